"""Save and load a quantized base as safetensors (never a pickle), so quantizing is done once.

One tensor per array: ``{key path}`` for a dense leaf, ``{key path}::codes``, ``::scales``,
``::scale_scales``, ``::scale_offset`` (and ``::outlier_index``, ``::outlier_values`` with outlier rows) for
a `QuantizedArray`, and a JSON header (``lora_jax_quantized``
entry, format ``QUANT_FORMAT``) with the model's name and, per leaf, its shape, dtype and quantization.
bfloat16 arrays are stored as their uint16 bits. Loading checks the file, the model name, the
quantization format and (given a template) every path and shape, and names what differs.

Example:
    >>> import jax.numpy as jnp, tempfile, os
    >>> from lora_jax.quant.tree import QuantSpec, quantize
    >>> q = quantize({"dense": {"kernel": jnp.ones((64, 8)), "bias": jnp.zeros(8)}}, QuantSpec())
    >>> f = save(os.path.join(tempfile.mkdtemp(), "base.safetensors"), q, model="toy")
    >>> back = load(f, model="toy", format="nf4")
    >>> bool(jnp.array_equal(back["dense"]["kernel"].codes, q["dense"]["kernel"].codes))
    True
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._closest import closest
from lora_jax.quant.array import QuantizedArray, QuantMeta, is_quantized
from lora_jax.spec import path_str

__all__ = ["QUANT_FORMAT", "save", "load", "info"]

QUANT_FORMAT = "lora_jax.quantized_base/2"
# Version 1 files (no outlier rows) read the same; a file with outlier rows is written as version 2 so
# that a reader of version 1, which knows no outlier tensors, refuses it instead of decoding zeros there.
_READABLE = ("lora_jax.quantized_base/1", QUANT_FORMAT)
_KEY = "lora_jax_quantized"
_PARTS = ("codes", "scales", "scale_scales", "scale_offset", "outlier_index", "outlier_values")


def _to_numpy(x) -> np.ndarray:
    a = np.asarray(jax.device_get(x))
    return a.view(np.uint16) if a.dtype == jnp.bfloat16 else a


def _from_numpy(a: np.ndarray, dtype: str):
    return jnp.asarray(a.view(jnp.bfloat16) if dtype == "bfloat16" else a)


def save(path, params: Any, *, model: str | None = None) -> pathlib.Path:
    """Writes `params` (quantized leaves and dense ones) to a ``.safetensors`` file; returns the file.

    Args:
        path: the file (``.safetensors`` added when missing).
        params: a params tree, typically from `lj.quantize`.
        model: the model's name (e.g. ``"smollm2-135m"``), checked again by `load`.
    """
    from safetensors.numpy import save_file

    file = pathlib.Path(path)
    if file.suffix != ".safetensors":
        file = file.with_suffix(".safetensors")
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    tensors, records = {}, {}
    for p, x in leaves:
        name = path_str(p)
        if is_quantized(x):
            m = x.meta
            records[name] = {
                "shape": list(m.shape),
                "dtype": m.dtype,
                "format": m.format,
                "block_size": m.block_size,
                "axis": m.axis,
                "double_quant": x.double_quant,
                "outlier_rows": x.outlier_rows,
            }
            for part, arr in zip(_PARTS, x.arrays, strict=True):
                if arr is not None:
                    tensors[f"{name}::{part}"] = _to_numpy(arr)
        else:
            records[name] = {"shape": list(np.shape(x)), "dtype": jnp.dtype(x.dtype).name}
            tensors[name] = _to_numpy(x)
    outliers = any(r.get("outlier_rows") for r in records.values())
    header = {"format": QUANT_FORMAT if outliers else _READABLE[0], "model": model, "leaves": records}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_KEY: json.dumps(header)})
    tmp.replace(file)
    return file


def info(path) -> dict:
    """The JSON header of a quantized base file (``format``, ``model``, ``leaves``)."""
    from safetensors import safe_open

    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(f"quantized base file not found: {str(file)!r}.")
    try:
        with safe_open(str(file), "np") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{str(file)!r} is not a readable safetensors file: {e}") from None
    if _KEY not in meta:
        raise ValueError(
            f"{str(file)!r} is not a quantized base written by lora_jax.quant.save (no {_KEY!r} "
            f"header; an adapter or a Hugging Face checkpoint?)."
        )
    header = json.loads(meta[_KEY])
    if header.get("format") not in _READABLE:
        raise ValueError(
            f"{str(file)!r}: unknown quantized base format {header.get('format')!r}, expected one of "
            f"{list(_READABLE)} (a file from a newer lora_jax? upgrade it)."
        )
    return header


def load(path, *, like: Any = None, model: str | None = None, format: str | None = None) -> Any:  # noqa: A002
    """Reads a file written by `save`.

    Args:
        path: the ``.safetensors`` file.
        like: optionally a params tree of the model (dense, quantized, or ``jax.ShapeDtypeStruct``
            leaves): the result gets its structure, and every path and shape must match.
        model: optionally the expected model name.
        format: optionally the expected quantization format (``"nf4"`` or ``"int8"``).

    Returns:
        The params tree (nested dicts keyed by path components without `like`), quantized leaves as
        `QuantizedArray`, bit for bit as saved.

    Raises:
        ValueError: not such a file, another model, another quantization format, or paths or shapes that
            differ from `like` (all listed).
    """
    from safetensors import safe_open

    header = info(path)
    if model is not None and header.get("model") != model:
        raise ValueError(
            f"{str(path)!r} holds a quantized base of model {header.get('model')!r}, not {model!r}. "
            f"Quantize this model's weights (lj.quantize) and save them again."
        )
    records = header["leaves"]
    fmts = sorted({r["format"] for r in records.values() if "format" in r})
    if format is not None and fmts != [format]:
        raise ValueError(
            f"{str(path)!r} is quantized as {fmts}, not {format!r}. Load it without format=, or "
            f"quantize the model again with QuantSpec(format={format!r})."
        )
    if like is not None:
        want = {
            path_str(p): tuple(np.shape(x) if not is_quantized(x) else x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(like, is_leaf=is_quantized)[0]
        }
        got = {k: tuple(r["shape"]) for k, r in records.items()}
        problems = [
            f"{k}: missing from the file (closest: {closest(k, list(got), n=2)})"
            for k in want
            if k not in got
        ]
        problems += [f"{k}: in the file, not in the model" for k in got if k not in want]
        problems += [
            f"{k}: shape {got[k]} in the file, {want[k]} in the model"
            for k in want
            if k in got and got[k] != want[k]
        ]
        if problems:
            raise ValueError(
                f"{str(path)!r} does not fit this model (another model or config?): {problems[:8]}"
                f"{' ...' if len(problems) > 8 else ''}"
            )
    values = {}
    with safe_open(str(path), "np") as f:
        for name, r in records.items():
            if "format" in r:
                stored = {p for p in _PARTS if f"{name}::{p}" in f.keys()}
                want = {"codes", "scales"} | (
                    {"scale_scales", "scale_offset"} if r.get("double_quant") else set()
                )
                want |= {"outlier_index", "outlier_values"} if r.get("outlier_rows") else set()
                if stored != want:  # a partial or inconsistent file would decode wrong values silently
                    raise ValueError(
                        f"{str(path)!r}: {name} is recorded with double_quant={r.get('double_quant')} and "
                        f"outlier_rows={r.get('outlier_rows', 0)}, which need the parts {sorted(want)}, but the "
                        f"file holds {sorted(stored)}. The file is damaged or was edited; save the base again."
                    )
                parts = [f.get_tensor(f"{name}::{p}") if p in stored else None for p in _PARTS]
                parts = [None if a is None else jnp.asarray(a) for a in parts]
                if parts[5] is not None:  # the outlier rows are in W's dtype (bfloat16 stored as its bits)
                    parts[5] = _from_numpy(np.asarray(parts[5]), r["dtype"])
                meta = QuantMeta(
                    tuple(r["shape"]), r["dtype"], r["format"], int(r["block_size"]), int(r["axis"])
                )
                values[name] = QuantizedArray.of_arrays(parts, meta)
            else:
                values[name] = _from_numpy(f.get_tensor(name), r["dtype"])
    if like is not None:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_quantized)
        return jax.tree_util.tree_unflatten(treedef, [values[path_str(p)] for p, _ in leaves])
    tree: dict = {}
    for name, v in values.items():
        node = tree
        *head, last = name.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return tree
