"""Byte-level BPE tokenizer rebuilt from GGUF metadata, and SmolLM2's chat template.

A GGUF file carries its tokenizer as metadata: the vocabulary (``tokenizer.ggml.tokens``), the BPE
merges (``tokenizer.ggml.merges``), token types (3 = control/special) and the pre-tokenizer family
(``tokenizer.ggml.pre``). :func:`bpe_from_gguf` turns that into a Hugging Face ``tokenizers.Tokenizer``
(GPT-2 style byte-level BPE) that encodes exactly like the original ``tokenizer.json``.

Example:
    >>> apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +NORMALIZE_WHITESPACE
    '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging
    Face<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lora_jax.models.gguf import _field

__all__ = ["SMOLLM2_SYSTEM_PROMPT", "apply_chat_template", "bpe_from_gguf", "special_ids"]

SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

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
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def special_ids(path_or_reader: Any) -> dict[str, int | None]:
    """``{"bos": id, "eos": id, "pad": id, "unk": id}`` from GGUF metadata (None where absent)."""
    from lora_jax.models.gguf import read_gguf

    reader = read_gguf(path_or_reader)
    return {k: _field(reader, f"tokenizer.ggml.{name}_token_id", None)
            for k, name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}


def apply_chat_template(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                        system_prompt: str = SMOLLM2_SYSTEM_PROMPT) -> str:
    """SmolLM2's ChatML prompt: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.

    Same output as the ``tokenizer.chat_template`` stored in SmolLM2's GGUF: a default system message
    is put first unless the first message is a system message, and ``add_generation_prompt`` opens the
    assistant's turn.

    Args:
      messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
    """
    parts = []
    for i, msg in enumerate(messages):
        if not {"role", "content"} <= set(msg):
            raise ValueError(f"messages[{i}] must have 'role' and 'content', got keys {sorted(msg)}.")
        if i == 0 and msg["role"] != "system":
            parts.append(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
        parts.append(f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
