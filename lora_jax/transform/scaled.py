"""`ScaledValue`: an adapted kernel times a pending per-channel scale, applied after (or before) its use.

Weight normalisation (Salimans & Kingma 2016; Linen ``nn.WeightNorm``, ``v / ‖v‖ * g`` written by hand),
spectral normalisation (``W / σ(W)``, Linen ``nn.SpectralNorm``) and per-channel scales all multiply a
kernel element-wise by an array ``c`` that varies along W's output axes only, its input axes only, or
not at all (a scalar). Folding ``c`` into W builds ``W ⊙ c``, and when ``c`` depends on W itself (the
norm of ``W + s·a·b``), differentiating through it computes a W-shaped gradient. So ``c`` is kept
*pending* instead, aligned to W's view like a factor (size 1 along the axes it does not vary along), and
applied where W is used, outside the contraction:

    x·(c_out ⊙ V) = (x·V) ⊙ c_out          x·(c_in ⊙ V) = (x ⊙ c_in)·V          V = W + s·a·b

with ``x·V = x·W + s·(x·a)·b`` (the `LoraValue` rule). The norm itself comes from
`lora_jax.transform.uses.sum_of_squares` (``‖W‖² + 2·(Wᵀa)·b + bᵀ(aᵀa)b`` per channel, as DoRA's
`lora_jax.dora.column_norm`), so the whole weight-normalised layer runs without a W-shaped array.

Rules:
- ``mul``/``div`` of a `LoraValue` (or a `ScaledValue`) by such a ``c``: a `ScaledValue` (``c_out`` for a
  c constant along a's axes, ``c_in`` for one constant along b's axes; scalars go to ``c_out``); a c
  that varies along both (an element-wise mask) falls back;
- view-like ops: V through the `LoraValue` rule, each pending scale through the same view
  (`views.FACTORS`); ``neg`` negates V;
- ``dot_general``: each scale goes to the output when it is constant along the contracted axes,
  else to x when it is constant along W's free axes; ``conv_general_dilated``: a scale along the
  kernel's output features goes to the output's feature axis, one along its input features to x's
  (tiled over the groups); ``gather``: a scale constant along the gathered axes goes to the rows;
- any other use (and a scale a use cannot move outside, e.g. one varying along a conv kernel's spatial
  axes) materialises ``c ⊙ (W + s·a·b)`` with a `FallbackWarning`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> p = {"v": jax.random.normal(jax.random.key(0), (8, 3)), "g": jnp.ones(3)}
    >>> d = lj.init(jax.random.key(1), p, lj.LoraSpec(rank=2, targets="v"))
    >>> wn = lambda p, x: x @ (p["v"] / jnp.linalg.norm(p["v"], axis=0) * p["g"])
    >>> x = jnp.ones((5, 8))
    >>> bool(jnp.allclose(lj.wrap(wn, strict=True)(p, d, x), wn(lj.merge(p, d), x), atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.transform import uses, views
from lora_jax.transform.interpreter import fallback
from lora_jax.transform.value import LoraValue, TrackedValue, present

__all__ = ["ScaledValue", "scale", "view", "neg", "dot_general", "conv_general_dilated", "gather"]


@dataclasses.dataclass
class ScaledValue(TrackedValue):
    """``c_in ⊙ c_out ⊙ V`` for a `LoraValue` V; the scales are float32, laid out on V's axes.

    Attributes:
        v: the scaled value ``V = W + s·a·b``.
        c_in: ``S``-rank array, size 1 along the axes only b varies along (a per-input-channel scale, maybe
            per stacked layer too), or None.
        c_out: ``S``-rank array, size 1 along the axes only a varies along (per output channel, or a
            scalar), or None.
    """

    v: LoraValue
    c_in: Any = None
    c_out: Any = None

    @property
    def path(self) -> str:
        return self.v.path

    @property
    def origin(self) -> tuple:
        return self.v.origin

    def scales(self) -> list:
        return [c for c in (self.c_in, self.c_out) if c is not None]

    def dense(self):
        d = self.v.dense()
        out = d.astype(jnp.promote_types(d.dtype, jnp.float32))
        for c in self.scales():
            out = out * c.astype(out.dtype)
        return out.astype(d.dtype)

    def arrays(self) -> tuple:
        return (*self.v.arrays(), self.c_in, self.c_out)

    def with_arrays(self, arrays: tuple, origin: tuple | None = None) -> ScaledValue:
        return ScaledValue(self.v.with_arrays(tuple(arrays[:-2]), origin), arrays[-2], arrays[-1])

    def stacked_arrays(self, length: int) -> tuple:
        def grow(c):  # a scale constant along the scanned axis gets the full length
            return c if c is None or c.shape[0] != 1 else jnp.broadcast_to(c, (length,) + c.shape[1:])

        return (*self.v.stacked_arrays(length), grow(self.c_in), grow(self.c_out))


def _float32(c):
    c = jnp.asarray(c)
    if jnp.issubdtype(c.dtype, jnp.floating) and jnp.finfo(c.dtype).bits >= 32:
        return c
    return c.astype(jnp.float32)


def scale(ctx, eqn, invals):
    """``W * c``, ``c * W``, ``W / c`` with c constant along one factor's axes: a pending scale.

    In inference mode (no factors) the kernel is looked through whatever c is (`views.scale`).
    """
    x, y = invals
    name = eqn.primitive.name
    if x is y or any(isinstance(z, LoraValue) and z.a is None for z in invals):
        return views.scale(ctx, eqn, invals)  # V * V (`uses.square`), or axis inference (looked through)
    if isinstance(x, TrackedValue) and isinstance(y, TrackedValue):
        return fallback(ctx, eqn, invals)
    if name == "div" and not isinstance(x, TrackedValue):  # c / W is not W + low rank
        return fallback(ctx, eqn, invals)
    t, c = (x, y) if isinstance(x, TrackedValue) else (y, x)
    sv = t if isinstance(t, ScaledValue) else ScaledValue(t)
    v = sv.v
    shape, n = np.shape(c), v.w.ndim
    if tuple(eqn.outvars[0].aval.shape) != v.w.shape or (shape and len(shape) != n):
        return fallback(ctx, eqn, invals)  # c broadcasts W up, or is not laid out on W's axes
    varies = {i for i, k in enumerate(shape) if k != 1 and v.w.shape[i] != 1}
    pa, pb = set(present(v.a.shape, v.w.shape)), set(present(v.b.shape, v.w.shape))
    if not varies & (pa - pb):  # constant along the input axes (may vary along stacked-layer axes)
        side = "c_out"
    elif not varies & (pb - pa):
        side = "c_in"
    else:  # an element-wise mask: (W + a·b)·c is not low rank
        return fallback(ctx, eqn, invals)
    c = _float32(c).reshape(shape or (1,) * n)
    c = 1.0 / c if name == "div" else c
    old = getattr(sv, side)
    out_dt = eqn.outvars[0].aval.dtype
    if out_dt != v.w.dtype:  # W promoted by c's dtype: the value is W + s·a·b in the wider dtype
        v = v.replace(w=v.w.astype(out_dt), a=v.a.astype(out_dt), b=v.b.astype(out_dt))
    return [dataclasses.replace(sv, v=v, **{side: c if old is None else old * c.astype(old.dtype)})]


def view(ctx, eqn, invals):
    """A view-like op: V through its `LoraValue` rule, each scale through the same view of its axes."""
    name = eqn.primitive.name
    sv, rest = invals[0], list(invals[1:])
    if any(isinstance(x, TrackedValue) for x in rest):
        return fallback(ctx, eqn, invals)
    rule = ctx.rule_for(name, [sv.v, *rest])
    out = None if rule is None else rule(ctx, eqn, [sv.v, *rest])
    if out is None or len(out) != 1 or not isinstance(out[0], LoraValue):
        return fallback(ctx, eqn, invals)
    if name == "convert_element_type":
        return [dataclasses.replace(sv, v=out[0])]  # the scales stay float32
    move = views.FACTORS.get(name)
    if move is None:
        return fallback(ctx, eqn, invals)
    cs = {}
    for side in ("c_in", "c_out"):
        c = getattr(sv, side)
        moved = None if c is None else move(eqn, c[..., None], sv.v, [sv.v.w, *rest])
        if c is not None and moved is None:
            return fallback(ctx, eqn, invals)
        cs[side] = None if c is None else moved[..., 0]
    return [ScaledValue(out[0], **cs)]


def neg(ctx, eqn, invals):
    """``-(c ⊙ V) = c ⊙ (-V)``."""
    sv = invals[0]
    return [dataclasses.replace(sv, v=views.neg(ctx, eqn, [sv.v])[0])]


def _as_layout(c, axes, ndim):
    """`c` (W-view rank) with its `axes` moved to positions ``0..`` of a rank-`ndim` layout: ``axes[k]`` of
    c becomes axis ``k`` of the result, the rest are size 1 (c must be size 1 on its other axes)."""
    keep = [i for i in range(c.ndim) if i not in axes]
    ct = jnp.transpose(c, list(axes) + keep).reshape([c.shape[i] for i in axes])
    return ct.reshape(ct.shape + (1,) * (ndim - len(axes)))


def _place(c, w_axes, target_axes, ndim):
    """`c` laid out on a rank-`ndim` array whose axis ``target_axes[k]`` corresponds to W's ``w_axes[k]``."""
    order = np.argsort(target_axes)
    w_sorted = [w_axes[k] for k in order]
    t_sorted = [target_axes[k] for k in order]
    c = _as_layout(c, w_sorted, len(w_sorted))  # W's axes in target order
    shape = [1] * ndim
    for k, t in enumerate(t_sorted):
        shape[t] = c.shape[k]
    return c.reshape(shape)


