"""Fixed-length rows from tokenized examples: one example per row (right-padded), or packed with segment ids.

Packing (``--pack``) puts several examples into each row of ``max_len`` tokens (best-fit decreasing:
longest first, each into the fullest row it fits), so far fewer positions are padding. A packed row's
``attention_mask`` holds segment ids: 1, 2, ... for the row's 1st, 2nd, ... example and 0 on padding
(0/1 for a row of one example, as before). With :func:`segment_apply` the Llama model attends only
within a segment (a block-diagonal causal mask) and restarts positions at 0 in each, so a packed
example computes exactly the logits it computes alone; with its first token's loss weight 0 (nothing
in its own segment predicts it), the packed loss equals the unpacked loss.

Example:
    >>> rows = pack_rows([([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1]), ([4], [0])], max_len=4)
    >>> rows["input_ids"].tolist(), rows["attention_mask"].tolist()
    ([[5, 6, 7, 4], [8, 9, 0, 0]], [[1, 1, 1, 2], [1, 1, 0, 0]])
    >>> rows["loss_mask"].tolist()
    [[0, 1, 1, 0], [0, 1, 0, 0]]
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["pack", "pack_rows", "pad_rows", "padding_fraction", "segment_apply"]

Example = tuple[Sequence[int], Sequence[int]]  # (ids, loss mask)


def pad_rows(examples: Sequence[Example], max_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One example per row, right-padded: int32 ``input_ids``, ``attention_mask``, ``loss_mask``
    ``(n, max_len)``. Examples must already fit (``len <= max_len``)."""
    out = _empty(len(examples), max_len, pad_id)
    for r, (ids, mask) in enumerate(examples):
        _put(out, r, 0, ids, mask, 1)
    return out


def pack(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing bins: lists of example indices (ascending) whose lengths sum to <= ``max_len``.

    Deterministic: examples are taken longest first (ties by index), each into the row with the least
    room that still holds it, else a new row; rows are ordered by their first example.

    Raises:
        ValueError: an example longer than ``max_len``.
    """
    if any(n > max_len for n in lengths):
        raise ValueError(
            f"an example of {max(lengths)} tokens does not fit in max_len={max_len}; truncate first."
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin), sorted
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(room, (n, -1))
        if j < len(room):
            free, b = room.pop(j)
        else:
            free, b = max_len, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(room, (free - n, b))
    rows = [sorted(b) for b in bins]
    return sorted(rows, key=lambda r: r[0])


def pack_rows(examples: Sequence[Example], max_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Examples packed into rows (see :func:`pack`): ``attention_mask`` holds segment ids (0 = padding)."""
    bins = pack([len(ids) for ids, _ in examples], max_len)
    out = _empty(len(bins), max_len, pad_id)
    for r, members in enumerate(bins):
        at = 0
        for seg, i in enumerate(members, start=1):
            ids, mask = examples[i]
            _put(out, r, at, ids, mask, seg)
            at += len(ids)
    return out


def padding_fraction(arrays: dict[str, np.ndarray]) -> float:
    """Fraction of positions that are padding (``attention_mask == 0``)."""
    m = np.asarray(arrays["attention_mask"])
    return float((m == 0).mean()) if m.size else 0.0


def segment_apply(apply_fn: Callable) -> Callable:
    """``f(variables, ids, attention_mask=segment_ids, **kw)`` calling ``apply_fn`` with a 0/1 mask and
    ``segment_ids``, for packed rows: a model apply (e.g. ``Llama.apply``) that accepts ``segment_ids``.
    A 0/1 mask is a row of one segment, so unpacked rows compute what they computed before."""

    def fn(variables, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:
            return apply_fn(variables, input_ids, **kwargs)
        return apply_fn(
            variables, input_ids, attention_mask=attention_mask > 0, segment_ids=attention_mask, **kwargs
        )

    return fn


def _empty(n: int, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros((n, max_len), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    out["input_ids"][:] = pad_id
    return out


def _put(out, row, at, ids, mask, segment):
    n = len(ids)
    out["input_ids"][row, at : at + n] = ids
    out["attention_mask"][row, at : at + n] = segment
    out["loss_mask"][row, at : at + n] = mask
