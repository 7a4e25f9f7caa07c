"""Adapter arithmetic: combine several adapters, re-rank them, and TIES / DARE merges.

Each function takes deltas trees (the structure of params, a `LoraDelta` at each target, None elsewhere,
as `lj.init` makes them) and returns one such tree, usable with `wrap`, `merge`, `save_adapter` and
`save_peft` like any other. Per target, with ΔWᵢ = sᵢ·aᵢ·bᵢ the update of adapter i:

- `combine(adapters, weights)`: Σᵢ wᵢ·ΔWᵢ exactly, by concatenating the factors along the rank axis
  (``[w₁s₁a₁ | w₂s₂a₂ | ...]`` times ``[b₁; b₂; ...]``): the rank is the sum of the ranks, scale 1.
- `rerank(deltas, k)`: the best rank-k approximation of s·a·b (Eckart-Young) without building ΔW:
  QR of ``a`` and ``bᵀ``, then the SVD of the small r×r core ``s·R_a·R_bᵀ``.
- `ties_merge` (Yadav et al. 2023, arXiv:2306.01708), `dare_merge` (Yu et al. 2023, arXiv:2311.03099) and
  `magnitude_prune_merge`: the merges of PEFT's ``add_weighted_adapter`` (``ties_svd``, ``dare_linear_svd``,
  ``dare_ties_svd``, ``magnitude_prune_svd``), computed on the dense ΔWᵢ (they are element-wise, so the
  dense update is needed) and returned as a rank-k delta via its truncated SVD.

A target that an adapter does not have contributes zero for it. Returned factors split the singular
values evenly, ``a = U·√(σ/c)``, ``b = √(σ/c)·Vᵀ``, with scale ``c`` (1 by default, or the input's
scale with ``scale=None`` in `rerank`), so that ``c·a·b`` is the approximation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.delta import LoraDelta, delta_weight
from lora_jax.spec import path_str

__all__ = ["combine", "rerank", "ties_merge", "dare_merge", "magnitude_prune_merge"]

_HI = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------------------
# Checking and pairing the inputs
# ---------------------------------------------------------------------------------------------------------


def _is_node(x) -> bool:
    return x is None or isinstance(x, LoraDelta)


def _check_delta(d, path: str, who: str) -> None:
    if d is None or type(d) is LoraDelta:
        return
    if isinstance(d, LoraDelta):  # a subclass: DoRA (a magnitude leaf) or another variant
        raise TypeError(
            f"{who} at {path!r} is a {type(d).__name__}, not a plain LoraDelta: its update is not s·a·b "
            f"(DoRA rescales each column of W + s·a·b by m / ‖W + s·a·b‖), so adapter arithmetic does not "
            f"apply. Merge it into the params (lj.merge) and take the difference from the base weights, or "
            f"train a plain LoRA adapter (LoraSpec(dora=False))."
        )
    raise TypeError(
        f"{who} at {path!r} is a {type(d).__name__}; adapter arithmetic needs a LoraDelta or None at each "
        f"leaf (a tree from lj.init, training or lj.adapter.load_adapter). A fully trained leaf (FullLeaf) "
        f"replaces W outright, so its update depends on the base weights: set that leaf to None in the "
        f"adapters and handle it separately."
    )


def _as_list(adapters, weights, fn: str):
    """``(trees, names, weights)`` from a sequence or a name → deltas mapping, with checked weights."""
    if isinstance(adapters, Mapping):
        names = [f"adapters[{k!r}]" for k in adapters]
        trees = list(adapters.values())
        if any(_is_node(t) for t in trees) or not isinstance(weights, Mapping):
            raise TypeError(
                f"lj.{fn}: adapters is a mapping, so it must map names to deltas trees, with weights a "
                f"mapping of the same names (found weights of type {type(weights).__name__}). To pass a "
                f"single deltas tree, wrap it in a list: lj.{fn}([deltas], [1.0], ...)."
            )
        if set(weights) != set(adapters):
            raise ValueError(
                f"lj.{fn}: weights must name the same adapters as adapters: adapters has "
                f"{sorted(map(str, adapters))}, weights has {sorted(map(str, weights))}."
            )
        weights = [weights[k] for k in adapters]
    elif isinstance(adapters, Sequence) and not isinstance(adapters, (str, bytes)):
        names = [f"adapters[{i}]" for i in range(len(adapters))]
        trees = list(adapters)
    else:
        raise TypeError(
            f"lj.{fn}: adapters must be a list of deltas trees or a mapping name -> deltas tree, found a "
            f"{type(adapters).__name__}. For one tree, pass [deltas]."
        )
    if not trees:
        raise ValueError(f"lj.{fn}: adapters is empty; pass at least one deltas tree.")
    if isinstance(weights, Mapping):
        raise TypeError(f"lj.{fn}: weights is a mapping but adapters is a list; pass a list of weights.")
    if isinstance(weights, (jax.Array, np.ndarray)):
        if weights.ndim != 1:
            raise ValueError(f"lj.{fn}: weights must be 1-D, one per adapter; found shape {weights.shape}.")
        weights = [weights[i] for i in range(weights.shape[0])]
    elif not isinstance(weights, Sequence) or isinstance(weights, (str, bytes)):
        raise TypeError(f"lj.{fn}: weights must be a list of numbers, found a {type(weights).__name__}.")
    if len(weights) != len(trees):
        raise ValueError(
            f"lj.{fn}: got {len(trees)} adapters but {len(weights)} weights; pass one weight per adapter."
        )
    return trees, names, list(weights)


def _aligned(trees, names, fn: str):
    """``(treedef, [(path, [delta_or_None per adapter])])``, checking that the adapters fit together."""
    flat = [jax.tree_util.tree_flatten_with_path(t, is_leaf=_is_node) for t in trees]
    leaves0, treedef = flat[0]
    paths = [path_str(p) for p, _ in leaves0]
    for name, (leaves, td) in zip(names[1:], flat[1:], strict=True):
        if td != treedef:
            mine = {path_str(p) for p, _ in leaves}
            only0, only1 = sorted(set(paths) - mine), sorted(mine - set(paths))
            detail = (
                f"paths only in {names[0]}: {only0[:5]}, only in {name}: {only1[:5]}"
                if only0 or only1
                else "same paths but different container types (e.g. a FrozenDict against a dict)"
            )
            raise ValueError(
                f"lj.{fn}: {name} does not have the tree structure of {names[0]} ({detail}). Every adapter "
                f"must be a deltas tree of the same params (None at leaves it does not target): build them "
                f"with lj.init on the same params, or load them with lj.adapter.load_adapter(path, params)."
            )
    rows = []
    for i, path in enumerate(paths):
        ds = [leaves[i][1] for leaves, _ in flat]
        for name, d in zip(names, ds, strict=True):
            _check_delta(d, path, name)
        present = [(n, d) for n, d in zip(names, ds, strict=True) if d is not None]
        if present:
            n0, d0 = present[0]
            for n, d in present[1:]:
                if d.axes != d0.axes:
                    raise ValueError(
                        f"lj.{fn}: at {path!r} {n0} has {d0.axes} but {n} has {d.axes}; adapters of one "
                        f"target must lay out W the same way. Re-create one with the other's axes "
                        f"(LoraSpec(axes=...)), or rerank each and merge them into the params separately."
                    )
                ns = len(d.axes.stack)
                if d.a.shape[:-1] != d0.a.shape[:-1] or d.b.shape[:ns] + d.b.shape[ns + 1 :] != (
                    d0.b.shape[:ns] + d0.b.shape[ns + 1 :]
                ):
                    raise ValueError(
                        f"lj.{fn}: at {path!r} {n0} and {n} are deltas of different kernels: {n0} has "
                        f"a {tuple(d0.a.shape)}, b {tuple(d0.b.shape)} (W {d0.weight_shape()}) and {n} has "
                        f"a {tuple(d.a.shape)}, b {tuple(d.b.shape)} (W {d.weight_shape()}). Only adapters "
                        f"of the same base model can be combined."
                    )
        rows.append((path, ds))
    return treedef, rows


def _out_dtype(ds):
    """The factors' dtype: theirs if they agree, else the widest (float32 for mixed 16-bit types)."""
    dts = {jnp.dtype(x.dtype) for d in ds for x in (d.a, d.b)}
    if len(dts) == 1:
        return dts.pop()
    widest = max(dts, key=lambda t: jnp.finfo(t).bits)
    return widest if jnp.finfo(widest).bits > 16 else jnp.dtype(jnp.float32)


