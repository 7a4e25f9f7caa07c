"""Save and load a quantized base as safetensors (never a pickle), so quantizing is done once.

One tensor per array: ``{key path}`` for a dense leaf, ``{key path}::codes``, ``::scales``,
``::scale_scales``, ``::scale_offset`` (and ``::outlier_index``, ``::outlier_values`` with outlier rows) for
a `QuantizedArray`, and a JSON header (``lora_jax_quantized`` entry, format ``QUANT_FORMAT``) with the
model's name and, per leaf, its shape, dtype, quantization and a CRC32 of each of its tensors, plus a CRC32
of the header itself (``header_crc32``, over the rest as canonical JSON). bfloat16 arrays are stored as
their uint16 bits.

Loading checks, before returning anything: the header's checksum, the model name, the quantization format,
(given a template) every path, shape, dtype and quantization, and for every tensor its checksum and its
shape and dtype against what the leaf's recorded metadata implies (the quantizer's own output shapes, by
`abstract_quantize`). Every problem is listed at once. With ``shardings=`` (the dense model's shardings)
each part goes straight to its devices, sharded as `quantize` would have sharded it.

Files of format versions 1 and 2 (no checksums; double-quantized scales coded the old way) are refused:
quantize the float weights again and save them.

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

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._checksums import crc32, json_crc32
from lora_jax._closest import closest
from lora_jax.quant.array import QuantizedArray, is_quantized
from lora_jax.spec import path_str

__all__ = ["QUANT_FORMAT", "save", "load", "info"]

QUANT_FORMAT = "lora_jax.quantized_base/3"
# Versions 1 and 2 carried no checksums and coded double-quantized scales the old way: refused, not decoded.
_OLD = ("lora_jax.quantized_base/1", "lora_jax.quantized_base/2")
_KEY = "lora_jax_quantized"
_HEADER_CRC = "header_crc32"
_PARTS = ("codes", "scales", "scale_scales", "scale_offset", "outlier_index", "outlier_values")
_FIX = "The file is corrupted: quantize the float weights again (lj.quantize) and save them (lj.quant.save)."


def _stored_dtype(dtype) -> np.dtype:
    """The numpy dtype an array of `dtype` is stored as (bfloat16 as its uint16 bits)."""
    dtype = jnp.dtype(dtype)
    return np.dtype(np.uint16) if dtype == jnp.bfloat16 else dtype


def _to_numpy(name: str, x) -> np.ndarray:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        raise TypeError(
            f"{name}: lj.quant.save stores arrays, found a {type(x).__name__} ({str(x)[:40]}). Make it an "
            f"array (jnp.asarray(x, dtype)) or keep it out of the tree you save."
        )
    a = np.asarray(jax.device_get(x))
    return a.view(np.uint16) if a.dtype == jnp.bfloat16 else a


def save(path, params: Any, *, model: str | None = None) -> pathlib.Path:
    """Writes `params` (quantized leaves and dense ones) to a ``.safetensors`` file; returns the file.

    The file is written under a temporary name and renamed, so a reader never sees half of it.

    Args:
        path: the file (``.safetensors`` added when missing).
        params: a params tree of arrays, typically from `lj.quantize`.
        model: the model's name (e.g. ``"smollm2-135m"``), checked again by `load`.

    Raises:
        TypeError: a leaf is not an array (a Python number, say: it is refused rather than converted, as
            it would come back as an array of a guessed dtype); names its key path.
        ValueError: a key path contains ``::``, which separates a path from a part's name.
    """
    from safetensors.numpy import save_file

    file = pathlib.Path(path)
    if file.suffix != ".safetensors":
        file = file.with_suffix(".safetensors")
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    tensors, records = {}, {}
    for p, x in leaves:
        name = path_str(p)
        if "::" in name:
            raise ValueError(
                f"{name}: key paths saved by lj.quant.save cannot contain '::' (it names a quantized "
                f"weight's parts, e.g. 'kernel::codes'). Rename that key."
            )
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
                "crc32": {},
            }
            for part, arr in zip(_PARTS, x.arrays, strict=True):
                if arr is not None:
                    a = tensors[f"{name}::{part}"] = _to_numpy(f"{name}::{part}", arr)
                    records[name]["crc32"][part] = crc32(a)
        else:
            a = tensors[name] = _to_numpy(name, x)
            records[name] = {"shape": list(a.shape), "dtype": jnp.dtype(x.dtype).name, "crc32": crc32(a)}
    header = {"format": QUANT_FORMAT, "model": model, "leaves": records}
    header[_HEADER_CRC] = json_crc32(json.loads(json.dumps(header)), _HEADER_CRC)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_KEY: json.dumps(header)})
    tmp.replace(file)
    return file


def info(path) -> dict:
    """The JSON header of a quantized base file (``format``, ``model``, ``leaves``, ``header_crc32``), after
    checking its format version and its checksum.

    Raises:
        ValueError: no such file, not safetensors (truncated?), no quantized-base header, a format of
            another version (1 and 2 are refused: quantize again), or a header that does not match its
            checksum (edited or corrupted).
    """
    from safetensors import safe_open

    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(f"quantized base file not found: {str(file)!r}.")
    try:
        with safe_open(str(file), "np") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(
            f"{str(file)!r} is not a readable safetensors file (truncated or corrupted?): {e}. {_FIX}"
        ) from None
    if _KEY not in meta:
        raise ValueError(
            f"{str(file)!r} is not a quantized base written by lora_jax.quant.save (no {_KEY!r} "
            f"header; an adapter or a Hugging Face checkpoint?)."
        )
    try:
        header = json.loads(meta[_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{str(file)!r}: the quantized base header is not valid JSON ({e}). {_FIX}"
        ) from None
    fmt = header.get("format") if isinstance(header, dict) else None
    if fmt in _OLD:
        raise ValueError(
            f"{str(file)!r} is a {fmt!r} quantized base, written with the old coding of double-quantized "
            f"scales and without checksums; this lora_jax reads only {QUANT_FORMAT!r} and does not decode it. "
            f"Re-run lj.quantize on the float weights and save them again with lj.quant.save."
        )
    if fmt != QUANT_FORMAT:
        raise ValueError(
            f"{str(file)!r}: unknown quantized base format {fmt!r}, expected {QUANT_FORMAT!r} (a file from a "
            f"newer lora_jax? upgrade it)."
        )
    if header.get(_HEADER_CRC) != json_crc32(header, _HEADER_CRC) or not isinstance(
        header.get("leaves"), dict
    ):
        raise ValueError(
            f"{str(file)!r}: the quantized base header does not match its checksum {_HEADER_CRC} (a shape, "
            f"dtype, block size, format, the model name or the list of leaves was edited or damaged after "
            f"lj.quant.save wrote it); nothing was loaded. {_FIX}"
        )
    return header


@functools.lru_cache(maxsize=256)
def _expected(shape: tuple, dtype: str, fmt: str, block_size: int, axis: int, dq: bool, k: int):
    """The `QuantizedArray` (parts ``jax.ShapeDtypeStruct``) that quantizing a leaf of `shape` and `dtype`
    with this spec gives: `abstract_quantize`, so the shapes follow the quantizer's own code."""
    from lora_jax.quant.tree import QuantSpec, abstract_quantize

    spec = QuantSpec(
        format=fmt, block_size=block_size, double_quant=dq, targets="w", block_axis=axis, outlier_rows=k
    )
    return abstract_quantize({"w": jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))}, spec)["w"]


