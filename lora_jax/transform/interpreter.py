"""The jaxpr interpreter behind `wrap` and `infer_axes`, and its fallback.

`eval_jaxpr` walks a jaxpr equation by equation. An equation whose inputs are all plain arrays is bound
as it is; one that consumes a `TrackedValue` goes to the rule the rule table gives for its primitive and
the kind of tracked value, and to `fallback` when there is none: the tracked inputs are materialised
(``W + s·a·b``) for that use alone, with a `FallbackWarning` naming the primitive and the parameter path
(a ValueError when ``strict=True``).

The rule table is passed in through `Ctx` rather than imported, so this module sits below the rules
(which re-enter `eval_jaxpr` for nested jaxprs) and the table (which imports the rules).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from lora_jax import _explicit
from lora_jax.quant.array import QuantLeaf
from lora_jax.transform.value import TrackedValue

__all__ = [
    "FallbackWarning",
    "Ctx",
    "Rule",
    "eval_jaxpr",
    "bind",
    "materialize",
    "plain",
    "fallback",
    "trace",
]


class FallbackWarning(UserWarning):
    """A targeted weight met an op with no factored rule; W + s·a·b was materialised for that use."""


# rule(ctx, eqn, invals) -> outvals, one per eqn.outvars; invals holds at least one TrackedValue.
Rule = Callable[["Ctx", Any, list], list]


@dataclasses.dataclass
class Ctx:
    """What one run of the interpreter shares across equations and nested jaxprs.

    Attributes:
        rule_for: ``rule_for(primitive_name, invals)``: the rule to apply, or None for the fallback.
        strict: raise instead of warning on a fallback.
        warned: (primitive, path) pairs already warned about (shared by every call of one wrapped fn).
        key: dropout PRNG key (None: no dropout).
        counter: how many dropout keys have been drawn from `key`.
        record: inference mode (`infer_axes`): path -> list of (use kind, {W axis: role}).
    """

    rule_for: Callable[[str, Sequence], Rule | None]
    strict: bool = False
    warned: set = dataclasses.field(default_factory=set)
    key: Any = None
    counter: list = dataclasses.field(default_factory=lambda: [0])
    record: dict | None = None

    def sub(self, key) -> Ctx:
        """A context for a loop body that draws its dropout keys from `key`."""
        return dataclasses.replace(self, key=key, counter=[0])

    def next_key(self):
        self.counter[0] += 1
        return jax.random.fold_in(self.key, self.counter[0])

    @property
    def inferring(self) -> bool:
        return self.record is not None

    def note(self, v: TrackedValue, kind: str, roles: dict):
        """Record, in inference mode, that `v` was used by `kind` with W's axes in these roles.

        An axis is an int (an axis of ``v.path``) or a ``(path, axis)`` pair: a value built from several
        parameters (kernels concatenated into one) tags its origins with their paths.
        """
        if self.record is None:
            return
        by_path: dict = {p: {} for p in _paths_of(v)}
        for ax, role in roles.items():
            path, ax = ax if isinstance(ax, tuple) else (v.path, ax)
            by_path.setdefault(path, {})[ax] = role
        for path, r in by_path.items():
            self.record.setdefault(path, []).append((kind, r))


def _paths_of(v: TrackedValue) -> list:
    """The parameter paths a tracked value is built from (several for concatenated kernels)."""
    tagged = {ax[0] for o in v.origin for ax in o if isinstance(ax, tuple)}
    return sorted(tagged) if tagged else [v.path]


def bind(eqn, invals) -> list:
    """Apply `eqn`'s primitive to plain `invals`, as the traced program did; always a list of outputs."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    # JAX before 0.9.2 returns (subfuns, params); 0.9.2 and later return params alone.
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    ctx_manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx_manager is None:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        with ctx_manager:
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def materialize(ctx: Ctx, v, prim: str):
    """The dense value of a tracked view; warns (or raises when strict) naming `prim` and the path.

    The one place where ``W + s·a·b`` is built (the only caller of ``TrackedValue.dense``): every
    materialisation, including a weight returned by the wrapped function (`prim` ``"output of fn"``),
    goes through the warning.
    """
    if not isinstance(v, TrackedValue):
        return v
    if ctx.inferring:
        ctx.note(v, "fallback:" + prim, {})
    elif ctx.strict:
        raise ValueError(
            f"lora_jax.wrap(strict=True): {v.path} is used by primitive `{prim}`, which has no factored "
            f"LoRA rule, so W + s·a·b would have to be materialised. Use wrap(fn) to allow it, or change "
            f"the model so the weight reaches a dot_general/conv/gather through view-like ops only."
        )
    elif (prim, v.path) not in ctx.warned:
        ctx.warned.add((prim, v.path))
        warnings.warn(
            f"lora_jax.wrap: {v.path} is used by primitive `{prim}`, which has no factored LoRA rule; "
            f"W + s·a·b is materialised for this use (slower, more memory). Pass strict=True to make "
            f"this an error.",
            FallbackWarning,
            stacklevel=2,
        )
    return v.dense()


