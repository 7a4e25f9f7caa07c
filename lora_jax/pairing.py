"""Pair every leaf of a params tree with its delta (or None), checking that each delta fits its weight.

Below both `lora_jax.core` (merge) and `lora_jax.transform` (wrap): everything that walks params and
deltas side by side starts here, so a mismatch gives the same error everywhere.

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.delta import LoraDelta
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> deltas = {"w": LoraDelta(jnp.ones((4, 2)), jnp.zeros((2, 3))), "b": None}
    >>> _, pairs = paired_leaves(params, deltas)
    >>> [(path, d is not None) for path, _, d in pairs]
    [('b', False), ('w', True)]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from lora_jax.delta import LoraDelta, is_delta
from lora_jax.full import full_problem, is_full
from lora_jax.spec import path_str

__all__ = ["paired_leaves", "fit_problem"]


def fit_problem(d: LoraDelta, shape: tuple[int, ...]) -> str | None:
    """Why `d` cannot be the delta of a kernel of `shape`, or None if it can.

    With ``d.axes = LoraAxes(stack, inputs, outputs)`` and rank r, a fitting delta has
    ``a: (*shape[stack], *shape[inputs], r)`` and ``b: (*shape[stack], r, *shape[outputs])``.

    Example:
        >>> import jax.numpy as jnp
        >>> d = LoraDelta(jnp.ones((4, 2)), jnp.zeros((2, 3)))
        >>> fit_problem(d, (4, 3)) is None
        True
        >>> fit_problem(d, (4, 5)).endswith("it needs a (4, 2) and b (2, 5), found a (4, 2) and b (2, 3)")
        True
    """
    ax = d.axes
    if sorted(ax.stack + ax.inputs + ax.outputs) != list(range(len(shape))):
        return f"{ax} do not list each axis of a {len(shape)}-D kernel exactly once"
    a_shape, b_shape = tuple(d.a.shape), tuple(d.b.shape)
    r = a_shape[-1] if a_shape else None
    pick = lambda axes: tuple(shape[i] for i in axes)  # noqa: E731
    want_a = (*pick(ax.stack), *pick(ax.inputs), r)
    want_b = (*pick(ax.stack), r, *pick(ax.outputs))
    if (a_shape, b_shape) != (want_a, want_b):
        return f"with {ax} (rank {r}) it needs a {want_a} and b {want_b}, found a {a_shape} and b {b_shape}"
    m = getattr(d, "m", None)  # a DoRA magnitude: one entry per output feature
    if m is not None and hasattr(m, "shape") and tuple(m.shape) != (*pick(ax.stack), *pick(ax.outputs)):
        return (
            f"its DoRA magnitude m needs shape {(*pick(ax.stack), *pick(ax.outputs))}, found {tuple(m.shape)}"
        )
    return None


def _short(e: Exception) -> str:
    """JAX's structure error without the values it prints (whole arrays)."""
    text = str(e).split(", value:")[0].split("\n")[0]
    return text[:300] + (" ..." if len(text) > 300 else "")


def _container_difference(params: Any, deltas: Any, path: str = "") -> tuple[str, str, str] | None:
    """``(where, params type, deltas type)`` of the first node where params and deltas hold the same keys
    in containers of different types (a ``FrozenDict`` against a ``dict``); None if there is none."""
    where = f"at {path!r}" if path else "at the top"
    if isinstance(params, Mapping) and isinstance(deltas, Mapping):
        if set(params) != set(deltas):
            return None
        if type(params) is not type(deltas):
            return where, type(params).__name__, type(deltas).__name__
        for k in params:
            found = _container_difference(params[k], deltas[k], f"{path}/{k}" if path else str(k))
            if found:
                return found
    elif (
        isinstance(params, (list, tuple)) and isinstance(deltas, (list, tuple)) and len(params) == len(deltas)
    ):
        if type(params) is not type(deltas):
            return where, type(params).__name__, type(deltas).__name__
        for i, (p, d) in enumerate(zip(params, deltas, strict=True)):
            found = _container_difference(p, d, f"{path}/{i}" if path else str(i))
            if found:
                return found
    return None


def paired_leaves(params: Any, deltas: Any, what: str = "deltas"):
    """``(treedef, [(path, w, delta_or_None)])`` for every leaf of params, in params' flattening order.

    Args:
        params: any pytree; its leaves are the base weights (or anything standing for them, e.g. a tree
            of shardings, for which there is no shape to check).
        deltas: a tree with params' structure holding a `LoraDelta` or None at each leaf.
        what: how `deltas` is named in error messages.

    Raises:
        ValueError: the structures differ (both sets of missing paths are listed), or a delta does not
            fit the shape of its weight.
        TypeError: a leaf of deltas is neither a LoraDelta nor None.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        ds = treedef.flatten_up_to(deltas)
    except (ValueError, TypeError) as e:
        containers = _container_difference(params, deltas)
        if containers is not None:
            where, p_type, d_type = containers
            raise ValueError(
                f"{what} do not have the structure of params: they hold the same keys, but {where} params are "
                f"a {p_type} and {what} a {d_type}. Build the {what} from these very params "
                f"(lj.init(key, params, spec) keeps their container types), or convert one side, e.g. "
                f"flax.core.freeze(...) / flax.core.unfreeze(...)."
            ) from None
        want = {path_str(p) for p, _ in leaves}
        # None marks an untargeted leaf: count it as present, or every untargeted path shows as missing.
        got = {
            path_str(p)
            for p, _ in jax.tree_util.tree_flatten_with_path(
                deltas, is_leaf=lambda x: x is None or is_delta(x) or is_full(x)
            )[0]
        }
        raise ValueError(
            f"{what} do not have the structure of params: {what} paths missing from params: "
            f"{sorted(got - want)[:8]}; params paths missing from {what}: {sorted(want - got)[:8]}. "
            f"Create deltas with lj.init(key, params, spec) for these very params.\n(jax: {_short(e)})"
        ) from None
    pairs = []
    for (p, w), d in zip(leaves, ds, strict=True):
        path = path_str(p)
        if d is not None:
            if not (is_delta(d) or is_full(d)):
                raise TypeError(
                    f"{path}: expected a LoraDelta or None in {what}, found {type(d).__name__} (or a FullLeaf "
                    f"for a leaf trained in full)"
                )
            if not hasattr(w, "shape"):  # e.g. a tree of shardings: nothing to check against
                pairs.append((path, w, d))
                continue
            problem = full_problem(d, tuple(w.shape)) if is_full(d) else fit_problem(d, tuple(w.shape))
            if problem:
                raise ValueError(
                    f"{path}: delta does not fit the parameter of shape {tuple(w.shape)}: {problem}. "
                    f"The adapter was made for a different model or config."
                )
        pairs.append((path, w, d))
    return treedef, pairs
