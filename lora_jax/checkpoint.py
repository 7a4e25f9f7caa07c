"""Training checkpoints: the train state for exact resume (orbax), apart from the adapter files.

`TrainCheckpointer` saves deltas, optimizer state, step and data position every N steps with an orbax
``CheckpointManager`` (asynchronously; the last K kept), never with pickle. The arrays are stored as one
flat dict ``{leaf_00000: ...}`` next to a JSON record of every leaf's key path, shape and dtype, so
restoring into a different model or optimizer is a clear ``ValueError`` listing the differences, never a
silent partial load, and a failed restore deletes nothing. `TrainCheckpointer.metadata` reads that JSON
record (and whatever the caller stored with it) without touching the arrays.

The adapter files (the deltas alone, and the merged export) live in `lora_jax.adapter`; their names are
re-exported here (``lora_jax.checkpoint.save_adapter is lora_jax.adapter.save_adapter``) so code written
against this module keeps working.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Adapter files moved to lora_jax.adapter; re-exported so `lj.checkpoint.save_adapter(...)` keeps working.
from lora_jax.adapter import (ADAPTER_FILE, ADAPTER_FORMAT, adapter_info, load_adapter, save_adapter,
                              save_merged, spec_from_json, spec_to_json)
from lora_jax.spec import path_str

__all__ = [
    "TrainCheckpointer",
    # re-exported from lora_jax.adapter
    "ADAPTER_FILE", "ADAPTER_FORMAT", "adapter_info", "load_adapter", "save_adapter", "save_merged",
    "spec_from_json", "spec_to_json",
]


def _describe(tree) -> tuple[list, list[str], list[dict]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = [path_str(p) for p, _ in leaves]
  shapes = [{"shape": list(np.shape(x)), "dtype": jnp.dtype(x.dtype).name} for _, x in leaves]
  return [x for _, x in leaves], paths, shapes


class TrainCheckpointer:
  """Saves and restores ``(state, meta)``: ``state`` any pytree of arrays, ``meta`` a JSON dict.

  An orbax ``CheckpointManager`` under ``directory`` (async saves, ``keep`` most recent,
  ``every`` steps apart). ``meta`` holds the step and data position and whatever the caller adds.

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
        save_interval_steps=max(1, int(every)), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def metadata(self, step: int | None = None) -> dict:
    """The JSON metadata stored with a checkpoint, read without touching its arrays.

    It is the ``meta`` dict given to `save`, plus ``step`` and the leaf record ``paths`` (key paths)
    and ``leaves`` (shape and dtype of each), the same dict `restore` returns.

    Args:
      step: which checkpoint; None means the latest.

    Raises:
      ValueError: no checkpoint in the directory, none at `step`, or its metadata cannot be read
        (corrupted or incomplete). Nothing is deleted.

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
        raise ValueError(f"no checkpoint in {str(self.directory)!r}, so no metadata to read (save one "
                         f"first, or give the directory a run wrote its checkpoints to).")
    elif int(step) not in self.all_steps():
      raise ValueError(f"no checkpoint at step {step} in {str(self.directory)!r}; the steps there are "
                       f"{sorted(self.all_steps())}.")
    step = int(step)
    ocp = self._ocp
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise ValueError(f"{self._where(step)} cannot be read (corrupted or incomplete?): {type(e).__name__}: "
                       f"{e}. Nothing was deleted; move the folder away to restart from an earlier "
                       f"step.") from None
    if not isinstance(meta, dict):
      raise ValueError(f"{self._where(step)} holds no metadata dict (found {type(meta).__name__}): it was "
                       f"not written by TrainCheckpointer? Nothing was deleted.")
    return meta

  def _where(self, step: int) -> str:
    return f"checkpoint {str(self.directory / str(step))!r}"

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves when `step` is due (every N) or `force`; returns whether a save was started."""
    leaves, paths, shapes = _describe(state)
    flat = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
    meta = {**meta, "step": int(step), "paths": paths, "leaves": shapes}
    args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(flat),
                                    meta=self._ocp.args.JsonSave(meta))
    return bool(self.manager.save(int(step), args=args, force=force))

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores into the structure, shapes, dtypes and shardings of `template` (arrays or
    ``jax.ShapeDtypeStruct``s); the latest step by default.

    Raises:
      FileNotFoundError: no checkpoint in the directory.
      ValueError: the checkpoint does not match `template` (every difference listed), or cannot be
        read (corrupted). Nothing is deleted in either case.
    """
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {str(self.directory)!r}")
    where = self._where(step)
    meta = self.metadata(step)
    leaves, paths, shapes = _describe(template)
    problems = []
    if "paths" not in meta or "leaves" not in meta:
      problems.append("its metadata lacks the leaf record (not written by TrainCheckpointer?)")
    else:
      if meta["paths"] != paths:
        missing = sorted(set(paths) - set(meta["paths"]))[:6]
        extra = sorted(set(meta["paths"]) - set(paths))[:6]
        problems.append(f"state structure differs: in the model but not the checkpoint {missing}; in the "
                        f"checkpoint but not the model {extra} ({len(meta['paths'])} vs {len(paths)} leaves)")
      else:
        for p, want, got in zip(paths, shapes, meta["leaves"]):
          if want != got:
            problems.append(f"{p}: expected {want['dtype']}{tuple(want['shape'])}, found "
                            f"{got['dtype']}{tuple(got['shape'])}")
    if problems:
      raise ValueError(f"{where} does not match this run ({len(problems)} problem(s)); nothing was restored "
                       f"or deleted. Use another checkpoint directory, or the settings the checkpoint was "
                       f"made with:\n  " + "\n  ".join(problems[:20]))

    def abstract(x):
      sharding = getattr(x, "sharding", None)
      return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    target = {f"leaf_{i:05d}": abstract(x) for i, x in enumerate(leaves)}
    try:
      flat = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:
      raise ValueError(f"{where} cannot be read (corrupted or incomplete?): {type(e).__name__}: {e}. "
                       f"Nothing was deleted; move the folder away to restart from an earlier step.") from None
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[f"leaf_{i:05d}"] for i in range(len(leaves))]), meta

  def wait(self) -> None:
    """Blocks until the pending async save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
