"""Data formats: rows of prompt + completion, chat ``messages`` or plain ``text``, tokenized with loss masks.

=====================  ==============================  ==========================================
format                 columns                         tokens that count in the loss
=====================  ==============================  ==========================================
``prompt-completion``  ``prompt``, ``completion``      the completion (and EOS)
``messages``           ``messages``: a list of         every assistant turn, as the model's own
                       ``{"role", "content"}``          chat template renders it (its end-of-turn
                                                       marker included)
``text``               ``text``                        every token (and EOS)
=====================  ==============================  ==========================================

The format is detected from the columns (:func:`detect_format`) or forced. With ``train_on_prompt``
every token counts. The first token of an example never does: nothing before it predicts it (so a
packed row, where the previous example's last token comes first, computes the same loss).

Chat rows are rendered with the model's Jinja chat template (:func:`lora_jax.models.tokenizers.
apply_chat_template`). Assistant turns are found without any template markup: for an assistant message
``i``, the conversation up to ``i`` rendered with the generation prompt must be a prefix of the
conversation up to and including ``i``, and that a prefix of the whole; the characters between are the
turn, and a token belongs to the turn its first character lies in.

Example:
    >>> detect_format(["prompt", "completion", "id"])
    'prompt-completion'
    >>> check_row({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
    ...           "messages", "chat.jsonl line 3")
    Traceback (most recent call last):
    ...
    lora_jax.data.errors.DataError: chat.jsonl line 3: field 'messages[1].role': 'bot' is not one of 'system', 'user', 'assistant'.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from lora_jax.data.errors import DataError

__all__ = [
    "COLUMNS",
    "FORMATS",
    "ROLES",
    "Encoded",
    "Encoder",
    "LabelSet",
    "answer_field",
    "check_row",
    "detect_format",
    "label_set",
    "special_tokens",
]

FORMATS = ("prompt-completion", "messages", "text")
COLUMNS = {"prompt-completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}
ROLES = ("system", "user", "assistant")


def detect_format(columns: Sequence[str], forced: str = "auto", where: str = "") -> str:
    """The format of rows with these columns (other columns are ignored).

    Raises:
        DataError: no format's columns are there (the columns are listed), or more than one format's
            are (choose with ``--format``).
    """
    at = f"{where}: " if where else ""
    cols = sorted(columns)
    if forced != "auto":
        if forced not in FORMATS:
            raise DataError(f"--format {forced!r} is not one of 'auto', {', '.join(map(repr, FORMATS))}.")
        missing = [c for c in COLUMNS[forced] if c not in columns]
        if missing:
            raise DataError(f"{at}--format {forced} needs the column(s) {missing}; found {cols}.")
        return forced
    found = [f for f in FORMATS if all(c in columns for c in COLUMNS[f])]
    if not found:
        raise DataError(
            f"{at}unknown columns {cols}: expected 'prompt' + 'completion', 'messages' or "
            f"'text' (rename the columns, or choose with --format)."
        )
    if len(found) > 1:
        raise DataError(f"{at}columns {cols} fit the formats {found}; choose one with --format.")
    return found[0]


def _kind(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def check_row(row: Mapping[str, Any], fmt: str, where: str, *, need_assistant: bool = True) -> None:
    """Checks one row's fields for ``fmt``.

    Raises:
        DataError: ``"{where}: field '{name}': {problem}"``: a missing or non-string value, an empty
            completion or text, ``messages`` that is not a list of ``{"role", "content"}`` objects, a
            role other than system/user/assistant, or (``need_assistant``) no assistant message.
    """

    def bad(field: str, problem: str):
        raise DataError(f"{where}: field {field!r}: {problem}.")

    if fmt == "messages":
        messages = row.get("messages")
        if isinstance(messages, str):
            bad("messages", 'is a string; expected a list of {"role", "content"} objects (JSON, not text)')
        if not isinstance(messages, (list, tuple)) or not messages:
            bad(
                "messages",
                f'expected a non-empty list of {{"role", "content"}} objects, found {_kind(messages)}',
            )
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                bad(f"messages[{i}]", f"expected an object with 'role' and 'content', found {_kind(m)}")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                bad(
                    f"messages[{i}].role",
                    (
                        f"{role!r} is not one of {', '.join(map(repr, ROLES))}"
                        if isinstance(role, str)
                        else f"missing or not a string ({_kind(role)})"
                    ),
                )
            if not isinstance(content, str):
                bad(f"messages[{i}].content", f"expected a string, found {_kind(content)}")
        if need_assistant and not any(m["role"] == "assistant" for m in messages):
            bad("messages", "has no assistant message, so nothing to learn (or use --train-on-prompt)")
        return
    for field in COLUMNS[fmt]:
        value = row.get(field)
        if not isinstance(value, str):
            bad(field, f"expected a string, found {_kind(value)}")
        if field != "prompt" and not value:
            bad(field, "is empty")


def answer_field(row: Mapping[str, Any], fmt: str) -> tuple[str | None, str | None]:
    """``(field name, text)`` of a row's answer: the completion, or the last assistant message."""
    if fmt == "prompt-completion":
        return "completion", row["completion"]
    if fmt == "messages":
        last = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
        if last:
            return f"messages[{last[-1]}].content", row["messages"][last[-1]]["content"]
    return None, None


