"""Train only the deltas: `trainable_mask` and `optimizer` for trees that hold base weights and deltas.

The recommended pattern needs neither: differentiate the deltas alone and use any optax optimizer::

    grads = jax.grad(loss)(deltas, params, batch)     # loss(deltas, params, batch)
    updates, opt_state = tx.update(grads, opt_state, deltas)

`optimizer(tx)` is for code that keeps one combined tree (e.g. ``{"params": p, "deltas": d}``): leaves
inside a `LoraDelta` get `tx`, every other leaf gets a zero update and no optimizer state
(``optax.partition`` with ``optax.set_to_zero``, the same composition as ``optax`` freezing).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from lora_jax.delta import is_delta

__all__ = ["trainable_mask", "optimizer"]


def trainable_mask(tree: Any) -> Any:
  """A tree of bools with `tree`'s leaves: True for the ``a``/``b`` of every `LoraDelta`, else False.

  Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.delta import LoraDelta
    >>> tree = {"w": jnp.ones((2, 2)), "dw": LoraDelta(jnp.ones((2, 1)), jnp.zeros((1, 2)))}
    >>> trainable_mask(tree)
    {'dw': LoraDelta(a=True, b=True, scale=1.0, axes=LoraAxes(stack=(), inputs=(0,), outputs=(1,)), dropout=0.0), 'w': False}
  """
  def mark(x):
    if is_delta(x):
      return jax.tree_util.tree_map(lambda _: True, x)
    return False
  return jax.tree_util.tree_map(mark, tree, is_leaf=is_delta)


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on delta leaves only; zero updates and no state for every other leaf of the tree."""
  def labels(tree):
    return jax.tree_util.tree_map(lambda m: "lora" if m else "frozen", trainable_mask(tree))
  return optax.partition({"lora": tx, "frozen": optax.set_to_zero()}, labels)
