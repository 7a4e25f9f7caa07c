"""PiSSA, OLoRA and LoftQ: initialise the delta from part of W and train it on top of the residual.

PiSSA and OLoRA move a rank-r part of each targeted kernel W into the delta, so they change the base too:
`init_with_residual` returns ``(residual, deltas)`` with ``merge(residual, deltas) == params`` (to float32
rounding) and the residual is what `wrap` / `merge` are then called with.

- **PiSSA** (Meng et al. 2024, arXiv:2404.02948): with the SVD ``W = U·S·Vᵀ`` of the ``(in, out)``
  matrix, ``a = U_r·sqrt(S_r/s)``, ``b = sqrt(S_r/s)·V_rᵀ`` (so ``s·a·b`` is W's best rank-r part) and
  ``residual = W - s·a·b``. ``init="pissa_niter_<n>"`` uses the randomized SVD of Halko et al. (2011) with
  n subspace iterations, much faster for large kernels (PEFT's spelling).
- **OLoRA** (Büyükakyüz 2024, arXiv:2406.01775): with the QR decomposition ``Wᵀ = Q·R``, ``b = Q_rᵀ``,
  ``a = R_rᵀ`` (orthonormal b), ``residual = W - s·a·b``.

- **LoftQ** (Li et al. 2023, arXiv:2310.08659), for a quantized base (QLoRA): starting from ``a·b = 0``,
  alternately quantize ``Q = q(W - s·a·b)`` and take the top-r SVD of the quantization error,
  ``s·a·b = SVD_r(W - dequant(Q))`` (split as in PiSSA), so that ``dequant(Q) + s·a·b ≈ W`` at step 0
  instead of ``dequant(q(W))``. ``init="loftq"`` runs one round (PEFT's ``loftq_iter=1``),
  ``"loftq_iter_<n>"`` n rounds; `init_with_residual` then needs ``qspec=`` (the `lj.QuantSpec` of the
  base) and returns the quantized residual (every leaf the `QuantSpec` targets quantized; the LoRA targets
  by LoftQ).

Users with only the original weights can still use a fine-tuned adapter: `to_original_base` rewrites it as
a plain LoRA delta of rank 2r against the *original* W (as PEFT's PiSSA conversion does), since
``residual + s·a'·b' = W + s·[a', a₀]·[b'; -b₀]``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    >>> spec = lj.LoraSpec(rank=2, targets="w", init="pissa")
    >>> residual, deltas = lj.init_with_residual(jax.random.key(1), params, spec)
    >>> bool(jnp.allclose(lj.merge(residual, deltas)["w"], params["w"], atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.delta import LoraDelta, delta_weight, is_delta
from lora_jax.full import is_full
from lora_jax.pairing import paired_leaves
from lora_jax.quant.array import is_quantized
from lora_jax.spec import LoraSpec, path_str, residual_init

__all__ = ["init_with_residual", "principal_factors", "to_original_base", "loftq_rounds"]


def loftq_rounds(init: str) -> int:
    """LoftQ's number of rounds for ``init`` (``"loftq"``: 1, ``"loftq_iter_<n>"``: n), else 0."""
    if init == "loftq":
        return 1
    m = re.fullmatch(r"loftq_iter_([1-9]\d*)", init)
    return int(m.group(1)) if m else 0


def _randomized_svd(key, m, rank: int, niter: int):
    """Top-`rank` SVD of `m: (p, q)` by randomized subspace iteration (Halko et al. 2011, alg. 4.4)."""
    p, q = m.shape
    width = min(rank + max(rank, 8), p, q)  # oversampling keeps the top-r part accurate
    y = m @ jax.random.normal(key, (q, width), m.dtype)
    basis, _ = jnp.linalg.qr(y)
    for _ in range(niter):
        z, _ = jnp.linalg.qr(m.T @ basis)
        basis, _ = jnp.linalg.qr(m @ z)
    u, s, vt = jnp.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ u)[:, :rank], s[:rank], vt[:rank]


def principal_factors(key, w, rank: int, scale: float, init: str):
    """``(a: (in, r), b: (r, out))`` of a 2-D float32 matrix `w: (in, out)` by PiSSA or OLoRA (see module doc)."""
    if init == "olora":
        q, r = jnp.linalg.qr(w.T)  # wᵀ: (out, in) = q (out, k) · r (k, in)
        return r[:rank].T, q[:, :rank].T  # as PEFT: s·a·b is s times the rank-r QR part
    niter = re.fullmatch(r"pissa_niter_(\d+)", init)
    if niter:
        u, s, vt = _randomized_svd(key, w, rank, int(niter.group(1)))
    else:
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    root = jnp.sqrt(s / scale)
    return u * root, root[:, None] * vt


