"""Rules for the uses of a `LoraValue`: each is rewritten into the base op plus the low-rank path.

- ``dot_general`` (Dense, DenseGeneral, einsum, attention projections, a weight-tied ``attend``):
  ``x·W + s·((x·a)·b)``, following the pure `plan_dot_general`;
- ``conv_general_dilated``: ``conv(x, W) + conv(x, a)·b`` (a conv with r output channels, then a 1x1 map
  r -> out, as PEFT's Conv LoRA);
- ``gather`` of rows (embedding lookups): ``W[ids] + s·a[ids]·b``.

Each rule first records, for axis inference, which of W's axes the use contracts (inputs), keeps as a
batch (stack) or leaves free (outputs). LoRA dropout applies to x on the low-rank path only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax.transform.interpreter import bind, fallback, materialize
from lora_jax.transform.plan import DotPlan, plan_dot_general
from lora_jax.transform.value import LoraValue, TrackedValue, dense_delta, squeeze_to

__all__ = ["dot_general", "conv_general_dilated", "gather"]


def _dropout(ctx, v: LoraValue, x):
    """x with LoRA dropout (rate ``v.dropout``) when the wrapped call got a dropout key."""
    if ctx.key is None or v.dropout == 0.0 or ctx.inferring:
        return x
    keep = 1.0 - v.dropout
    mask = jax.random.bernoulli(ctx.next_key(), keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def _note_roles(ctx, v: LoraValue, plan: DotPlan):
    roles = {}
    for role in ("inputs", "stack", "outputs"):  # a later role wins where a view axis merged several
        for i, r in enumerate(plan.roles):
            if r == role:
                roles.update({ax: role for ax in v.origin[i]})
    ctx.note(v, "dot_general", roles)


def dot_general(ctx, eqn, invals):
    """``x·W`` plus the low-rank path of `plan_dot_general`; W may be either operand."""
    lhs, rhs = invals
    if isinstance(lhs, TrackedValue) and isinstance(rhs, TrackedValue):
        return dot_general(ctx, eqn, [lhs, materialize(ctx, rhs, "dot_general (both operands adapted)")])
    w_is_rhs = isinstance(rhs, LoraValue)
    v, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
    p = eqn.params
    plan = plan_dot_general(p["dimension_numbers"], x.shape, v.w.shape, w_is_rhs,
                            None if v.a is None else v.a.shape, None if v.b is None else v.b.shape)
    _note_roles(ctx, v, plan)
    if plan.dense:
        # Contracting over axes of both factors at once (a trace-like use): no cheaper than dense.
        why = eqn.primitive.name + " (contracts axes of both a and b)"
        return bind(eqn, [materialize(ctx, lhs, why), materialize(ctx, rhs, why)])
    base = bind(eqn, [x, v.w] if w_is_rhs else [v.w, x])[0]
    if plan.low_rank is None:
        return [base]
    path, dt, pet, prec = plan.low_rank, x.dtype, p.get("preferred_element_type"), p.get("precision")
    first, second = (v.b, v.a) if path.first == "b" else (v.a, v.b)
    xin = _dropout(ctx, v, x)
    t = jnp.einsum(path.first_spec, xin, squeeze_to(first, path.first_axes).astype(dt), precision=prec,
                   preferred_element_type=pet).astype(dt)
    low = jnp.einsum(path.second_spec, t, squeeze_to(second, path.second_axes).astype(dt), precision=prec,
                     preferred_element_type=pet)
    low = low.reshape(path.low_shape)
    return [base + jnp.broadcast_to(low, base.shape).astype(base.dtype)]


def conv_general_dilated(ctx, eqn, invals):
    """``conv(x, W) + conv(x, a)·b`` for W the kernel (rhs) of a plain convolution."""
    x, v = invals
    p = eqn.params
    if isinstance(x, TrackedValue) or not isinstance(v, LoraValue):
        return fallback(ctx, eqn, invals)
    dn = p["dimension_numbers"]
    out_dim, in_dim, *spatial = dn.rhs_spec
    ctx.note(v, "conv", {**{ax: "inputs" for i in (in_dim, *spatial) for ax in v.origin[i]},
                         **{ax: "outputs" for ax in v.origin[out_dim]}})
    base = bind(eqn, [x, v.w])[0]
    if v.a is None:
        return [base]
    shape = v.w.shape
    a_ok = all(v.a.shape[i] == shape[i] for i in (in_dim, *spatial)) and v.a.shape[out_dim] == 1
    b_ok = all(v.b.shape[i] == 1 for i in range(len(shape)) if i != out_dim)
    if not (a_ok and b_ok) or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return fallback(ctx, eqn, invals)
    # Low-rank path: conv with a (r output channels), then a 1x1 map r -> out with b (PEFT's Conv LoRA).
    a_k = jnp.moveaxis(jnp.squeeze(v.a, out_dim), -1, out_dim).astype(x.dtype)
    xin = _dropout(ctx, v, x)
    low = lax.conv_general_dilated(xin, a_k, p["window_strides"], p["padding"], p["lhs_dilation"],
                                   p["rhs_dilation"], dn, precision=p["precision"],
                                   preferred_element_type=p["preferred_element_type"]).astype(x.dtype)
    feat = dn.out_spec[1]
    b_mat = v.b.reshape(shape[out_dim], v.b.shape[-1]).astype(x.dtype)  # (out, r)
    low = jnp.moveaxis(jnp.moveaxis(low, feat, -1) @ b_mat.T, -1, feat)
    return [base + low.astype(base.dtype)]


def gather(ctx, eqn, invals):
    """``W[ids] + s·a[ids]·b`` for a gather of slices of W (an embedding lookup)."""
    v, idx = invals
    if isinstance(idx, TrackedValue) or not isinstance(v, LoraValue):
        return fallback(ctx, eqn, invals)
    p = eqn.params
    dn = p["dimension_numbers"]
    shape = v.w.shape
    sizes = p["slice_sizes"]
    gathered = [d for d in range(len(shape)) if d in dn.start_index_map and sizes[d] < shape[d]]
    ctx.note(v, "gather", {**{ax: "inputs" for d in gathered for ax in v.origin[d]},
                           **{ax: "outputs" for d in range(len(shape)) if d not in gathered
                              for ax in v.origin[d]}})
    base = bind(eqn, [v.w, idx])[0]
    if v.a is None:
        return [base]
    if getattr(dn, "operand_batching_dims", ()):
        return fallback(ctx, eqn, invals)

    def gather_factor(f):
        keep = np.array([0 if f.shape[d] == 1 else 1 for d in dn.start_index_map], np.int32)
        fidx = idx * jnp.asarray(keep, idx.dtype)  # a factor constant along an axis is read at index 0
        fsizes = tuple(1 if f.shape[d] == 1 else sizes[d] for d in range(len(shape))) + (f.shape[-1],)
        fdn = dn._replace(offset_dims=tuple(dn.offset_dims) + (base.ndim,))
        return lax.gather(f, fidx, fdn, fsizes, mode=p["mode"], fill_value=p.get("fill_value"),
                          indices_are_sorted=p["indices_are_sorted"], unique_indices=p["unique_indices"])

    low = dense_delta(gather_factor(v.a), gather_factor(v.b), base.shape, base.dtype)
    return [base + low]
