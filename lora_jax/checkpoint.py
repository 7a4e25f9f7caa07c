"""Training checkpoints: the train state for exact resume (orbax), apart from the adapter files.

`TrainCheckpointer` saves deltas, optimizer state, step and data position every N steps with an orbax
``CheckpointManager`` (asynchronously; the last K kept), never with pickle. The arrays are stored as one
flat dict ``{leaf_00000: ...}`` next to a JSON record of every leaf's key path, shape and dtype, so
restoring into a different model or optimizer is a clear ``ValueError`` listing the differences, never a
silent partial load, and a failed restore deletes nothing. `TrainCheckpointer.metadata` reads that JSON
record (and whatever the caller stored with it) without touching the arrays.

Integrity: orbax and tensorstore do not checksum the array data, so a flipped bit in an array file would
restore as a silently wrong value. The JSON record therefore also holds a CRC32 of every leaf's bytes
(``crc32``, computed on the host when the save starts) and a CRC32 of the record itself
(``meta_crc32``); `TrainCheckpointer.restore` checks both and raises a ``ValueError`` naming the step and
the key paths that differ, deleting nothing. An older step is restored on purpose with
``restore(template, step=...)``, after `TrainCheckpointer.set_aside_after` has moved the newer ones away.

Under several processes (each holding only its shards of an array), a leaf's checksum is one CRC per
block of its sharding, computed by the process that holds the block and gathered for the record; see
`lora_jax._checksums` for what is computed where and how a restore with another sharding is checked.

Checkpoints written before these checksums existed restore with a warning that they are unverified.

The adapter files (the deltas alone, and the merged export) live in `lora_jax.adapter`; their names are
re-exported here (``lora_jax.checkpoint.save_adapter is lora_jax.adapter.save_adapter``) so code written
against this module keeps working.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Adapter files moved to lora_jax.adapter; re-exported so `lj.checkpoint.save_adapter(...)` keeps working.
from lora_jax._checksums import checksums, corrupted_leaves, json_crc32, valid_records
from lora_jax.adapter import (
    ADAPTER_FILE,
    ADAPTER_FORMAT,
    adapter_info,
    load_adapter,
    save_adapter,
    save_merged,
    spec_from_json,
    spec_to_json,
)
from lora_jax.spec import path_str

__all__ = [
    "TrainCheckpointer",
    # re-exported from lora_jax.adapter
    "ADAPTER_FILE",
    "ADAPTER_FORMAT",
    "adapter_info",
    "load_adapter",
    "save_adapter",
    "save_merged",
    "spec_from_json",
    "spec_to_json",
]

CRC_KEY = "crc32"  # metadata entry: one checksum record per leaf, aligned with "paths"
META_CRC_KEY = "meta_crc32"  # metadata entry: CRC32 of the canonical JSON of the rest of the metadata


def _describe(tree) -> tuple[list, list[str], list[dict]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [path_str(p) for p, _ in leaves]
    shapes = [{"shape": list(np.shape(x)), "dtype": jnp.dtype(x.dtype).name} for _, x in leaves]
    return [x for _, x in leaves], paths, shapes


class TrainCheckpointer:
    """Saves and restores ``(state, meta)``: ``state`` any pytree of arrays, ``meta`` a JSON dict.

    An orbax ``CheckpointManager`` under ``directory`` (async saves, ``keep`` most recent,
    ``every`` steps apart). ``meta`` holds the step and data position and whatever the caller adds, plus
    the checksums that `restore` verifies.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> ckpt = TrainCheckpointer(tempfile.mkdtemp(), every=1, keep=2)
      >>> ckpt.save(3, {"w": jnp.arange(3.0)}, {"data_position": 3})
      True
      >>> ckpt.wait()
      >>> state, meta = ckpt.restore({"w": jnp.zeros(3)})
      >>> state["w"].tolist(), meta["step"], meta["data_position"]
      ([0.0, 1.0, 2.0], 3, 3)
      >>> ckpt.close()
    """

    def __init__(self, directory, *, every: int = 100, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = pathlib.Path(directory).absolute()
        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(every)),
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata stored with a checkpoint, read without touching its arrays.

        It is the ``meta`` dict given to `save`, plus ``step``, the leaf record ``paths`` (key paths) and
        ``leaves`` (shape and dtype of each), and the checksums ``crc32`` (one per leaf) and
        ``meta_crc32``: the same dict `restore` returns. The metadata's own checksum is verified here.

        Args:
          step: which checkpoint; None means the latest.

        Raises:
          ValueError: no checkpoint in the directory, none at `step`, or its metadata cannot be read or
            fails its checksum (corrupted or incomplete). Nothing is deleted.

        Example:
          >>> import tempfile, jax.numpy as jnp
          >>> ckpt = TrainCheckpointer(tempfile.mkdtemp(), every=1)
          >>> ckpt.save(5, {"w": jnp.zeros((2, 3))}, {"data_position": 40})
          True
          >>> ckpt.wait()
          >>> meta = ckpt.metadata()
          >>> meta["step"], meta["data_position"], meta["paths"], meta["leaves"]
          (5, 40, ['w'], [{'shape': [2, 3], 'dtype': 'float32'}])
          >>> ckpt.close()
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(
                    f"no checkpoint in {str(self.directory)!r}, so no metadata to read (save one "
                    f"first, or give the directory a run wrote its checkpoints to)."
                )
        elif _as_step(step) not in self.all_steps():
            raise ValueError(
                f"no checkpoint at step {step} in {str(self.directory)!r}; the steps there are "
                f"{self.all_steps()}."
            )
        step = _as_step(step)
        ocp = self._ocp
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise ValueError(
                f"{self._where(step)} cannot be read (corrupted or incomplete?): {_short(e)}. Nothing "
                f"was deleted; move the folder away to restart from an earlier step."
            ) from None
        if not isinstance(meta, dict):
            raise ValueError(
                f"{self._where(step)} holds no metadata dict (found {type(meta).__name__}): it was "
                f"not written by TrainCheckpointer? Nothing was deleted."
            )
        # Both checksums are written together: one without the other means a corrupted key.
        if (CRC_KEY in meta) != (META_CRC_KEY in meta) or meta.get(META_CRC_KEY, None) not in (
            None,
            json_crc32(meta, META_CRC_KEY),
        ):
            raise ValueError(
                f"{self._where(step)} (step {step}) is corrupted: its metadata does not match its "
                f"checksum {META_CRC_KEY}. Nothing was deleted; {self._earlier(step)}"
            )
        return meta

    def _where(self, step: int) -> str:
        return f"checkpoint {str(self.directory / str(step))!r}"

    def _earlier(self, step: int) -> str:
        earlier = [s for s in self.all_steps() if s < step]
        if not earlier:
            return "there is no earlier checkpoint here; move the folder away to start over."
        return (
            f"restore an earlier step ({earlier}) with restore(..., step=...), after set_aside_after(step) "
            f"has moved the newer ones away, or move the folder away."
        )

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves when `step` is due (every N) or `force`; returns whether a save was started.

        When it saves, every leaf of `state` is copied to the host to compute its CRC32 before the
        (asynchronous) write starts; under several processes that includes one small all-gather of the
        checksums, so every process must call `save` with the same `step` (as orbax requires anyway).

        Raises:
          TypeError: `meta` is not JSON-able.
        """
        step = _as_step(step)
        if not force and not self.manager.should_save(step):
            return False
        leaves, paths, shapes = _describe(state)
        flat = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
        meta = {k: v for k, v in meta.items() if k not in (CRC_KEY, META_CRC_KEY)}
        meta = {**meta, "step": step, "paths": paths, "leaves": shapes, CRC_KEY: checksums(leaves)}
        try:  # the JSON round trip normalizes what JSON changes (tuples, int keys), as the reader will see it
            meta = json.loads(json.dumps(meta, allow_nan=True))
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"TrainCheckpointer.save: meta must be JSON-able (dicts, lists, str, numbers, bools, "
                f"None): {e}"
            ) from None
        meta[META_CRC_KEY] = json_crc32(meta, META_CRC_KEY)
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(flat), meta=self._ocp.args.JsonSave(meta)
        )
        return bool(self.manager.save(step, args=args, force=force))

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into the structure, shapes, dtypes and shardings of `template` (arrays or
        ``jax.ShapeDtypeStruct``s), and verifies every leaf against the checksums stored with it.

        Args:
          template: the state's structure, as given to `save`.
          step: which checkpoint (one of `all_steps`); None means the latest. To go back to an older step
            on purpose and train on from there, restore it and call ``set_aside_after(step)`` before the
            next `save` (orbax saves no step at or below the latest one on disk).

        Returns:
          ``(state, meta)``: the restored state and the metadata (see `metadata`).

        Raises:
          FileNotFoundError: no checkpoint in the directory.
          ValueError: no checkpoint at `step` (the steps there are listed); the checkpoint does not match
            `template` (every difference listed); it cannot be read; or a leaf does not match its checksum
            (corrupted: the step and the key paths are named). Nothing is deleted in any case.
        """
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {str(self.directory)!r}")
        meta = self.metadata(step)
        step = _as_step(step)
        where = self._where(step)
        leaves, paths, shapes = _describe(template)
        problems = []
        if "paths" not in meta or "leaves" not in meta:
            problems.append("its metadata lacks the leaf record (not written by TrainCheckpointer?)")
        else:
            if meta["paths"] != paths:
                missing = sorted(set(paths) - set(meta["paths"]))[:6]
                extra = sorted(set(meta["paths"]) - set(paths))[:6]
                problems.append(
                    f"state structure differs: in the model but not the checkpoint {missing}; in the "
                    f"checkpoint but not the model {extra} ({len(meta['paths'])} vs {len(paths)} leaves)"
                )
            else:
                for p, want, got in zip(paths, shapes, meta["leaves"]):
                    if want != got:
                        problems.append(
                            f"{p}: expected {want['dtype']}{tuple(want['shape'])}, found "
                            f"{got['dtype']}{tuple(got['shape'])}"
                        )
        if problems:
            raise ValueError(
                f"{where} does not match this run ({len(problems)} problem(s)); nothing was restored "
                f"or deleted. Use another checkpoint directory, or the settings the checkpoint was "
                f"made with:\n  " + "\n  ".join(problems[:20])
            )
        records = meta.get(CRC_KEY)
        if records is None and META_CRC_KEY not in meta:
            warnings.warn(
                f"{where} was written without checksums (an older lora_jax): its arrays are restored "
                f"unverified.",
                stacklevel=2,
            )
        elif not valid_records(records, [s["shape"] for s in shapes]):
            raise ValueError(
                f"{where} (step {step}) is corrupted: its checksum record {CRC_KEY!r} is missing or "
                f"malformed. Nothing was restored or deleted; {self._earlier(step)}"
            )

        def abstract(x):
            sharding = getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

        target = {f"leaf_{i:05d}": abstract(x) for i, x in enumerate(leaves)}
        try:
            flat = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except Exception as e:
            raise ValueError(
                f"{where} cannot be read (corrupted or incomplete?): {_short(e)}. Nothing was deleted; "
                f"{self._earlier(step)}"
            ) from None
        values = [flat[f"leaf_{i:05d}"] for i in range(len(leaves))]
        if records is not None:
            bad = corrupted_leaves(records, values)
            if bad:
                names = [paths[i] for i in bad]
                raise ValueError(
                    f"{where} (step {step}) is corrupted: {len(bad)} of {len(paths)} leaves do not match "
                    f"the checksums saved with them: {names[:10]}{' ...' if len(names) > 10 else ''}. "
                    f"Nothing was restored or deleted; {self._earlier(step)}"
                )
        treedef = jax.tree_util.tree_structure(template)
        return jax.tree_util.tree_unflatten(treedef, values), meta

    def set_aside_after(self, step: int) -> list[pathlib.Path]:
        """Moves every checkpoint newer than `step` into ``directory/set_aside/`` (nothing is deleted).

        For going back to an older checkpoint on purpose (e.g. the latest one is corrupted): after
        ``restore(template, step=step)``, the run's next saves at later steps are not skipped as "older than
        the latest checkpoint", and `latest_step` is `step` again. Waits for a pending save first. Under
        several processes, call it on every process (process 0 moves the folders, then all synchronize).

        Returns:
          Where the checkpoints went (``set_aside/<step>``, or ``set_aside/<step>.<n>`` if that exists).

        Raises:
          ValueError: no checkpoint at `step`.
        """
        step = _as_step(step)
        self.wait()
        if step not in self.all_steps():
            raise ValueError(
                f"no checkpoint at step {step} in {str(self.directory)!r}; the steps there are "
                f"{self.all_steps()}."
            )
        moved = {}
        for s in (s for s in self.all_steps() if s > step):
            dest, n = self.directory / "set_aside" / str(s), 1
            while dest.exists():
                dest, n = self.directory / "set_aside" / f"{s}.{n}", n + 1
            moved[s] = dest
        _sync(
            f"lora_jax.TrainCheckpointer.set_aside_after({step}):start"
        )  # every process has chosen the names
        if jax.process_index() == 0:
            for s, dest in moved.items():
                dest.parent.mkdir(parents=True, exist_ok=True)
                (self.directory / str(s)).rename(dest)
        _sync(f"lora_jax.TrainCheckpointer.set_aside_after({step}):done")
        self.manager.reload()
        return list(moved.values())

    def wait(self) -> None:
        """Blocks until the pending async save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _short(e: Exception) -> str:
    """``Type: message`` of an orbax / tensorstore error, without the tensorstore spec it appends."""
    text = " ".join(str(e).split()).split(" [tensorstore_spec")[0]
    return f"{type(e).__name__}: {text[:400]}{' ...' if len(text) > 400 else ''}"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _as_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, found {step!r}")
    return int(step)