def init_with_residual(
    key: jax.Array,
    params: Any,
    spec: LoraSpec,
    *,
    fn: Callable | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
    qspec: Any = None,
) -> tuple[Any, Any]:
    """``(residual, deltas)`` for a PiSSA / OLoRA / LoftQ spec, with ``merge(residual, deltas) ≈ params``.

    Args:
        key: PRNG key (used by ``pissa_niter_<n>``; each leaf gets its own).
        params: any pytree of arrays.
        spec: a `LoraSpec` with ``init="pissa"``, ``"pissa_niter_<n>"``, ``"olora"``, ``"loftq"`` or
            ``"loftq_iter_<n>"``.
        fn, args, kwargs: as for `lj.init` (axis inference for >2-D kernels).
        qspec: LoftQ only (and required there): the `lj.QuantSpec` of the quantized base.

    Returns:
        residual: params with each targeted W replaced by ``W - s·a·b`` (in W's dtype); with LoftQ, the
            quantized base: ``Q`` (a `QuantizedArray`) at the LoRA targets, ``lj.quantize`` of the other
            leaves `qspec` targets, so that ``merge(residual, deltas) ≈ params`` more closely than
            ``dequantize(quantize(params, qspec))``.
        deltas: as from `lj.init`, but with a and b holding W's principal part (b is not zero).

    Raises:
        ValueError: `spec.init` is a plain init (``"kaiming"``, ``"gaussian"``): use `lj.init`; LoftQ
            without `qspec`, or with a LoRA target that `qspec` does not quantize.

    Example (LoftQ):
        >>> import jax, jax.numpy as jnp
        >>> import lora_jax as lj
        >>> w = {"w": jax.random.normal(jax.random.key(0), (128, 32))}
        >>> qspec = lj.QuantSpec(targets="w")
        >>> q, d = lj.init_with_residual(jax.random.key(1), w, lj.LoraSpec(rank=4, targets="w", init="loftq"),
        ...                              qspec=qspec)
        >>> err = lambda p: float(jnp.linalg.norm(p["w"] - w["w"]))
        >>> err(lj.merge(q, d)) < err(lj.dequantize(lj.quantize(w, qspec)))
        True
    """
    from lora_jax import core  # core imports this module's neighbours; keep the import local

    if not residual_init(spec.init):
        raise ValueError(
            f"init_with_residual: LoraSpec(init={spec.init!r}) leaves the base unchanged, so there is no "
            f"residual; use lj.init(key, params, spec), or init='pissa' / 'pissa_niter_<n>' / 'olora' (or "
            f"'loftq' / 'loftq_iter_<n>' with qspec= for a quantized base)."
        )
    rounds = loftq_rounds(spec.init)
    if rounds and qspec is None:
        raise ValueError(
            f"init_with_residual: LoraSpec(init={spec.init!r}) quantizes the base, so it needs the base's "
            f"QuantSpec: init_with_residual(key, params, spec, qspec=lj.QuantSpec(format='nf4'))."
        )
    if qspec is not None and not rounds:
        raise ValueError(
            f"init_with_residual: qspec= is for LoftQ (init='loftq' or 'loftq_iter_<n>'), not init={spec.init!r}; "
            f"quantize the residual afterwards with lj.quantize(residual, qspec)."
        )
    _check_dense(params, spec.init, rounds)
    plain = core.init(key, params, dataclasses.replace(spec, init="kaiming"), fn=fn, args=args, kwargs=kwargs)
    treedef, pairs = paired_leaves(params, plain)
    if rounds:
        out = _loftq(key, pairs, qspec, rounds)
        residual = jax.tree_util.tree_unflatten(treedef, [w for w, _ in out])
        from lora_jax.quant import quantize  # the LoRA targets are quantized already; quantize the rest

        return quantize(residual, qspec), jax.tree_util.tree_unflatten(treedef, [d for _, d in out])
    residual, deltas = [], []
    for path, w, d in pairs:
        if d is None or is_full(d):  # untouched, or trained in full (its copy replaces W as it is)
            residual.append(w)
            deltas.append(d)
            continue
        if not isinstance(w, (jax.Array, np.ndarray)):
            raise TypeError(f"{path}: {spec.init} needs a dense kernel, found {type(w).__name__}")
        d_new = _principal_delta(core._leaf_key(key, path), jnp.asarray(w), d, spec.init)
        w_res = (jnp.asarray(w, jnp.float32) - delta_weight(d_new, jnp.float32)).astype(w.dtype)
        if getattr(d, "m", None) is not None:  # DoRA: the magnitude of the original W
            d_new = dataclasses.replace(d, a=d_new.a, b=d_new.b)
        residual.append(w_res)
        deltas.append(d_new)
    return jax.tree_util.tree_unflatten(treedef, residual), jax.tree_util.tree_unflatten(treedef, deltas)


