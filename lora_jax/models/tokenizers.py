"""Byte-level BPE tokenizer rebuilt from GGUF metadata, and chat templates rendered with Jinja.

A GGUF file carries its tokenizer as metadata: the vocabulary (``tokenizer.ggml.tokens``), the BPE
merges (``tokenizer.ggml.merges``), token types (3 = control/special) and the pre-tokenizer family
(``tokenizer.ggml.pre``). :func:`bpe_from_gguf` turns that into a Hugging Face ``tokenizers.Tokenizer``
(GPT-2 style byte-level BPE) that encodes exactly like the original ``tokenizer.json``.

A chat model's prompt format is its own Jinja template (``tokenizer.chat_template`` in a GGUF,
``chat_template`` in ``tokenizer_config.json``); :func:`apply_chat_template` renders it the way
transformers' ``apply_chat_template`` does (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``,
``raise_exception``). The default template is SmolLM2-135M-Instruct's.

Example:
    >>> apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +NORMALIZE_WHITESPACE
    '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging
    Face<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from lora_jax.models.gguf import _field

__all__ = [
    "SMOLLM2_CHAT_TEMPLATE",
    "SMOLLM2_SYSTEM_PROMPT",
    "apply_chat_template",
    "bpe_from_gguf",
    "bpe_from_gguf_file",
    "chat_template",
    "special_ids",
]

SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2-135M-Instruct's chat template, verbatim from its GGUF (``tokenizer.chat_template``).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# llama.cpp pre-tokenizer names -> whether digits are split one by one before the byte-level regex.
_PRE_DIGITS = {"smollm": True, "starcoder": True, "refact": True, "gpt2": False, "default": False}
_CONTROL = 3  # gguf.TokenType.CONTROL


def bpe_from_gguf(path_or_reader: Any):
    """A ``tokenizers.Tokenizer`` from the tokenizer metadata of a GGUF file (or ``GGUFReader``).

    Special (control) tokens such as ``<|im_start|>`` are registered so they are never split; no BOS
    is added (SmolLM2 uses none). The BOS/EOS/padding ids are given by :func:`special_ids`.

    Raises:
      ValueError: the file's tokenizer is not byte-level BPE, or its pre-tokenizer is unknown.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from lora_jax.models.gguf import read_gguf

    reader = read_gguf(path_or_reader)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2').")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_DIGITS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_DIGITS)}.")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_DIGITS[pre]:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def bpe_from_gguf_file(path: str | os.PathLike):
    """`bpe_from_gguf` of a GGUF file, kept as tokenizer JSON beside it for the next call.

    Parsing a GGUF file's metadata (a vocabulary and merges of ~100k strings) takes seconds, the JSON a
    fraction of one. The JSON is ``<file>.tokenizer-<size>-<mtime_ns>.json``, so a changed file is read
    again; it is written to a temporary file and renamed (concurrent processes never read half of one),
    and not written at all where the folder is read-only.

    Example (needs the asset)::

        tok = bpe_from_gguf_file(lora_jax.assets.fetch("smollm2-135m"))
    """
    from tokenizers import Tokenizer

    from lora_jax.models.gguf import read_gguf

    path = pathlib.Path(os.fspath(path))
    stat = path.stat()
    cached = path.with_name(f"{path.name}.tokenizer-{stat.st_size}-{stat.st_mtime_ns}.json")
    try:
        return Tokenizer.from_str(cached.read_text(encoding="utf-8"))
    except Exception:  # absent or unreadable (tokenizers raises a plain Exception): rebuilt below
        pass
    tok = bpe_from_gguf(read_gguf(path))
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(tok.to_str(), encoding="utf-8")
        os.replace(tmp, cached)
    except OSError:  # a read-only cache folder: no cache, the same tokenizer
        tmp.unlink(missing_ok=True)
    return tok


def special_ids(path_or_reader: Any) -> dict[str, int | None]:
    """``{"bos": id, "eos": id, "pad": id, "unk": id}`` from GGUF metadata (None where absent)."""
    from lora_jax.models.gguf import read_gguf

    reader = read_gguf(path_or_reader)
    return {
        k: _field(reader, f"tokenizer.ggml.{name}_token_id", None)
        for k, name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
    }


def chat_template(name_or_path: str | os.PathLike) -> str | None:
    """The chat template of a model: ``"smollm2-135m"`` (its GGUF), a GGUF file, or a Hugging Face folder.

    A folder's template is ``chat_template.jinja`` or ``chat_template`` in ``tokenizer_config.json``.
    ``None`` when the model has none (e.g. BERT).
    """
    if name_or_path == "smollm2-135m":
        from lora_jax import assets

        name_or_path = assets.fetch("smollm2-135m")
    path = pathlib.Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        from lora_jax.models.gguf import read_gguf

        return _field(read_gguf(path), "tokenizer.chat_template", None)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "tokenizer_config.json").is_file():
        template = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get(
            "chat_template"
        )
        return template if isinstance(template, str) else None
    return None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """A Jinja template compiled as transformers does: sandboxed, trim/lstrip blocks, its globals."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def apply_chat_template(
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    system_prompt: str | None = None,
    template: str | None = None,
    **kwargs: Any,
) -> str:
    """Renders ``messages`` with a model's chat template (default: SmolLM2's ChatML template).

    Args:
      messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
      add_generation_prompt: open the assistant's turn at the end.
      system_prompt: put first as a system message unless the first message is one (``None``: the
        template's own default, SmolLM2's "You are a helpful AI assistant named SmolLM, ...").
      template: the Jinja template (see :func:`chat_template`); ``None``: :data:`SMOLLM2_CHAT_TEMPLATE`.
      **kwargs: more template variables, e.g. ``bos_token``.

    Raises:
      ValueError: a message without ``role``/``content``, a template that does not compile, or one that
        rejects the messages (its ``raise_exception``).
    """
    import jinja2

    for i, msg in enumerate(messages):
        if not {"role", "content"} <= set(msg):
            raise ValueError(f"messages[{i}] must have 'role' and 'content', got keys {sorted(msg)}.")
    chat = [dict(m) for m in messages]
    if system_prompt is not None and not (chat and chat[0]["role"] == "system"):
        chat.insert(0, {"role": "system", "content": system_prompt})
    try:
        return _compile(SMOLLM2_CHAT_TEMPLATE if template is None else template).render(
            messages=chat, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None
