"""Adapter files: the deltas alone (MBs, not GBs), and the merged model for export; never a pickle.

- **Adapter** (`save_adapter` / `load_adapter` / `adapter_info`): the deltas as safetensors, tensors
  ``{key path}/a`` and ``{key path}/b`` (a DoRA magnitude ``{key path}/m``, a fully trained leaf
  ``{key path}/full``), with a JSON header (``lora_jax`` entry, format
  ``ADAPTER_FORMAT``) holding the `LoraSpec`, the base model's identity and, per delta, its scale, axes,
  rank, kernel shape and a CRC32 of each array, and a CRC32 of the whole header (``header_crc32``), so
  an edited scale, axis, target or dropout is refused like a flipped bit in an array. Loading checks
  everything against the model and the file, lists every problem at once, and loads nothing partially:
  neither part of the file, nor the file into part of the model (every leaf that the stored spec
  targets in this model must get a delta, unless ``allow_partial=True``).
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
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._checksums import crc32, json_crc32
from lora_jax._closest import closest
from lora_jax.core import _fit_problem, merge
from lora_jax.coverage import check_coverage
from lora_jax.delta import LoraDelta, is_delta
from lora_jax.dora import DoraDelta, is_dora
from lora_jax.full import FullLeaf, full_problem, is_full
from lora_jax.spec import LoraAxes, LoraSpec, path_str

__all__ = [
    "ADAPTER_FILE",
    "ADAPTER_FORMAT",
    "adapter_info",
    "load_adapter",
    "save_adapter",
    "save_merged",
    "spec_from_json",
    "spec_to_json",
]

ADAPTER_FORMAT = "lora_jax.adapter/2"
ADAPTER_FILE = "adapter.safetensors"
# Format /1 (no header checksum) is still read, with a warning, rather than refused: adapters are the
# results people keep (hours of training each), the array checksums of a /1 file still hold, and
# loading one and saving it again upgrades it; refusing them would leave retraining as the only way.
_FORMATS_READ = (ADAPTER_FORMAT, "lora_jax.adapter/1")
_HEADER_CRC = "header_crc32"
# The fields every header holds (format /2 also `_HEADER_CRC`), each delta record, and the stored spec.
_HEADER_FIELDS = ("format", "spec", "base_model", "deltas", "extra")
_DELTA_FIELDS = ("scale", "axes", "dropout", "rank", "weight_shape", "crc32_a", "crc32_b")
_SPEC_FIELDS = (
    "rank",
    "alpha",
    "targets",
    "exclude",
    "rank_pattern",
    "alpha_pattern",
    "rslora",
    "init",
    "dropout",
    "dtype",
    "axes",
)
# LoraSpec fields written only when they differ from their defaults (older headers lack them).
_SPEC_OPTIONAL = {"dora": False, "dora_detach_norm": True, "train_full": []}


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
        "rank": spec.rank,
        "alpha": spec.alpha,
        "targets": list(spec.targets),
        "exclude": list(spec.exclude),
        "rank_pattern": dict(spec.rank_pattern),
        "alpha_pattern": dict(spec.alpha_pattern),
        "rslora": spec.rslora,
        "init": spec.init,
        "dropout": spec.dropout,
        "dtype": None if spec.dtype is None else jnp.dtype(spec.dtype).name,
        "axes": {k: dataclasses.asdict(v) for k, v in dict(spec.axes).items()},
        **{
            k: v
            for k, v in (
                ("dora", spec.dora),
                ("dora_detach_norm", spec.dora_detach_norm),
                ("train_full", list(spec.train_full)),
            )
            if v != _SPEC_OPTIONAL[k]
        },
    }


def spec_from_json(d: dict) -> LoraSpec:
    """The `LoraSpec` that `spec_to_json` wrote (as stored in an adapter file's header).

    Example:
        >>> spec = LoraSpec(rank=4, axes={".*/qkv": LoraAxes(inputs=(0,), outputs=(1, 2))})
        >>> spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec
        True
    """
    d = dict(d)
    unknown = sorted(set(d) - set(_SPEC_FIELDS) - set(_SPEC_OPTIONAL))
    if unknown:
        raise ValueError(
            f"spec_from_json: unknown LoraSpec field(s) {unknown}; the fields are {list(_SPEC_FIELDS)}."
        )
    if "targets" not in d:
        raise ValueError("spec_from_json: the spec has no 'targets' field (which parameters it adapts).")
    d["axes"] = {k: LoraAxes(**v) for k, v in d.get("axes", {}).items()}
    d["targets"], d["exclude"] = tuple(d["targets"]), tuple(d.get("exclude", ()))
    d["train_full"] = tuple(d.get("train_full", ()))
    return LoraSpec(**d)


# ----------------------------------------------------------------------------------------------------
# Adapter files


def _adapter_file(path) -> pathlib.Path:
    path = pathlib.Path(path)
    return path / ADAPTER_FILE if path.is_dir() or path.suffix != ".safetensors" else path


def _missing_fields(header: dict) -> list[str]:
    """The required header fields that are absent, as "/"-joined paths (e.g. ``deltas/<path>/scale``)."""
    required = _HEADER_FIELDS + ((_HEADER_CRC,) if header.get("format") == ADAPTER_FORMAT else ())
    missing = [k for k in required if k not in header]
    spec, deltas = header.get("spec"), header.get("deltas")
    if isinstance(spec, dict):
        missing += [f"spec/{k}" for k in _SPEC_FIELDS if k not in spec]
    if isinstance(deltas, dict):
        for name, rec in deltas.items():
            fields = rec if isinstance(rec, dict) else {}
            missing += [f"deltas/{name}/{k}" for k in _DELTA_FIELDS if k not in fields]
    return missing


def save_adapter(
    path,
    deltas: Any,
    spec: LoraSpec,
    *,
    base_model: dict | None = None,
    extra: dict | None = None,
    verbose: bool = True,
) -> pathlib.Path:
    """Writes the deltas alone as safetensors with a JSON header; returns the file written.

    Args:
        path: a ``.safetensors`` file, or a folder (the file is ``folder/adapter.safetensors``).
        deltas: from `lj.init` / training (any sharding; gathered to the host).
        spec: the `LoraSpec` the deltas were made with (stored, for `adapter_info`).
        base_model: JSON-able identity of the base model (name, config), checked by `load_adapter`.
        extra: any other JSON-able metadata (e.g. accuracy).
        verbose: print the file size.

    Tensors are named ``{key path}/a`` and ``{key path}/b``, and ``{key path}/full`` for a fully trained
    leaf (`FullLeaf`, ``LoraSpec.train_full``); the header ``lora_jax`` entry holds
    ``{"format", "spec", "base_model", "deltas": {path: {scale, axes, dropout, rank, weight_shape,
    crc32_a, crc32_b}}, "extra", "header_crc32"}`` (and ``"full": {path: {shape, dtype, crc32}}`` when
    there are fully trained leaves), the last a CRC32 of the others as canonical JSON
    (sorted keys, no spaces): any change to the header after saving, `extra` included, is refused on
    load. (A checksum against accidents and careless edits, not a signature.) The file is written to a
    temporary name and renamed, so a reader never sees half an adapter.

    Raises:
        TypeError: a leaf of `deltas` is neither a `LoraDelta` nor None (names its key path), or
            `base_model` / `extra` are not JSON-able.
        ValueError: `deltas` holds no `LoraDelta`.
    """
    from safetensors.numpy import save_file

    file = _adapter_file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    flat = jax.tree_util.tree_flatten_with_path(deltas, is_leaf=lambda x: is_delta(x) or is_full(x))[0]
    tensors, record, full = {}, {}, {}
    for p, d in flat:
        if d is None:
            continue
        if is_full(d):  # a fully trained leaf: tensor {name}/full
            x = np.asarray(jax.device_get(d.value))
            tensors[f"{path_str(p)}/full"] = x
            full[path_str(p)] = {"shape": list(x.shape), "dtype": x.dtype.name, "crc32": crc32(x)}
            continue
        if not is_delta(d):
            raise TypeError(
                f"{path_str(p)}: expected a LoraDelta or None in deltas, found {type(d).__name__}"
            )
        name = path_str(p)
        a = np.asarray(jax.device_get(d.a))
        b = np.asarray(jax.device_get(d.b))
        tensors[f"{name}/a"], tensors[f"{name}/b"] = a, b
        record[name] = {
            "scale": d.scale,
            "axes": dataclasses.asdict(d.axes),
            "dropout": d.dropout,
            "rank": d.rank,
            "weight_shape": list(d.weight_shape()),
            "crc32_a": crc32(a),
            "crc32_b": crc32(b),
        }
        if is_dora(d):  # DoRA magnitude: tensor {name}/m
            m = np.asarray(jax.device_get(d.m))
            tensors[f"{name}/m"] = m
            record[name]["dora"] = {"detach_norm": d.detach_norm, "crc32_m": crc32(m)}
    if not record:
        raise ValueError("save_adapter: deltas hold no LoraDelta (nothing to save).")
    header = {
        "format": ADAPTER_FORMAT,
        "spec": spec_to_json(spec),
        "base_model": base_model or {},
        "deltas": record,
        "extra": extra or {},
        **({"full": full} if full else {}),
    }
    try:  # the round trip normalizes what JSON changes (tuples, int keys), as a reader will see it
        header = json.loads(json.dumps(header))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_adapter: base_model and extra must be JSON-able: {e}") from None
    header[_HEADER_CRC] = json_crc32(header, _HEADER_CRC)
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"lora_jax": json.dumps(header)})
    os.replace(tmp, file)  # a reader never sees a half-written adapter
    if verbose:
        size = file.stat().st_size
        print(
            f"adapter: {file} ({size / 2**20:.2f} MiB, {len(record)} deltas{f', {len(full)} fully trained leaves' if full else ''}, "
            f"{sum(t.size for t in tensors.values()):,} parameters)"
        )
    return file


def adapter_info(path) -> dict:
    """The JSON header of an adapter file (``format``, ``spec``, ``base_model``, ``deltas``, ``extra``,
    ``header_crc32``), after checking that every field is there and that the header matches its checksum.

    A format ``lora_jax.adapter/1`` file (written before the header checksum existed) is read with a
    warning that its header is not covered.

    Args:
        path: the ``.safetensors`` file or its folder.

    Raises:
        ValueError: missing file, not safetensors, no lora_jax header, an unknown format, a header field
            missing (each named, e.g. ``deltas/params/layers_0/attn/query/kernel/scale``), or a header that
            does not match its checksum (edited or corrupted). The message names the file.
    """
    from safetensors import safe_open

    file = _adapter_file(path)
    if not file.is_file():
        raise ValueError(
            f"adapter file not found: {str(file)!r} (give the file or the folder holding {ADAPTER_FILE})."
        )
    try:
        with safe_open(str(file), "np") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(
            f"{str(file)!r} is not a readable safetensors adapter (corrupted or truncated?): {e}"
        ) from None
    if "lora_jax" not in meta:
        raise ValueError(
            f"{str(file)!r} has no lora_jax header: it is not an adapter written by "
            f"lora_jax.adapter.save_adapter."
        )
    try:
        header = json.loads(meta["lora_jax"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(file)!r}: the lora_jax header is not valid JSON (corrupted?): {e}") from None
    if not isinstance(header, dict):
        raise ValueError(
            f"{str(file)!r}: the lora_jax header is a JSON {type(header).__name__}, not an object "  # noqa: TRY004
            f"(corrupted?)."
        )
    if "format" in header and header["format"] not in _FORMATS_READ:
        raise ValueError(
            f"{str(file)!r}: unknown adapter format {header.get('format')!r}, expected {ADAPTER_FORMAT!r}."
        )
    missing = _missing_fields(header)
    if missing:
        raise ValueError(
            f"{str(file)!r}: the adapter header lacks the field(s) {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} (corrupted, or edited by hand?); nothing was "
            f"loaded. Save the adapter again with save_adapter."
        )
    for name in ("spec", "deltas", "base_model", "extra"):
        if not isinstance(header[name], dict):
            raise ValueError(
                f"{str(file)!r}: the adapter header field {name!r} is a JSON "  # noqa: TRY004
                f"{type(header[name]).__name__}, not an object (corrupted?)."
            )
    if header["format"] != ADAPTER_FORMAT:
        warnings.warn(
            f"{str(file)!r} is a {header['format']!r} adapter: its arrays are checksummed but its "
            f"header (scales, axes, targets, dropout, the list of deltas) is not. Load it and save it "
            f"again with save_adapter to upgrade it to {ADAPTER_FORMAT!r}.",
            stacklevel=2,
        )
    elif header[_HEADER_CRC] != json_crc32(header, _HEADER_CRC):
        raise ValueError(
            f"{str(file)!r}: the adapter header does not match its checksum {_HEADER_CRC}: it was "
            f"edited or corrupted after save_adapter wrote it (a scale, axes, targets, dropout, "
            f"the list of deltas, or the metadata). Nothing was loaded. To change an adapter, load "
            f"it, change the deltas and save it again with save_adapter."
        )
    return header


def load_adapter(path, params: Any, *, base_model: dict | None = None, allow_partial: bool = False) -> Any:
    """Reads an adapter and returns deltas with the structure of `params`, after checking everything.

    Args:
        path: the ``.safetensors`` file or its folder.
        params: the base model's params (arrays or ``jax.ShapeDtypeStruct``s), e.g. Linen variables.
        base_model: if given, must equal the identity stored at save time (e.g. ``{"name": ...}``; only
            the keys given here are compared).
        allow_partial: load the adapter even if some leaves of `params` that its stored spec targets get
            no delta (e.g. a 2-layer adapter into a 3-layer model), leaving those leaves unadapted.

    Returns:
        A tree with the structure of `params`: a `LoraDelta` at each stored key path, None elsewhere.

    Raises:
        ValueError: a corrupted file (bad header, a missing header field, a header or array checksum
            mismatch, a missing tensor), a delta path that is not in `params` (with the closest paths it
            has), a shape that does not fit its kernel, a base-model mismatch (all listed at once), or,
            without `allow_partial`, leaves of `params` that the stored spec targets but the adapter has
            no delta for (named). Nothing is loaded partially.
    """
    from safetensors import safe_open

    header = adapter_info(path)
    file = _adapter_file(path)
    problems = []
    if base_model:
        stored = header.get("base_model", {})
        for k, v in base_model.items():
            if stored.get(k) != v:
                problems.append(
                    f"base model {k!r}: the adapter was made for {stored.get(k)!r}, this model is {v!r}"
                )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    by_path = {path_str(p): i for i, (p, _) in enumerate(leaves)}
    out: list = [None] * len(leaves)
    try:
        with safe_open(str(file), "np") as f:
            names = set(f.keys())
            for name, rec in header["deltas"].items():
                if name not in by_path:
                    problems.append(
                        f"{name}: not a parameter of this model (closest: {closest(name, by_path, n=3)})"
                    )
                    continue
                if f"{name}/a" not in names or f"{name}/b" not in names:
                    problems.append(
                        f"{name}: tensors {name}/a or {name}/b missing from the file (corrupted?)"
                    )
                    continue
                a, b = f.get_tensor(f"{name}/a"), f.get_tensor(f"{name}/b")
                if crc32(a) != rec["crc32_a"] or crc32(b) != rec["crc32_b"]:
                    problems.append(f"{name}: checksum mismatch, the file is corrupted")
                    continue
                try:
                    d = LoraDelta(
                        jnp.asarray(a),
                        jnp.asarray(b),
                        scale=float(rec["scale"]),
                        axes=LoraAxes(**rec["axes"]),
                        dropout=float(rec["dropout"]),
                    )
                    if "dora" in rec:
                        m = f.get_tensor(f"{name}/m")
                        if crc32(m) != rec["dora"]["crc32_m"]:
                            problems.append(
                                f"{name}: checksum mismatch of the DoRA magnitude, the file is corrupted"
                            )
                            continue
                        d = DoraDelta(
                            d.a,
                            d.b,
                            scale=d.scale,
                            axes=d.axes,
                            dropout=d.dropout,
                            m=jnp.asarray(m),
                            detach_norm=bool(rec["dora"]["detach_norm"]),
                        )
                except (TypeError, ValueError, KeyError) as e:
                    problems.append(f"{name}: malformed delta record {rec} ({e})")
                    continue
                expected = tuple(getattr(leaves[by_path[name]][1], "shape", ()))
                why = _fit_problem(d, expected)
                if why:
                    problems.append(f"{name}: does not fit the model's kernel of shape {expected}: {why}")
                    continue
                out[by_path[name]] = d
            for name, rec in (header.get("full") or {}).items():  # fully trained leaves
                if name not in by_path:
                    problems.append(
                        f"{name}: not a parameter of this model (closest: {closest(name, by_path, n=3)})"
                    )
                    continue
                if f"{name}/full" not in names:
                    problems.append(f"{name}: tensor {name}/full missing from the file (corrupted?)")
                    continue
                x = f.get_tensor(f"{name}/full")
                if not isinstance(rec, dict) or crc32(x) != rec.get("crc32"):
                    problems.append(
                        f"{name}: checksum mismatch of the fully trained leaf, the file is corrupted"
                    )
                    continue
                d = FullLeaf(jnp.asarray(x))
                expected = tuple(getattr(leaves[by_path[name]][1], "shape", ()))
                why = full_problem(d, expected)
                if why:
                    problems.append(f"{name}: does not fit the model's parameter of shape {expected}: {why}")
                    continue
                out[by_path[name]] = d
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{str(file)!r} could not be read (corrupted or truncated?): {e}") from None
    if problems:
        raise ValueError(
            f"adapter {str(file)!r} does not fit this model ({len(problems)} problem(s)); nothing "
            f"was loaded:\n  " + "\n  ".join(problems)
        )
    deltas = jax.tree_util.tree_unflatten(treedef, out)
    try:
        spec = spec_from_json(header["spec"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(
            f"adapter {str(file)!r}: its stored spec is malformed ({type(e).__name__}: {e}); "
            f"nothing was loaded."
        ) from None
    check_coverage(
        params,
        deltas,
        lambda p: spec.matches(p) or spec.full_matches(p),
        allow_partial=allow_partial,
        source=f"adapter {str(file)!r}",
    )
    return deltas


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
    tensors = {
        path_str(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_flatten_with_path(merged)[0]
    }
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"lora_jax_merged": json.dumps(metadata or {})})
    os.replace(tmp, file)
    return file