def _check_dense(params, init: str, rounds: int) -> None:
    """Raise if `params` holds a `QuantizedArray`: these inits need the dense weights (see `init_with_residual`)."""
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_quantized)
    path = next((p for p, x in leaves if is_quantized(x)), None)
    if path is None:
        return
    name = path_str(path)
    fix = (
        "LoftQ quantizes the base itself: pass the dense params (the original weights, or "
        "lj.dequantize(params)) together with qspec=your QuantSpec"
        if rounds
        else f"init={init!r} splits each dense weight (SVD/QR): pass the dense params (the original weights, "
        "or lj.dequantize(params)) and quantize the residual afterwards with lj.quantize(residual, qspec)"
    )
    raise ValueError(
        f"init_with_residual: {name} is already quantized (a QuantizedArray), but LoraSpec(init={init!r}) "
        f"needs dense weights. {fix}."
    )


def _loftq(key, pairs, qspec, rounds: int) -> list:
    """``[(Q or W, delta)]`` per leaf: LoftQ's alternation at each LoRA target (see the module doc)."""
    from lora_jax import core
    from lora_jax.quant import tree as qtree

    out = []
    for path, w, d in pairs:
        if d is None or is_full(d):
            out.append((w, d))
            continue
        if not qspec.matches(path):
            raise ValueError(
                f"{path}: LoftQ initialises the adapters of quantized kernels, but the QuantSpec (targets "
                f"{list(qspec.targets)}, exclude {list(qspec.exclude)}) does not quantize this LoRA target. "
                f"Quantize it too, or leave it out of LoraSpec.targets."
            )
        if getattr(d, "m", None) is not None:
            raise ValueError(f"{path}: LoftQ with a DoRA delta is not supported; use dora=False.")
        w32 = jnp.asarray(w, jnp.float32)
        k = core._leaf_key(key, path)
        d_new, q = d, None
        for _ in range(rounds):
            start = w32 if q is None else w32 - delta_weight(d_new, jnp.float32)
            q = qtree.quantize_leaf(path, start.astype(w.dtype), qspec)
            d_new = _principal_delta(k, w32 - q.dequantize(jnp.float32), d, "pissa")
        out.append((q, d_new))
    return out


def _principal_delta(key, w, d: LoraDelta, init: str) -> LoraDelta:
    ax, r = d.axes, d.rank
    ns = len(ax.stack)
    mat = jnp.transpose(w.astype(jnp.float32), ax.stack + ax.inputs + ax.outputs)
    stack, ins, outs = mat.shape[:ns], mat.shape[ns : ns + len(ax.inputs)], mat.shape[ns + len(ax.inputs) :]
    mat = mat.reshape((math.prod(stack), math.prod(ins), math.prod(outs)))
    keys = jax.random.split(key, mat.shape[0])
    a, b = jax.vmap(lambda k, m: principal_factors(k, m, r, d.scale, init))(keys, mat)
    a = a.reshape((*stack, *ins, r)).astype(d.a.dtype)
    b = b.reshape((*stack, r, *outs)).astype(d.b.dtype)
    return LoraDelta(a, b, scale=d.scale, axes=d.axes, dropout=d.dropout)


def to_original_base(deltas: Any, initial: Any) -> Any:
    """Fine-tuned PiSSA / OLoRA `deltas` as plain LoRA deltas of rank 2r against the original params.

    ``original + s·[a, a₀]·[b; -b₀] == residual + s·a·b`` where ``(a₀, b₀)`` are the `initial` deltas
    from `init_with_residual`; the result exports to PEFT (`lj.peft.save_peft`) for users who only have
    the original weights. The scale is unchanged (PEFT's ``r`` and ``lora_alpha`` both double).

    Args:
        deltas: the trained deltas.
        initial: the deltas `init_with_residual` returned (same structure).
    """

    def one(d, d0):
        if d is None or is_full(d):
            return d
        if getattr(d, "m", None) is not None:
            raise ValueError(
                "to_original_base: a DoRA delta does not convert to plain LoRA (its magnitude "
                "normalises W + s·a·b); export the residual base with lj.adapter.save_merged."
            )
        ns = len(d.axes.stack)
        a = jnp.concatenate([d.a, d0.a.astype(d.a.dtype)], axis=-1)
        b = jnp.concatenate([d.b, -d0.b.astype(d.b.dtype)], axis=ns)
        return LoraDelta(a, b, scale=d.scale, axes=d.axes, dropout=d.dropout)

    return jax.tree_util.tree_map(
        one, deltas, initial, is_leaf=lambda x: x is None or is_delta(x) or is_full(x)
    )