# --- tokenization --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized example.

    Attributes:
        ids: token ids ``(n,)``.
        mask: loss weights ``(n,)`` in {0, 1}: 1 on tokens that count (``mask[0] == 0`` always).
        prompt_len: tokens before the answer (the completion or last assistant turn; ``n`` for text).
        answer_len: tokens of the answer (completion + EOS, or the last assistant turn; 0 for text).
    """

    ids: list[int]
    mask: list[int]
    prompt_len: int
    answer_len: int


# SmolLM2-135M-Instruct's special tokens (tokenizer.ggml.{bos,eos,padding}_token_id of the pinned GGUF: 1, 2, 2).
SMOLLM2_SPECIAL = {"bos": "<|im_start|>", "eos": "<|im_end|>"}


def special_tokens(model: str, tokenizer) -> dict[str, Any]:
    """``{"eos_id", "eos_token", "bos_token", "pad_id"}`` of a model (None where it has none).

    ``"smollm2-135m"`` and ``"tiny-llama"`` (the same tokenizer): the GGUF's (:data:`SMOLLM2_SPECIAL`); a
    Hugging Face folder: ``tokenizer_config.json`` (``eos_token``, ``bos_token``), else ``config.json``'s ids.
    """
    eos = bos = pad = None
    if model in ("smollm2-135m", "tiny-llama"):  # the pinned GGUF's metadata (not re-read: a slow parse)
        eos, bos = (
            tokenizer.token_to_id(SMOLLM2_SPECIAL["eos"]),
            tokenizer.token_to_id(SMOLLM2_SPECIAL["bos"]),
        )
        pad = eos
    else:
        folder = pathlib.Path(model)
        conf = _json(folder / "tokenizer_config.json")
        name = lambda v: v.get("content") if isinstance(v, Mapping) else v
        eos_t, bos_t = name(conf.get("eos_token")), name(conf.get("bos_token"))
        eos = tokenizer.token_to_id(eos_t) if isinstance(eos_t, str) else None
        bos = tokenizer.token_to_id(bos_t) if isinstance(bos_t, str) else None
        if eos is None:
            e = _json(folder / "config.json").get("eos_token_id")
            eos = e[0] if isinstance(e, list) and e else e if isinstance(e, int) else None
    token = lambda i: None if i is None else tokenizer.id_to_token(int(i))
    return {
        "eos_id": eos,
        "eos_token": token(eos),
        "bos_token": token(bos),
        "pad_id": pad if pad is not None else (eos if eos is not None else 0),
    }


def _json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


class Encoder:
    """Tokenizes rows of one format into :class:`Encoded` examples.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        fmt: one of :data:`FORMATS`.
        template: the chat template (``messages``; None: SmolLM2's).
        eos_id: appended after a completion or a text (None: nothing).
        train_on_prompt: every token counts, not only the answers.
        template_vars: more template variables (``bos_token``, ``eos_token``).
    """

    def __init__(
        self,
        tokenizer,
        fmt: str,
        *,
        template: str | None = None,
        eos_id: int | None = None,
        train_on_prompt: bool = False,
        template_vars: Mapping[str, Any] | None = None,
    ):
        from lora_jax.data.sentiment import _plain

        self.tok = _plain(tokenizer)
        self.fmt, self.template, self.eos_id = fmt, template, eos_id
        self.train_on_prompt = train_on_prompt
        self.template_vars = {k: v for k, v in (template_vars or {}).items() if v is not None}

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=special).ids

    def render(self, messages, generation_prompt: bool) -> str:
        from lora_jax.models.tokenizers import apply_chat_template

        return apply_chat_template(
            messages, add_generation_prompt=generation_prompt, template=self.template, **self.template_vars
        )

    def __call__(self, row: Mapping[str, Any], where: str = "") -> Encoded:
        """The tokens of a row (checked with :func:`check_row` first)."""
        check_row(row, self.fmt, where, need_assistant=not self.train_on_prompt)
        tail = [] if self.eos_id is None else [int(self.eos_id)]
        if self.fmt == "text":
            ids = self._ids(row["text"], True) + tail
            return self._finish(ids, [1] * len(ids), len(ids), 0)
        if self.fmt == "prompt-completion":
            p, c = self._ids(row["prompt"], True), self._ids(row["completion"], False) + tail
            return self._finish(p + c, [0] * len(p) + [1] * len(c), len(p), len(c))
        return self._chat(row["messages"], where)

    def _chat(self, messages, where: str) -> Encoded:
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        full = self.render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self.render(messages[:i], True), self.render(messages[: i + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DataError(
                    f"{where}: field 'messages[{i}]': the chat template does not render the "
                    f"conversation up to this turn as a prefix of the whole, so its tokens cannot "
                    f"be located; use --train-on-prompt or a prompt/completion file."
                )
            spans.append((len(before), len(upto)))
        enc = self.tok.encode(full, add_special_tokens=False)
        ids, starts = enc.ids, [s for s, _ in enc.offsets]
        inside = lambda s, span: span[0] <= s < span[1]
        mask = [int(any(inside(s, sp) for sp in spans)) for s in starts]
        if spans:
            last = spans[-1]
            first = next((j for j, s in enumerate(starts) if s >= last[0]), len(ids))
            prompt_len, answer_len = first, sum(1 for s in starts if inside(s, last))
        else:
            prompt_len, answer_len = len(ids), 0
        return self._finish(ids, mask, prompt_len, answer_len)

    def _finish(self, ids, mask, prompt_len, answer_len) -> Encoded:
        mask = [1] * len(ids) if self.train_on_prompt else list(mask)
        if mask:
            mask[0] = 0  # nothing predicts an example's first token
        return Encoded(list(ids), mask, prompt_len, answer_len)

    def with_answer(self, row: Mapping[str, Any], answer: str) -> dict:
        """A copy of ``row`` whose answer (completion, or last assistant message) is ``answer``."""
        row = dict(row)
        if self.fmt == "prompt-completion":
            row["completion"] = answer
        elif self.fmt == "messages":
            messages = [dict(m) for m in row["messages"]]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            messages[last]["content"] = answer
            row["messages"] = messages
        return row


# --- label sets ----------------------------------------------------------------------------------

MAX_LABELS = 20


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """Completions drawn from a few labels: ``names`` (stripped), ``texts`` (each label's answer as the
    data spell it, e.g. with a leading space), ``detected`` (True: found in the data, not ``--labels``)."""

    names: tuple[str, ...]
    texts: tuple[str, ...]
    detected: bool

    def index(self, answer: str) -> int:
        return self.names.index(answer.strip())


def label_set(answers: Sequence[tuple[str, str, str]], given: str | None = None) -> LabelSet | None:
    """The label set of the answers, given (``"a,b,c"``) or detected; None for free text.

    Detected when there are 2 to 20 distinct (stripped) answers and at most a quarter as many as answers.

    Args:
        answers: ``(where, field, answer)`` of every row, e.g. ``("train.jsonl line 3", "completion",
            " positive")``.
        given: ``--labels``.

    Raises:
        DataError: with ``given``: fewer than two labels, or an answer that is not one of them (free-text
            completions), naming the first such row and field.
    """
    counts = collections.Counter(a.strip() for _, _, a in answers)
    if given is not None:
        names = tuple(dict.fromkeys(x.strip() for x in given.split(",") if x.strip()))
        if len(names) < 2:
            raise DataError(f"--labels {given!r}: give at least two labels, comma-separated.")
        for where, field, answer in answers:
            if answer.strip() not in names:
                raise DataError(
                    f"{where}: field {field!r}: {answer[:60]!r} is not one of --labels "
                    f"{', '.join(map(repr, names))}; label accuracy needs every answer to be a "
                    f"label (drop --labels for free-text completions)."
                )
        detected = False
    else:
        if not 2 <= len(counts) <= min(MAX_LABELS, len(answers) // 4):
            return None
        names, detected = tuple(sorted(counts)), True
    spelled = collections.defaultdict(collections.Counter)
    for _, _, a in answers:
        spelled[a.strip()][a] += 1
    lead = " " if answers and all(a.startswith(" ") for _, _, a in answers) else ""
    texts = tuple(spelled[n].most_common(1)[0][0] if spelled[n] else lead + n for n in names)
    return LabelSet(names, texts, detected)