def _compute_dtype(dtype):
    return jnp.dtype(jnp.float64) if jnp.finfo(dtype).bits > 32 else jnp.dtype(jnp.float32)


def _common_dropout(ds) -> float:
    drops = {d.dropout for d in ds}
    return drops.pop() if len(drops) == 1 else 0.0


def _check_rank(k, path: str, m: int, n: int, w_shape, fn: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"lj.{fn}: k must be an int (the new rank), found {type(k).__name__} {k!r}.")
    if k <= 0:
        raise ValueError(f"lj.{fn}: k must be a positive rank, found k={k}.")
    if k > min(m, n):
        raise ValueError(
            f"lj.{fn}: k={k} is above the largest possible rank at {path!r}: W has shape {tuple(w_shape)}, "
            f"i.e. {m} inputs x {n} outputs per layer, so k must be <= {min(m, n)}. Use a smaller k."
        )
    return int(k)


def _check_scale(scale, fn: str, allow_none: bool):
    if scale is None and allow_none:
        return None
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float, np.floating, np.integer))
        or not scale > 0
    ):
        raise ValueError(f"lj.{fn}: scale must be a positive number, found {scale!r}.")
    return float(scale)


# ---------------------------------------------------------------------------------------------------------
# Factors from a (low-rank) SVD
# ---------------------------------------------------------------------------------------------------------


