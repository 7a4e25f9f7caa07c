"""`QuantValue`: a quantized base weight (QLoRA) as a value the `wrap` interpreter carries.

A `QuantizedArray` leaf enters the interpreter as its arrays (codes, scales) plus the view-like ops met
on the way to its use, and optionally its LoRA factors kept aligned to the view (as in `LoraValue`).
Nothing dense is built until a use:

- ``dot_general``: ``x·view(dequant(Wq)) + s·((x·a)·b)``. The base product has a custom VJP whose
  backward pass decodes W again instead of keeping a dense copy alive from forward to backward; the
  codes and scales get a zero cotangent (the base is frozen: no W-shaped gradient is ever formed);
- ``conv_general_dilated`` with the kernel as rhs: ``conv(x, view(dequant(Wq))) + conv(x, a)·b``, the base
  term with the same custom VJP, the low-rank term plain LoRA's factored conv;
- ``gather`` of rows (an embedding lookup): the rows of the codes and scales are gathered first and only
  they are decoded (when the block axis is not the gathered one), plus the low-rank rows;
- view-like ops (casts, transposes, reshapes, slices, ...): recorded, to be replayed on the decoded W at
  the use; the factors go through the `LoraValue` rule of the same op (run on a zero stand-in for W,
  which the compiler drops), so every view `LoraValue` supports works here too.

Any other use decodes W (plus ``s·a·b``) for that use alone, with a `FallbackWarning`. Control flow
(``jit``, ``scan`` over stacked quantized layers, ``checkpoint``, ``while``, ``cond``) only needs the
`TrackedValue` interface below.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> p = lj.quantize({"w": jnp.ones((64, 3))}, lj.QuantSpec(targets="w"))
    >>> d = lj.init(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w"))
    >>> y = lj.wrap(lambda p, x: x @ p["w"])(p, d, jnp.ones((5, 64)))
    >>> y.shape, float(y[0, 0])
    ((5, 3), 64.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _explicit
from lora_jax.delta import LoraDelta
from lora_jax.dora import is_dora
from lora_jax.quant.array import QuantizedArray, QuantMeta, dequantize_arrays
from lora_jax.transform import views
from lora_jax.transform.interpreter import bind, fallback, materialize
from lora_jax.transform.plan import plan_dot_general
from lora_jax.transform.uses import conv_low_rank, low_rank_term
from lora_jax.transform.value import (
    LoraValue,
    TrackedValue,
    aligned_factors,
    dense_delta,
    own_axes,
)

__all__ = ["QuantValue", "view", "each_array", "dot_general", "conv_general_dilated", "gather"]


@dataclasses.dataclass
class QuantValue(TrackedValue):
    """A view of a quantized kernel: ``ops(dequant(q)) + Σ_r a·b`` (a, b aligned to the view, or None).

    Attributes:
        q: the quantized arrays ``QuantizedArray.arrays`` (codes, scales, the double-quantization and the
            outlier-row parts).
        meta: their `QuantMeta` (the dense weight's shape, dtype, format, block size and axis).
        ops: the view-like equations met since the input, each ``(eqn, invals, i)`` with this value at
            ``invals[i]``; replayed on the decoded weight at a use.
        shape: the current view's shape ``S``.
        dtype: the current view's dtype.
        a: ``(*S, r)`` with size 1 along the output axes (scale folded into b), or None (no LoRA).
        b: ``(*S, r)`` with size 1 along the input axes, or None.
        origin: see `TrackedValue`.
        path: see `TrackedValue`.
        dropout: LoRA dropout rate on the input of the low-rank path.
    """

    q: tuple
    meta: QuantMeta
    ops: tuple
    shape: tuple
    dtype: Any
    a: Any
    b: Any
    origin: tuple
    path: str
    dropout: float = 0.0

    @classmethod
    def of(cls, q: QuantizedArray, d: LoraDelta | None, path: str) -> QuantValue:
        """The untouched quantized kernel `q` with its delta `d` (or None)."""
        if is_dora(d):
            # The magnitude needs W's column norms; a quantized base has no factored rule for them yet,
            # and dropping m would silently compute plain LoRA.
            raise ValueError(
                f"lj.wrap: {path} is a quantized base leaf with a DoRA delta (DoRA on a quantized base is "
                "not supported); dequantize that leaf (lj.dequantize) or use a plain LoRA spec (dora=False)"
            )
        a = b = None
        if d is not None:
            a, b = aligned_factors(jax.ShapeDtypeStruct(q.shape, q.dtype), d)
        return cls(
            q.arrays,
            q.meta,
            (),
            q.shape,
            q.dtype,
            a,
            b,
            own_axes(len(q.shape)),
            path,
            0.0 if d is None else d.dropout,
        )

    def base(self, q=None):
        """The decoded base weight's current view (no low-rank part), from `q` (default: ``self.q``)."""
        q = self.q if q is None else q
        w = dequantize_arrays(tuple(None if x is None else jax.lax.stop_gradient(x) for x in q), self.meta)
        for eqn, invals, i in self.ops:
            w = bind(eqn, [*invals[:i], w, *invals[i + 1 :]])[0]
        return w

    def dense(self):
        w = self.base()
        if self.a is None:
            return w
        return w + dense_delta(self.a, self.b, w.shape, w.dtype)

    def arrays(self) -> tuple:
        return (*self.q, self.a, self.b)

    def with_arrays(self, arrays: tuple, origin: tuple | None = None) -> QuantValue:
        q, (a, b) = tuple(arrays[:-2]), arrays[-2:]
        kw = {}
        if q[0].ndim == len(self.meta.shape) - 1:  # a slice of a stack (the body of a scan over layers)
            m = self.meta
            kw = dict(meta=dataclasses.replace(m, shape=m.shape[1:], axis=m.axis - 1), shape=self.shape[1:])
        return dataclasses.replace(
            self, q=q, a=a, b=b, origin=self.origin if origin is None else origin, **kw
        )

    def stacked_arrays(self, length: int) -> tuple:
        if self.ops or self.meta.axis == 0 or self.meta.shape[0] != length:
            raise ValueError(
                f"lora_jax.wrap: {self.path} is scanned over its axis 0, which must be a leading axis of every "
                f"quantized array: quantize it with a block axis after the stacked axis (QuantSpec(block_axis="
                f"{{{self.path!r}: 1}}) for a (layers, in, out) kernel), and pass it to the scan untouched."
            )
        if self.a is None:
            return (*self.q, None, None)
        grow = lambda f: jnp.broadcast_to(f, (length,) + f.shape[1:]) if f.shape[0] == 1 else f  # noqa: E731
        return (*self.q, grow(self.a), grow(self.b))

    def standin(self) -> LoraValue:
        """A `LoraValue` with a zero W of this view's shape and the same factors (for the factor rules)."""
        return LoraValue(
            jnp.zeros(self.shape, self.dtype), self.a, self.b, self.origin, self.path, self.dropout
        )


def view(ctx, eqn, invals):
    """A view-like op: recorded for the base, the factors go through the `LoraValue` rule of the op."""
    where = [i for i, x in enumerate(invals) if isinstance(x, TrackedValue)]
    if len(where) != 1:
        return fallback(ctx, eqn, invals)
    i = where[0]
    v = invals[i]
    sub = [*invals[:i], v.standin(), *invals[i + 1 :]]
    rule = ctx.rule_for(eqn.primitive.name, sub)
    out = rule(ctx, eqn, sub) if rule is not None else None
    if out is None or len(out) != 1 or not isinstance(out[0], LoraValue):
        return fallback(ctx, eqn, invals)
    o = out[0]
    return [
        dataclasses.replace(
            v,
            ops=v.ops + ((eqn, tuple(invals), i),),
            shape=tuple(o.w.shape),
            dtype=o.w.dtype,
            a=o.a,
            b=o.b,
            origin=o.origin,
        )
    ]


def _dropout(ctx, v: QuantValue, x):
    if ctx.key is None or v.dropout == 0.0:
        return x
    keep = 1.0 - v.dropout
    mask = jax.random.bernoulli(ctx.next_key(), keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def _decode_view(v: QuantValue, q, op_args):
    """The decoded view of `v` from its quantized arrays `q` and the other operands of its view ops."""
    w = dequantize_arrays(q, v.meta)
    for (eqn, _, i), args in zip(v.ops, op_args, strict=True):
        w = bind(eqn, [*args[:i], w, *args[i:]])[0]
    return w


def _tied(q: tuple, x) -> tuple:
    """`q` with a zero taken from `x` added to its float32 scales: a decode of it must wait for `x`.

    An empty `x` (a batch of 0 rows) has no element to take and nothing to wait for: `q` is returned.
    """
    if np.size(x) == 0:
        return q

    def tie(q, x):
        x0 = jax.lax.stop_gradient(jnp.reshape(x, (-1,))[0].astype(jnp.float32))
        zero = jnp.where(jnp.isfinite(x0), x0, 0.0) * 0.0  # 0 even for an inf or NaN x0
        codes, scales, scale_scales, offset, *rest = q
        if offset is not None:
            return codes, scales, scale_scales, offset + zero, *rest
        return codes, scales + zero, None, None, *rest

    if _explicit.mesh_of(q, x) is None:
        return tie(q, x)
    # Explicit mesh axes: flattening a sharded x is computed in Auto mode; q keeps its types.
    specs = tuple(None if a is None else _explicit.spec_of(a) for a in q)
    return _explicit.auto(tie, tuple(q), x, out_specs=specs)


def _base_use(eqn, v: QuantValue, operands: list, i: int):
    """``eqn`` applied with the decoded base at ``operands[i]``; the backward pass decodes it again.

    A custom VJP: the forward keeps no decoded W (its residuals are the other operands and the quantized
    arrays, already alive), and the backward decodes W after the cotangent arrives (tied to it, so the
    compiler can neither hoist the decode nor share the forward's). The
    quantized arrays get a zero cotangent: the base is frozen, no W-shaped gradient is formed.
    """
    others = operands[:i] + operands[i + 1 :]
    op_args = tuple(tuple(inv[:j] + inv[j + 1 :]) for _, inv, j in v.ops)

    def run(others, op_args, q):
        return bind(eqn, [*others[:i], _decode_view(v, q, op_args), *others[i:]])[0]

    def primal(others, op_args, q):
        # Decoded once the other operand exists, not all kernels up front.
        x = next((o for o in others if jnp.issubdtype(jnp.result_type(o), jnp.inexact)), None)
        return run(others, op_args, q if x is None else _tied(q, x))

    @jax.custom_vjp
    def use(others, op_args, q):
        return primal(others, op_args, q)

    def fwd(others, op_args, q):
        return primal(others, op_args, q), (others, op_args, q)

    def bwd(res, g):
        others, op_args, q = res
        # The decode below depends on g: it is neither merged with the forward's (the CPU compiler drops
        # optimization barriers before CSE) nor scheduled before g exists.
        q, g = jax.lax.optimization_barrier((_tied(q, g), g))
        _, pull = jax.vjp(lambda o, a: run(o, a, q), others, op_args)
        g_others, g_args = pull(g)
        return g_others, g_args, None  # None: a zero cotangent for every quantized array, typed by JAX

    use.defvjp(fwd, bwd)
    try:
        return use(list(others), op_args, tuple(v.q))
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise TypeError(_NO_JVP.format(path=v.path)) from e


# Why forward mode is refused: with a custom_jvp (what jvp needs), reverse mode is the transpose of the
# tangent map, whose decode of W can depend on forward-pass values only, so the compiler may share it with
# the forward's decode or hoist it: measured on CPU (6 quantized 256×256 kernels), the train step's
# temporaries then hold 5 dense kernels instead of 1. The custom_vjp of `_base_use` keeps the backward's
# decode tied to the cotangent instead.
_NO_JVP = (
    "lora_jax.wrap: forward-mode autodiff (jax.jvp, jax.jacfwd, jax.linearize) through the quantized base "
    "leaf {path} is not supported: its uses decode W inside a custom_vjp so that no dense copy of W is kept "
    "from the forward to the backward pass. Use reverse mode (jax.grad, jax.vjp, jax.jacrev; a Hessian-"
    "vector product as jax.jvp(jax.grad(f), ...) works), or dequantize the base first "
    "(lj.wrap(fn)(lj.dequantize(params), deltas, ...)) for forward mode."
)


def each_array(ctx, eqn, invals):
    """``pvary`` on a quantized value: its arrays as `views.each_array` casts them, and the other operands of
    its recorded view ops alike, since those ops are replayed on the decoded, now varying, W."""
    outs = views.each_array(ctx, eqn, invals)
    return [
        dataclasses.replace(
            y,
            ops=tuple(
                (e, tuple(a if k == i else views.vary(eqn, a) for k, a in enumerate(args)), i)
                for e, args, i in y.ops
            ),
        )
        if isinstance(y, QuantValue)
        else y
        for y in outs
    ]


def dot_general(ctx, eqn, invals):
    """``x·view(dequant(Wq)) + s·((x·a)·b)``, following `plan_dot_general`."""
    lhs, rhs = invals
    if isinstance(lhs, TrackedValue) and isinstance(rhs, TrackedValue):
        return dot_general(ctx, eqn, [lhs, materialize(ctx, rhs, "dot_general (both operands tracked)")])
    w_is_rhs = isinstance(rhs, QuantValue)
    v, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
    p = eqn.params
    plan = plan_dot_general(
        p["dimension_numbers"],
        x.shape,
        v.shape,
        w_is_rhs,
        None if v.a is None else v.a.shape,
        None if v.b is None else v.b.shape,
    )
    if plan.dense:
        return fallback(ctx, eqn, invals)
    base = _base_use(eqn, v, list(invals), 1 if w_is_rhs else 0)
    if plan.low_rank is None:
        return [base]
    path, dt, pet, prec = plan.low_rank, x.dtype, p.get("preferred_element_type"), p.get("precision")
    first, second = (v.b, v.a) if path.first == "b" else (v.a, v.b)
    xin = _dropout(ctx, v, x)
    return [base + low_rank_term(path, xin, first, second, base, dt=dt, acc=pet, prec=prec)]


def conv_general_dilated(ctx, eqn, invals):
    """``conv(x, view(dequant(Wq))) + conv(x, a)·b`` for a quantized kernel (rhs) of a convolution.

    The base term decodes the kernel at the op (with `_base_use`'s backward, as for ``dot_general``); the
    low-rank term is plain LoRA's factored conv (`uses.conv_low_rank`). Factors that do not split along
    the kernel's input and output axes, or ``batch_group_count > 1`` with LoRA, fall back (W + s·a·b
    decoded for this use, with a warning saying why); a kernel without LoRA never does.
    """
    x, v = invals
    if isinstance(x, TrackedValue) or not isinstance(v, QuantValue):
        return fallback(ctx, eqn, invals)
    low = None
    if v.a is not None:
        low = conv_low_rank(ctx, eqn, x, v, v.shape)
        if low is None:
            why = (
                "batch_group_count > 1"
                if eqn.params["batch_group_count"] != 1
                else "LoRA factors not split along the kernel's input and output axes"
            )
            return bind(eqn, [x, materialize(ctx, v, f"conv_general_dilated ({why})")])
    base = _base_use(eqn, v, [x, v], 1)
    return [base if low is None else base + low.astype(base.dtype)]


def _row_lookup(eqn, v: QuantValue, idx) -> Any:
    """``dequant(Wq)[ids]`` decoding only the gathered rows, for ``jnp.take(W, ids, axis=0)``; else None."""
    m, p = v.meta, eqn.params
    dn = p["dimension_numbers"]
    nb = idx.ndim - 1
    if (
        v.ops
        or m.axis == 0
        or idx.shape[-1] != 1
        or getattr(dn, "operand_batching_dims", ())
        or tuple(dn.start_index_map) != (0,)
        or tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.offset_dims) != tuple(range(nb, nb + len(m.shape) - 1))
        or tuple(p["slice_sizes"]) != (1, *m.shape[1:])
    ):
        return None
    mode = jax.lax.GatherScatterMode.from_any(p["mode"])
    if mode not in (
        jax.lax.GatherScatterMode.CLIP,
        jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
        jax.lax.GatherScatterMode.FILL_OR_DROP,
    ):
        return None
    ids = idx[..., 0]
    # The codes are read at clamped ids (CLIP; PROMISE_IN_BOUNDS clamps too); FILL_OR_DROP then replaces
    # the rows of out-of-range ids by the fill value (NaN by default), as the gather of the dense W does.
    parts = tuple(
        None if x is None else jnp.take(jax.lax.stop_gradient(x), ids, axis=0, mode="clip") for x in v.q
    )
    rows = dataclasses.replace(m, shape=tuple(ids.shape) + m.shape[1:], axis=m.axis - 1 + ids.ndim)
    out = dequantize_arrays(parts, rows)
    if mode == jax.lax.GatherScatterMode.FILL_OR_DROP:
        fill = p.get("fill_value")
        fill = np.nan if fill is None else fill
        ok = (ids >= 0) & (ids < m.shape[0])
        ok = ok.reshape(ids.shape + (1,) * (out.ndim - ids.ndim))
        out = jnp.where(ok, out, jnp.asarray(fill, out.dtype))
    return out


def gather(ctx, eqn, invals):
    """``dequant(Wq)[ids] + s·a[ids]·b`` for a gather of slices of W (an embedding lookup)."""
    v, idx = invals
    if isinstance(idx, TrackedValue) or not isinstance(v, QuantValue):
        return fallback(ctx, eqn, invals)
    base = _row_lookup(eqn, v, idx)
    if base is None:
        base = _base_use(eqn, v, [v, idx], 0)
    if v.a is None:
        return [base]
    # The low-rank rows: the LoraValue rule on a zero W (its base term is zero, the compiler drops it);
    # rows of out-of-range ids get 0 there (FILL_OR_DROP), the fill value is in `base` already.
    sub = [v.standin(), idx]
    rule = ctx.rule_for("gather", sub)
    low_eqn = eqn.replace(params={**eqn.params, "fill_value": 0})
    low = rule(ctx, low_eqn, sub)[0] if rule is not None else fallback(ctx, low_eqn, sub)[0]
    return [base + low.astype(base.dtype)]
