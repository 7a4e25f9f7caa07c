"""Adapter files: the deltas alone (MBs, not GBs), and the merged model for export; never a pickle.

- **Adapter** (`save_adapter` / `load_adapter` / `adapter_info`): the deltas as safetensors, tensors
  ``{key path}/a`` and ``{key path}/b``, with a JSON header (``lora_jax`` entry, format
  ``ADAPTER_FORMAT``) holding the `LoraSpec`, the base model's identity and, per delta, its scale, axes,
  rank, kernel shape and a CRC32 of each array. Loading checks everything against the model and the
  file, lists every problem at once and loads nothing partially.
- **Spec as JSON** (`spec_to_json` / `spec_from_json`): the `LoraSpec` stored in that header.
- **Merged params** (`save_merged`): ``W + s·a·b`` folded in, as safetensors keyed by key path.

The training state for exact resume (deltas, optimizer state, step) is another thing, kept by
`lora_jax.checkpoint.TrainCheckpointer`.

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
    >>> adapter_info(path)["deltas"]["dense/kernel"]["weight_shape"]
    [16, 8]
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

from lora_jax._closest import closest
from lora_jax.core import _fit_problem, merge
from lora_jax.delta import LoraDelta, is_delta
from lora_jax.spec import LoraAxes, LoraSpec, path_str

__all__ = [
    "ADAPTER_FILE", "ADAPTER_FORMAT", "adapter_info", "load_adapter", "save_adapter", "save_merged",
    "spec_from_json", "spec_to_json",
]

ADAPTER_FORMAT = "lora_jax.adapter/1"
ADAPTER_FILE = "adapter.safetensors"


# ----------------------------------------------------------------------------------------------------
# LoraSpec <-> JSON


def spec_to_json(spec: LoraSpec) -> dict:
    """A JSON-able dict that `spec_from_json` turns back into an equal `LoraSpec`.

    Example:
        >>> d = spec_to_json(LoraSpec(rank=4, targets=".*/query/kernel"))
        >>> d["rank"], d["targets"], d["dtype"]
        (4, ['.*/query/kernel'], None)
    """
    return {
        "rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets), "exclude": list(spec.exclude),
        "rank_pattern": dict(spec.rank_pattern), "alpha_pattern": dict(spec.alpha_pattern),
        "rslora": spec.rslora, "init": spec.init, "dropout": spec.dropout,
        "dtype": None if spec.dtype is None else jnp.dtype(spec.dtype).name,
        "axes": {k: dataclasses.asdict(v) for k, v in dict(spec.axes).items()},
    }


def spec_from_json(d: dict) -> LoraSpec:
    """The `LoraSpec` that `spec_to_json` wrote (as stored in an adapter file's header).

    Example:
        >>> spec = LoraSpec(rank=4, axes={".*/qkv": LoraAxes(inputs=(0,), outputs=(1, 2))})
        >>> spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec
        True
    """
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
    crc32_a, crc32_b}}, "extra"}``. The file is written to a temporary name and renamed, so a reader
    never sees half an adapter.

    Raises:
        TypeError: a leaf of `deltas` is neither a `LoraDelta` nor None (names its key path).
        ValueError: `deltas` holds no `LoraDelta`.
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

    Args:
        path: the ``.safetensors`` file or its folder.

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
                         f"lora_jax.adapter.save_adapter.")
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

    Returns:
        A tree with the structure of `params`: a `LoraDelta` at each stored key path, None elsewhere.

    Raises:
        ValueError: a corrupted file (bad header, missing tensor, checksum mismatch), a delta path that is
            not in `params` (with the closest paths it has), a shape that does not fit its kernel, or a
            base-model mismatch. All problems are listed at once; nothing is loaded partially.
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
                    problems.append(f"{name}: not a parameter of this model (closest: {closest(name, by_path, n=3)})")
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


# ----------------------------------------------------------------------------------------------------
# Merged export


def save_merged(path, params: Any, deltas: Any, *, metadata: dict | None = None) -> pathlib.Path:
    """Writes ``lj.merge(params, deltas)`` as safetensors, one tensor per "/"-joined key path.

    Args:
        path: a ``.safetensors`` file, or a folder (the file is ``folder/merged.safetensors``).
        params: the base model's params.
        deltas: the deltas to fold in (same structure as `params`, None where there is no delta).
        metadata: JSON-able metadata, stored under the header's ``lora_jax_merged`` entry.

    Returns:
        The file written.
    """
    from safetensors.numpy import save_file

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
