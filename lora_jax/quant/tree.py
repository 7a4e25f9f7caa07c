"""`QuantSpec` and the params transforms `quantize` / `dequantize`.

A `QuantSpec` selects leaves exactly as `LoraSpec` does (regexes matched in full against "/"-joined key
paths, ``exclude`` removing some, an error with the closest paths when nothing matches), and says how
to quantize them. `quantize` replaces each targeted float leaf by a `QuantizedArray`; `dequantize`
turns every `QuantizedArray` back into a dense array. Both work eagerly (one leaf at a time, each
keeping its sharding) and inside ``jax.jit``.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((128, 32)), "bias": jnp.zeros(32)}}
    >>> q = quantize(params, QuantSpec(format="nf4", targets=".*/kernel"))
    >>> q["dense"]["kernel"]
    QuantizedArray(shape=(128, 32), dtype=float32, format=nf4, block_size=64, axis=0, double_quant)
    >>> dequantize(q)["dense"]["kernel"].shape
    (128, 32)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax._closest import closest
from lora_jax.quant.array import QuantizedArray, QuantMeta, encode_arrays, is_quantized
from lora_jax.quant.codes import FORMATS
from lora_jax.spec import path_str

__all__ = [
    "QuantSpec",
    "quantize",
    "dequantize",
    "quantize_leaf",
    "check_targets",
    "abstract_quantize",
    "part_shardings",
    "leaf_shardings",
    "shardings",
    "check_shard_blocks",
]


def _patterns(x, name: str) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        x = (x,)
    if not isinstance(x, Sequence) or not all(isinstance(p, str) for p in x):
        raise TypeError(f"QuantSpec.{name} must be a regex string or a sequence of them, got {x!r}")
    for p in x:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"QuantSpec.{name}: {p!r} is not a valid regular expression: {e}") from None
    return tuple(x)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Which parameters to quantize, and how (QLoRA, Dettmers et al. 2023).

    Attributes:
        format: ``"nf4"`` (4-bit NormalFloat, two codes per byte) or ``"int8"`` (absmax int8).
        block_size: elements per absmax block along the block axis (even; 64 in the paper).
        double_quant: quantize the block scales too, to 8 bits in blocks of 256 scales (the paper's layout
            and bits: 0.129 instead of 0.5 bits per parameter at block size 64). Each block of 256 stores
            two float32, the log2 of its smallest positive scale and a log2 step; a code is linear in
            log2(scale), with one code for an exact 0. The paper codes the mean-centred scales as dynamic
            8-bit floats instead; log codes keep every scale's relative error below ``2 ** (step / 2) - 1``,
            ``step = log2(max / min) / 253`` (0.16% on Gaussian weights, 1.5% next to a 1000× larger
            block), so one huge weight cannot wreck the small scales of the other 255 blocks.
        targets: regex or regexes; a leaf is quantized when one matches its whole "/"-joined key path.
        exclude: regex or regexes removing leaves from the targets.
        block_axis: the axis the blocks run along, an input axis of the kernel: an int for every leaf,
            or ``{regex: int}`` per leaf (first full match wins; others get -2). The default -2 is the
            input axis of a Dense ``(in, out)`` kernel and of a scan-stacked ``(layers, in, out)`` one.
        outlier_rows: keep this many rows along the block axis of each kernel (per stacked layer) exactly,
            in W's dtype: those holding its largest absolute values, the rows of "super weights" (Yu et al.
            2024) whose inputs carry massive activations. They are zeroed before the blocks are quantized
            (so they do not set the block scales) and written back after decoding. 0 (the default) is the
            paper's plain NF4/int8. Each kept row costs ``4 * out`` bytes plus 4 for its index (float32):
            2 rows of SmolLM2's ``(1536, 576)`` down projection add 1.0% to its nf4 bytes.

    Example:
        >>> QuantSpec(format="int8", block_size=128).targets
        ('.*/kernel',)
    """

    format: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    targets: str | Sequence[str] = r".*/kernel"
    exclude: str | Sequence[str] = ()
    block_axis: int | Mapping[str, int] = -2
    outlier_rows: int = 0

    def __post_init__(self):
        object.__setattr__(self, "targets", _patterns(self.targets, "targets"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if not self.targets:
            raise ValueError("QuantSpec.targets is empty: give at least one regex, e.g. r'.*/kernel'.")
        if self.format not in FORMATS:
            raise ValueError(f"QuantSpec.format={self.format!r} is not one of {FORMATS}.")
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 2 or bs % 2:
            raise ValueError(f"QuantSpec.block_size={bs!r} must be an even int >= 2 (64 in the paper).")
        k = self.outlier_rows
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(
                f"QuantSpec.outlier_rows={k!r} must be an int >= 0 (0: plain block quantization; 2 keeps the two "
                f"rows with the largest weights of each kernel exactly)."
            )
        if isinstance(self.block_axis, Mapping):
            for pat, ax in self.block_axis.items():
                _patterns(pat, "block_axis")
                if not isinstance(ax, int):
                    raise TypeError(f"QuantSpec.block_axis[{pat!r}] must be an int, got {ax!r}")
            object.__setattr__(self, "block_axis", tuple(self.block_axis.items()))
        elif isinstance(self.block_axis, tuple) and all(
            isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int)
            for e in self.block_axis
        ):
            pass  # the normalised form of a dict (what dataclasses.replace passes back)
        elif not isinstance(self.block_axis, int) or isinstance(self.block_axis, bool):
            raise TypeError(
                f"QuantSpec.block_axis must be an int (one axis for every leaf) or a {{regex: int}} dict, got "
                f"{self.block_axis!r}. A block runs along one axis; for an axis per leaf write e.g. "
                f"block_axis={{'.*/qkv/kernel': 0, '.*/out/kernel': 1}}."
            )

    def matches(self, path: str) -> bool:
        """Whether the "/"-joined key path is targeted (and not excluded)."""
        full = lambda pats: any(re.fullmatch(p, path) for p in pats)  # noqa: E731
        return full(self.targets) and not full(self.exclude)

    def axis_for(self, path: str) -> int:
        if isinstance(self.block_axis, int):
            return self.block_axis
        return next((ax for pat, ax in self.block_axis if re.fullmatch(pat, path)), -2)

    def select(self, paths: Sequence[str]) -> list[str]:
        """The targeted paths among `paths`; raises when none is."""
        chosen = [p for p in paths if self.matches(p)]
        if not chosen:
            raise ValueError(
                f"QuantSpec.targets {list(self.targets)} (exclude {list(self.exclude)}) match no parameter. "
                f"Patterns must match the whole '/'-joined key path. Closest available paths: "
                f"{closest(self.targets, paths, regex=True)}. All {len(paths)} paths start like: {list(paths)[:8]}"
            )
        return chosen


def _check_leaf(path: str, w, spec: QuantSpec) -> int:
    """The block axis of leaf `w` at `path`, after checking it can be quantized with `spec`."""
    shape, dtype = getattr(w, "shape", None), getattr(w, "dtype", None)
    if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{path}: only floating-point arrays can be quantized, found {type(w).__name__} with dtype {dtype}. "
            f"Narrow QuantSpec.targets or add this path to QuantSpec.exclude."
        )
    if len(shape) < 2:
        raise ValueError(
            f"{path}: quantized weights need at least 2 dims (in, out), found shape {tuple(shape)} (a bias or "
            f"norm scale?). Narrow QuantSpec.targets, e.g. end it with '/kernel', or add this path to exclude."
        )
    axis = spec.axis_for(path)
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"{path}: QuantSpec.block_axis {axis} is out of range for shape {tuple(shape)}.")
    axis %= len(shape)
    n, bs = shape[axis], spec.block_size
    if n % bs:
        ok = [b for b in (256, 128, 64, 32, 16, 8, 4, 2) if n % b == 0]
        use = (
            f"Use a block size that divides {n} (e.g. {ok[:3]})"
            if ok
            else f"No even block size divides {n} (QuantSpec.block_size must be even), and "
            f"padding is not supported: pad that axis to a multiple of {bs} in the model"
        )
        raise ValueError(
            f"{path}: its block axis {axis} has size {n}, not divisible by QuantSpec.block_size={bs} (shape "
            f"{tuple(shape)}). {use}, quantize along another input axis with "
            f"QuantSpec(block_axis={{{path!r}: <axis>}}), or leave this path unquantized with "
            f"QuantSpec(exclude={path!r})."
        )
    if spec.outlier_rows >= n:
        raise ValueError(
            f"{path}: QuantSpec.outlier_rows={spec.outlier_rows} keeps all {n} rows (or more) along "
            f"its block axis {axis} (shape {tuple(shape)}): nothing would be quantized. Use fewer outlier rows "
            f"(a handful; 2 for SmolLM2), or exclude this path."
        )
    check_shard_blocks(path, tuple(shape), axis, bs, getattr(w, "sharding", None))
    return axis


