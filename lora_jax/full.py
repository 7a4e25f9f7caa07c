"""Fully trained leaves (PEFT's ``modules_to_save``): `FullLeaf`, a trainable copy of a base leaf.

Some parameters are better trained in full next to the low-rank deltas: a freshly initialised
classification head, norms, biases, a resized embedding. ``LoraSpec(train_full=<regex>)`` marks them;
`lj.init` then puts a ``FullLeaf(value)`` at each such path of the deltas tree, holding a copy of the
base value (float32, or ``LoraSpec.dtype``). Everything that walks a deltas tree treats it as the new
value of that leaf:

- `lj.wrap` feeds ``value`` (cast to W's dtype) to the function in place of W;
- `lj.merge` replaces W by ``value`` cast to W's dtype; `lj.unmerge` cannot recover W and raises;
- `lj.optimizer` / `lj.trainable_mask` train it (with `lj.loraplus` it gets the base learning rate,
  like ``a``), `lj.count_params` counts it, `lj.delta_shardings` shards it like W;
- `lj.adapter.save_adapter` / `load_adapter` store it (tensor ``{path}/full``) and `lj.peft.save_peft` /
  `load_peft` write and read it as a PEFT ``modules_to_save`` module.

`FullLeaf` is a registered pytree with one leaf, ``value``, so optax and ``jax.grad`` see a plain array;
`is_full` tells it apart from a `LoraDelta` (`lj.is_delta` is False for it) and from None.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> params = {"w": jnp.ones((4, 3)), "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> spec = lj.LoraSpec(rank=2, targets="w", train_full="head/.*")
    >>> d = lj.init(jax.random.key(0), params, spec)
    >>> type(d["head"]["bias"]).__name__, d["head"]["bias"].value.shape, lj.count_params(d)
    ('FullLeaf', (2,), 22)
    >>> bool((lj.merge(params, d)["head"]["kernel"] == params["head"]["kernel"]).all())
    True
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["FullLeaf", "is_full", "init_full", "full_problem"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullLeaf:
    """A fully trained copy of one base leaf. ``value``: W's shape, float32 (or the spec's dtype).

    Example:
        >>> import jax.numpy as jnp
        >>> f = FullLeaf(jnp.zeros((3, 2)))
        >>> [x.shape for x in jax.tree_util.tree_leaves(f)]
        [(3, 2)]
    """

    value: jax.Array


def is_full(x) -> bool:
    """Whether `x` is a `FullLeaf` (a fully trained leaf in a deltas tree)."""
    return isinstance(x, FullLeaf)


def init_full(w, dtype, where: str = "") -> FullLeaf:
    """A trainable copy of the base leaf `w` in `dtype` (a quantized base leaf is dequantized first).

    Raises:
        TypeError: `w` is not a floating-point array (an integer buffer, a step counter, ...).
    """
    dense = w.dequantize() if hasattr(w, "dequantize") else w
    w_dtype = getattr(dense, "dtype", None)
    if w_dtype is None or not jnp.issubdtype(w_dtype, jnp.floating):
        raise TypeError(
            f"{where}: LoraSpec.train_full selects a leaf that is not a floating-point array ({type(w).__name__} "
            f"with dtype {w_dtype}); only float leaves can be trained. Narrow LoraSpec.train_full."
        )
    return FullLeaf(jnp.array(dense, dtype=dtype, copy=True))


def full_problem(f: FullLeaf, shape: tuple[int, ...]) -> str | None:
    """Why `f` cannot replace a base leaf of `shape`, or None if it can.

    Example:
        >>> full_problem(FullLeaf(jnp.zeros((3, 2))), (3, 4))
        'its fully trained value has shape (3, 2), the parameter (3, 4)'
    """
    found = tuple(getattr(f.value, "shape", ()))
    if found != tuple(shape):
        return f"its fully trained value has shape {found}, the parameter {tuple(shape)}"
    return None
