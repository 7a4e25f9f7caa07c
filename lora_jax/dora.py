"""DoRA (Liu et al. 2024, arXiv:2402.09353): weight-decomposed low-rank adaptation.

DoRA splits the adapted weight into a direction and a trained magnitude ``m``, one entry per output
feature (per column of a Flax ``(in, out)`` kernel, per stacked layer):

    V = W + s·a·b                   W' = m ⊙ V / ‖V‖_col            (paper, eq. 5)

``m`` starts at ``‖W‖_col``, so a fresh `DoraDelta` changes nothing. The column norms never need V:
for each output j (summing over the input axes i),

    ‖V_j‖² = ‖W_j‖² + 2s·Σ_r (Wᵀa)_jr·b_rj + s²·Σ_rr' b_rj (aᵀa)_rr' b_r'j

which costs in×out×r multiply-adds and builds only ``Wᵀa: (out, r)`` and ``aᵀa: (r, r)``, never an
in×out array. `column_norm` computes exactly that, and both `wrap` (``y = (m/‖V‖) ⊙ (x·W + s·(x·a)·b)``)
and `merge` use it, so they agree to rounding and a fresh delta merges to W bit for bit.

With ``detach_norm=True`` (the default, as in PEFT) ‖V‖ is treated as a constant in the backward pass,
the paper's section 4.3 recommendation: gradients flow through m and through V's direction only.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> params = {"w": jnp.arange(12.0).reshape(4, 3)}
    >>> d = lj.init(jax.random.key(0), params, lj.LoraSpec(rank=2, targets="w", dora=True))
    >>> d["w"].m.shape                         # one magnitude per output feature
    (3,)
    >>> bool((lj.merge(params, d)["w"] == params["w"]).all())
    True
"""

from __future__ import annotations

import dataclasses
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lora_jax import _explicit
from lora_jax.delta import LoraDelta