def _unit(d: LoraDelta) -> LoraDelta:
    """d with scale 1 and no dropout: the static metadata left is structural (axes), so jitted helpers
    that take the scale as a traced argument compile once per shape, not once per alpha."""
    return dataclasses.replace(d, scale=1.0, dropout=0.0)


def _factors(u, sigma, vt, k: int, c, like: LoraDelta, dtype) -> LoraDelta:
    """Factors with ``c·a·b = u[..., :k]·diag(σ[:k])·vt[:k]``, zero-padded to rank k, in like's layout.

    u: (*S, m, t), sigma: (*S, t), vt: (*S, t, n) with σ sorted in decreasing order; c may be traced, so
    the delta returned has scale 1.0 and the caller sets the real one.
    """
    ax = like.axes
    ns = len(ax.stack)
    stack, ins = like.a.shape[:ns], like.a.shape[ns:-1]
    outs = like.b.shape[ns + 1 :]
    kk = min(k, sigma.shape[-1])
    root = jnp.sqrt(sigma[..., :kk] / c)
    a = u[..., :, :kk] * root[..., None, :]
    b = root[..., :, None] * vt[..., :kk, :]
    if kk < k:  # fewer directions than asked for: the rest are zero (still the best rank-k approximation)
        a = jnp.concatenate([a, jnp.zeros((*a.shape[:-1], k - kk), a.dtype)], axis=-1)
        b = jnp.concatenate([b, jnp.zeros((*b.shape[:-2], k - kk, b.shape[-1]), b.dtype)], axis=-2)
    a = a.reshape(*stack, *ins, k).astype(dtype)
    b = b.reshape(*stack, k, *outs).astype(dtype)
    return LoraDelta(a, b, scale=1.0, axes=ax)


def _flat_factors(d: LoraDelta, cd):
    """``a: (*S, m, r)``, ``b: (*S, r, n)`` in dtype cd."""
    ns = len(d.axes.stack)
    stack = d.a.shape[:ns]
    m = math.prod(d.a.shape[ns:-1])
    n = math.prod(d.b.shape[ns + 1 :])
    return d.a.astype(cd).reshape(*stack, m, d.rank), d.b.astype(cd).reshape(*stack, d.rank, n)


def _sizes(d: LoraDelta) -> tuple[int, int]:
    ns = len(d.axes.stack)
    return math.prod(d.a.shape[ns:-1]), math.prod(d.b.shape[ns + 1 :])


@functools.partial(jax.jit, static_argnums=(3,))
def _rerank_one(d: LoraDelta, s, c, k: int) -> LoraDelta:
    """The rank-k truncation of ``s·a·b`` (d has scale 1), as factors for scale c (set by the caller)."""
    dtype = _out_dtype([d])
    cd = _compute_dtype(dtype)
    a, b = _flat_factors(d, cd)
    qa, ra = jnp.linalg.qr(a)  # (*S, m, p), (*S, p, r)      p = min(m, r)
    qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))  # (*S, n, q), (*S, q, r)
    core = jnp.asarray(s, cd) * jnp.matmul(ra, jnp.swapaxes(rb, -1, -2), precision=_HI)  # (*S, p, q)
    uc, sigma, vct = jnp.linalg.svd(core, full_matrices=False)
    u = jnp.matmul(qa, uc, precision=_HI)  # (*S, m, t)
    vt = jnp.matmul(vct, jnp.swapaxes(qb, -1, -2), precision=_HI)  # (*S, t, n)
    return _factors(u, sigma, vt, k, jnp.asarray(c, cd), d, dtype)


