"""From ``--data`` to tokenized examples: read the splits, detect the format, tokenize (cached), build rows.

:func:`load_files` reads the files (:mod:`~lora_jax.data.files`), detects the format from the
columns (:mod:`~lora_jax.data.formats`), carves a validation split if none is given and finds the
label set; nothing is tokenized yet. :meth:`FileData.tokenize` then tokenizes the rows a process asks
for (its own share) and caches them in an ``.npz`` file keyed by everything that decides the tokens
(the files' contents, the tokenizer, the chat template, the format and flags), so a resumed run reads
them back. :func:`build_rows` cuts examples to ``max_len`` (or drops them) and pads or packs them into
fixed-shape rows.

Tokens are stored whole (not cut to ``max_len``): :class:`Tokenized` is ragged, ``ids[offsets[i]:
offsets[i + 1]]`` is example ``i``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from lora_jax.data import files as files_lib
from lora_jax.data import formats, packing
from lora_jax.data.files import DataError

__all__ = ["FileData", "Tokenized", "build_rows", "load_files"]

CACHE_VERSION = 1


class _Where:
    """``table.where(row)``, computed only when an error message is formatted."""

    def __init__(self, table, row):
        self.table, self.row = table, row

    def __str__(self):
        return self.table.where(self.row)

    __format__ = lambda self, spec: format(str(self), spec)


@dataclasses.dataclass
class Tokenized:
    """Tokenized examples, ragged.

    Attributes:
        rows: ``(n,)`` the table row of each example.
        ids: ``(total,)`` int32 token ids of all examples, back to back.
        mask: ``(total,)`` int8 loss weights.
        offsets: ``(n + 1,)`` int64; example ``i`` is ``[offsets[i], offsets[i + 1])``.
        prompt_len, answer_len: ``(n,)`` int32 (see :class:`~lora_jax.data.formats.Encoded`).
        label: ``(n,)`` int32 index into the label set, -1 without one.
    """

    rows: np.ndarray
    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    prompt_len: np.ndarray
    answer_len: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, rows: Sequence[int]) -> Tokenized:
        """The examples of these table rows, in this order (all must be here)."""
        where = {int(r): i for i, r in enumerate(self.rows)}
        idx = [where[int(r)] for r in rows]
        parts = [self.example(i) for i in idx]
        return _assemble(
            np.asarray(rows, np.int64), parts, self.prompt_len[idx], self.answer_len[idx], self.label[idx]
        )

    def save(self, path: pathlib.Path) -> None:
        """Writes an ``.npz`` atomically (a temporary file renamed into place)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **dataclasses.asdict(self))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: pathlib.Path) -> Tokenized:
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})


