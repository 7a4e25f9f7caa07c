"""Rules for the uses of a `LoraValue`: each is rewritten into the base op plus the low-rank path.

- ``dot_general`` (Dense, DenseGeneral, einsum, attention projections, a weight-tied ``attend``):
  ``x·W + s·((x·a)·b)``, following the pure `plan_dot_general`;
- ``conv_general_dilated``: ``conv(x, W) + conv(x, a)·b`` (a conv with r output channels, then a 1x1 map
  r -> out, as PEFT's Conv LoRA); grouped and depthwise convs run a grouped conv with a (r channels per
  group), then a per-group map with b;
- ``gather`` of rows (embedding lookups): ``W[ids] + s·a[ids]·b``;
- ``V * V`` / ``V ** 2`` then ``reduce_sum`` (the norm of weight normalisation): three thin contractions;
- ``reduce_sum`` of V over its input (or output) axes (a per-channel mean): ``Σ W + (Σ a)·b``.

Each rule first records, for axis inference, which of W's axes the use contracts (inputs), keeps as a
batch (stack) or leaves free (outputs). LoRA dropout applies to x on the low-rank path only. Below float32
(bfloat16 compute), ``x·W`` and ``(x·a)·b`` accumulate in float32 and are added before one rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax import _explicit
from lora_jax.transform.interpreter import bind, fallback, materialize
from lora_jax.transform.plan import DotPlan, plan_dot_general
from lora_jax.transform.value import LoraValue, TrackedValue, dense_delta, labels, present, squeeze_to

__all__ = [
    "dot_general",
    "conv_general_dilated",
    "conv_low_rank",
    "gather",
    "SquareValue",
    "square",
    "sum_of_squares",
    "reduce_sum",
]


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


def low_rank_term(path, xin, first, second, base, *, dt, acc, prec, widen: bool = False):
    """``(xin·first)·second`` along `path` (a `DotPlan.low_rank`; the scale is folded into b), broadcast to
    `base`'s shape and dtype.

    The first product is rounded to `dt` unless `widen` (bfloat16 compute: both products accumulate in
    float32). With Explicit mesh axes it is computed in Auto mode, as on an Auto mesh (typed in Explicit
    types, its backward pass would all-gather the activations), and typed like `base` (x·W).
    """

    def run(xin, first, second):
        t = jnp.einsum(
            path.first_spec,
            xin,
            squeeze_to(first, path.first_axes).astype(dt),
            precision=prec,
            preferred_element_type=acc,
        )
        t = t if widen else t.astype(dt)
        low = jnp.einsum(
            path.second_spec,
            t,
            squeeze_to(second, path.second_axes).astype(t.dtype),
            precision=prec,
            preferred_element_type=acc,
        )
        return jnp.broadcast_to(low.reshape(path.low_shape), base.shape).astype(base.dtype)

    spec = _explicit.spec_of(base) if _explicit.mesh_of(base, xin, first, second) is not None else None
    return _explicit.auto(run, xin, first, second, out_specs=spec)


def dot_general(ctx, eqn, invals):
    """``x·W`` plus the low-rank path of `plan_dot_general`; W may be either operand."""
    lhs, rhs = invals
    if isinstance(lhs, TrackedValue) and isinstance(rhs, TrackedValue):
        return dot_general(ctx, eqn, [lhs, materialize(ctx, rhs, "dot_general (both operands adapted)")])
    w_is_rhs = isinstance(rhs, LoraValue)
    v, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
    p = eqn.params
    plan = plan_dot_general(
        p["dimension_numbers"],
        x.shape,
        v.w.shape,
        w_is_rhs,
        None if v.a is None else v.a.shape,
        None if v.b is None else v.b.shape,
    )
    _note_roles(ctx, v, plan)
    if plan.dense:
        # Contracting over axes of both factors at once (a trace-like use): no cheaper than dense.
        why = eqn.primitive.name + " (contracts axes of both a and b)"
        return bind(eqn, [materialize(ctx, lhs, why), materialize(ctx, rhs, why)])
    operands = [x, v.w] if w_is_rhs else [v.w, x]
    if plan.low_rank is None:
        return bind(eqn, operands)
    path, dt, pet, prec = plan.low_rank, x.dtype, p.get("preferred_element_type"), p.get("precision")
    out_dt = eqn.outvars[0].aval.dtype
    # Below float32 (bfloat16 compute), both products of the low-rank path and the base product
    # accumulate in float32 and are added once, then rounded once: as close to the float32 truth as x·W'.
    widen = jnp.issubdtype(out_dt, jnp.floating) and jnp.finfo(out_dt).bits < 32
    acc = np.dtype(np.float32) if widen else pet
    base = bind(eqn.replace(params={**p, "preferred_element_type": acc}) if widen else eqn, operands)[0]
    first, second = (v.b, v.a) if path.first == "b" else (v.a, v.b)
    xin = _dropout(ctx, v, x)
    low = low_rank_term(path, xin, first, second, base, dt=dt, acc=acc, prec=prec, widen=widen)
    return [(base + low).astype(out_dt)]


def conv_general_dilated(ctx, eqn, invals):
    """``conv(x, W) + conv(x, a)·b`` for W the kernel (rhs) of a plain convolution."""
    x, v = invals
    p = eqn.params
    if isinstance(x, TrackedValue) or not isinstance(v, LoraValue):
        return fallback(ctx, eqn, invals)
    dn = p["dimension_numbers"]
    out_dim, in_dim, *spatial = dn.rhs_spec
    ctx.note(
        v,
        "conv",
        {
            **{ax: "inputs" for i in (in_dim, *spatial) for ax in v.origin[i]},
            **{ax: "outputs" for ax in v.origin[out_dim]},
        },
    )
    base = bind(eqn, [x, v.w])[0]
    if v.a is None:
        return [base]
    low = conv_low_rank(ctx, eqn, x, v, v.w.shape)
    if low is None:
        return fallback(ctx, eqn, invals)
    return [base + low.astype(base.dtype)]


def conv_low_rank(ctx, eqn, x, v, shape):
    """The low-rank term ``conv(x, a)·b`` of a conv whose kernel (rhs, of `shape`) carries the factors
    ``v.a``, ``v.b`` (aligned to the kernel, as in `LoraValue`); None when the factors do not split along
    the kernel's input/spatial and output axes, or for ``batch_group_count > 1``.

    Shared by every value kind whose kernel term is computed apart (a quantized base decodes its own).
    """
    p = eqn.params
    dn = p["dimension_numbers"]
    out_dim, in_dim, *spatial = dn.rhs_spec
    a_ok = all(v.a.shape[i] == shape[i] for i in (in_dim, *spatial)) and v.a.shape[out_dim] == 1
    b_ok = all(v.b.shape[i] == 1 for i in range(len(shape)) if i != out_dim)
    groups = p["feature_group_count"]
    if not (a_ok and b_ok) or p["batch_group_count"] != 1:
        return None
    # Low-rank path: conv with a (r output channels), then a 1x1 map r -> out with b (PEFT's Conv LoRA).
    # Grouped / depthwise (G groups): every group convolves its own input channels with the same a, so
    # the conv has G·r output channels (a tiled G times, feature_group_count=G); then each group's r
    # channels map to that group's out/G output channels with its block of b.
    r = v.a.shape[-1]
    a_k = jnp.moveaxis(jnp.squeeze(v.a, out_dim), -1, out_dim).astype(x.dtype)
    if groups > 1:
        a_k = jnp.tile(a_k, [groups if i == out_dim else 1 for i in range(a_k.ndim)])
    xin = _dropout(ctx, v, x)
    low = lax.conv_general_dilated(
        xin,
        a_k,
        p["window_strides"],
        p["padding"],
        p["lhs_dilation"],
        p["rhs_dilation"],
        dn,
        feature_group_count=groups,
        precision=p["precision"],
        preferred_element_type=p["preferred_element_type"],
    ).astype(x.dtype)
    feat = dn.out_spec[1]
    b_mat = v.b.reshape(groups, shape[out_dim] // groups, r).astype(x.dtype)  # (G, out/G, r)
    low = jnp.moveaxis(low, feat, -1)
    low = jnp.einsum("...gr,gor->...go", low.reshape(low.shape[:-1] + (groups, r)), b_mat)
    return jnp.moveaxis(low.reshape(low.shape[:-2] + (shape[out_dim],)), -1, feat)


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
    ctx.note(
        v,
        "gather",
        {
            **{ax: "inputs" for d in gathered for ax in v.origin[d]},
            **{ax: "outputs" for d in range(len(shape)) if d not in gathered for ax in v.origin[d]},
        },
    )
    base = bind(eqn, [v.w, idx])[0]
    if v.a is None:
        return [base]
    if getattr(dn, "operand_batching_dims", ()):
        return fallback(ctx, eqn, invals)

    def gather_factor(f):
        keep = np.array([0 if f.shape[d] == 1 else 1 for d in dn.start_index_map], np.int32)
        keep = keep.reshape((1,) * (idx.ndim - 1) + (-1,))  # along the index vector (last) axis
        fidx = idx * jnp.asarray(keep, idx.dtype)  # a factor constant along an axis is read at index 0
        fsizes = tuple(1 if f.shape[d] == 1 else sizes[d] for d in range(len(shape))) + (f.shape[-1],)
        fdn = dn._replace(offset_dims=tuple(dn.offset_dims) + (base.ndim,))
        return lax.gather(
            f,
            fidx,
            fdn,
            fsizes,
            mode=p["mode"],
            fill_value=0,  # an out-of-range row is the base's fill value plus 0 (not fill·fill)
            indices_are_sorted=p["indices_are_sorted"],
            unique_indices=p["unique_indices"],
        )

    low = dense_delta(gather_factor(v.a), gather_factor(v.b), base.shape, base.dtype)
    return [base + low]


@dataclasses.dataclass
class SquareValue(TrackedValue):
    """``V ∘ V`` for a `LoraValue` V = W + Σ_r a·b, kept as V until a sum reduces it (`sum_of_squares`).

    A value kind of its own (not a `LoraValue`: the view rules do not apply to a square); any use but
    ``reduce_sum`` materialises it through the fallback.
    """

    v: LoraValue

    @property
    def path(self):
        return self.v.path

    @property
    def origin(self):
        return self.v.origin

    def dense(self):
        d = self.v.dense()
        return d * d

    def arrays(self) -> tuple:
        return self.v.arrays()

    def with_arrays(self, arrays: tuple, origin: tuple | None = None) -> SquareValue:
        return SquareValue(self.v.with_arrays(arrays, origin))

    def stacked_arrays(self, length: int) -> tuple:
        return self.v.stacked_arrays(length)


def square(ctx, eqn, invals):
    """``V * V``, ``V ** 2``, ``jnp.square(V)``: a `SquareValue` (in inference mode, looked through)."""
    v = invals[0]
    if eqn.primitive.name == "integer_pow" and eqn.params["y"] != 2:
        return fallback(ctx, eqn, invals)
    if v.a is None:
        return [v.replace(w=v.w * v.w)]
    return [SquareValue(v)]


def sum_of_squares(ctx, eqn, invals):
    """``Σ_axes (W + Σ_r a·b)²`` (the norm of weight normalisation) without building W + s·a·b.

    ``= Σ W² + 2 Σ_r Σ W·a_r·b_r + Σ_{r,r'} Σ a_r·a_r'·b_r·b_r'``: three contractions whose results have
    the reduced shape (W meets a like x does in ``x·W``; no W-shaped array, no W-shaped gradient).
    """
    v = invals[0].v
    axes = set(eqn.params["axes"])
    shape = v.w.shape
    n = len(shape)
    lab = labels(n + 2)
    keep = [i for i in range(n) if i not in axes]
    pa, pb = present(v.a.shape, shape), present(v.b.shape, shape)
    a, b = squeeze_to(v.a, pa), squeeze_to(v.b, pb)
    sa, sb = "".join(lab[i] for i in pa), "".join(lab[i] for i in pb)
    r, q = lab[n], lab[n + 1]
    full = "".join(lab)[:n]

    def term(spec_in, ops, have):
        out = [i for i in keep if i in have]
        res = jnp.einsum(  # at full float32 precision, as the element-wise squares it stands for
            f"{spec_in}->{''.join(lab[i] for i in out)}",
            *ops,
            preferred_element_type=jnp.float32,
            precision=lax.Precision.HIGHEST,
        )
        return res.reshape([shape[i] if i in out else 1 for i in keep])

    total = term(f"{full},{full}", (v.w, v.w), set(range(n)))
    total = total + 2 * term(f"{full},{sa}{r},{sb}{r}", (v.w, a, b), set(range(n)))
    total = total + term(f"{sa}{r},{sb}{r},{sa}{q},{sb}{q}", (a, b, a, b), set(pa) | set(pb))
    return [jnp.broadcast_to(total, [shape[i] for i in keep]).astype(eqn.outvars[0].aval.dtype)]


def reduce_sum(ctx, eqn, invals):
    """``Σ_axes (W + Σ_r a·b) = Σ_axes W + Σ_r (Σ a)·(Σ b)`` (a per-channel mean, as weight
    standardisation takes) when the sum runs over all of W's input axes or all of its output axes.

    A sum that leaves input and output axes both (one over a stacked-layer or broadcast axis) would
    build an in×out array: it falls back. In inference mode the value is looked through.
    """
    v = invals[0]
    axes = set(eqn.params["axes"])
    shape = v.w.shape
    n = len(shape)
    base = bind(eqn, [v.w])[0]
    if v.a is None:
        return [base]
    pa, pb = present(v.a.shape, shape), present(v.b.shape, shape)
    if not (set(pa) - set(pb) <= axes or set(pb) - set(pa) <= axes):
        return fallback(ctx, eqn, invals)
    lab = labels(n + 1)
    keep = [i for i in range(n) if i not in axes]
    out = [i for i in keep if i in pa or i in pb]
    low = jnp.einsum(
        f"{''.join(lab[i] for i in pa)}{lab[n]},{''.join(lab[i] for i in pb)}{lab[n]}"
        f"->{''.join(lab[i] for i in out)}",
        squeeze_to(v.a, pa),
        squeeze_to(v.b, pb),
        preferred_element_type=jnp.float32,
    )
    # Summed axes along which neither factor varies count each term shape[i] times.
    low = low * float(np.prod([shape[i] for i in axes if i not in pa and i not in pb]))
    low = jnp.broadcast_to(low.reshape([shape[i] if i in out else 1 for i in keep]), base.shape)
    return [base + low.astype(base.dtype)]
