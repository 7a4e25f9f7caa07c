"""Per-example adapters in `wrap`: ``wrap(fn)(params, bank, *args, adapter_ids=ids)``.

Each example e runs ``fn`` with the adapter in slot ``ids[e]`` of an `AdapterBank` (−1: the base model
alone), in one batch, computing at every use of an adapted W

    x_e·W + s[ids[e]]·(x_e·a[ids[e]])·b[ids[e]]

and never ``W + s·a·b`` for any adapter: the base product is one matmul over the whole batch and the
low-rank path a batched contraction over gathered factors (BGMV, as in Punica, Chen et al. 2023,
arXiv:2310.18547).

How: ``jax.vmap`` over the example axis of the factored interpreter that plain `wrap` runs. The
gathered factors ``a[ids]`` and ``s[ids]·b[ids]`` (the scale folded into b in float32, so each example's
`LoraDelta` has the static scale 1) are mapped; the params are not, so ``x·W`` is batched by vmap's
dot_general rule into one matmul with an unbatched W, while ``(x·a)·b`` becomes a contraction with a batch
axis. Inside the map, ``fn`` sees each example with its example axis kept at size 1, so it runs on a batch
of one exactly as it would be called by the user.

Why this design and not a new value kind that finds the example axis of x at each use: finding that axis
inside the jaxpr means following it through every reshape, transpose, scan and while loop of the model
(a batch and time axis merged into one, a KV cache with layers first) — which is what ``vmap``'s batching
rules already do, exactly and for every primitive JAX has. So the only question left is where the example
axis of each argument and output is: by default the leading axis of every array argument and output
(0-d ones are shared), else ``wrap(fn, in_axes=..., out_axes=...)`` (an int, or a function of the
"/"-joined argument path and the shape). An argument whose example axis does not have ``len(ids)`` entries
is an error, never a silent broadcast.

Rows with ``ids[e] == -1`` get zero factors (``jnp.where`` on the gathered a and s·b), so their low-rank
term is exactly 0 and ``x·W + 0`` is bit-equal to ``x·W``: such a row equals ``fn(params, ...)`` bit for
bit in float32 (tested; below float32 the factored rule rounds ``x·W`` once from a float32 accumulator,
which can differ from the base model's own rounding, as plain `wrap` does). Concrete ids are
range-checked; under ``jit`` an id outside ``[-1, n)`` gathers NaN factors, so its row comes out NaN
rather than with another adapter.

LoRA dropout under a bank draws one key per example (``jax.random.split(dropout_key, batch)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lora_jax import _explicit
from lora_jax.bank import AdapterBank, check_bank_fits
from lora_jax.delta import LoraDelta
from lora_jax.spec import path_str

__all__ = ["call_with_bank", "example_axis", "AxesSpec"]

# An int (every array leaf), None (the default: 0, and shared for 0-d leaves) or a function
# ``(path, shape) -> int | None`` of the "/"-joined path of a leaf and its shape.
AxesSpec = int | None | Callable[[str, tuple], "int | None"]


def example_axis(spec: AxesSpec, path: str, shape: tuple) -> int | None:
    """The example axis of one leaf under `spec` (None: the leaf is shared by every example)."""
    if callable(spec):
        ax = spec(path, tuple(shape))
    elif spec is None:
        ax = 0 if len(shape) else None
    else:
        ax = spec
    if ax is None:
        return None
    if isinstance(ax, bool) or not isinstance(ax, (int, np.integer)) or not -len(shape) <= ax < len(shape):
        raise ValueError(
            f"lj.wrap with an adapter bank: the example axis {ax!r} given for {path or 'the leaf'} of shape "
            f"{tuple(shape)} is not one of its axes; return an axis in [{-len(shape)}, {len(shape)}) or None "
            f"(shared by every example) from in_axes/out_axes."
        )
    return int(ax) % len(shape)


def _check_ids(ids, n: int):
    if ids is None:
        raise TypeError(
            "lj.wrap(fn)(params, bank, ...): an AdapterBank needs adapter_ids=, an int array (batch,) "
            "naming each example's slot (-1: base model only)"
        )
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim != 1:
        raise TypeError(
            f"lj.wrap: adapter_ids must be a 1-D int array (batch,), found dtype {ids.dtype} and shape "
            f"{ids.shape}; e.g. jnp.array([0, 2, -1], jnp.int32)"
        )
    try:
        concrete = np.asarray(ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None  # traced (under jit): out-of-range ids gather NaN factors instead
    if concrete is not None:
        bad = concrete[(concrete < -1) | (concrete >= n)]
        if bad.size:
            raise ValueError(
                f"lj.wrap: adapter_ids {sorted(set(bad.tolist()))[:8]} are out of range for a bank of {n} "
                f"adapters: each id must be in [-1, {n}) (-1: base model only)"
            )
    return ids.astype(jnp.int32)


def _gather(x, idx, valid):
    """``x[idx]`` with NaN for out-of-range ids (never another slot), zero where not `valid`."""
    g = x.at[idx].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)
    return jnp.where(valid.reshape((-1,) + (1,) * (g.ndim - 1)), g, jnp.zeros((), g.dtype))


def call_with_bank(
    plain: Callable,
    params: Any,
    bank: AdapterBank,
    args: tuple,
    kwargs: dict,
    adapter_ids,
    dropout_key,
    in_axes: AxesSpec,
    out_axes: AxesSpec,
):
    """``plain(params, deltas_e, *args_e, **kwargs_e)`` for every example e, mapped with ``jax.vmap``.

    `plain` is the plain wrapped function (``wrap(fn)`` for a deltas tree). See the module docstring.
    """
    check_bank_fits(bank, params)
    ids = _check_ids(adapter_ids, bank.size)
    n_ex = ids.shape[0]
    valid = ids != -1
    idx = jnp.where(valid, ids, 0)
    a_g, b_g = {}, {}
    for p in bank.paths:
        s = _gather(bank.scale[p], idx, valid)  # (B,) float32
        b = bank.b[p]
        a_g[p] = _gather(bank.a[p], idx, valid)
        b_g[p] = _gather(b.astype(jnp.float32), idx, valid) * s.reshape((-1,) + (1,) * (b.ndim - 1))

    leaves, tree = jax.tree_util.tree_flatten_with_path((args, kwargs))
    mapped, axes = [], []
    for i, (kp, x) in enumerate(leaves):
        if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
            continue
        path = _arg_path(kp)
        ax = example_axis(in_axes, path, np.shape(x))
        if ax is None:
            continue
        if np.shape(x)[ax] != n_ex:
            raise ValueError(
                f"lj.wrap with an adapter bank: argument {path} has shape {tuple(np.shape(x))}; its example "
                f"axis {ax} has {np.shape(x)[ax]} entries, but adapter_ids has {n_ex}. Give one id per "
                f"example, or say where each argument's example axis is: wrap(fn, in_axes=lambda path, "
                f"shape: ...) returning the axis, or None for an argument every example shares."
            )
        mapped.append(i)
        axes.append(ax)
    keys = None if dropout_key is None else jax.random.split(dropout_key, n_ex)
    paths = set(bank.paths)
    axes_by_path, drops = dict(bank.axes), dict(bank.dropout)
    leaf_paths = [p for p, _ in _paths_of(bank)]

    def one(a_e, b_e, key_e, xs):
        vals = [x for _, x in leaves]
        for i, ax, x in zip(mapped, axes, xs, strict=True):
            vals[i] = jnp.expand_dims(x, ax)
        args_e, kwargs_e = jax.tree_util.tree_unflatten(tree, vals)
        deltas = jax.tree_util.tree_unflatten(
            bank.treedef,
            [
                LoraDelta(a_e[p], b_e[p], scale=1.0, axes=axes_by_path[p], dropout=drops[p])
                if p in paths
                else None
                for p in leaf_paths
            ],
        )
        return plain(params, deltas, *args_e, dropout_key=key_e, **kwargs_e)

    xs = [leaves[i][1] for i in mapped]
    ex = lambda x, ax: jax.ShapeDtypeStruct(np.delete(np.shape(x), ax), jnp.result_type(x))  # noqa: E731
    first = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), t)  # noqa: E731
    try:
        shapes = jax.eval_shape(
            one,
            first(a_g),
            first(b_g),
            None if keys is None else keys[0],
            [ex(x, ax) for x, ax in zip(xs, axes, strict=True)],
        )
    except (TypeError, ValueError) as e:
        if _explicit.mesh_of(params, xs) is not None:
            e.add_note(_EXPLICIT_NOTE)
        raise
    out_leaves, out_tree = jax.tree_util.tree_flatten_with_path(shapes)
    out_ax = []
    for kp, s in out_leaves:
        path = path_str(kp)
        ax = example_axis(out_axes, path, s.shape)
        if ax is not None and s.shape[ax] != 1:
            raise ValueError(
                f"lj.wrap with an adapter bank: output {path or '(the output)'} has shape {s.shape} for a "
                f"single example, so axis {ax} cannot be its example axis (it should have size 1 there). "
                f"Pass wrap(fn, out_axes=...) with the right axis, or None for an output that is the same "
                f"for every example."
            )
        out_ax.append(ax)

    def squeezed(a_e, b_e, key_e, xs):
        outs = jax.tree_util.tree_leaves(one(a_e, b_e, key_e, xs))
        return [o if ax is None else jnp.squeeze(o, ax) for o, ax in zip(outs, out_ax, strict=True)]

    in_ax = (0, 0, None if keys is None else 0, [ax for ax in axes])
    a_g, b_g, keys = _sharded_like_examples(a_g, b_g, keys, xs, axes)
    try:
        outs = jax.vmap(squeezed, in_axes=in_ax, out_axes=out_ax)(a_g, b_g, keys, xs)
    except ValueError as e:
        if "out_axes" not in str(e) and "vmap has mapped output" not in str(e):
            raise
        shared = [path_str(kp) for (kp, _), ax in zip(out_leaves, out_ax, strict=True) if ax is None]
        raise ValueError(
            f"lj.wrap with an adapter bank: an output declared shared by every example ({shared}) depends on "
            f"the example (a loss summed over the batch?). Return per-example values (e.g. the logits) "
            f"and reduce them outside, or give its example axis in out_axes. (jax: {str(e)[:200]})"
        ) from None
    return jax.tree_util.tree_unflatten(out_tree, outs)


_EXPLICIT_NOTE = (
    "lj.wrap with an adapter bank runs fn on one example at a time (jax.vmap over the batch, a batch of 1 "
    "inside fn). With Explicit mesh axes, a model that shards its batch axis in its own code (reshard or "
    "out_sharding over a data axis) cannot run on one example: serve the bank on a mesh with Auto axes "
    "(jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))), or merge each adapter."
)


def _sharded_like_examples(a_g, b_g, keys, xs, axes):
    """With Explicit mesh axes, the per-example adapters and keys sharded along the examples like the first
    mapped argument (``jax.vmap`` wants every mapped axis sharded alike); unchanged otherwise."""
    typed = [(x, ax) for x, ax in zip(xs, axes, strict=True) if _explicit.mesh_of(x) is not None]
    if not typed:
        return a_g, b_g, keys
    x, ax = typed[0]
    sharding = _explicit.sharding_on_mesh_of(x, P(_explicit.spec_of(x)[ax]))
    like = lambda t: jax.tree.map(lambda g: _explicit.conform(g, sharding), t)  # noqa: E731
    return like(a_g), like(b_g), None if keys is None else like(keys)


def _paths_of(bank: AdapterBank):
    dummy = jax.tree_util.tree_unflatten(bank.treedef, [0] * bank.treedef.num_leaves)
    return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(dummy)[0]]


def _arg_path(kp) -> str:
    """ "/"-joined path of an argument leaf: ``"0"`` for the first positional argument, ``"cache/k"`` for
    the field k of keyword argument ``cache``."""
    return path_str(kp[1:])  # kp[0] picks args or kwargs
