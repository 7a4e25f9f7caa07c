"""`LoraDelta`: the trainable low-rank factors of one kernel, and how they are initialised.

For a kernel W with stacked axes S, input axes I and output axes O (see `LoraAxes`),

    a: (*S, *I, r)      b: (*S, r, *O)      ΔW = scale · a @ b   (laid out back in W's axis order)

`a` and `b` are the pytree's leaves; `scale`, `dropout` and `axes` are static metadata, so optax,
`jax.grad` and checkpointing see only the two arrays (Hu et al. 2021, arXiv:2106.09685, eq. 3).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.spec import LoraAxes

__all__ = ["LoraDelta", "init_delta", "delta_weight", "is_delta"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraDelta:
    """Low-rank factors of one kernel. ``a: (*stack, *in, r)``, ``b: (*stack, r, *out)``.

    Example:
      >>> import jax.numpy as jnp
      >>> d = LoraDelta(jnp.ones((4, 2)), jnp.ones((2, 3)), scale=0.5, axes=LoraAxes())
      >>> delta_weight(d).shape, float(delta_weight(d)[0, 0])
      ((4, 3), 1.0)
    """

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)
    axes: LoraAxes = dataclasses.field(metadata=dict(static=True), default=LoraAxes())
    dropout: float = dataclasses.field(metadata=dict(static=True), default=0.0)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the kernel this delta belongs to."""
        ns = len(self.axes.stack)
        dims = dict(zip(self.axes.stack, self.a.shape[:ns]))
        dims.update(zip(self.axes.inputs, self.a.shape[ns:-1]))
        dims.update(zip(self.axes.outputs, self.b.shape[ns + 1 :]))
        return tuple(dims[i] for i in range(len(dims)))


def is_delta(x) -> bool:
    return isinstance(x, LoraDelta)


def delta_weight(d: LoraDelta, dtype=jnp.float32) -> jax.Array:
    """``scale · a @ b`` in W's axis order and shape, computed in `dtype` (float32 by default)."""
    ax = d.axes
    ns, ni, no = len(ax.stack), len(ax.inputs), len(ax.outputs)
    a, b = d.a.astype(dtype), d.b.astype(dtype)
    s = "".join(chr(ord("a") + i) for i in range(ns))
    i = "".join(chr(ord("k") + j) for j in range(ni))
    o = "".join(chr(ord("A") + j) for j in range(no))
    prod = jnp.einsum(f"{s}{i}z,{s}z{o}->{s}{i}{o}", a, b, precision=jax.lax.Precision.HIGHEST)
    # prod is laid out (*stack, *inputs, *outputs); move each group back to W's axis positions.
    order = ax.stack + ax.inputs + ax.outputs
    return (d.scale * jnp.transpose(prod, np.argsort(order))).astype(dtype)


def init_delta(
    key, w_shape, axes: LoraAxes, rank: int, scale: float, init: str, dtype, dropout=0.0, where: str = ""
) -> LoraDelta:
    """A fresh delta for a kernel of shape `w_shape`: random a, zero b (so ΔW = 0 exactly)."""
    stack = tuple(w_shape[i] for i in axes.stack)
    ins = tuple(w_shape[i] for i in axes.inputs)
    outs = tuple(w_shape[i] for i in axes.outputs)
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    if rank > min(fan_in, fan_out):
        raise ValueError(
            f"{where}: rank {rank} is larger than this kernel allows: W has shape {tuple(w_shape)} with "
            f"inputs {ins} (= {fan_in}) and outputs {outs} (= {fan_out}), so rank must be <= "
            f"{min(fan_in, fan_out)}. Lower LoraSpec.rank or set rank_pattern for this path."
        )
    a_shape = (*stack, *ins, rank)
    if init == "kaiming":
        # PEFT/loralib: kaiming_uniform_(A, a=sqrt(5)) on A (r, fan_in) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    elif init == "gaussian":
        a = jax.random.normal(key, a_shape, jnp.float32) / rank
    else:
        raise ValueError(f"{where}: unknown init {init!r}")
    b = jnp.zeros((*stack, rank, *outs), dtype)
    return LoraDelta(a.astype(dtype), b, scale=float(scale), axes=axes, dropout=float(dropout))