def _ones_on(c, axes) -> bool:
    return all(c.shape[i] == 1 for i in axes)


def _scaled_by(y, c):
    """``y ⊙ c`` computed in float32 (c is float32), rounded once to y's dtype."""
    wide = jnp.promote_types(y.dtype, c.dtype) if jnp.issubdtype(y.dtype, jnp.floating) else c.dtype
    return (y.astype(wide) * c.astype(wide)).astype(y.dtype)


def dot_general(ctx, eqn, invals):
    """``(x ⊙ c_x)·V ⊙ c_y``: each scale goes to the output or to x, then the `LoraValue` rule."""
    lhs, rhs = invals
    if isinstance(lhs, TrackedValue) and isinstance(rhs, TrackedValue):
        return fallback(ctx, eqn, invals)
    w_is_rhs = isinstance(rhs, ScaledValue)
    sv, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, xc, wb, xb = (rc, lc, rb, lb) if w_is_rhs else (lc, rc, lb, rb)
    n, nx = sv.v.w.ndim, len(x.shape)
    wfree = [i for i in range(n) if i not in wc and i not in wb]
    xfree = [i for i in range(nx) if i not in xc and i not in xb]
    nout = len(wb) + len(wfree) + len(xfree)
    # Output layout: batch axes, then lhs free axes, then rhs free axes.
    out_pos = dict(zip(wb, range(len(wb)), strict=True))
    first = len(wb) + (len(xfree) if w_is_rhs else 0)
    out_pos.update({a: first + k for k, a in enumerate(wfree)})
    c_x = c_y = None
    for c in sv.scales():
        if _ones_on(c, wc):
            c = _place(c, list(out_pos), list(out_pos.values()), nout)
            c_y = c if c_y is None else c_y * c
        elif _ones_on(c, wfree):
            c = _place(c, [*wc, *wb], [*xc, *xb], nx)
            c_x = c if c_x is None else c_x * c
        else:  # varies along contracted and free axes of this use
            return fallback(ctx, eqn, invals)
    if c_x is not None:
        x = _scaled_by(x, c_x)
    y = uses.dot_general(ctx, eqn, [x, sv.v] if w_is_rhs else [sv.v, x])[0]
    return [y if c_y is None else _scaled_by(y, c_y)]