@jax.jit
def _concat(weights, scales, ds) -> LoraDelta:
    """``[w₁s₁a₁ | w₂s₂a₂ | ...]`` and ``[b₁; b₂; ...]`` of one target's deltas (each of scale 1)."""
    dtype = _out_dtype(ds)
    cd = _compute_dtype(dtype)
    ns = len(ds[0].axes.stack)
    a = jnp.concatenate(
        [d.a.astype(cd) * (jnp.asarray(w, cd) * jnp.asarray(s, cd)) for w, s, d in zip(weights, scales, ds)],
        axis=-1,
    )
    b = jnp.concatenate([d.b.astype(dtype) for d in ds], axis=ns)
    return LoraDelta(a.astype(dtype), b, 1.0, ds[0].axes)


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------


def combine(adapters: Sequence[Any] | Mapping[str, Any], weights) -> Any:
    """Σᵢ wᵢ·ΔWᵢ per target, exactly, as one deltas tree of rank Σᵢ rᵢ (PEFT's ``cat`` combination).

    At each target, ``a = [w₁s₁·a₁ | w₂s₂·a₂ | ...]: (*stack, *in, Σr)``, ``b = [b₁; b₂; ...]: (*stack, Σr,
    *out)`` and scale 1, so ``a·b = Σᵢ wᵢ·sᵢ·aᵢ·bᵢ``. Adapters without a delta at a target add nothing
    there; a target no adapter has stays None. Weights may be traced (the function works under `jax.jit`).
    To get back to a small rank, follow with `rerank`.

    Args:
      adapters: a list of deltas trees of the same params (or a mapping name -> deltas tree).
      weights: one number per adapter (a list, a 1-D array, or a mapping with adapters' names); negative
        weights subtract.

    Returns:
      A deltas tree with the adapters' structure; each delta has scale 1.0, the adapters' common axes,
      their common dropout (0.0 if they differ) and their common dtype (the widest if they differ).

    Raises:
      ValueError: no adapters, a weight count that differs from the adapter count, trees of different
        structure, or deltas of one target with different axes or kernel shapes (the path and both shapes
        are named).
      TypeError: a leaf is a DoRA delta or not a delta at all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import lora_jax as lj
      >>> p = {"w": jnp.zeros((6, 5))}
      >>> d1 = {"w": lj.LoraDelta(jnp.ones((6, 2)), jnp.ones((2, 5)), scale=0.5)}
      >>> d2 = {"w": lj.LoraDelta(jnp.ones((6, 3)), jnp.ones((3, 5)), scale=2.0)}
      >>> c = lj.combine([d1, d2], [1.0, -0.25])
      >>> c["w"].rank, c["w"].scale, float(lj.delta_weight(c["w"])[0, 0])   # 1·0.5·2 - 0.25·2·3
      (5, 1.0, -0.5)
    """
    trees, names, weights = _as_list(adapters, weights, "combine")
    treedef, rows = _aligned(trees, names, "combine")
    out = []
    for _, ds in rows:
        present = [(w, d) for w, d in zip(weights, ds, strict=True) if d is not None]
        if not present:
            out.append(None)
            continue
        ws, ds = zip(*present, strict=True)
        c = _concat(ws, tuple(d.scale for d in ds), tuple(_unit(d) for d in ds))
        out.append(dataclasses.replace(c, dropout=_common_dropout(ds)))
    return jax.tree_util.tree_unflatten(treedef, out)


