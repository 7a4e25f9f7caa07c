"""The parameter transform: `init` deltas for a params pytree, `merge` them in, `unmerge` them out.

``deltas`` always has the structure of ``params`` with a `LoraDelta` at each targeted leaf and ``None``
elsewhere, so ``jax.tree.map(f, deltas, params, is_leaf=...)`` pairs them and optax ignores the Nones.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _explicit
from lora_jax.delta import LoraDelta, delta_weight, init_delta, is_delta
from lora_jax.dora import dora_fold, init_magnitude, is_dora
from lora_jax.full import init_full, is_full
from lora_jax.pairing import fit_problem, paired_leaves
from lora_jax.quant.array import QuantLeaf, box_quantized, is_quantized
from lora_jax.spec import LoraAxes, LoraSpec, path_str, residual_init
from lora_jax.transform.axes import infer_axes

__all__ = ["init", "merge", "unmerge", "count_params", "delta_weights"]

# `core.paired_leaves` (imported above) and `core._fit_problem` were the pairing helpers' old homes; they
# stay importable while callers move to lora_jax.pairing.
_fit_problem = fit_problem


def _leaf_key(key, path: str):
    # A key that depends only on (key, path): adding a target never changes another leaf's init.
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _kind(x) -> str:
    """What a misplaced argument is, for a message: ``a LoraSpec``, ``a PRNG key``, ``a dict``..."""
    if isinstance(x, LoraSpec):
        return "a LoraSpec"
    if isinstance(x, (jax.Array, np.ndarray)) and (
        jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or (x.dtype == jnp.uint32 and x.shape == (2,))
    ):
        return "a PRNG key"
    name = type(x).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _check_init_args(key, params, spec) -> None:
    """`init`'s arguments in their order: a key, a params tree, a LoraSpec (names what was swapped)."""
    spec_ok = isinstance(spec, LoraSpec)
    key_ok = isinstance(key, (jax.Array, np.ndarray)) and not isinstance(params, LoraSpec)
    if spec_ok and key_ok:
        return
    got = f"key is {_kind(key)}, params {_kind(params)}, spec {_kind(spec)}"
    if (
        any(isinstance(x, LoraSpec) for x in (key, params))
        or _kind(params) == "a PRNG key"
        or _kind(spec) == "a PRNG key"
    ):
        raise TypeError(
            f"lj.init(key, params, spec): the arguments are in the wrong order ({got}). Call "
            f"lj.init(jax.random.key(0), params, lj.LoraSpec(...))."
        )
    if not spec_ok:
        raise TypeError(f"lj.init: spec must be a LoraSpec, found {_kind(spec)}.")
    raise TypeError(f"lj.init: key must be a PRNG key (jax.random.key(seed)), found {_kind(key)}.")


def _check_target(path: str, w) -> None:
    shape, dtype = getattr(w, "shape", None), getattr(w, "dtype", None)
    if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{path}: LoRA targets must be floating-point arrays, found {type(w).__name__} with dtype "
            f"{dtype}. Narrow LoraSpec.targets or add this path to LoraSpec.exclude."
        )
    if len(shape) < 2:
        raise ValueError(
            f"{path}: LoRA targets need at least 2 dims (in, out), found shape {tuple(shape)} (a bias or "
            f"scale?). Narrow LoraSpec.targets, e.g. end it with '/kernel', or add this path to exclude."
        )