def _expected_leaf(name: str, r: Any):
    """The abstract leaf a header record describes: a `QuantizedArray` of ``ShapeDtypeStruct`` parts or a
    ``ShapeDtypeStruct``; raises ValueError naming the leaf when the record is not a valid one."""
    try:
        shape, dtype = tuple(int(n) for n in r["shape"]), jnp.dtype(r["dtype"]).name
        if "format" not in r:
            return jax.ShapeDtypeStruct(shape, dtype)
        q = _expected(
            shape,
            dtype,
            r["format"],
            r["block_size"],
            r["axis"],
            r["double_quant"],
            r["outlier_rows"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: its header record {r} does not describe a valid leaf ({e})") from None
    if q.meta.axis != r["axis"]:
        raise ValueError(f"{name}: its header record has block axis {r['axis']}, not a valid axis of {shape}")
    return q


def _like_problems(like: Any, records: dict) -> list[str]:
    """What differs between the template `like` and the file's leaves: paths, shapes, dtypes, quantization."""
    leaves = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_quantized)[0]
    want = {path_str(p): x for p, x in leaves}
    problems = [
        f"{k}: missing from the file (closest: {closest(k, list(records), n=2)})"
        for k in want
        if k not in records
    ]
    problems += [f"{k}: in the file, not in the model" for k in records if k not in want]
    for k, x in want.items():
        if k not in records:
            continue
        r = records[k]
        shape = tuple(x.shape) if is_quantized(x) else tuple(np.shape(x))
        if tuple(r["shape"]) != shape:
            problems.append(f"{k}: shape {tuple(r['shape'])} in the file, {shape} in the model")
            continue
        dtype = getattr(x, "dtype", None)
        if dtype is not None and jnp.dtype(dtype).name != r["dtype"]:
            problems.append(
                f"{k}: dtype {r['dtype']} in the file, {jnp.dtype(dtype).name} in the model (load with a "
                f"template of the file's dtype and cast, or quantize the {jnp.dtype(dtype).name} weights again)"
            )
        if is_quantized(x):
            m = x.meta
            mine = (m.format, m.block_size, m.axis, x.double_quant, x.outlier_rows)
            theirs = tuple(r.get(f) for f in ("format", "block_size", "axis", "double_quant", "outlier_rows"))
            if "format" not in r:
                problems.append(f"{k}: dense in the file, quantized ({m.format}) in the model")
            elif mine != theirs:
                fields = "(format, block_size, axis, double_quant, outlier_rows)"
                problems.append(
                    f"{k}: quantized as {theirs} in the file, {mine} in the model {fields} (load with a dense "
                    f"template, or quantize again with the model's QuantSpec)"
                )
    return problems


def _dense_shardings(file: str, shardings: Any, records: dict) -> dict:
    """``{path: sharding or None}`` from the dense model's `shardings` tree; raises on other paths."""
    from lora_jax.quant.tree import shardings_by_path

    what = f"{file!r}: shardings= does not match the file's leaves (with the structure of like=)"
    return shardings_by_path(shardings, list(records), what)


def _place(name: str, a: np.ndarray, dtype, sharding):
    """The stored array `a` as a jax.Array of `dtype` (bfloat16 from its bits), placed with `sharding`."""
    a = a.view(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else a
    if sharding is None:
        return jnp.asarray(a)
    try:
        return jax.device_put(a, sharding)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name}: cannot place an array of shape {a.shape} with the sharding {sharding} ({e}). Give "
            f"this weight's sharding in the dense model."
        ) from None