def check_shard_blocks(path: str, shape: tuple, axis: int, block_size: int, sharding) -> None:
    """Raises when W's `sharding` would split a block of `block_size` along `axis` over two shards."""
    if not isinstance(sharding, NamedSharding):
        return
    n, bs = shape[axis], block_size
    entry = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    names = entry[axis]
    names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    parts = 1
    for name in names:
        parts *= sharding.mesh.shape[name]
    if parts > 1 and (n // parts) % bs:
        raise ValueError(
            f"{path}: its block axis {axis} (size {n}) is sharded over mesh axis {names} ({parts} shards of "
            f"{n // parts}), so blocks of {bs} would cross a shard boundary. Use a block size dividing "
            f"{n // parts}, or shard this axis over fewer devices."
        )


def part_shardings(sharding, ndim: int, axis: int, double_quant: bool, outliers: bool = False):
    """Shardings of a `QuantizedArray`'s arrays: codes and scales like W, the small ones on W's lead axes.

    `sharding` is W's (None unless a ``NamedSharding``: then None), `ndim` W's rank, `axis` the block axis.
    The outlier rows are sharded like W but for the block axis (k rows are not split), their indices on
    the lead axes.
    """
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    named = lambda *s: NamedSharding(sharding.mesh, PartitionSpec(*s))  # noqa: E731
    like = named(*spec)
    lead = spec[:axis]
    dq = (named(*lead, None), named(*lead, None)) if double_quant else (None, None)
    out = (named(*lead, None), named(*lead, None, *spec[axis + 1 :])) if outliers else (None, None)
    return (like, like, *dq, *out)


def leaf_shardings(path: str, q: QuantizedArray, sharding) -> Any:
    """The shardings of `q`'s parts (a `QuantizedArray` holding them) from its dense weight's `sharding`.

    None gives None (left where it is); a fully replicated sharding (one device) is used for every part.
    """
    if sharding is None:
        return None
    if isinstance(sharding, NamedSharding):
        if len(sharding.spec) > q.ndim:
            raise ValueError(
                f"{path}: its sharding {sharding.spec} has {len(sharding.spec)} entries, but the weight has "
                f"{q.ndim} dims (shape {q.shape}). Give the sharding of this weight in the dense model."
            )
        check_shard_blocks(path, q.shape, q.meta.axis, q.meta.block_size, sharding)
        parts = part_shardings(sharding, q.ndim, q.meta.axis, q.double_quant, q.outlier_rows > 0)
    elif isinstance(sharding, jax.sharding.Sharding) and sharding.is_fully_replicated:
        parts = (sharding,) * 6
    else:
        raise TypeError(
            f"{path}: expected a jax.sharding.NamedSharding (or None) for this quantized weight, found "
            f"{type(sharding).__name__}. Give the dense model's NamedSharding of this weight."
        )
    return QuantizedArray.of_arrays([None if x is None else s for x, s in zip(q.arrays, parts)], q.meta)


def shardings(qparams: Any, dense_shardings: Any) -> Any:
    """Shardings for every array of a quantized params tree, from the dense model's shardings.

    Codes and scales are sharded like the dense weight, the double-quantization parts on its leading
    (stacked) axes, outlier rows like W but whole along the block axis (as `quantize` places them).

    Args:
        qparams: a params tree with `QuantizedArray` leaves (from `quantize`, `abstract_quantize` or
            `lj.quant.load`), arrays or ``jax.ShapeDtypeStruct`` elsewhere.
        dense_shardings: the dense model's shardings: a tree with the structure of `qparams` where each
            `QuantizedArray` stands for one weight, holding a ``jax.sharding.Sharding`` (``NamedSharding`` for
            a sharded quantized weight) or None (left as is) per weight; or one sharding for every leaf.

    Returns:
        A tree matching `qparams` array for array (a `QuantizedArray` of shardings for each quantized
        weight), for ``jax.device_put(qparams, ...)`` or ``jax.jit(out_shardings=...)``.

    Raises:
        ValueError: the paths of the two trees differ (listed), a sharding has more entries than its weight
            has dims, or a block would cross a shard boundary (naming the path and the mesh axis).
        TypeError: a quantized weight's sharding is neither a ``NamedSharding`` nor replicated.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("tp",))
        >>> q = quantize({"w": jnp.ones((128, 8)), "b": jnp.ones(8)}, QuantSpec(targets="w"))
        >>> s = shardings(q, {"w": NamedSharding(mesh, P(None, "tp")), "b": None})
        >>> s["w"].codes.spec, s["w"].scale_offset.spec, s["b"]
        (P(None, 'tp'), P(None,), None)
        >>> jax.device_put(q, s)["w"].scales.sharding.spec
        P(None, 'tp')
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_quantized)
    paths = [path_str(p) for p, _ in leaves]
    given = shardings_by_path(dense_shardings, paths, "the shardings do not match the quantized params")
    out = [
        leaf_shardings(k, x, given[k]) if is_quantized(x) else given[k] for k, (_, x) in zip(paths, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def shardings_by_path(dense_shardings: Any, paths: Sequence[str], what: str) -> dict:
    """``{path: sharding or None}`` for each of `paths`, from the dense model's shardings: a tree with one
    ``jax.sharding.Sharding`` (or None) per weight, or one sharding for all.

    Raises:
        ValueError: a path without a sharding (with the closest given), a sharding for another path, or an
            entry that is not a sharding; all listed, after `what` (the message's start).
    """
    if isinstance(dense_shardings, jax.sharding.Sharding):
        return dict.fromkeys(paths, dense_shardings)
    flat = jax.tree_util.tree_flatten_with_path(
        dense_shardings, is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding)
    )[0]
    given = {path_str(p): s for p, s in flat}
    wanted = set(paths)
    problems = [
        f"{k}: no sharding given (closest: {closest(k, list(given), n=2)})" for k in paths if k not in given
    ]
    problems += [f"{k}: a sharding for a weight that is not there" for k in given if k not in wanted]
    problems += [
        f"{k}: expected a jax.sharding.Sharding or None, found {type(s).__name__}"
        for k, s in given.items()
        if s is not None and not isinstance(s, jax.sharding.Sharding)
    ]
    if problems:
        raise ValueError(
            f"{what} (give the dense model's shardings, one per weight): "
            f"{problems[:8]}{' ...' if len(problems) > 8 else ''}"
        )
    return given


@functools.cache
def _quantize_jit(fmt, block_size, axis, double_quant, outlier_rows, shardings):
    def f(w):
        return encode_arrays(w, fmt, block_size, axis, double_quant, outlier_rows)

    return jax.jit(f, out_shardings=shardings)


@functools.cache
def _count_nonfinite_jit(sharding):
    return jax.jit(lambda w: jnp.count_nonzero(~jnp.isfinite(w)), out_shardings=sharding)


def _check_finite(path: str, w) -> None:
    """Raises when the concrete array `w` holds NaN or inf (quantized, they would spoil their block)."""
    if isinstance(w, jax.Array):
        s = w.sharding
        n_bad = _count_nonfinite_jit(
            NamedSharding(s.mesh, PartitionSpec()) if isinstance(s, NamedSharding) else None
        )
        bad = int(n_bad(w))
    else:
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(w, np.float32))))
    if bad:
        size = int(np.prod(np.shape(w)))
        raise ValueError(
            f"{path}: {bad} of its {size} values are not finite (NaN or inf); quantized, each would make its "
            f"whole block decode to NaN. Fix the weights before quantizing (a damaged checkpoint or a diverged "
            f"run? jnp.nan_to_num if they are meant to be finite), or leave this path unquantized with "
            f"QuantSpec(exclude={path!r})."
        )


def quantize(params: Any, spec: QuantSpec) -> Any:
    """`params` with each leaf `spec` targets replaced by a `QuantizedArray`.

    Leaves already quantized are left as they are. Eagerly, each leaf is quantized by its own jitted
    function and its parts keep W's sharding (codes and scales sharded like W); inside ``jax.jit`` it is
    plain array code.

    Eagerly, a targeted leaf holding NaN or inf is an error. Under a trace (``jax.jit``, ``eval_shape``)
    values cannot be checked: a non-finite value makes its own block of ``block_size`` weights decode to
    NaN (its block scale is NaN or inf, coded as such with double quantization) and leaves every other
    block as it would be without it.

    Args:
        params: any pytree of arrays (Linen variables, a dict, ...).
        spec: the `QuantSpec`.

    Returns:
        A tree with params' structure, `QuantizedArray` at the targets.

    Raises:
        ValueError: nothing matches; a targeted leaf is 1-D, has a block axis not divisible by the block
            size, is sharded so that a block would cross a shard boundary, or (outside a trace) holds NaN
            or inf.
        TypeError: a targeted leaf is not a floating-point array, or is a ``jax.ShapeDtypeStruct`` (use
            `abstract_quantize`).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    paths = [path_str(p) for p, _ in leaves]
    spec.select(paths)  # raises when nothing matches
    out = [quantize_leaf(path, w, spec) for path, (_, w) in zip(paths, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def check_targets(abstract: Any, spec: QuantSpec) -> None:
    """Raises what `quantize` would raise on `abstract`, without reading a value.

    Args:
        abstract: a params tree of arrays or ``jax.ShapeDtypeStruct`` (with ``sharding=`` to check shard
            boundaries), e.g. before a loader reads anything.
        spec: the `QuantSpec`.
    """
    leaves = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=is_quantized)[0]
    paths = [path_str(p) for p, _ in leaves]
    chosen = set(spec.select(paths))
    for path, (_, w) in zip(paths, leaves, strict=True):
        if path in chosen and not is_quantized(w):
            _check_leaf(path, w, spec)


def quantize_leaf(path: str, w: Any, spec: QuantSpec) -> Any:
    """`w` as a `QuantizedArray` if `spec` targets `path`, else `w` itself: `quantize` for one leaf.

    For loaders that quantize each parameter as soon as it is created, so the dense parameters are
    never all in memory at once (`lora_jax.models.load(..., quantize=spec)`).

    Example:
        >>> import jax.numpy as jnp
        >>> quantize_leaf("params/dense/kernel", jnp.ones((64, 8)), QuantSpec()).shape
        (64, 8)
        >>> quantize_leaf("params/dense/bias", jnp.ones(8), QuantSpec()).shape   # not targeted: unchanged
        (8,)
    """
    if is_quantized(w) or not spec.matches(path):
        return w
    if isinstance(w, jax.ShapeDtypeStruct):
        raise TypeError(
            f"{path}: lj.quantize needs arrays, found a jax.ShapeDtypeStruct {tuple(w.shape)} {w.dtype}. For "
            f"the shapes (and shardings) of the quantized parts without any values, use "
            f"lj.quant.abstract_quantize(abstract_params, spec)."
        )
    axis = _check_leaf(path, w, spec)
    if not isinstance(w, jax.core.Tracer):
        _check_finite(path, w)
    if isinstance(w, jax.core.Tracer) or not isinstance(w, jax.Array):
        return QuantizedArray.quantize(
            jnp.asarray(w),
            spec.format,
            spec.block_size,
            axis,
            double_quant=spec.double_quant,
            outlier_rows=spec.outlier_rows,
        )
    shardings = part_shardings(w.sharding, w.ndim, axis, spec.double_quant, spec.outlier_rows > 0)
    jitted = _quantize_jit(
        spec.format, spec.block_size, axis, spec.double_quant, spec.outlier_rows, shardings
    )
    meta = QuantMeta(
        tuple(int(s) for s in w.shape), jnp.dtype(w.dtype).name, spec.format, spec.block_size, axis
    )
    return QuantizedArray.of_arrays(jitted(w), meta)


def abstract_quantize(abstract: Any, spec: QuantSpec) -> Any:
    """`quantize` on shapes: ``jax.eval_shape`` of it, each part with the sharding `quantize` would give it.

    Args:
        abstract: a params tree of ``jax.ShapeDtypeStruct`` (with ``sharding=`` for sharded parts) or arrays.
        spec: the `QuantSpec`.

    Returns:
        The tree `quantize` returns, its `QuantizedArray` parts ``jax.ShapeDtypeStruct`` (codes and scales
        sharded like the dense weight, the double-quantization parts on its leading axes); nothing computed.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> q = abstract_quantize({"w": jax.ShapeDtypeStruct((128, 32), jnp.float32)}, QuantSpec(targets="w"))
        >>> q["w"].codes.shape, q["w"].codes.dtype, q["w"].nbytes
        ((64, 32), dtype('uint8'), 2120)
    """
    check_targets(abstract, spec)
    shaped = jax.eval_shape(lambda t: quantize(t, spec), abstract)
    leaves, treedef = jax.tree_util.tree_flatten(abstract, is_leaf=is_quantized)
    qleaves = treedef.flatten_up_to(shaped)
    out = []
    for w, q in zip(leaves, qleaves, strict=True):
        if not is_quantized(q) or is_quantized(w):
            out.append(w)  # as given (eval_shape would turn a concrete mesh into an abstract one)
            continue
        sh = part_shardings(
            getattr(w, "sharding", None), len(w.shape), q.meta.axis, q.double_quant, q.outlier_rows > 0
        )
        sh = sh or (None,) * 6
        parts = [
            None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
            for x, s in zip(q.arrays, sh, strict=True)
        ]
        out.append(QuantizedArray.of_arrays(parts, q.meta))
    return jax.tree_util.tree_unflatten(treedef, out)


def dequantize(params: Any, dtype: Any = None) -> Any:
    """`params` with every `QuantizedArray` replaced by its dense weight (original dtype unless `dtype`).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize({"w": jnp.full((64, 2), 0.5)}, QuantSpec(targets="w"))
        >>> dequantize(q)["w"][0].tolist()
        [0.5, 0.5]
    """
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if is_quantized(x) else x, params, is_leaf=is_quantized
    )