def rerank(deltas: Any, k: int, *, scale: float | None = 1.0) -> Any:
    """The best rank-k approximation of each delta's s·a·b, as deltas of rank k.

    For ``a: (*stack, *in, r)``, ``b: (*stack, r, *out)`` (flattened to m = Π in, n = Π out), with
    ``a = Q_a·R_a`` and ``bᵀ = Q_b·R_b`` (reduced QR) and ``s·R_a·R_bᵀ = U·diag(σ)·Vᵀ`` (an SVD of at
    most r×r), ``s·a·b = (Q_a·U)·diag(σ)·(Q_b·V)ᵀ`` is an SVD of ΔW, and its first k terms are the best
    rank-k approximation in Frobenius and spectral norm (Eckart-Young); the m×n ΔW is never built. Each
    stacked layer is approximated on its own. The returned ``a = Q_a·U_k·√(σ_k/c)`` and
    ``b = √(σ_k/c)·(Q_b·V_k)ᵀ`` have scale c, so ``c·a·b`` is the approximation and both factors carry
    the same singular values. For k above r (but at most min(m, n)) the extra columns of a and rows of b
    are zero.

    Args:
      deltas: a deltas tree (or one `LoraDelta`), e.g. from `combine`.
      k: the new rank, 1 <= k <= min(m, n) at every target.
      scale: the scale c of the returned deltas: 1.0 (PEFT's ``lora_alpha = r`` convention for merged
        adapters), any positive number (e.g. alpha / k of the spec you keep training with), or None to keep
        each delta's own scale.

    Returns:
      A tree with the structure of `deltas`; each delta has ``a: (*stack, *in, k)``, ``b: (*stack, k,
      *out)``, the input's axes, dropout and dtype (computed in float32 or float64).

    Raises:
      ValueError: k <= 0, or k above min(m, n) at some target (the path and W's shape are named), or a
        scale that is not positive.
      TypeError: k is not an int, or a leaf is a DoRA delta or not a delta.
    """
    scale = _check_scale(scale, "rerank", allow_none=True)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(deltas, is_leaf=_is_node)
    out = []
    for p, d in leaves:
        path = path_str(p) or "deltas"
        _check_delta(d, path, "deltas")
        if d is None:
            out.append(None)
            continue
        m, n = _sizes(d)
        kk = _check_rank(k, path, m, n, d.weight_shape(), "rerank")
        c = d.scale if scale is None else scale
        out.append(dataclasses.replace(_rerank_one(_unit(d), d.scale, c, kk), scale=c, dropout=d.dropout))
    return jax.tree_util.tree_unflatten(treedef, out)


def ties_merge(
    adapters: Sequence[Any] | Mapping[str, Any],
    weights,
    *,
    density: float,
    k: int | None = None,
    majority_sign: str = "total",
    scale: float = 1.0,
) -> Any:
    """TIES merging (trim, elect sign, disjoint merge) of the adapters' ΔW, as rank-k deltas.

    Per target, with τᵢ = ΔWᵢ = sᵢ·aᵢ·bᵢ (zero for an adapter without this target), as PEFT's
    ``add_weighted_adapter(combination_type="ties_svd")`` and ``peft.utils.merge_utils.ties``:

    1. trim: keep the ``int(density·N)`` largest |τᵢ| of each kernel (N entries per stacked layer), zero the
       rest;
    2. elect: ``γ = sign(Σᵢ τᵢ)`` (``majority_sign="total"``) or ``sign(Σᵢ sign τᵢ)`` (``"frequency"``),
       +1 where that sum is 0;
    3. disjoint merge: ``ΔW = Σᵢ [sign τᵢ = γ]·wᵢ·τᵢ / max(1, Σᵢ [sign τᵢ = γ])``;

    then the rank-k truncated SVD of ΔW, in factors as in `rerank`. This needs each ΔWᵢ dense, one target
    at a time.

    Args:
      adapters: a list of deltas trees of the same params (or a mapping name -> deltas tree).
      weights: one number per adapter, applied after trimming and sign election (as PEFT does).
      density: the fraction of each τᵢ kept, in (0, 1]; 1 keeps all.
      k: the rank of the result; None: the largest rank among the adapters at each target (at most
        min(m, n)).
      majority_sign: ``"total"`` or ``"frequency"``.
      scale: the scale of the returned deltas (see `rerank`).

    Returns:
      A deltas tree with the adapters' structure.

    Raises:
      ValueError: as `combine`, and a density outside (0, 1], an unknown majority_sign, or a bad k.
      TypeError: a DoRA delta or a leaf that is not a delta.
    """
    if majority_sign not in ("total", "frequency"):
        raise ValueError(
            f"lj.ties_merge: majority_sign must be 'total' or 'frequency', found {majority_sign!r}."
        )
    return _dense_merge(adapters, weights, "ties_merge", density, k, scale, "magnitude", majority_sign, None)


