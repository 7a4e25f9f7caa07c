"""Shardings for deltas that follow their base weights on a device mesh.

For W sharded as ``P(*spec)`` (one entry per W axis), the delta's ``a: (*stack, *in, r)`` takes the
entries of W's stack and input axes and ``b: (*stack, r, *out)`` those of its stack and output axes; the
rank axis is replicated. So ``x @ a`` contracts like ``x @ W`` and ``(x @ a) @ b`` comes out sharded like
``x @ W``: no extra resharding of activations. A fully trained leaf (`FullLeaf`, ``LoraSpec.train_full``)
takes W's sharding as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax.delta import LoraDelta
from lora_jax.full import FullLeaf, is_full
from lora_jax.pairing import paired_leaves

__all__ = ["delta_shardings", "delta_partition_specs"]


def _delta_spec(d: LoraDelta, spec: PartitionSpec, ndim: int) -> tuple[PartitionSpec, PartitionSpec]:
    full = tuple(spec) + (None,) * (ndim - len(spec))
    pick = lambda axes: tuple(full[i] for i in axes)
    ax = d.axes
    a = PartitionSpec(*pick(ax.stack), *pick(ax.inputs), None)
    b = PartitionSpec(*pick(ax.stack), None, *pick(ax.outputs))
    return a, b


def _like(d: LoraDelta, a: PartitionSpec, b: PartitionSpec, wrap) -> LoraDelta:
    # A DoRA magnitude m: (*stack, *out) follows b without its rank axis.
    if getattr(d, "m", None) is not None:
        ns = len(d.axes.stack)
        m = PartitionSpec(*tuple(b)[:ns], *tuple(b)[ns + 1 :])
        return dataclasses.replace(d, a=wrap(a), b=wrap(b), m=wrap(m))
    return LoraDelta(wrap(a), wrap(b), d.scale, d.axes, d.dropout)


def delta_partition_specs(deltas: Any, param_specs: Any) -> Any:
    """Like `delta_shardings` with a tree of ``PartitionSpec`` (one per param leaf) in and out."""
    treedef, pairs = paired_leaves(param_specs, deltas)
    out = []
    for path, spec, d in pairs:
        if d is None:
            out.append(None)
            continue
        if not isinstance(spec, PartitionSpec):
            raise TypeError(f"{path}: expected a PartitionSpec, found {spec!r}")
        if is_full(d):  # a fully trained leaf: sharded like W
            out.append(FullLeaf(spec))
            continue
        a, b = _delta_spec(d, spec, len(d.weight_shape()))
        out.append(_like(d, a, b, lambda x: x))
    return jax.tree_util.tree_unflatten(treedef, out)


def delta_shardings(deltas: Any, param_shardings: Any) -> Any:
    """A tree like `deltas` whose LoraDeltas hold ``NamedSharding``s for a and b.

    Args:
      deltas: from `lj.init`.
      param_shardings: a tree like params of ``NamedSharding`` (e.g. ``jax.tree.map(lambda x: x.sharding,
        params)`` or from Flax's logical-axis rules).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from lora_jax.delta import LoraDelta
      >>> mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
      >>> d = {"w": LoraDelta(jnp.ones((8, 2)), jnp.zeros((2, 4)))}
      >>> s = delta_shardings(d, {"w": NamedSharding(mesh, P("fsdp", "tensor"))})
      >>> s["w"].a.spec, s["w"].b.spec
      (P('fsdp', None), P(None, 'tensor'))
    """
    treedef, pairs = paired_leaves(param_shardings, deltas, what="deltas")
    out = []
    for path, sh, d in pairs:
        if d is None:
            out.append(None)
            continue
        if not isinstance(sh, NamedSharding):
            raise TypeError(
                f"{path}: expected a jax.sharding.NamedSharding for the base weight, found {sh!r}. "
                f"Give NamedShardings (mesh + PartitionSpec), or use delta_partition_specs with PartitionSpecs."
            )
        if is_full(d):  # a fully trained leaf: sharded like W
            out.append(FullLeaf(sh))
            continue
        a, b = _delta_spec(d, sh.spec, len(d.weight_shape()))
        out.append(_like(d, a, b, lambda x, mesh=sh.mesh: NamedSharding(mesh, x)))
    return jax.tree_util.tree_unflatten(treedef, out)
