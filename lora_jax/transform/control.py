"""Rules for higher-order primitives: re-enter the body through the public API, interpreter inside.

Nested ``jit`` and call primitives are inlined; ``jax.checkpoint`` is re-applied with its policy around
the interpreted body; ``lax.scan`` gets the tracked values' arrays as extra scanned inputs (a stack of
layers, ``nn.scan``); ``while`` and ``cond`` get their bodies and branches interpreted. Custom JVP/VJP
calls run their primal: a custom derivative rule of a call that consumes an adapted weight could only
produce a W-shaped cotangent, which is what factored execution avoids.

These rules only use the `TrackedValue` interface (its path, origin and arrays), so they serve every
kind of tracked value. A checkpoint's outputs may be tracked values (returned as their arrays and
rebuilt outside); loop carries and outputs are plain arrays: a tracked value that would flow into one is
materialised (with a `FallbackWarning`).
"""

from __future__ import annotations

import jax
from jax import lax

from lora_jax.transform.interpreter import eval_jaxpr, fallback, plain
from lora_jax.transform.value import TrackedValue

__all__ = ["inline", "custom_call", "checkpoint", "scan", "while_loop", "cond"]


def _closed(params, names):
    """``(jaxpr, consts)`` of the first of `names` in `params` (a ClosedJaxpr or an open Jaxpr)."""
    closed = next(params[n] for n in names if n in params)
    return (closed.jaxpr, closed.consts) if hasattr(closed, "jaxpr") else (closed, ())


def inline(ctx, eqn, invals):
    """A nested jit or call: evaluate its jaxpr in place."""
    jaxpr, consts = _closed(eqn.params, ("jaxpr", "call_jaxpr", "fun_jaxpr"))
    return eval_jaxpr(ctx, jaxpr, consts, invals)


def custom_call(ctx, eqn, invals):
    """A custom_jvp / custom_vjp call: evaluate its primal jaxpr, bypassing the custom derivative."""
    # The jaxpr is `call_jaxpr` (custom_jvp; custom_vjp since JAX 0.6.1) or `fun_jaxpr` (older custom_vjp).
    jaxpr, consts = _closed(eqn.params, ("call_jaxpr", "fun_jaxpr"))
    return eval_jaxpr(ctx, jaxpr, consts, invals)


def checkpoint(ctx, eqn, invals):
    """``jax.checkpoint`` (remat) around the interpreted body, with the same policy."""
    p = eqn.params
    jaxpr = p["jaxpr"]
    tracked = {i: x for i, x in enumerate(invals) if isinstance(x, TrackedValue)}
    plain_ins = [x for x in invals if not isinstance(x, TrackedValue)]
    parts = [x.arrays() for x in tracked.values()]

    templates: list = []  # the tracked outputs as traced inside, to rebuild them outside

    def body(plain_ins, parts):
        it_p, it_t = iter(plain_ins), iter(parts)
        vals = [
            tracked[i].with_arrays(next(it_t)) if i in tracked else next(it_p) for i in range(len(invals))
        ]
        outs = eval_jaxpr(ctx, jaxpr, (), vals)
        templates[:] = [o if isinstance(o, TrackedValue) else None for o in outs]
        # A weight returned through the checkpoint (NNX's remat returns the layer's params) leaves as its
        # arrays, unchanged: it stays W + low rank outside, and nothing W-shaped is built for it.
        return [o.arrays() if isinstance(o, TrackedValue) else o for o in outs]

    outs = jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(
        plain_ins, parts
    )
    return [o if t is None else t.with_arrays(tuple(o)) for o, t in zip(outs, templates, strict=True)]


def scan(ctx, eqn, invals):
    """``lax.scan``: a tracked value scanned over (a stack of layers) is sliced along with its factors."""
    p = eqn.params
    closed, nc, nk = p["jaxpr"], p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
    init = plain(ctx, init, "scan carry")
    length = p["length"]
    xs_parts = []
    for x in xs:
        if isinstance(x, TrackedValue):
            ctx.note(x, "scan", {ax: "stack" for ax in x.origin[0]})
            xs_parts.append(x.stacked_arrays(length))
        else:
            xs_parts.append(x)
    keys = None if ctx.key is None else jax.random.split(ctx.next_key(), length)

    def body(carry, scanned):
        key, parts = scanned
        sub = ctx if key is None else ctx.sub(key)
        xs_vals = [
            x.with_arrays(part, origin=x.origin[1:]) if isinstance(x, TrackedValue) else part
            for x, part in zip(xs, parts, strict=True)
        ]
        outs = eval_jaxpr(sub, closed.jaxpr, closed.consts, [*consts, *carry, *xs_vals])
        outs = plain(sub, outs, "scan output")
        return outs[:nk], outs[nk:]

    carry, ys = lax.scan(
        body, list(init), (keys, xs_parts), length=length, reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry, *ys]


def while_loop(ctx, eqn, invals):
    """``lax.while_loop``: cond and body interpreted; tracked values are closed over, not carried."""
    p = eqn.params
    cj, bj, cn, bn = p["cond_jaxpr"], p["body_jaxpr"], p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    init = plain(ctx, init, "while carry")

    def cond_fun(carry):
        return eval_jaxpr(ctx, cj.jaxpr, cj.consts, [*cconsts, *carry])[0]

    def body_fun(carry):
        return plain(ctx, eval_jaxpr(ctx, bj.jaxpr, bj.consts, [*bconsts, *carry]), "while carry")

    return list(lax.while_loop(cond_fun, body_fun, list(init)))


def cond(ctx, eqn, invals):
    """``lax.cond`` / ``lax.switch``: every branch interpreted, tracked operands closed over."""
    index, ops = invals[0], invals[1:]
    if isinstance(index, TrackedValue):
        return fallback(ctx, eqn, invals)
    tracked = {i: x for i, x in enumerate(ops) if isinstance(x, TrackedValue)}
    plain_ops = [x for x in ops if not isinstance(x, TrackedValue)]

    def branch_fn(br):
        def f(*plain_ops):
            it = iter(plain_ops)
            vals = [tracked[i] if i in tracked else next(it) for i in range(len(ops))]
            return plain(ctx, eval_jaxpr(ctx, br.jaxpr, br.consts, vals), "cond output")

        return f

    return list(lax.switch(index, [branch_fn(br) for br in eqn.params["branches"]], *plain_ops))