def _assemble(rows, parts, prompt_len, answer_len, label) -> Tokenized:
    lengths = [len(ids) for ids, _ in parts]
    offsets = np.zeros(len(parts) + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    cat = lambda i, dt: np.concatenate([np.asarray(p[i], dt) for p in parts]) if parts else np.zeros(0, dt)
    return Tokenized(
        np.asarray(rows, np.int64),
        cat(0, np.int32),
        cat(1, np.int8),
        offsets,
        np.asarray(prompt_len, np.int32),
        np.asarray(answer_len, np.int32),
        np.asarray(label, np.int32),
    )


@dataclasses.dataclass
class FileData:
    """The splits of ``--data``, read but not tokenized.

    Attributes:
        format: the rows' format.
        encoder: tokenizes a row.
        labels: the label set of the answers, or None (free text).
        train_table, val_table: the rows of each split's files (the same table when validation is carved).
        train_rows, val_rows: the table rows of each split, in order.
        carved: validation was carved from the training files (``--val-fraction``).
        ignored: columns no format uses.
        fingerprint: sha256 of every data file (names and contents).
        files: the files of each split.
    """

    format: str
    encoder: formats.Encoder
    labels: formats.LabelSet | None
    train_table: files_lib.Table
    val_table: files_lib.Table
    train_rows: np.ndarray
    val_rows: np.ndarray
    carved: bool
    ignored: list[str]
    fingerprint: str
    files: dict[str, list[pathlib.Path]]
    cache_key: str

    def tokenize(
        self, split: str, rows: Sequence[int], cache_dir: str | os.PathLike | None = None, tag: str = ""
    ) -> Tokenized:
        """Tokenizes these rows of ``split``'s table (cached in ``cache_dir`` when given).

        Raises:
            DataError: a row that fails :func:`~lora_jax.data.formats.check_row`.
        """
        table = self.train_table if split == "train" else self.val_table
        rows = np.asarray(rows, np.int64)
        path = None
        if cache_dir is not None:
            key = hashlib.sha256((self.cache_key + split).encode() + rows.tobytes()).hexdigest()[:20]
            path = pathlib.Path(cache_dir) / f"tokens-{split}{'-' + tag if tag else ''}-{key}.npz"
            if path.is_file():
                try:
                    return Tokenized.load(path)
                except (OSError, ValueError, KeyError):
                    pass  # unreadable: tokenize again
        parts, plen, alen, label = [], [], [], []
        ds = table.dataset.select(rows.tolist()) if len(rows) else []
        for r, row in zip(rows.tolist(), ds):
            where = _Where(table, r)
            enc = self.encoder(row, where)
            parts.append((enc.ids, enc.mask))
            plen.append(enc.prompt_len)
            alen.append(enc.answer_len)
            label.append(self.labels.index(formats.answer_field(row, self.format)[1]) if self.labels else -1)
        out = _assemble(rows, parts, plen, alen, label)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            out.save(path)
        return out

    def rows_of(self, split: str, rows: Sequence[int]) -> list[dict]:
        """The raw rows (dicts) of ``split`` at these table rows."""
        table = self.train_table if split == "train" else self.val_table
        return list(table.dataset.select([int(r) for r in rows]))

    def where(self, split: str, row: int) -> str:
        return (self.train_table if split == "train" else self.val_table).where(int(row))


def load_files(
    data: str,
    tokenizer,
    *,
    model: str,
    fmt: str = "auto",
    val_fraction: float = 0.1,
    train_on_prompt: bool = False,
    labels: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> FileData:
    """Reads ``--data`` and prepares its tokenization (nothing is tokenized yet).

    Args:
        data: the ``--data`` value (see :func:`~lora_jax.data.files.parse_data_arg`).
        tokenizer: the model's ``tokenizers.Tokenizer``.
        model: the model name or folder (for its chat template and special tokens).
        fmt: ``"auto"`` or one of :data:`~lora_jax.data.formats.FORMATS`.
        val_fraction: held out from the training files when there is no validation file.
        train_on_prompt: every token counts in the loss.
        labels: ``--labels`` (``"a,b,c"``), or None to detect a label set.
        cache_dir: ``datasets``' Arrow cache.

    Raises:
        DataError: see :func:`~lora_jax.data.files.read_table`, :func:`~lora_jax.data.formats.detect_format`,
            :func:`~lora_jax.data.formats.label_set`.
    """
    from lora_jax.models import tokenizers

    split_files = files_lib.parse_data_arg(data)
    arrow = None if cache_dir is None else pathlib.Path(cache_dir) / "arrow"
    train = files_lib.read_table(split_files["train"], arrow)
    found = formats.detect_format(train.columns, fmt, where=split_files["train"][0].name)
    if "validation" in split_files:
        val = files_lib.read_table(split_files["validation"], arrow)
        vfmt = formats.detect_format(val.columns, fmt, where=split_files["validation"][0].name)
        if vfmt != found:
            raise DataError(
                f"{split_files['validation'][0].name}: {vfmt} rows, but the training files hold "
                f"{found} rows; both splits must have one format."
            )
        train_rows, val_rows, carved = np.arange(len(train)), np.arange(len(val)), False
    else:
        val = train
        train_rows, val_rows = files_lib.carve(len(train), val_fraction)
        carved = True
    if labels is not None and found == "text":
        raise DataError(
            f"--labels {labels!r}: text rows have no completions to be labels; use "
            f"prompt/completion or messages rows, or drop --labels."
        )

    special = formats.special_tokens(model, tokenizer)
    template = None if model == "tiny-llama" else tokenizers.chat_template(model)
    if found == "messages" and template is None and model not in ("tiny-llama", "smollm2-135m"):
        raise DataError(
            f"messages rows need a chat template, and the model {model!r} has none "
            f"(chat_template in tokenizer_config.json); use prompt/completion rows."
        )
    encoder = formats.Encoder(
        tokenizer,
        found,
        template=template,
        eos_id=special["eos_id"],
        train_on_prompt=train_on_prompt,
        template_vars={"bos_token": special["bos_token"], "eos_token": special["eos_token"]},
    )

    label_set = None
    if found != "text":
        answers = (
            _answers(train, np.arange(len(train)), found)
            if carved
            # in file order
            else _answers(train, train_rows, found) + _answers(val, val_rows, found)
        )
        label_set = formats.label_set(answers, labels)
    digest = files_lib.data_fingerprint(data)
    key = json.dumps(
        {
            "v": CACHE_VERSION,
            "data": digest,
            "format": found,
            "template": template,
            "eos": special["eos_id"],
            "tokenizer": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
            "train_on_prompt": train_on_prompt,
            "labels": label_set and list(label_set.texts),
            "val_fraction": val_fraction if carved else None,
        }
    )
    ignored = [c for c in train.columns if c not in formats.COLUMNS[found]]
    return FileData(
        found,
        encoder,
        label_set,
        train,
        val,
        train_rows,
        val_rows,
        carved,
        ignored,
        digest,
        split_files,
        hashlib.sha256(key.encode()).hexdigest(),
    )


def _answers(table, rows, fmt) -> list[tuple[Any, str, str]]:
    """``(where, field, answer)`` of every row that has an answer (rows are checked as they are read)."""
    out = []
    col = table.dataset["messages" if fmt == "messages" else "completion"]
    for r in np.asarray(rows).tolist():
        value = col[r]
        row = {"messages": value} if fmt == "messages" else {"prompt": "", "completion": value}
        formats.check_row(row, fmt, _Where(table, r), need_assistant=False)
        field, answer = formats.answer_field(row, fmt)
        if field is not None:
            out.append((_Where(table, r), field, answer))
    return out


def build_rows(
    tok: Tokenized, max_len: int, *, pad_id: int = 0, drop_long: bool = False, pack: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fixed-shape rows of ``tok``'s examples and what it took.

    Examples longer than ``max_len`` are cut to their first ``max_len`` tokens, or dropped with
    ``drop_long``. Rows: one example each (:func:`~lora_jax.data.packing.pad_rows`), or packed
    (:func:`~lora_jax.data.packing.pack_rows`).

    Returns:
        ``(arrays, stats)``: ``input_ids``, ``attention_mask``, ``loss_mask`` int32 ``(rows, max_len)``
        and ``example`` (the first example index of each row); stats ``examples``, ``long`` (over
        ``max_len``), ``truncated``, ``dropped``, ``no_loss`` (examples left without a loss token),
        ``rows``, ``tokens``, ``padding`` (fraction), ``padding_unpacked``.
    """
    examples, kept, long = [], [], 0
    no_loss = 0
    for i in range(len(tok)):
        ids, mask = tok.example(i)
        if len(ids) > max_len:
            long += 1
            if drop_long:
                continue
            ids, mask = ids[:max_len], mask[:max_len]
        if not mask.any():
            no_loss += 1
        examples.append((ids, mask))
        kept.append(i)
    tokens = int(sum(len(ids) for ids, _ in examples))
    unpacked_padding = 1.0 - tokens / max(len(examples) * max_len, 1)
    arrays = (
        packing.pack_rows(examples, max_len, pad_id) if pack else packing.pad_rows(examples, max_len, pad_id)
    )
    stats = {
        "examples": len(examples),
        "long": long,
        "truncated": 0 if drop_long else long,
        "dropped": long if drop_long else 0,
        "no_loss": no_loss,
        "rows": int(len(arrays["input_ids"])),
        "tokens": tokens,
        "padding": packing.padding_fraction(arrays),
        "padding_unpacked": unpacked_padding,
    }
    return arrays, stats