def init(
    key: jax.Array,
    params: Any,
    spec: LoraSpec,
    *,
    fn: Callable | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
) -> Any:
    """Fresh deltas for the leaves of `params` that `spec` targets.

    Args:
      key: PRNG key; each leaf gets ``fold_in(key, crc32(path))``.
      params: any pytree of arrays (Linen variables, an NNX State, a dict...).
      spec: the `LoraSpec`.
      fn, args, kwargs: optionally the apply function and example arguments,
        ``fn(params, *args, **kwargs)``; it is traced abstractly (no FLOPs) to infer the stacked, input and
        output axes of kernels without explicit axes from how they are contracted (2-D kernels too: an
        ``(out, in)`` layout gets `a` on its input axis, with a warning; undecided ones stay ``(in, out)``).

    Returns:
      A tree with params' structure: `LoraDelta` at targets (b = 0, so ``merge(params, deltas) == params``
      exactly), a `FullLeaf` copy (float32, or ``spec.dtype``) at the leaves ``spec.train_full`` selects,
      None elsewhere.

    Raises:
      TypeError: the arguments are not (key, params, LoraSpec), e.g. ``init(key, spec, params)``; the
        message says which is which.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
      >>> d = init(jax.random.key(0), params, LoraSpec(rank=4, targets=".*/kernel"))
      >>> d["dense"]["kernel"].a.shape, d["dense"]["kernel"].b.shape, d["dense"]["bias"]
      ((16, 4), (4, 32), None)
    """
    _check_init_args(key, params, spec)
    if residual_init(spec.init):
        raise ValueError(
            f"lj.init: LoraSpec(init={spec.init!r}) moves W's principal part into the delta, which changes the "
            f"base weights too; use residual, deltas = lj.init_with_residual(key, params, spec) and train on "
            f"the residual."
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    paths = [path_str(p) for p, _ in leaves]
    chosen = set(spec.select(paths))
    full = set(spec.select_full(paths, [p for p in paths if p in chosen]))
    inferred = None
    dtype = jnp.float32 if spec.dtype is None else jnp.dtype(spec.dtype)
    out = []
    for path, (_, w) in zip(paths, leaves, strict=True):
        if path in full:
            if isinstance(w, jax.ShapeDtypeStruct):
                raise TypeError(
                    f"{path}: LoraSpec.train_full copies the base value of this leaf, but params hold only its "
                    f"shape (a jax.ShapeDtypeStruct). Call lj.init with the real params (under jax.jit if "
                    f"they are sharded)."
                )
            out.append(init_full(w, dtype, where=path))
            continue
        if path not in chosen:
            out.append(None)
            continue
        _check_target(path, w)
        axes = spec.axes_for(path)
        if axes is None and len(w.shape) == 2 and fn is None:
            axes = LoraAxes()
        if axes is None:
            if fn is None:
                raise ValueError(
                    f"{path}: kernel of shape {tuple(w.shape)} has more than 2 dims and no axes were given. "
                    f"Either pass LoraSpec(axes={{{path!r}: LoraAxes(stack=..., inputs=..., outputs=...)}}) or "
                    f"let init infer them: lj.init(key, params, spec, fn=apply_fn, args=example_args)."
                )
            if inferred is None:  # only leaves without explicit axes; 2-D ones default to (in, out)
                need = {
                    p
                    for p, (_, x) in zip(paths, leaves, strict=True)
                    if p in chosen and spec.axes_for(p) is None
                }
                inferred = infer_axes(
                    fn,
                    _abstract_quantized(params),
                    need,
                    args,
                    kwargs or {},
                    optional={
                        p for p, (_, x) in zip(paths, leaves, strict=True) if p in need and len(x.shape) == 2
                    },
                )
            axes = inferred.get(path, LoraAxes())
        axes = axes.check(len(w.shape), path)
        d = init_delta(
            _leaf_key(key, path),
            w.shape,
            axes,
            spec.rank_for(path),
            spec.scale_for(path),
            spec.init,
            dtype,
            spec.dropout,
            where=path,
        )
        if spec.dora:
            if is_quantized(w):
                raise ValueError(
                    f"{path}: DoRA is not supported for a quantized base kernel (QuantizedArray); "
                    f"use LoraSpec(dora=False) for QLoRA targets, or exclude this path."
                )
            d = init_magnitude(w, d, spec.dora_detach_norm, where=path)
        out.append(d)
    return jax.tree_util.tree_unflatten(treedef, out)


def _abstract_quantized(params):
    # A quantized leaf is seen by the apply function as a dense weight of its shape and dtype.
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )


@jax.custom_jvp
def _add_exact(w, dw):
    """``w + dw``, but ``w`` itself (all its bits) where ``dw == 0``.

    Plain ``w + dw`` turns a -0.0 in W into +0.0 when dw is +0.0, and merging a fresh delta (b = 0) must
    give back params bit for bit. The JVP is that of ``w + dw``: a `where` would cut the gradient of dw
    wherever dw is zero (everywhere, at init).
    """
    return jnp.where(dw == 0, w, w + dw)


@_add_exact.defjvp
def _add_exact_jvp(primals, tangents):
    return _add_exact(*primals), tangents[0] + tangents[1]


def _fold(w, d: LoraDelta, sign: float, path: str = ""):
    # W ± s·a·b in float32 (float64 for float64 W), cast once back to W's dtype.
    if is_full(d):  # a fully trained leaf replaces W
        if sign < 0:
            raise ValueError(
                f"unmerge: {path} is trained in full (LoraSpec.train_full): merge replaced the base value by "
                f"the trained one, so the base cannot be recovered from the merged params. Keep the original "
                f"params instead of unmerging."
            )
        return d.value.astype(w.dtype)
    acc = w.dtype if jnp.finfo(w.dtype).bits > 32 else jnp.float32
    if is_dora(d):  # DoRA: (m / ‖V‖_col) ⊙ V with V = W + s·a·b
        if sign < 0:
            raise ValueError(
                "unmerge: a DoRA merge cannot be undone: W' = m ⊙ V / ‖V‖_col loses each column's scale of "
                "V = W + s·a·b. Keep the original params and merge them again instead."
            )
        return dora_fold(w, _add_exact(w.astype(acc), _delta_like(d, acc, w)), d).astype(w.dtype)
    return _add_exact(w.astype(acc), sign * _delta_like(d, acc, w)).astype(w.dtype)


