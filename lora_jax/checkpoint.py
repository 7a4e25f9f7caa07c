"""Checkpoints: the train state for exact resume (orbax), adapter-only files, merged params.

Three things get written, none of them with pickle:

- **Train state** (`TrainCheckpointer`): deltas, optimizer state, step and data position, saved every
  N steps by an orbax ``CheckpointManager`` (asynchronously; the last K kept). The arrays are stored as
  one flat dict ``{leaf_00000: ...}`` next to a JSON record of every leaf's key path, shape and dtype,
  so restoring into a different model or optimizer is a clear ``ValueError`` listing the differences,
  never a silent partial load, and a failed restore deletes nothing.
- **Adapter** (`save_adapter` / `load_adapter`): the deltas alone (MBs, not GBs) as safetensors, with a
  JSON header holding the `LoraSpec`, the base model's identity and, per delta, its key path, scale,
  axes and a CRC32 of each array, so a corrupted or mismatched file is detected on load.
- **Merged params** (`save_merged`): ``W + s·a·b`` folded in, as safetensors keyed by key path.

Example:
  >>> import jax, jax.numpy as jnp, tempfile, os
  >>> import lora_jax as lj
  >>> params = {"dense": {"kernel": jnp.ones((16, 8))}}
  >>> spec = lj.LoraSpec(rank=2, targets=".*/kernel")
  >>> deltas = lj.init(jax.random.key(0), params, spec)
  >>> path = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
  >>> _ = save_adapter(path, deltas, spec, base_model={"name": "toy"}, verbose=False)
  >>> back = load_adapter(path, params)
  >>> bool(jnp.array_equal(back["dense"]["kernel"].a, deltas["dense"]["kernel"].a))
  True
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core import _fit_problem
from lora_jax.delta import LoraDelta, is_delta
from lora_jax.spec import LoraAxes, LoraSpec, path_str

__all__ = [
    "ADAPTER_FORMAT", "ADAPTER_FILE", "TrainCheckpointer", "adapter_info", "load_adapter", "save_adapter",
    "save_merged", "spec_from_json", "spec_to_json",
]

ADAPTER_FORMAT = "lora_jax.adapter/1"
ADAPTER_FILE = "adapter.safetensors"


# ----------------------------------------------------------------------------------------------------
# LoraSpec <-> JSON


def spec_to_json(spec: LoraSpec) -> dict:
  """A JSON-able dict that `spec_from_json` turns back into an equal `LoraSpec`."""
  return {
      "rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets), "exclude": list(spec.exclude),
      "rank_pattern": dict(spec.rank_pattern), "alpha_pattern": dict(spec.alpha_pattern),
      "rslora": spec.rslora, "init": spec.init, "dropout": spec.dropout,
      "dtype": None if spec.dtype is None else jnp.dtype(spec.dtype).name,
      "axes": {k: dataclasses.asdict(v) for k, v in dict(spec.axes).items()},
  }


def spec_from_json(d: dict) -> LoraSpec:
  d = dict(d)
  d["axes"] = {k: LoraAxes(**v) for k, v in d.get("axes", {}).items()}
  d["targets"], d["exclude"] = tuple(d["targets"]), tuple(d.get("exclude", ()))
  return LoraSpec(**d)


# ----------------------------------------------------------------------------------------------------
# Adapter files


def _adapter_file(path) -> pathlib.Path:
  path = pathlib.Path(path)
  return path / ADAPTER_FILE if path.is_dir() or path.suffix != ".safetensors" else path


def _crc(x: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(x).tobytes()) & 0xFFFFFFFF


def save_adapter(path, deltas: Any, spec: LoraSpec, *, base_model: dict | None = None,
                 extra: dict | None = None, verbose: bool = True) -> pathlib.Path:
  """Writes the deltas alone as safetensors with a JSON header; returns the file written.

  Args:
    path: a ``.safetensors`` file, or a folder (the file is ``folder/adapter.safetensors``).
    deltas: from `lj.init` / training (any sharding; gathered to the host).
    spec: the `LoraSpec` the deltas were made with (stored, for `adapter_info`).
    base_model: JSON-able identity of the base model (name, config), checked by `load_adapter`.
    extra: any other JSON-able metadata (e.g. accuracy).
    verbose: print the file size.

  Tensors are named ``{key path}/a`` and ``{key path}/b``; the header ``lora_jax`` entry holds
  ``{"format", "spec", "base_model", "deltas": {path: {scale, axes, dropout, rank, weight_shape,
  crc32_a, crc32_b}}, "extra"}``.
  """
  from safetensors.numpy import save_file

  file = _adapter_file(path)
  file.parent.mkdir(parents=True, exist_ok=True)
  flat = jax.tree_util.tree_flatten_with_path(deltas, is_leaf=is_delta)[0]
  tensors, record = {}, {}
  for p, d in flat:
    if d is None:
      continue
    if not is_delta(d):
      raise TypeError(f"{path_str(p)}: expected a LoraDelta or None in deltas, found {type(d).__name__}")
    name = path_str(p)
    a = np.asarray(jax.device_get(d.a))
    b = np.asarray(jax.device_get(d.b))
    tensors[f"{name}/a"], tensors[f"{name}/b"] = a, b
    record[name] = {"scale": d.scale, "axes": dataclasses.asdict(d.axes), "dropout": d.dropout,
                    "rank": d.rank, "weight_shape": list(d.weight_shape()),
                    "crc32_a": _crc(a), "crc32_b": _crc(b)}
  if not record:
    raise ValueError("save_adapter: deltas hold no LoraDelta (nothing to save).")
  header = {"format": ADAPTER_FORMAT, "spec": spec_to_json(spec), "base_model": base_model or {},
            "deltas": record, "extra": extra or {}}
  tmp = file.with_name(file.name + ".tmp")
  save_file(tensors, str(tmp), metadata={"lora_jax": json.dumps(header)})
  os.replace(tmp, file)  # a reader never sees a half-written adapter
  if verbose:
    size = file.stat().st_size
    print(f"adapter: {file} ({size / 2**20:.2f} MiB, {len(record)} deltas, "
          f"{sum(t.size for t in tensors.values()):,} parameters)")
  return file


def adapter_info(path) -> dict:
  """The JSON header of an adapter file (``format``, ``spec``, ``base_model``, ``deltas``, ``extra``).

  Raises:
    ValueError: missing file, not safetensors, or no lora_jax header (names the file).
  """
  from safetensors import safe_open

  file = _adapter_file(path)
  if not file.is_file():
    raise ValueError(f"adapter file not found: {str(file)!r} (give the file or the folder holding "
                     f"{ADAPTER_FILE}).")
  try:
    with safe_open(str(file), "np") as f:
      meta = f.metadata() or {}
  except Exception as e:  # safetensors raises its own error types for a bad header
    raise ValueError(f"{str(file)!r} is not a readable safetensors adapter (corrupted or truncated?): "
                     f"{e}") from None
  if "lora_jax" not in meta:
    raise ValueError(f"{str(file)!r} has no lora_jax header: it is not an adapter written by "
                     f"lora_jax.checkpoint.save_adapter.")
  try:
    header = json.loads(meta["lora_jax"])
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(file)!r}: the lora_jax header is not valid JSON (corrupted?): {e}") from None
  if header.get("format") != ADAPTER_FORMAT:
    raise ValueError(f"{str(file)!r}: unknown adapter format {header.get('format')!r}, expected "
                     f"{ADAPTER_FORMAT!r}.")
  return header


def load_adapter(path, params: Any, *, base_model: dict | None = None) -> Any:
  """Reads an adapter and returns deltas with the structure of `params`, after checking everything.

  Args:
    path: the ``.safetensors`` file or its folder.
    params: the base model's params (arrays or ``jax.ShapeDtypeStruct``s), e.g. Linen variables.
    base_model: if given, must equal the identity stored at save time (e.g. ``{"name": ...}``; only
      the keys given here are compared).

  Raises:
    ValueError: a corrupted file (bad header, missing tensor, checksum mismatch), a delta path that is
      not in `params`, a shape that does not fit its kernel, or a base-model mismatch. All problems
      are listed at once; nothing is loaded partially.
  """
  from safetensors import safe_open

  header = adapter_info(path)
  file = _adapter_file(path)
  problems = []
  if base_model:
    stored = header.get("base_model", {})
    for k, v in base_model.items():
      if stored.get(k) != v:
        problems.append(f"base model {k!r}: the adapter was made for {stored.get(k)!r}, this model is {v!r}")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  by_path = {path_str(p): i for i, (p, _) in enumerate(leaves)}
  out: list = [None] * len(leaves)
  try:
    with safe_open(str(file), "np") as f:
      names = set(f.keys())
      for name, rec in header["deltas"].items():
        if name not in by_path:
          close = sorted(by_path, key=lambda q: -_similarity(q, name))[:3]
          problems.append(f"{name}: not a parameter of this model (closest: {close})")
          continue
        if f"{name}/a" not in names or f"{name}/b" not in names:
          problems.append(f"{name}: tensors {name}/a or {name}/b missing from the file (corrupted?)")
          continue
        a, b = f.get_tensor(f"{name}/a"), f.get_tensor(f"{name}/b")
        if _crc(a) != rec["crc32_a"] or _crc(b) != rec["crc32_b"]:
          problems.append(f"{name}: checksum mismatch, the file is corrupted")
          continue
        try:
          d = LoraDelta(jnp.asarray(a), jnp.asarray(b), scale=float(rec["scale"]),
                        axes=LoraAxes(**rec["axes"]), dropout=float(rec["dropout"]))
        except (TypeError, ValueError, KeyError) as e:
          problems.append(f"{name}: malformed delta record {rec} ({e})")
          continue
        expected = tuple(getattr(leaves[by_path[name]][1], "shape", ()))
        why = _fit_problem(d, expected)
        if why:
          problems.append(f"{name}: does not fit the model's kernel of shape {expected}: {why}")
          continue
        out[by_path[name]] = d
  except ValueError:
    raise
  except Exception as e:
    raise ValueError(f"{str(file)!r} could not be read (corrupted or truncated?): {e}") from None
  if problems:
    raise ValueError(f"adapter {str(file)!r} does not fit this model ({len(problems)} problem(s)); nothing "
                     f"was loaded:\n  " + "\n  ".join(problems))
  return jax.tree_util.tree_unflatten(treedef, out)


def _similarity(a: str, b: str) -> float:
  import difflib
  return difflib.SequenceMatcher(None, a, b).ratio()


def save_merged(path, params: Any, deltas: Any, *, metadata: dict | None = None) -> pathlib.Path:
  """Writes ``lj.merge(params, deltas)`` as safetensors, one tensor per "/"-joined key path."""
  from safetensors.numpy import save_file

  from lora_jax.core import merge

  file = pathlib.Path(path)
  if file.suffix != ".safetensors":
    file = file / "merged.safetensors"
  file.parent.mkdir(parents=True, exist_ok=True)
  merged = merge(params, deltas)
  tensors = {path_str(p): np.asarray(jax.device_get(x))
             for p, x in jax.tree_util.tree_flatten_with_path(merged)[0]}
  tmp = file.with_name(file.name + ".tmp")
  save_file(tensors, str(tmp), metadata={"lora_jax_merged": json.dumps(metadata or {})})
  os.replace(tmp, file)
  return file


# ----------------------------------------------------------------------------------------------------
# Train state (orbax)


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
    where = f"checkpoint {str(self.directory / str(step))!r}"
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise ValueError(f"{where} cannot be read (corrupted or incomplete?): {type(e).__name__}: {e}. "
                       f"Nothing was deleted; move the folder away to restart from an earlier step.") from None
    leaves, paths, shapes = _describe(template)
    problems = []
    if not isinstance(meta, dict) or "paths" not in meta or "leaves" not in meta:
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
                       f"or deleted. Use another --out folder, or the flags the checkpoint was made "
                       f"with:\n  " + "\n  ".join(problems[:20]))

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