__all__ = ["DoraDelta", "is_dora", "column_norm", "dora_factor", "dora_fold", "init_magnitude"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoraDelta(LoraDelta):
    """A `LoraDelta` with a DoRA magnitude. ``a: (*stack, *in, r)``, ``b: (*stack, r, *out)``,
    ``m: (*stack, *out)``.

    Attributes:
        m: the trained magnitude of each output feature (a leaf, like a and b).
        detach_norm: treat ‖W + s·a·b‖_col as a constant in the backward pass (paper, section 4.3).

    Example:
        >>> import jax.numpy as jnp
        >>> d = DoraDelta(jnp.ones((4, 2)), jnp.zeros((2, 3)), m=jnp.full((3,), 2.0))
        >>> sorted(x.shape for x in jax.tree_util.tree_leaves(d))
        [(2, 3), (3,), (4, 2)]
    """

    m: jax.Array = None
    detach_norm: bool = dataclasses.field(metadata=dict(static=True), default=True)


def is_dora(x) -> bool:
    return isinstance(x, DoraDelta)


def _labels(axes):
    """einsum labels for W's axes (``S``tack, ``I``nputs, ``O``utputs) and r."""
    letters = iter(string.ascii_letters)
    lab = {}
    for i in (*axes.stack, *axes.inputs, *axes.outputs):
        lab[i] = next(letters)
    return lab, next(letters), next(letters)


def column_norm(w, d: LoraDelta | None, axes=None) -> jax.Array:
    """‖W + s·a·b‖ over W's input axes, float32, shape ``(*stack, *out)``; never builds an in×out array.

    Args:
        w: the kernel, any float dtype, laid out as ``d.axes`` (or `axes`) says.
        d: its delta, or None for ‖W‖_col alone.
        axes: W's `LoraAxes` when `d` is None.

    With Explicit mesh axes the sums over W's (possibly sharded) input axes run with the axes in Auto mode,
    and the norms are typed with W's sharding of its stack and output axes.
    """
    arrays = (w,) if d is None else (w, d.a, d.b)
    if _explicit.mesh_of(arrays) is None:
        return _column_norm(w, d, axes)
    ax = d.axes if d is not None else axes
    spec = _explicit.spec_of(w)
    out = PartitionSpec(*(spec[i] for i in (*ax.stack, *ax.outputs)))
    if d is None:
        return _explicit.auto(lambda w: _column_norm(w, None, axes), w, out_specs=out)
    run = lambda w, a, b: _column_norm(w, dataclasses.replace(d, a=a, b=b))  # noqa: E731
    return _explicit.auto(run, w, d.a, d.b, out_specs=out)


def _column_norm(w, d: LoraDelta | None, axes=None) -> jax.Array:
    """`column_norm` on arrays without Explicit mesh axes."""
    ax = d.axes if d is not None else axes
    lab, r, t = _labels(ax)
    S = "".join(lab[i] for i in ax.stack)
    I = "".join(lab[i] for i in ax.inputs)  # noqa: E741
    O = "".join(lab[i] for i in ax.outputs)  # noqa: E741
    W = "".join(lab[i] for i in range(w.ndim))
    hi = jax.lax.Precision.HIGHEST
    f32 = jnp.float32
    sq = jnp.einsum(f"{W},{W}->{S}{O}", w, w, precision=hi, preferred_element_type=f32)
    if d is None:
        return jnp.sqrt(sq)
    a = d.a.astype(w.dtype)  # no W-sized cast: the products accumulate in float32
    b = d.b.astype(f32)
    wta = jnp.einsum(f"{W},{S}{I}{r}->{S}{O}{r}", w, a, precision=hi, preferred_element_type=f32)
    cross = jnp.einsum(f"{S}{O}{r},{S}{r}{O}->{S}{O}", wta, b, precision=hi)
    a32 = d.a.astype(f32)
    ata = jnp.einsum(f"{S}{I}{r},{S}{I}{t}->{S}{r}{t}", a32, a32, precision=hi)
    lowsq = jnp.einsum(f"{S}{r}{O},{S}{r}{t},{S}{t}{O}->{S}{O}", b, ata, b, precision=hi)
    s = jnp.float32(d.scale)
    return jnp.sqrt(jnp.maximum(sq + 2.0 * s * cross + s * s * lowsq, 0.0))


@jax.custom_jvp
def _snap_one(g):
    """`g`, with entries within 8 float32 ulps of 1 set to exactly 1; differentiated as the identity.

    ``m = ‖W‖_col`` at init and ``‖W + s·a·b‖_col`` with b = 0 are the same sum, but XLA may add it up in
    another order inside another program (init eagerly, merge or the train step under jit): the factor
    comes out as 1 ± 1 ulp. Snapping it makes a fresh DoRA delta change nothing bit for bit; the
    derivative is untouched, so m still trains.
    """
    return jnp.where(jnp.abs(g - 1.0) <= 8 * jnp.finfo(jnp.float32).eps, jnp.ones_like(g), g)


@_snap_one.defjvp
def _snap_one_jvp(primals, tangents):
    return _snap_one(*primals), tangents[0]


def dora_factor(w, d: DoraDelta) -> jax.Array:
    """``m / ‖W + s·a·b‖_col`` (float32, ``(*stack, *out)``), the norm detached when ``d.detach_norm``."""
    norm = column_norm(w, d)
    if d.detach_norm:
        norm = jax.lax.stop_gradient(norm)
    return _snap_one(d.m.astype(jnp.float32) / norm)


def aligned_factor(g, axes, ndim: int) -> jax.Array:
    """`g`: ``(*stack, *out)`` laid out on W's axes, size 1 along the input axes."""
    ns = len(axes.stack)
    g = g.reshape(g.shape[:ns] + (1,) * len(axes.inputs) + g.shape[ns:])
    return jnp.transpose(g, np.argsort(axes.stack + axes.inputs + axes.outputs))


def dora_fold(w, v, d: DoraDelta) -> jax.Array:
    """The merged DoRA kernel ``(m/‖V‖_col) ⊙ V``, given ``v = W + s·a·b`` (in its accumulation dtype)."""
    g = aligned_factor(dora_factor(w, d), d.axes, w.ndim)
    return v * g.astype(v.dtype)


def init_magnitude(w, d: LoraDelta, detach_norm: bool = True, where: str = "") -> DoraDelta:
    """`d` with a DoRA magnitude ``m = ‖W‖_col`` (float32): a fresh DoRA delta that changes nothing."""
    if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
        raise TypeError(f"{where}: DoRA needs a dense floating-point kernel, found {type(w).__name__}")
    m = column_norm(jnp.asarray(w), None, d.axes)
    return DoraDelta(d.a, d.b, scale=d.scale, axes=d.axes, dropout=d.dropout, m=m, detach_norm=detach_norm)