def dare_merge(
    key: jax.Array,
    adapters: Sequence[Any] | Mapping[str, Any],
    weights,
    *,
    density: float,
    k: int | None = None,
    ties: bool = False,
    majority_sign: str = "total",
    scale: float = 1.0,
) -> Any:
    """DARE merging (drop and rescale) of the adapters' ΔW, as rank-k deltas.

    Per target, with τᵢ = ΔWᵢ = sᵢ·aᵢ·bᵢ (zero for an adapter without this target), as PEFT's
    ``dare_linear_svd`` / ``dare_ties_svd`` and ``peft.utils.merge_utils.dare_linear`` / ``dare_ties``:
    each entry of τᵢ is kept with probability `density` and divided by it, ``τᵢ' = τᵢ·Mᵢ/density``, then
    ``ΔW = Σᵢ wᵢ·τᵢ'`` (``ties=False``, DARE-linear) or the sign election and disjoint merge of
    `ties_merge` on the τᵢ' (``ties=True``, DARE-TIES); then the rank-k truncated SVD as in `rerank`.

    The masks are a function of the key, the target's path and the number of adapters n only, drawn over
    ΔW in W's own layout: ``M = jax.random.bernoulli(fold_in(key, crc32(path) & 0x7FFFFFFF), density,
    (n, W.size)).reshape(n, *W.shape)`` and ``Mᵢ = M[i]`` (so adding a target never changes another
    target's masks).

    Args:
      key: a PRNG key (``jax.random.key(seed)``).
      adapters: a list of deltas trees of the same params (or a mapping name -> deltas tree).
      weights: one number per adapter.
      density: the keep probability, in (0, 1].
      k: the rank of the result; None: the largest rank among the adapters at each target.
      ties: elect signs and merge disjointly (DARE-TIES) instead of summing (DARE-linear).
      majority_sign: with ``ties=True``, ``"total"`` or ``"frequency"``.
      scale: the scale of the returned deltas (see `rerank`).

    Returns:
      A deltas tree with the adapters' structure.

    Raises:
      ValueError: as `ties_merge`.
      TypeError: key is not a PRNG key, a DoRA delta, or a leaf that is not a delta.
    """
    if not isinstance(key, (jax.Array, np.ndarray)) or not (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        raise TypeError(
            f"lj.dare_merge(key, adapters, weights, ...): key must be a PRNG key (jax.random.key(seed)), "
            f"found a {type(key).__name__}."
        )
    if majority_sign not in ("total", "frequency"):
        raise ValueError(
            f"lj.dare_merge: majority_sign must be 'total' or 'frequency', found {majority_sign!r}."
        )
    return _dense_merge(
        adapters, weights, "dare_merge", density, k, scale, "random", majority_sign if ties else None, key
    )


def magnitude_prune_merge(
    adapters: Sequence[Any] | Mapping[str, Any], weights, *, density: float, k: int | None = None, scale=1.0
) -> Any:
    """``ΔW = Σᵢ wᵢ·trim(τᵢ)``: TIES's trim step without the sign election (PEFT's ``magnitude_prune_svd``).

    Args and results as `ties_merge`.
    """
    return _dense_merge(
        adapters, weights, "magnitude_prune_merge", density, k, scale, "magnitude", None, None
    )


# ---------------------------------------------------------------------------------------------------------
# The dense merges
# ---------------------------------------------------------------------------------------------------------


def _check_density(density, fn: str) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float, np.floating, np.integer)):
        raise TypeError(f"lj.{fn}: density must be a number in (0, 1], found {type(density).__name__}.")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(
            f"lj.{fn}: density must be in (0, 1] (the fraction of each ΔW kept), found {density}; "
            f"1 keeps everything."
        )
    return float(density)


def _trim(tau, density: float, ns: int):
    """Keeps the int(density·N) largest |τ| of each stacked layer (N its size), like PEFT's topk; ties at
    the threshold are all kept. tau: (*W)."""
    if density >= 1.0:
        return tau
    lead = tau.shape[:ns]
    flat = jnp.abs(tau).reshape(*lead, -1)
    size = flat.shape[-1]
    keep = int(density * size)
    if keep == 0:
        return jnp.zeros_like(tau)
    threshold = jnp.sort(flat, axis=-1)[..., size - keep]
    mask = flat >= threshold[..., None]
    return jnp.where(mask.reshape(tau.shape), tau, jnp.zeros_like(tau))


