"""The values the `wrap` interpreter carries in place of targeted weights.

`TrackedValue` is what every kind of tracked weight shares: the parameter path, where each of its axes
came from, its dense value (for the fallback) and its arrays (to thread it through ``jax.checkpoint`` or
``lax.scan``). `LoraValue` is the one kind today: a view of a kernel W together with its LoRA factors
kept *aligned* to W's axes,

    a_full: W.shape with output axes set to 1, plus a trailing r axis
    b_full: W.shape with input axes set to 1, plus a trailing r axis,   V = W + Σ_r a_full·b_full

so view-like ops (casts, transposes, reshapes, broadcasts, slices, scalar scaling) apply to W and to both
factors alike, and a contraction can tell which factor holds which of W's axes from the factor shapes.

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.delta import LoraDelta
    >>> w = jnp.zeros((4, 3))
    >>> v = LoraValue.of(w, LoraDelta(jnp.ones((4, 2)), jnp.ones((2, 3))), "w")
    >>> v.a.shape, v.b.shape         # (in, 1, r), (1, out, r)
    ((4, 1, 2), (1, 3, 2))
    >>> v.dense().tolist()[0]        # W + s·a·b with s = 1
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.delta import LoraDelta

__all__ = [
    "TrackedValue",
    "LoraValue",
    "own_axes",
    "aligned_factors",
    "dense_delta",
    "labels",
    "present",
    "squeeze_to",
]


class TrackedValue:
    """What the interpreter and the kind-agnostic rules (control flow, fallback) need of a tracked weight.

    Attributes:
        path: the parameter's "/"-joined key path (for warnings, errors and axis inference).
        origin: one frozenset per axis of the current view: the axes of the original parameter that the
            view axis comes from (for axis inference).
    """

    path: str
    origin: tuple

    def dense(self) -> Any:
        """The plain array this value stands for (what ``fn`` would see after `merge`)."""
        raise NotImplementedError

    def arrays(self) -> tuple:
        """The arrays (None where absent) to pass through a JAX transform; inverse of `with_arrays`."""
        raise NotImplementedError

    def with_arrays(self, arrays: tuple, origin: tuple | None = None) -> TrackedValue:
        """This value with its arrays replaced (e.g. by the tracers inside a ``jax.checkpoint`` body)."""
        raise NotImplementedError

    def stacked_arrays(self, length: int) -> tuple:
        """`arrays` with a leading axis of size `length` on every one, to be scanned over by ``lax.scan``."""
        raise NotImplementedError


@dataclasses.dataclass
class LoraValue(TrackedValue):
    """A view of a targeted kernel: value ``w + Σ_r a[..., r] * b[..., r]`` (a, b broadcast against w).

    In inference mode (`infer_axes`) `a` and `b` are None and only `w` and `origin` are tracked.

    Attributes:
        w: the base weight's view, shape ``S``.
        a: ``(*S, r)`` with size 1 along the output axes (the scale is folded into b), or None.
        b: ``(*S, r)`` with size 1 along the input axes, or None.
        origin: see `TrackedValue`.
        path: see `TrackedValue`.
        dropout: LoRA dropout rate on the input of the low-rank path.
    """

    w: Any
    a: Any
    b: Any
    origin: tuple
    path: str
    dropout: float = 0.0

    @classmethod
    def of(cls, w, d: LoraDelta, path: str) -> LoraValue:
        """The untouched kernel `w` (any array) with its delta `d`."""
        w = jnp.asarray(w)
        a, b = aligned_factors(w, d)
        return cls(w, a, b, own_axes(w.ndim), path, d.dropout)

    def replace(self, **kw) -> LoraValue:
        return dataclasses.replace(self, **kw)

    def dense(self):
        if self.a is None:
            return self.w
        return self.w + dense_delta(self.a, self.b, self.w.shape, self.w.dtype)

    def arrays(self) -> tuple:
        return self.w, self.a, self.b

    def with_arrays(self, arrays: tuple, origin: tuple | None = None) -> LoraValue:
        w, a, b = arrays
        return self.replace(w=w, a=a, b=b, origin=self.origin if origin is None else origin)

    def stacked_arrays(self, length: int) -> tuple:
        if self.a is None:
            return self.w, None, None
        # A factor constant along the scanned axis has size 1 there: give it the full length.
        grow = lambda f: jnp.broadcast_to(f, (length,) + f.shape[1:]) if f.shape[0] == 1 else f  # noqa: E731
        return self.w, grow(self.a), grow(self.b)


def own_axes(ndim: int) -> tuple:
    """The origin of an untouched kernel: view axis i is W's axis i."""
    return tuple(frozenset({i}) for i in range(ndim))


def aligned_factors(w, d: LoraDelta):
    """a_full, b_full (see the module doc) from a delta; scale folded into b; both cast to W's dtype."""
    ax, n = d.axes, w.ndim
    a = d.a.reshape(d.a.shape[:-1] + (1,) * len(ax.outputs) + d.a.shape[-1:])
    a = jnp.transpose(a, tuple(np.argsort(ax.stack + ax.inputs + ax.outputs)) + (n,))
    ns = len(ax.stack)
    b = jnp.moveaxis(d.b, ns, -1)
    b = b.reshape(b.shape[:ns] + (1,) * len(ax.inputs) + b.shape[ns:])
    b = jnp.transpose(b, tuple(np.argsort(ax.stack + ax.inputs + ax.outputs)) + (n,))
    b = b.astype(jnp.float32) * d.scale
    return a.astype(w.dtype), b.astype(w.dtype)


def labels(n: int) -> list[str]:
    """`n` distinct einsum labels."""
    if n > len(string.ascii_letters):
        raise ValueError("lora_jax.wrap: too many dimensions in one contraction")
    return list(string.ascii_letters[:n])


def present(f_shape, shape) -> list[int]:
    """Axes of `shape` along which a factor of shape `f_shape` varies (its other axes have size 1)."""
    return [i for i in range(len(shape)) if f_shape[i] != 1 and shape[i] != 1]


def squeeze_to(f, keep):
    """Factor `f` with only the axes in `keep` (and the trailing r axis) left."""
    return f.reshape([f.shape[i] for i in keep] + [f.shape[-1]])


def dense_delta(a, b, shape, dtype):
    """Σ_r a·b as a dense array of `shape` (one einsum over the present axes, then a broadcast)."""
    n = len(shape)
    lab = labels(n + 1)
    pa, pb = present(a.shape, shape), present(b.shape, shape)
    out = sorted(set(pa) | set(pb))
    spec = (
        f"{''.join(lab[i] for i in pa)}{lab[n]},{''.join(lab[i] for i in pb)}{lab[n]}"
        f"->{''.join(lab[i] for i in out)}"
    )
    res = jnp.einsum(spec, squeeze_to(a, pa), squeeze_to(b, pb), preferred_element_type=jnp.float32)
    res = res.reshape([shape[i] if i in out else 1 for i in range(n)])
    return jnp.broadcast_to(res, shape).astype(dtype)
