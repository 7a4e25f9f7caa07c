"""CRC32 checksums of pytree leaves, also when an array is sharded across processes.

Used by `lora_jax.checkpoint` (train-state checkpoints) and `lora_jax.adapter` (adapter files). A
checksum covers the bytes of a leaf's host value in C order and native byte order, so it does not
depend on how the array was sharded when it was computed or checked.

A leaf's record is:

- an int, the CRC32 of the whole array, when the process can address the array in full (every array in
  a single-process run, and replicated or process-local ones);
- ``{"blocks": [[[[start, stop], ...], crc], ...]}`` for an array sharded across processes (each
  process holds only its shards): one CRC32 per distinct block of the array's sharding. Each process
  computes the CRCs of the blocks it holds, and one small all-gather gives every process every record,
  so the metadata that the primary process writes covers each block exactly once.

`corrupted_leaves` checks restored values against the records: each process checks the blocks that lie
within its own shards; the verdicts are combined with an all-gather; an array with a block that no
process holds whole (restored with another sharding) is gathered whole to every host and checked there
(a collective; adapters and their optimizer state are small). Every process returns the same answer.

Example:
    >>> import numpy as np
    >>> records = checksums([np.arange(3.0), np.zeros((2, 2), np.float32)])
    >>> corrupted_leaves(records, [np.arange(3.0), np.ones((2, 2), np.float32)])
    [1]
"""

from __future__ import annotations

import json
import zlib

import jax
import numpy as np

__all__ = ["checksums", "corrupted_leaves", "crc32", "json_crc32", "valid_records"]

_UNKNOWN, _OK, _BAD = 0, 1, 2


def crc32(x) -> int:
    """CRC32 of the bytes of host array `x` (C order, native byte order), as an unsigned int.

    Example:
        >>> crc32(np.zeros(2, np.uint8)) == crc32(np.zeros((1, 2), np.uint8))
        True
    """
    return zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8)) & 0xFFFFFFFF


def json_crc32(record: dict, own_key: str) -> int:
    """CRC32 of a JSON header `record` without its own checksum entry `own_key`, as canonical JSON (sorted
    keys, no spaces): the header checksum of adapters, quantized bases and checkpoint metadata.

    Example:
        >>> json_crc32({"a": 1, "crc": 5}, "crc") == json_crc32({"a": 1}, "crc")
        True
    """
    body = {k: v for k, v in record.items() if k != own_key}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()) & 0xFFFFFFFF


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))


def _spans_processes(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _block(index: tuple, shape: tuple) -> tuple:
    """A shard's index (a tuple of slices) as ``((start, stop), ...)``."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _slices(block) -> tuple:
    return tuple(slice(int(a), int(b)) for a, b in block)


def _within(block, outer) -> bool:
    return all(o0 <= b0 and b1 <= o1 for (b0, b1), (o0, o1) in zip(block, outer))


def _allgather(x: np.ndarray) -> np.ndarray:
    """``(processes, *x.shape)``: `x` from every process (a collective)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def _gather_whole(y) -> np.ndarray:
    """The whole value of an array that spans processes, on every host (a collective)."""
    from jax.experimental import multihost_utils

    return _host(multihost_utils.process_allgather(y, tiled=True))


def checksums(leaves: list) -> list:
    """One checksum record per leaf (see the module docstring).

    Copies every leaf to the host. A collective when a leaf spans processes: then every process must
    call it with the same leaves.
    """
    records: list = [None] * len(leaves)
    sharded = []  # (leaf index, blocks, [crc or None per block])
    for i, x in enumerate(leaves):
        if not _spans_processes(x):
            records[i] = crc32(_host(x))
            continue
        shape = tuple(x.shape)
        blocks = sorted({_block(idx, shape) for idx in x.sharding.devices_indices_map(shape).values()})
        local = {}
        for shard in x.addressable_shards:
            b = _block(shard.index, shape)
            if b not in local:
                local[b] = crc32(np.asarray(shard.data))
        sharded.append((i, blocks, [local.get(b) for b in blocks]))
    if sharded:  # the same leaves span processes on every process, so every process joins
        crcs = [c for _, _, cs in sharded for c in cs]
        held = _allgather(np.array([c is not None for c in crcs], np.int32))
        value = _allgather(np.array([c or 0 for c in crcs], np.uint32).view(np.int32)).view(np.uint32)
        owner = held.argmax(axis=0)  # every block has a holder: every device belongs to some process
        crcs = [int(value[owner[j], j]) for j in range(len(crcs))]
        k = 0
        for i, blocks, _ in sharded:
            records[i] = {
                "blocks": [[[list(b) for b in block], crcs[k + j]] for j, block in enumerate(blocks)]
            }
            k += len(blocks)
    return records


def _check_full(record, host: np.ndarray) -> int:
    if isinstance(record, dict):
        return _OK if all(crc32(host[_slices(b)]) == c for b, c in record["blocks"]) else _BAD
    return _OK if crc32(host) == record else _BAD


def _check_local(record, y) -> list[int]:
    """Per block of `record`: whether it matches this process's shards of `y`, or _UNKNOWN."""
    if not isinstance(record, dict):
        return [_UNKNOWN]
    shape = tuple(y.shape)
    shards = [(_block(s.index, shape), s) for s in y.addressable_shards]
    out = []
    for block, crc in record["blocks"]:
        block = tuple(tuple(b) for b in block)
        holder = next(((outer, s) for outer, s in shards if _within(block, outer)), None)
        if holder is None:
            out.append(_UNKNOWN)
            continue
        outer, shard = holder
        local = tuple(slice(b0 - o0, b1 - o0) for (b0, b1), (o0, _) in zip(block, outer))
        out.append(_OK if crc32(np.asarray(shard.data)[local]) == crc else _BAD)
    return out


def corrupted_leaves(records: list, values: list) -> list[int]:
    """Indices of the `values` that do not match their checksum `records` (from `checksums`).

    A collective when a value spans processes (every process must call it; all return the same list).
    """
    status = []  # per leaf: one entry per block, or one for the whole leaf
    for record, y in zip(records, values, strict=True):
        status.append(_check_local(record, y) if _spans_processes(y) else [_check_full(record, _host(y))])
    if jax.process_count() > 1:
        sizes = [len(s) for s in status]
        merged = _allgather(np.array([v for s in status for v in s], np.int32)).max(axis=0)
        status = np.split(merged, np.cumsum(sizes)[:-1])
    bad = []
    for i, s in enumerate(status):
        if _BAD in s:
            bad.append(i)
        elif _UNKNOWN in s and _check_full(records[i], _gather_whole(values[i])) == _BAD:
            bad.append(i)  # the same leaves are unknown on every process, so every process gathers
    return bad


def valid_records(records, shapes: list) -> bool:
    """Whether `records` is a well-formed list of checksum records for leaves of these `shapes`."""
    if not isinstance(records, list) or len(records) != len(shapes):
        return False
    for r, shape in zip(records, shapes):
        if isinstance(r, dict):
            blocks = r.get("blocks")
            if not isinstance(blocks, list) or not all(
                isinstance(b, list)
                and len(b) == 2
                and isinstance(b[1], int)
                and isinstance(b[0], list)
                and len(b[0]) == len(shape)
                for b in blocks
            ):
                return False
        elif not isinstance(r, int) or isinstance(r, bool):
            return False
    return True