def _delta_like(d: LoraDelta, dtype, w):
    # s·a·b, typed with W's sharding on a mesh with Explicit axes (a and b may be sharded otherwise).
    return _explicit.typed_like(delta_weight(d, dtype), w)


@functools.cache
def _fold_jit(sign: float, donate: bool, sharding):
    kw = {} if sharding is None else dict(out_shardings=sharding)
    return jax.jit(functools.partial(_fold, sign=sign), donate_argnums=(0,) if donate else (), **kw)


def _replace_full(w, d, sign: float, path: str):
    """A fully trained leaf, eagerly: its value in W's dtype and sharding (no W-sized jit per leaf)."""
    out = _fold(w, d, sign, path)
    if isinstance(w, jax.core.Tracer) or not isinstance(w, jax.Array):
        return out
    return jax.device_put(out, w.sharding)


def _apply(params, deltas, sign: float, donate: bool, dtype=None):
    treedef, pairs = paired_leaves(box_quantized(params), deltas)
    out = []
    for path, w, d in pairs:
        if isinstance(w, QuantLeaf):  # a quantized base leaf (QLoRA): decoded, then merged like a dense one
            w = w.q.dequantize(dtype)
        if d is not None and not jnp.issubdtype(jnp.result_type(w), jnp.floating):
            raise TypeError(
                f"{path}: a delta can only be merged into a floating-point array, found "
                f"{type(w).__name__} with dtype {getattr(w, 'dtype', None)}."
            )
        if d is None:
            out.append(w)
        elif is_full(d):
            out.append(_replace_full(w, d, sign, path))
        elif isinstance(w, jax.core.Tracer) or not isinstance(w, jax.Array):
            out.append(_fold(jnp.asarray(w), d, sign))  # inside a trace: plain ops, the caller's jit decides
        else:
            # One leaf at a time: peak memory is one kernel's worth, and each result keeps W's sharding.
            out.append(_fold_jit(sign, donate, w.sharding)(w, d))
    return jax.tree_util.tree_unflatten(treedef, out)


def merge(params: Any, deltas: Any, *, donate: bool = False, dtype: Any = None) -> Any:
    """``W + s·a·b`` at every delta (fp32 arithmetic, cast back to W's dtype); other leaves unchanged.

    A quantized base leaf (`lj.QuantizedArray`, QLoRA) is dequantized first, to `dtype` (default: the
    dtype it was quantized from), so the result is dense everywhere; `lj.quantize` it again for a
    quantized merged model.

    Works eagerly and inside `jit`; eagerly, each merged leaf keeps its input's sharding. With
    ``donate=True`` each targeted W's buffer is donated so merging a large model does not double its
    memory (the input params must not be used afterwards).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"w": jnp.zeros((3, 2))}
      >>> d = {"w": LoraDelta(jnp.ones((3, 1)), jnp.ones((1, 2)), scale=2.0)}
      >>> merge(params, d)["w"].tolist()
      [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """
    return _apply(params, deltas, 1.0, donate, dtype)


def unmerge(params: Any, deltas: Any, *, donate: bool = False) -> Any:
    """Inverse of `merge`: ``W - s·a·b``; ``unmerge(merge(p, d), d) ≈ p`` up to one rounding of W's dtype.

    Raises:
        ValueError: the deltas hold a DoRA delta or a fully trained leaf (``LoraSpec.train_full``): their
            merge cannot be undone (the path is named); keep the original params instead.
    """
    return _apply(params, deltas, -1.0, donate)


def count_params(deltas: Any) -> int:
    """Number of trainable scalars in the deltas (elements of every a and b, DoRA magnitude and fully
    trained leaf)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(deltas)))


def delta_weights(deltas: Any, dtype=jnp.float32) -> Any:
    """``s·a·b`` per targeted leaf, shaped like the kernel (None elsewhere, fully trained leaves
    included: they have no low-rank update), for analysis."""
    return jax.tree_util.tree_map(
        lambda d: None if d is None or is_full(d) else delta_weight(d, dtype),
        deltas,
        is_leaf=lambda x: x is None or is_delta(x) or is_full(x),
    )