def plain(ctx: Ctx, vals, prim: str) -> list:
    """`vals` with every tracked value materialised (see `materialize`)."""
    return [materialize(ctx, x, prim) for x in vals]


def fallback(ctx: Ctx, eqn, invals) -> list:
    """The rule for a use with no factored rule: materialise the tracked inputs, then bind."""
    return bind(eqn, plain(ctx, invals, eqn.primitive.name))


def _conform(x, var):
    sharding = getattr(getattr(var, "aval", None), "sharding", None)
    return x if sharding is None else _explicit.conform(x, sharding)


def eval_jaxpr(ctx: Ctx, jaxpr, consts, args) -> list:
    """Evaluate `jaxpr` on `args` (plain arrays or tracked values); outputs may be tracked values."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(x, TrackedValue) for x in invals):
            rule = ctx.rule_for(eqn.primitive.name, invals) or fallback
            outs = rule(ctx, eqn, invals)
            # With Explicit mesh axes the program expects each output's sharding in its type; a rule that
            # computed it another way (e.g. replicated a, b in s·(x·a)·b) hands it over resharded.
            outs = [x if isinstance(x, TrackedValue) else _conform(x, v) for v, x in zip(eqn.outvars, outs)]
        else:
            outs = bind(eqn, invals)
        # A dropped output (DropVar) is written too: nothing reads it, and it needs no type check that
        # moved between JAX versions (jax.extend.core has no DropVar in 0.9).
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _is_dynamic(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def trace(fn: Callable, param_leaves, treedef, args: tuple, kwargs: dict):
    """The jaxpr of ``fn(params, *args, **kwargs)``, with the param leaves first, then the array leaves
    of args and kwargs (other leaves are static).

    Returns:
        ``(closed_jaxpr, out_shape, dynamic_arg_leaves)``: evaluate the jaxpr on
        ``[*param_leaves, *dynamic_arg_leaves]``; `out_shape` gives the output tree.
    """
    arg_leaves, arg_tree = jax.tree_util.tree_flatten((args, kwargs))
    dyn_pos = [i for i, x in enumerate(arg_leaves) if _is_dynamic(x)]

    def flat_fn(p_leaves, dyn):
        leaves = list(arg_leaves)
        for i, x in zip(dyn_pos, dyn, strict=True):
            leaves[i] = x
        a, k = jax.tree_util.tree_unflatten(arg_tree, leaves)
        return fn(jax.tree_util.tree_unflatten(treedef, p_leaves), *a, **k)

    def spec(x):
        if isinstance(x, jax.Array) and not jax.typeof(x).weak_type:
            # An array or tracer stands for itself: fn is traced with its whole type (sharding with
            # Explicit mesh axes, manual axes it varies over inside shard_map).
            return x
        dtype = jnp.result_type(x) if not hasattr(x, "dtype") else x.dtype
        # A weak-typed array is traced strongly typed; a quantized weight is typed like its codes (they
        # keep W's layout and sharding). Both keep the manual axes they vary over and Explicit shardings.
        return _explicit.shape_dtype(np.shape(x), dtype, x.q.codes if isinstance(x, QuantLeaf) else x)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
        [spec(w) for w in param_leaves], [spec(arg_leaves[i]) for i in dyn_pos]
    )
    return closed, out_shape, [arg_leaves[i] for i in dyn_pos]