def _disjoint(taus, weights, method: str):
    """TIES's sign election and disjoint mean. taus: (n, *W), weights: (n,)."""
    sign = jnp.sign(taus)
    votes = taus.sum(axis=0) if method == "total" else sign.sum(axis=0)
    majority = jnp.where(votes >= 0, jnp.ones_like(votes), -jnp.ones_like(votes))
    agree = (sign == majority).astype(taus.dtype)
    w = weights.reshape(-1, *([1] * (taus.ndim - 1)))
    total = (w * taus * agree).sum(axis=0)
    return total / jnp.maximum(agree.sum(axis=0), jnp.ones((), taus.dtype))


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _merge_leaf(ds, scales, weights, keep, c, density, k, sign_method) -> LoraDelta:
    """One target: the dense τᵢ = sᵢ·aᵢ·bᵢ (zero where ds[i] is None; each delta has scale 1), pruned (by
    magnitude, or by the DARE masks keep: (n, *W) when given) and merged, then truncated to rank k as
    factors for scale c (set by the caller)."""
    present = [d for d in ds if d is not None]
    like = present[0]
    dtype = _out_dtype(present)
    cd = _compute_dtype(dtype)
    ax = like.axes
    ns = len(ax.stack)
    w_shape = like.weight_shape()
    order = ax.stack + ax.inputs + ax.outputs
    m, n = _sizes(like)
    taus = []
    for i, d in enumerate(ds):
        if d is None:
            taus.append(jnp.zeros(w_shape, cd))
            continue
        tau = jnp.asarray(scales[i], cd) * delta_weight(d, cd)  # W's layout
        if keep is not None:
            taus.append(jnp.where(keep[i], tau, jnp.zeros_like(tau)) / jnp.asarray(density, cd))
        else:  # trim each stacked layer on its own: stacked axes first, then back to W's layout
            taus.append(jnp.transpose(_trim(jnp.transpose(tau, order), density, ns), np.argsort(order)))
    taus = jnp.stack(taus)
    w = jnp.stack([jnp.asarray(x, cd) for x in weights])
    if sign_method is None:
        merged = jnp.tensordot(w, taus, axes=1, precision=_HI)
    else:
        merged = _disjoint(taus, w, sign_method)
    flat = jnp.transpose(merged, order).reshape(*[w_shape[i] for i in ax.stack], m, n)  # (*stack, m, n)
    u, sigma, vt = jnp.linalg.svd(flat, full_matrices=False)
    return _factors(u, sigma, vt, k, jnp.asarray(c, cd), like, dtype)


def _dense_merge(adapters, weights, fn, density, k, scale, prune, sign_method, key):
    density = _check_density(density, fn)
    scale = _check_scale(scale, fn, allow_none=False)
    trees, names, weights = _as_list(adapters, weights, fn)
    treedef, rows = _aligned(trees, names, fn)
    out = []
    from tqdm.auto import tqdm

    todo = [r for r in rows if any(d is not None for d in r[1])]
    bar = tqdm(total=len(todo), desc=fn, disable=len(todo) < 16, leave=False)
    for path, ds in rows:
        present = [d for d in ds if d is not None]
        if not present:
            out.append(None)
            continue
        like = present[0]
        m, n = _sizes(like)
        default = min(max(d.rank for d in present), m, n)
        kk = _check_rank(default if k is None else k, path, m, n, like.weight_shape(), fn)
        keep = None
        if prune == "random":  # outside _merge_leaf: one compiled draw per shape, whatever the other args
            leaf_key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
            w_shape = like.weight_shape()
            keep = jax.random.bernoulli(leaf_key, density, (len(ds), math.prod(w_shape)))
            keep = keep.reshape(len(ds), *w_shape)
        units = tuple(None if d is None else _unit(d) for d in ds)
        scales = tuple(0.0 if d is None else d.scale for d in ds)
        r = _merge_leaf(units, scales, tuple(weights), keep, scale, density, kk, sign_method)
        out.append(dataclasses.replace(r, scale=scale, dropout=_common_dropout(present)))
        bar.update()
    bar.close()
    return jax.tree_util.tree_unflatten(treedef, out)