def conv_general_dilated(ctx, eqn, invals):
    """``conv(x ⊙ c_in, V) ⊙ c_out`` for scales along the kernel's input / output feature axes."""
    x, sv = invals
    p = eqn.params
    if isinstance(x, TrackedValue) or not isinstance(sv, ScaledValue) or p["batch_group_count"] != 1:
        return fallback(ctx, eqn, invals)
    dn = p["dimension_numbers"]
    out_dim, in_dim, *spatial = dn.rhs_spec
    nx = len(x.shape)
    c_x = c_y = None
    for c in sv.scales():
        if _ones_on(c, (in_dim, *spatial)):
            c = _place(c, [out_dim], [dn.out_spec[1]], nx)
            c_y = c if c_y is None else c_y * c
        elif _ones_on(c, (out_dim, *spatial)):
            c = _place(c, [in_dim], [dn.lhs_spec[1]], nx)
            reps = [p["feature_group_count"] if i == dn.lhs_spec[1] else 1 for i in range(nx)]
            c = jnp.tile(c, reps)  # x's channel g·(in/G) + i meets kernel input channel i
            c_x = c if c_x is None else c_x * c
        else:  # varies along the kernel's spatial axes
            return fallback(ctx, eqn, invals)
    if c_x is not None:
        x = _scaled_by(x, c_x)
    y = uses.conv_general_dilated(ctx, eqn, [x, sv.v])[0]
    return [y if c_y is None else _scaled_by(y, c_y)]


def gather(ctx, eqn, invals):
    """``gather(V) ⊙ c`` for scales constant along the gathered axes (per feature, or scalars)."""
    sv, idx = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    if isinstance(idx, TrackedValue) or getattr(dn, "operand_batching_dims", ()):
        return fallback(ctx, eqn, invals)
    shape, sizes = sv.v.w.shape, p["slice_sizes"]
    kept = [d for d in range(len(shape)) if d not in dn.collapsed_slice_dims]  # -> dn.offset_dims
    sliced = [d for d in range(len(shape)) if d in dn.start_index_map or sizes[d] < shape[d]]
    if not all(_ones_on(c, sliced) for c in sv.scales()):  # a per-row scale
        return fallback(ctx, eqn, invals)
    y = uses.gather(ctx, eqn, [sv.v, idx])[0]
    for c in sv.scales():
        keep = [d for d in kept if c.shape[d] != 1]
        y = _scaled_by(y, _place(c, keep, [dn.offset_dims[kept.index(d)] for d in keep], y.ndim))
    return [y]


def folded(rule):
    """`rule` run with ``mul``/``div`` of a `LoraValue` folding c into W and a factor (`views.scale`).

    For value kinds whose view rules replay the `LoraValue` rule on a stand-in and need a `LoraValue` back
    (a quantized base, whose decoded W is scaled at its use anyway).
    """

    def run(ctx, eqn, invals):
        inner = ctx.rule_for
        pick = lambda name, vals: views.scale if name in ("mul", "div") else inner(name, vals)  # noqa: E731
        return rule(dataclasses.replace(ctx, rule_for=pick), eqn, invals)

    return run
