"""WordPiece tokenizers for BERT checkpoints (MiniLM and any Hugging Face BERT folder).

A Hugging Face BERT folder ships either a ``tokenizer.json`` (the fast tokenizer, read as is) or only
``vocab.txt`` plus ``tokenizer_config.json``; from those :func:`load_wordpiece` builds the same pipeline
as ``transformers.BertTokenizerFast``: BERT normalizer (clean text, Chinese characters, lowercase and
accent stripping as configured), BERT pre-tokenizer, WordPiece with ``##`` continuations, and the
``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` templates.

Tokenizers carry mutable padding/truncation state. The helpers here never change the tokenizer they
are given: :func:`configured` returns a configured copy and :func:`encode` works on such a copy.

Example:
    >>> tok = from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "##s"])
    >>> tok.encode("The movies").ids
    [2, 5, 6, 7, 3]
    >>> batch = encode(tok, ["the movie", "movies"], max_len=6)
    >>> batch["input_ids"].tolist()
    [[2, 5, 6, 3, 0, 0], [2, 6, 7, 3, 0, 0]]
    >>> batch["attention_mask"].tolist()
    [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def from_vocab(
    vocab: Sequence[str] | dict[str, int],
    *,
    lowercase: bool = True,
    strip_accents: bool | None = None,
    handle_chinese_chars: bool = True,
    unk_token: str = "[UNK]",
    cls_token: str = "[CLS]",
    sep_token: str = "[SEP]",
    max_input_chars_per_word: int = 100,
) -> tokenizers.Tokenizer:
    """Builds a BERT WordPiece tokenizer from a vocabulary (a list in id order, or token -> id).

    ``strip_accents=None`` follows ``lowercase``, as in BERT.
    """
    if not isinstance(vocab, dict):
        vocab = {token: i for i, token in enumerate(vocab)}
    missing = [t for t in (unk_token, cls_token, sep_token) if t not in vocab]
    if missing:
        raise ValueError(
            f"WordPiece vocabulary lacks the special tokens {missing}; a BERT vocabulary needs "
            f"{unk_token!r}, {cls_token!r} and {sep_token!r} (pass other names via unk_token=/cls_token=/sep_token=)."
        )
    tok = tokenizers.Tokenizer(
        models.WordPiece(vocab, unk_token=unk_token, max_input_chars_per_word=max_input_chars_per_word)
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=handle_chinese_chars,
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab[cls_token], vocab[sep_token]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(cls_token, cls_id), (sep_token, sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = [t for t in SPECIAL_TOKENS if t in vocab]
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def load_wordpiece(folder: str | pathlib.Path) -> tokenizers.Tokenizer:
    """Loads the tokenizer of a Hugging Face BERT folder.

    Reads ``tokenizer.json`` when present; otherwise builds a WordPiece tokenizer from ``vocab.txt``,
    lowercasing (and stripping accents) as ``tokenizer_config.json`` says (``do_lower_case``,
    ``strip_accents``, ``tokenize_chinese_chars``, special-token names; BERT's defaults when absent).

    Raises:
        FileNotFoundError: the folder has neither ``tokenizer.json`` nor ``vocab.txt``.
    """
    folder = pathlib.Path(folder)
    if (folder / "tokenizer.json").is_file():
        return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab_file = folder / "vocab.txt"
    if not vocab_file.is_file():
        raise FileNotFoundError(
            f"no tokenizer in {str(folder)!r}: expected 'tokenizer.json' or 'vocab.txt' (a BERT WordPiece "
            f"vocabulary, one token per line)."
        )
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokens = vocab_file.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens = tokens[:-1]
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token.rstrip("\r"), i)
    names = {
        k: config[k] if isinstance(config.get(k), str) else default
        for k, default in (("unk_token", "[UNK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]"))
    }
    return from_vocab(
        vocab,
        lowercase=bool(config.get("do_lower_case", True)),
        strip_accents=config.get("strip_accents"),
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        **names,
    )


def pad_id(tokenizer: tokenizers.Tokenizer, default: int = 0) -> int:
    """The tokenizer's padding id: its padding setting, else ``[PAD]``/``<pad>``, else ``default``."""
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|pad|>"):
        i = tokenizer.token_to_id(token)
        if i is not None:
            return int(i)
    return default


def configured(
    tokenizer: tokenizers.Tokenizer,
    max_len: int | None = None,
    *,
    pad: bool = True,
    pad_token_id: int | None = None,
) -> tokenizers.Tokenizer:
    """A copy of ``tokenizer`` that truncates to ``max_len`` and (``pad=True``) right-pads to exactly ``max_len``.

    ``max_len=None`` turns both truncation and padding off. Truncation keeps room for the special
    tokens the post-processor adds (``[CLS]``/``[SEP]``).
    """
    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}.")
        tok.enable_truncation(max_length=max_len)
        if pad:
            pid = pad_id(tokenizer) if pad_token_id is None else pad_token_id
            token = tokenizer.id_to_token(pid) or "[PAD]"
            tok.enable_padding(direction="right", pad_id=pid, pad_token=token, length=max_len)
    return tok


def encode(
    tokenizer: tokenizers.Tokenizer, texts: Sequence[str], max_len: int, *, add_special_tokens: bool = True
) -> dict[str, np.ndarray]:
    """Tokenizes, truncates and right-pads ``texts`` to ``max_len``.

    Returns:
        ``input_ids``, ``attention_mask``, ``token_type_ids``: int32 arrays of shape ``(len(texts), max_len)``.
    """
    tok = configured(tokenizer, max_len)
    encodings = tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    return {
        "input_ids": np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), max_len),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32).reshape(
            len(texts), max_len
        ),
        "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int32).reshape(len(texts), max_len),
    }