def load(
    path,
    *,
    like: Any = None,
    model: str | None = None,
    format: str | None = None,  # noqa: A002
    shardings: Any = None,
) -> Any:
    """Reads a file written by `save`, after checking it (see the module docstring).

    Args:
        path: the ``.safetensors`` file.
        like: optionally a params tree of the model (dense, quantized, or ``jax.ShapeDtypeStruct``
            leaves): the result gets its structure, and every path, shape and dtype must match (and, for
            a `QuantizedArray` leaf, the format, block size, block axis, double quantization and outlier rows).
        model: optionally the expected model name.
        format: optionally the expected quantization format (``"nf4"`` or ``"int8"``).
        shardings: optionally the DENSE model's shardings: a tree with the structure of `like` (or of the
            file's leaves), a ``jax.sharding.Sharding`` or None per weight, or one sharding for all. Each part
            of a quantized weight is placed as `lj.quant.shardings` says (codes and scales sharded like the
            weight); a block never crosses a shard boundary.

    Returns:
        The params tree (nested dicts keyed by path components without `like`), quantized leaves as
        `QuantizedArray`, bit for bit as saved.

    Raises:
        ValueError: not such a file, another format version, another model, another quantization format,
            leaves that differ from `like`, shardings that do not fit (the path and mesh axis), or a
            corrupted file: a header or tensor checksum mismatch, a missing or extra tensor, a tensor whose
            shape or dtype is not what its leaf's metadata implies (all listed, each with its path and part).
            Nothing is returned partially.
        TypeError: a quantized weight's sharding is neither a ``NamedSharding`` nor replicated.

    Example:
        >>> import jax, jax.numpy as jnp, tempfile, os
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from lora_jax.quant.tree import QuantSpec, quantize
        >>> params = {"w": jnp.ones((128, 8), jnp.bfloat16)}
        >>> f = save(os.path.join(tempfile.mkdtemp(), "b"), quantize(params, QuantSpec(targets="w")))
        >>> mesh = jax.make_mesh((1,), ("tp",))
        >>> back = load(f, like=params, shardings={"w": NamedSharding(mesh, P(None, "tp"))})
        >>> back["w"].codes.sharding.spec
        P(None, 'tp')
        >>> load(f, like={"w": jnp.ones((128, 8))})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: ...w: dtype bfloat16 in the file, float32 in the model...
    """
    from safetensors import safe_open

    from lora_jax.quant.tree import leaf_shardings

    file = str(path)
    header = info(path)
    if model is not None and header.get("model") != model:
        raise ValueError(
            f"{file!r} holds a quantized base of model {header.get('model')!r}, not {model!r}. "
            f"Quantize this model's weights (lj.quantize) and save them again."
        )
    records = header["leaves"]
    problems = []
    abstract = {}
    for name, r in records.items():
        try:
            abstract[name] = _expected_leaf(name, r)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError(f"{file!r}: {len(problems)} invalid leaf record(s): {problems[:8]}. {_FIX}")
    fmts = sorted({r["format"] for r in records.values() if "format" in r})
    if format is not None and fmts != [format]:
        raise ValueError(
            f"{file!r} is quantized as {fmts}, not {format!r}. Load it without format=, or "
            f"quantize the model again with QuantSpec(format={format!r})."
        )
    if like is not None:
        problems = _like_problems(like, records)
        if problems:
            raise ValueError(
                f"{file!r} does not fit this model (another model or config?): {problems[:8]}"
                f"{' ...' if len(problems) > 8 else ''}"
            )
    place = dict.fromkeys(records)
    if shardings is not None:
        dense = _dense_shardings(file, shardings, records)
        for name, x in abstract.items():
            place[name] = leaf_shardings(name, x, dense[name]) if is_quantized(x) else dense[name]
    values = {}
    try:
        with safe_open(file, "np") as f:
            names = set(f.keys())
            known = set()
            for name, r in records.items():
                x = abstract[name]
                if not is_quantized(x):
                    known.add(name)
                    if name not in names:
                        problems.append(f"{name}: tensor missing from the file")
                        continue
                    a = f.get_tensor(name)
                    why = _tensor_problem(name, a, x, r.get("crc32"))
                    if why:
                        problems.append(why)
                    elif not problems:
                        values[name] = _place(name, a, x.dtype, place[name])
                    continue
                want = {p for p, part in zip(_PARTS, x.arrays, strict=True) if part is not None}
                known |= {f"{name}::{p}" for p in want}
                stored = {p for p in _PARTS if f"{name}::{p}" in names}
                if stored != want:  # a partial or inconsistent file would decode wrong values silently
                    problems.append(
                        f"{name} is recorded with double_quant={r.get('double_quant')} and outlier_rows="
                        f"{r.get('outlier_rows', 0)}, which need the parts {sorted(want)}, but the file holds "
                        f"{sorted(stored)}: the file is damaged or was edited"
                    )
                    continue
                crcs = r.get("crc32") if isinstance(r.get("crc32"), dict) else {}
                parts = [None] * len(_PARTS)
                sh = place[name].arrays if place[name] is not None else (None,) * len(_PARTS)
                for i, (p, part) in enumerate(zip(_PARTS, x.arrays, strict=True)):
                    if part is None:
                        continue
                    a = f.get_tensor(f"{name}::{p}")
                    why = _tensor_problem(f"{name}::{p}", a, part, crcs.get(p))
                    if why:
                        problems.append(why)
                    elif not problems:
                        parts[i] = _place(f"{name}::{p}", a, part.dtype, sh[i])
                if not problems:
                    values[name] = QuantizedArray.of_arrays(parts, x.meta)
            problems += [
                f"{k}: a tensor that belongs to no leaf of the header" for k in sorted(names - known)
            ]
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors on a damaged data area
        raise ValueError(f"{file!r} could not be read (truncated or corrupted?): {e}. {_FIX}") from None
    if problems:
        raise ValueError(
            f"{file!r}: {len(problems)} problem(s), nothing was loaded: {problems[:8]}"
            f"{' ...' if len(problems) > 8 else ''}. {_FIX}"
        )
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


def _tensor_problem(name: str, a: np.ndarray, want, crc) -> str | None:
    """Why the stored tensor `a` is not the part `want` (a ``ShapeDtypeStruct``) with checksum `crc`."""
    shape, dtype = tuple(want.shape), _stored_dtype(want.dtype)
    if a.shape != shape or a.dtype != dtype:
        return (
            f"{name}: expected {dtype.name}{list(shape)} (from the leaf's recorded shape, dtype and "
            f"quantization), found {a.dtype.name}{list(a.shape)}"
        )
    if crc32(a) != crc:
        return (
            f"{name}: checksum mismatch (CRC32 {crc32(a)}, recorded {crc}): the tensor's bytes were changed"
        )
    return None
