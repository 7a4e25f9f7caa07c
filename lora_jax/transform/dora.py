"""`DoraValue`: a DoRA-adapted kernel as a value the `wrap` interpreter carries (see `lora_jax.dora`).

A DoRA weight is ``W' = g ⊙ V`` with ``V = W + s·a·b`` (a `LoraValue`) and ``g = m / ‖V‖_col`` one factor
per output feature. `g` is computed once per call from ``Wᵀa`` and ``aᵀa`` (`lora_jax.dora.column_norm`,
no in×out array) and kept aligned to W's axes like a LoRA factor: shape ``(*S, 1)`` with size 1 along
the input axes. Then

- view-like ops (casts, transposes, reshapes, broadcasts, slices, ...) go to V through the `LoraValue`
  rule of the op, and to g through the same rule (g rides in the place of a factor);
- ``dot_general`` contracting W's input axes: ``y = g ⊙ (x·W + s·(x·a)·b)``, the `LoraValue` rule times
  g laid out on the output;
- ``conv_general_dilated`` and ``gather`` (conv kernels, embedding tables) raise: DoRA is not supported
  there.

Anything else (and a contraction over W's output axes) falls back to ``g ⊙ (W + s·a·b)`` with a
`FallbackWarning`. Control flow (jit, scan over stacked layers, checkpoint, ...) only needs the
`TrackedValue` interface below.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> p = {"w": jax.random.normal(jax.random.key(0), (8, 3))}
    >>> d = lj.init(jax.random.key(1), p, lj.LoraSpec(rank=2, targets="w", dora=True))
    >>> x = jnp.ones((5, 8))
    >>> bool(jnp.array_equal(lj.wrap(lambda p, x: x @ p["w"])(p, d, x), x @ p["w"]))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from lora_jax.dora import DoraDelta, aligned_factor, dora_factor
from lora_jax.transform import uses
from lora_jax.transform.interpreter import fallback, materialize
from lora_jax.transform.value import LoraValue, TrackedValue

__all__ = ["DoraValue", "view", "dot_general", "unsupported"]


@dataclasses.dataclass
class DoraValue(TrackedValue):
    """A view of a DoRA kernel: ``g ⊙ V`` (g broadcast against V).

    Attributes:
        v: the direction ``V = W + s·a·b`` as a `LoraValue` (its view of W and aligned factors).
        g: ``m / ‖V‖_col`` aligned to the view: ``(*S, 1)``, size 1 along W's input axes, float32.
    """

    v: LoraValue
    g: Any

    @classmethod
    def of(cls, w, d: DoraDelta, path: str) -> DoraValue:
        """The untouched kernel `w` with its DoRA delta `d`."""
        w = jnp.asarray(w)
        g = aligned_factor(dora_factor(w, d), d.axes, w.ndim)
        return cls(LoraValue.of(w, d, path), g[..., None])

    @property
    def path(self) -> str:
        return self.v.path

    @property
    def origin(self) -> tuple:
        return self.v.origin

    def dense(self):
        w = self.v.dense()
        return (w.astype(jnp.float32) * self.g[..., 0]).astype(w.dtype)

    def arrays(self) -> tuple:
        return (*self.v.arrays(), self.g)

    def with_arrays(self, arrays: tuple, origin: tuple | None = None) -> DoraValue:
        return DoraValue(self.v.with_arrays(tuple(arrays[:-1]), origin), arrays[-1])

    def stacked_arrays(self, length: int) -> tuple:
        g = self.g
        if g.shape[0] == 1:
            g = jnp.broadcast_to(g, (length,) + g.shape[1:])
        return (*self.v.stacked_arrays(length), g)


# The view-like ops for which a LoraValue rule applies the same function to W and to both factors
# (so g, riding in b's place, goes through the very same view as V).
VIEWS = (
    "transpose",
    "broadcast_in_dim",
    "reshape",
    "squeeze",
    "slice",
    "dynamic_slice",
    "sharding_constraint",
    "reshard",
    "copy",
    "rev",
)


def view(ctx, eqn, invals):
    """A view-like op: V through the `LoraValue` rule, g through the same rule in a factor's place."""
    where = [i for i, x in enumerate(invals) if isinstance(x, TrackedValue)]
    name = eqn.primitive.name
    if len(where) != 1 or where[0] != 0:
        return fallback(ctx, eqn, invals)
    dv, rest = invals[0], list(invals[1:])
    rule = ctx.rule_for(name, [dv.v, *rest])
    if rule is None:
        return fallback(ctx, eqn, invals)
    out = rule(ctx, eqn, [dv.v, *rest])
    if len(out) != 1 or not isinstance(out[0], LoraValue):
        return fallback(ctx, eqn, invals)
    if name == "convert_element_type":
        g = dv.g  # g stays float32; it multiplies the float32-accumulated output
    else:
        carrier = rule(ctx, eqn, [dv.v.replace(b=dv.g), *rest])
        if len(carrier) != 1 or not isinstance(carrier[0], LoraValue):
            return fallback(ctx, eqn, invals)
        g = carrier[0].b
    return [DoraValue(out[0], g)]


def dot_general(ctx, eqn, invals):
    """``g ⊙ (x·W + s·((x·a)·b))`` when the contraction runs over W's input axes (g constant there)."""
    lhs, rhs = invals
    if isinstance(lhs, TrackedValue) and isinstance(rhs, TrackedValue):
        return dot_general(ctx, eqn, [lhs, materialize(ctx, rhs, "dot_general (both operands adapted)")])
    w_is_rhs = isinstance(rhs, DoraValue)
    dv, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, xc, wb, xb = (rc, lc, rb, lb) if w_is_rhs else (lc, rc, lb, rb)
    g = dv.g[..., 0]
    n = g.ndim
    if any(g.shape[i] != 1 for i in wc):  # contracts an output axis (a tied `attend`): dense
        return fallback(ctx, eqn, invals)
    y = uses.dot_general(ctx, eqn, [x, dv.v] if w_is_rhs else [dv.v, x])[0]
    # g on the output's layout: batch axes, then (x's free axes, W's free axes) or the reverse.
    wfree = [i for i in range(n) if i not in wc and i not in wb]
    order = [*wb, *wfree]
    gt = jnp.transpose(g, order + list(wc)).reshape([g.shape[i] for i in order])
    nxfree = len(x.shape) - len(xc) - len(xb)
    gt = gt.reshape(
        gt.shape[: len(wb)]
        + ((1,) * nxfree + gt.shape[len(wb) :] if w_is_rhs else gt.shape[len(wb) :] + (1,) * nxfree)
    )
    return [(y.astype(jnp.float32) * gt).astype(y.dtype)]


def unsupported(ctx, eqn, invals):
    """Conv kernels and embedding tables: DoRA is defined here for (Dense-like) contractions only."""
    dv = next(x for x in invals if isinstance(x, DoraValue))
    what = {"conv_general_dilated": "convolution kernels", "gather": "embedding lookups (gather)"}
    raise ValueError(
        f"{dv.path}: DoRA is not supported for {what.get(eqn.primitive.name, eqn.primitive.name)}; it is "
        f"implemented for Dense / DenseGeneral / einsum kernels (also scan-stacked). Use LoraSpec(dora=False) "
        f"for this path, or leave it out of the DoRA spec's targets."
    )
