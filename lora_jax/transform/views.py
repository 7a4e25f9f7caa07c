"""Rules for view-like ops on a `LoraValue`: the op applies to W and to both aligned factors alike.

A factor's axes line up with W's (size 1 where the factor is constant), plus a trailing rank axis that
every op leaves alone. So ``transpose(W)``, ``reshape(W)``, ``W[i:j]``, ``jnp.split(W)``,
``W.astype(bf16)``, ``jnp.tile(W)``, ``stop_gradient(W)``, ... stay low-rank:
``op(W + Σ_r a·b) = op(W) + Σ_r op(a)·op(b)``; so do flips (``rev``), padding (the factors are padded
with zeros), concatenations of kernels (block factors) and ``W ± c`` (a per-channel c becomes one more
rank, any other c is added to W). Each rule also maps the view's `origin` (which original axes each
view axis comes from) for axis inference. When an op cannot be expressed on the factors (e.g. a reshape
merging an axis a factor varies along with one it does not), the rule hands the use to the fallback.

`scale` folds a per-channel c into W and a factor (``c·W``); `wrap` keeps such a c pending instead
(`lora_jax.transform.scaled`) and uses `scale` for axis inference and for quantized bases. `FACTORS`
gives, per view primitive, the function that maps any array aligned to W's axes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax import _explicit
from lora_jax.transform.interpreter import bind, fallback
from lora_jax.transform.uses import square
from lora_jax.transform.value import LoraValue, TrackedValue, present

__all__ = [
    "view",
    "convert_element_type",
    "transpose",
    "broadcast_in_dim",
    "reshape",
    "squeeze",
    "slice_",
    "dynamic_slice",
    "identity",
    "scale",
    "rev",
    "stop_gradient",
    "FACTORS",
    "concatenate",
    "neg",
    "add",
    "split",
    "tile",
    "pad",
    "device_put",
]


def view(fn_factor, new_origin):
    """Rule builder: w' = the op on w; a' = fn_factor(eqn, a, v, invals) (same for b); origin from
    ``new_origin(ctx, eqn, v)``. A factor function returns None when the op has no factored form."""

    def rule(ctx, eqn, invals):
        v = invals[0]
        if any(isinstance(x, TrackedValue) for x in invals[1:]):
            return fallback(ctx, eqn, invals)
        w = bind(eqn, [v.w, *invals[1:]])[0]
        if v.a is None:
            a = b = None
        else:
            a, b = (fn_factor(eqn, f, v, invals) for f in (v.a, v.b))
            if a is None or b is None:  # not representable in factored form
                return fallback(ctx, eqn, invals)
        origin = new_origin(ctx, eqn, v)
        return [v.replace(w=w, a=a, b=b, origin=origin)]

    return rule


def _same_origin(ctx, eqn, v):
    return v.origin


def _cast_factor(eqn, f, v, invals):
    dt = eqn.params["new_dtype"]
    return f.astype(dt) if jnp.issubdtype(dt, jnp.inexact) else None


def _transpose_factor(eqn, f, v, invals):
    return jnp.transpose(f, tuple(eqn.params["permutation"]) + (f.ndim - 1,))


def _transpose_origin(ctx, eqn, v):
    return tuple(v.origin[i] for i in eqn.params["permutation"])


def _broadcast_factor(eqn, f, v, invals):
    shape, bdims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    fshape = [1] * len(shape)
    for k, j in enumerate(bdims):
        fshape[j] = f.shape[k]
    return lax.broadcast_in_dim(f, tuple(fshape) + (f.shape[-1],), tuple(bdims) + (len(shape),))


def _broadcast_origin(ctx, eqn, v):
    origin = [frozenset()] * len(eqn.params["shape"])
    for k, j in enumerate(eqn.params["broadcast_dimensions"]):
        origin[j] = v.origin[k]
    return tuple(origin)


def _reshape_groups(old, new):
    """Split a reshape into contiguous groups of old and new axes with equal products."""
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        gi, gj, po, pn = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn:
                gi.append(i)
                po *= old[i]
                i += 1
            else:
                gj.append(j)
                pn *= new[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _reshape_factor(eqn, f, v, invals):
    if eqn.params.get("dimensions") is not None:
        return None
    old, new = v.w.shape, tuple(eqn.params["new_sizes"])
    fshape = []
    for gi, gj in _reshape_groups(old, new):
        sizes = [f.shape[i] for i in gi]
        if all(s == 1 for s in sizes):
            fshape += [1] * len(gj)
        elif all(f.shape[i] == old[i] for i in gi):
            fshape += [new[j] for j in gj]
        else:  # a group mixing axes the factor varies along with axes it does not
            return None
    return f.reshape(tuple(fshape) + (f.shape[-1],))


def _reshape_origin(ctx, eqn, v):
    new = tuple(eqn.params["new_sizes"])
    origin = [frozenset()] * len(new)
    for gi, gj in _reshape_groups(v.w.shape, new):
        merged = frozenset().union(*(v.origin[i] for i in gi)) if gi else frozenset()
        for j in gj:
            origin[j] = merged
    return tuple(origin)


def _squeeze_factor(eqn, f, v, invals):
    return lax.squeeze(f, tuple(d % v.w.ndim for d in eqn.params["dimensions"]))


def _squeeze_origin(ctx, eqn, v):
    dims = {d % v.w.ndim for d in eqn.params["dimensions"]}
    # A squeezed axis that came from a W axis of size > 1 was indexed (a layer picked from a stack).
    indexed = frozenset().union(*(v.origin[d] for d in dims)) if dims else frozenset()
    if indexed:
        ctx.note(v, "index", {ax: "stack" for ax in indexed})
    return tuple(o for i, o in enumerate(v.origin) if i not in dims)


def _slice_factor(eqn, f, v, invals):
    p = eqn.params
    strides = p["strides"] or (1,) * v.w.ndim
    start, limit, step = [], [], []
    for i in range(v.w.ndim):
        if f.shape[i] == 1:
            start.append(0), limit.append(1), step.append(1)
        else:
            start.append(p["start_indices"][i]), limit.append(p["limit_indices"][i]), step.append(strides[i])
    return lax.slice(f, (*start, 0), (*limit, f.shape[-1]), (*step, 1))


def _dynamic_slice_factor(eqn, f, v, invals):
    starts = invals[1 : 1 + v.w.ndim]
    sizes = eqn.params["slice_sizes"]
    idx = [jnp.zeros((), jnp.int32) if f.shape[i] == 1 else starts[i] for i in range(v.w.ndim)]
    idx = [jnp.asarray(i).astype(jnp.int32) for i in idx]
    sz = [1 if f.shape[i] == 1 else sizes[i] for i in range(v.w.ndim)]
    return lax.dynamic_slice(f, (*idx, jnp.zeros((), jnp.int32)), (*sz, f.shape[-1]))


def _identity_factor(eqn, f, v, invals):
    return f


convert_element_type = view(_cast_factor, _same_origin)
transpose = view(_transpose_factor, _transpose_origin)
broadcast_in_dim = view(_broadcast_factor, _broadcast_origin)
reshape = view(_reshape_factor, _reshape_origin)
squeeze = view(_squeeze_factor, _squeeze_origin)
slice_ = view(_slice_factor, _same_origin)
dynamic_slice = view(_dynamic_slice_factor, _same_origin)
identity = view(_identity_factor, _same_origin)  # sharding constraints, copies: the value is unchanged


def _rev_factor(eqn, f, v, invals):
    return lax.rev(f, tuple(d for d in eqn.params["dimensions"] if f.shape[d] != 1))


rev = view(_rev_factor, _same_origin)  # jnp.flip; ConvTranspose(transpose_kernel=True) flips its kernel


def _stop_gradient_factor(eqn, f, v, invals):
    return lax.stop_gradient(f)


stop_gradient = view(_stop_gradient_factor, _same_origin)  # W, a and b all held constant


def scale(ctx, eqn, invals):
    """``c * W``, ``W * c`` or ``W / c`` for c constant along the axes of one factor: c goes into the other.

    ``W * W`` is a use, `uses.square`.

    c is a scalar or an array of W's rank with size 1 along the axes it does not vary along (how JAX
    writes ``W * g`` for a per-channel g): a per-output-channel scale (weight norm's g, a per-channel
    quantisation scale) scales b, a per-input-channel one scales a. A c that varies along the axes of
    both factors (an element-wise mask) falls back; in inference mode (no factors) the value is looked
    through whatever c is, so axis inference still sees the contraction behind it.
    """
    x, y = invals
    if x is y and isinstance(x, LoraValue) and eqn.primitive.name == "mul":
        return square(ctx, eqn, [x])
    if isinstance(x, TrackedValue) and isinstance(y, TrackedValue):
        return fallback(ctx, eqn, invals)
    if eqn.primitive.name == "div" and not isinstance(x, LoraValue):  # c / W is not W + low rank
        return fallback(ctx, eqn, invals)
    v, c = (x, y) if isinstance(x, LoraValue) else (y, x)
    w = bind(eqn, [v.w, c] if v is x else [c, v.w])[0]
    if w.shape != v.w.shape:  # c broadcasts W up: not a scaling of W
        return fallback(ctx, eqn, invals)
    if v.a is None:
        return [v.replace(w=w)]
    shape = np.shape(c)
    if shape and len(shape) != v.w.ndim:
        return fallback(ctx, eqn, invals)
    varies = {i for i, n in enumerate(shape) if n != 1 and v.w.shape[i] != 1}
    if not varies & set(present(v.a.shape, v.w.shape)):
        name = "b"
    elif not varies & set(present(v.b.shape, v.w.shape)):
        name = "a"
    else:  # an element-wise mask: (W + a·b)·c is not low rank
        return fallback(ctx, eqn, invals)
    f = getattr(v, name)
    cf = jnp.asarray(c).astype(f.dtype)[..., None]
    f = f * cf if eqn.primitive.name == "mul" else f / cf
    return [v.replace(w=w, **{name: f})]


def _tagged(v):
    """`v.origin` with each axis tagged by its path (a concatenation mixes several parameters)."""
    return tuple(frozenset(ax if isinstance(ax, tuple) else (v.path, ax) for ax in o) for o in v.origin)


def concatenate(ctx, eqn, invals):
    """Kernels concatenated along an axis (fused LSTM gates, a qkv kernel fused at run time): block factors.

    ``concat_k(W_i + a_i·b_i) = concat_k(W_i) + Σ_i a_i'·b_i'`` where the factor of ``W_i`` that varies
    along axis k is zero-padded to the whole axis (the other stays constant along it), and the padded
    factors are concatenated along the rank axis: rank Σ r_i, a block-diagonal product. Plain operands
    (a kernel that is not adapted) add no rank.
    """
    k = eqn.params["dimension"]
    tracked = [x for x in invals if isinstance(x, TrackedValue)]
    if any(not isinstance(x, LoraValue) for x in tracked) or len({x.dropout for x in tracked}) > 1:
        return fallback(ctx, eqn, invals)
    w = bind(eqn, [x.w if isinstance(x, LoraValue) else x for x in invals])[0]
    tags = [_tagged(x) for x in tracked]
    origin = tuple(frozenset().union(*(t[i] for t in tags)) for i in range(w.ndim))
    path = "+".join(dict.fromkeys(x.path for x in tracked))
    out = LoraValue(w, None, None, origin, path, tracked[0].dropout)
    if tracked[0].a is None:
        return [out]
    sizes = [np.shape(x.w if isinstance(x, LoraValue) else x)[k] for x in invals]
    offsets = np.cumsum([0] + sizes)
    parts = []  # (a_i', b_i') with their own rank axes
    for x, off, n in zip(invals, offsets, sizes, strict=False):
        if not isinstance(x, LoraValue):
            continue
        a, b = x.a, x.b
        pad = [(0, 0)] * a.ndim
        pad[k] = (int(off), int(offsets[-1] - off - n))
        a_varies = a.shape[k] == n > 1
        if a_varies:
            a = jnp.pad(a, pad)
        if not a_varies or b.shape[k] == n > 1:  # b carries the block (broadcast along k if constant)
            b = jnp.pad(jnp.broadcast_to(b, b.shape[:k] + (n,) + b.shape[k + 1 :]), pad)
        parts.append((a, b))
    full = (
        lambda fs: [
            jnp.broadcast_to(
                f,
                tuple(max(g.shape[i] for g in fs) for i in range(w.ndim))  # noqa: E731
                + f.shape[-1:],
            )
            for f in fs
        ]
    )
    a = jnp.concatenate(full([p[0] for p in parts]), axis=-1)
    b = jnp.concatenate(full([p[1] for p in parts]), axis=-1)
    return [out.replace(a=a, b=b)]


def neg(ctx, eqn, invals):
    """``-W = -w - Σ_r a·b``: negate w and b."""
    v = invals[0]
    return [v.replace(w=-v.w, b=None if v.b is None else -v.b)]


def device_put(ctx, eqn, invals):
    """device_put may carry several operands; tracked ones pass through (it is a no-op on values)."""
    outs = bind(eqn, [x.w if isinstance(x, LoraValue) else x for x in invals])
    return [x.replace(w=o) if isinstance(x, LoraValue) else o for x, o in zip(invals, outs, strict=True)]


def vary(eqn, a):
    """`a` made varying over the manual axes of the ``pvary`` `eqn` it does not vary over yet (itself if none
    or if it is not an array)."""
    if a is None or isinstance(a, TrackedValue) or not hasattr(a, "dtype"):
        return a
    missing = tuple(n for n in eqn.params["axes"] if n not in _explicit.varying_axes(a))
    return bind(eqn.replace(params={**eqn.params, "axes": missing}), [a])[0] if missing else a


def each_array(ctx, eqn, invals):
    """A cast of the type only (``pvary``: varying over shard_map's manual axes): the op is applied to each
    array of a tracked value (W, a, b; codes and scales) and the value stays tracked.

    Each array is made varying over the axes it does not vary over yet (`vary`: a factor may already vary
    where W does not, with one adapter per device).
    """
    return [
        x.with_arrays(tuple(vary(eqn, a) for a in x.arrays()))
        if isinstance(x, TrackedValue)
        else vary(eqn, x)
        for x in invals
    ]


def add(ctx, eqn, invals):
    """``W + c``, ``W - c``, ``c - W`` for a plain c: still W' + low rank.

    A c that varies along W's output axes only, its input axes only, or not at all (a scalar; a
    per-channel mean, as weight standardisation subtracts) becomes one more rank of the factors (ones on
    the other side), so nothing W-shaped depends on c; any other c is added to W. With LoRA dropout (which
    would drop the extra rank along with the low-rank path) c is added to W.
    """
    x, y = invals
    if isinstance(x, TrackedValue) and isinstance(y, TrackedValue):
        return fallback(ctx, eqn, invals)
    v, c = (x, y) if isinstance(x, TrackedValue) else (y, x)
    if tuple(eqn.outvars[0].aval.shape) != v.w.shape or eqn.outvars[0].aval.dtype != v.w.dtype:
        return fallback(ctx, eqn, invals)  # c broadcasts W up or widens it
    flip = eqn.primitive.name == "sub" and v is y  # c - W = -W + c
    if flip:
        v = neg(ctx, eqn, [v])[0]
    shape, n = np.shape(c), v.w.ndim
    sign = -1.0 if eqn.primitive.name == "sub" and not flip else 1.0
    if v.a is None:
        return [v.replace(w=v.w + sign * jnp.asarray(c, v.w.dtype))]
    c = (
        jnp.asarray(c)
        .astype(v.w.dtype)
        .reshape(shape if len(shape) == n else (1,) * (n - len(shape)) + shape)
    )
    varies = {i for i in range(n) if c.shape[i] != 1 and v.w.shape[i] != 1}
    pa, pb = set(present(v.a.shape, v.w.shape)), set(present(v.b.shape, v.w.shape))
    if v.dropout or (varies & (pa - pb) and varies & (pb - pa)):
        return [v.replace(w=v.w - c if sign < 0 else v.w + c)]
    on_b = not varies & (pa - pb)  # c on b's side (ones on a's), or else on a's
    ones = jnp.ones((1,) * n, v.w.dtype)
    extra_a, extra_b = (ones, c) if on_b else (c, ones)
    extra_b = extra_b * jnp.asarray(sign, v.w.dtype)

    def join(f, e):  # f: (*S', r) and e: (*S'',) -> (*S, r + 1)
        shape = tuple(np.broadcast_shapes(f.shape[:-1], e.shape))
        return jnp.concatenate(
            [jnp.broadcast_to(f, shape + f.shape[-1:]), jnp.broadcast_to(e[..., None], shape + (1,))], -1
        )

    return [v.replace(a=join(v.a, extra_a), b=join(v.b, extra_b))]


def split(ctx, eqn, invals):
    """``jnp.split`` of a kernel (a fused qkv kernel split in three): each part is a slice of W and of
    the factors that vary along the split axis (a factor constant along it goes to every part whole)."""
    v = invals[0]
    ws = bind(eqn, [v.w])
    if v.a is None:
        return [v.replace(w=w) for w in ws]
    axis, sizes = eqn.params["axis"] % v.w.ndim, eqn.params["sizes"]
    parts = {}
    for name in ("a", "b"):
        f = getattr(v, name)
        parts[name] = lax.split(f, sizes, axis) if f.shape[axis] != 1 else [f] * len(ws)
    return [v.replace(w=w, a=a, b=b) for w, a, b in zip(ws, parts["a"], parts["b"], strict=True)]


def _tile_factor(eqn, f, v, invals):
    reps = tuple(1 if f.shape[i] == 1 else k for i, k in enumerate(eqn.params["reps"]))
    return jnp.tile(f, reps + (1,))


tile = view(_tile_factor, _same_origin)  # jnp.tile: each factor tiled along the axes it varies along


def pad(ctx, eqn, invals):
    """``jnp.pad`` / ``lax.pad`` of a kernel (W padded with any value): the factors are padded with zeros
    along the axes they vary along, so the padding gets no low-rank part. A padded axis along which
    neither factor varies first gets b broadcast along it."""
    v, value = invals
    if isinstance(value, TrackedValue):
        return fallback(ctx, eqn, invals)
    w = bind(eqn, [v.w, value])[0]
    if v.a is None:
        return [v.replace(w=w)]
    config = eqn.params["padding_config"]
    grows = [i for i, (lo, hi, mid) in enumerate(config) if (lo > 0 or hi > 0 or mid > 0)]
    b = v.b
    full = [i for i in grows if v.a.shape[i] == 1 and b.shape[i] == 1 and v.w.shape[i] != 1]
    if full:
        b = jnp.broadcast_to(
            b, tuple(v.w.shape[i] if i in full else n for i, n in enumerate(b.shape[:-1])) + b.shape[-1:]
        )

    def pad_factor(f):
        cfg = [config[i] if f.shape[i] != 1 else (0, 0, 0) for i in range(v.w.ndim)] + [(0, 0, 0)]
        return lax.pad(f, jnp.zeros((), f.dtype), cfg)

    return [v.replace(w=w, a=pad_factor(v.a), b=pad_factor(b))]


# primitive -> how a view maps an aligned array (a factor, or any array laid out on W's view axes with a
# trailing axis, such as a pending per-channel scale; see `lora_jax.transform.scaled`). Casts are absent:
# they apply to W and the factors, not to arrays kept in float32.
FACTORS = {
    "transpose": _transpose_factor,
    "broadcast_in_dim": _broadcast_factor,
    "reshape": _reshape_factor,
    "squeeze": _squeeze_factor,
    "slice": _slice_factor,
    "dynamic_slice": _dynamic_slice_factor,
    "sharding_constraint": _identity_factor,
    "reshard": _identity_factor,
    "copy": _identity_factor,
    "rev": _rev_factor,
    "stop_gradient": _stop_gradient_factor,
    "tile": _tile_factor,
}
