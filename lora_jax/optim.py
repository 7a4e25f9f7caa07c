"""Train only the deltas: `trainable_mask` and `optimizer` for trees that hold base weights and deltas.

The recommended pattern needs neither: differentiate the deltas alone and use any optax optimizer::

    grads = jax.grad(loss)(deltas, params, batch)     # loss(deltas, params, batch)
    updates, opt_state = tx.update(grads, opt_state, deltas)

`optimizer(tx)` is for code that keeps one combined tree (e.g. ``{"params": p, "deltas": d}``): leaves
inside a `LoraDelta` get `tx`, every other leaf gets a zero update and no optimizer state
(``optax.partition`` with ``optax.set_to_zero``, the same composition as ``optax`` freezing).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import optax

from lora_jax.bank import is_bank
from lora_jax.delta import is_delta
from lora_jax.full import is_full

__all__ = ["trainable_mask", "optimizer", "loraplus"]


def trainable_mask(tree: Any) -> Any:
    """A tree of bools with `tree`'s leaves: True for the ``a``/``b`` (and DoRA ``m``) of every `LoraDelta`
    and the value of every `FullLeaf` (``LoraSpec.train_full``), else False.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax.delta import LoraDelta
      >>> tree = {"w": jnp.ones((2, 2)), "dw": LoraDelta(jnp.ones((2, 1)), jnp.zeros((1, 2)))}
      >>> trainable_mask(tree)
      {'dw': LoraDelta(a=True, b=True, scale=1.0, axes=LoraAxes(stack=(), inputs=(0,), outputs=(1,)), dropout=0.0), 'w': False}
    """

    def mark(x):
        if is_bank(x):  # an AdapterBank: its a and b train, its per-slot scale and rank do not
            return x.trainable_mask()
        if is_delta(x) or is_full(x):
            return jax.tree_util.tree_map(lambda _: True, x)
        return False

    return jax.tree_util.tree_map(mark, tree, is_leaf=lambda x: is_delta(x) or is_full(x) or is_bank(x))


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on delta leaves (and fully trained leaves) only; zero updates and no state for every other leaf."""

    def labels(tree):
        return jax.tree_util.tree_map(lambda m: "lora" if m else "frozen", trainable_mask(tree))

    return optax.partition({"lora": tx, "frozen": optax.set_to_zero()}, labels)


def _b_mask(tree: Any) -> Any:
    """True for the ``b`` (and the DoRA magnitude ``m``) of every delta, False for every other leaf."""

    def mark(x):
        if is_delta(x):
            marks = jax.tree_util.tree_map(lambda _: True, x)
            return dataclasses.replace(marks, a=False)
        return False

    return jax.tree_util.tree_map(mark, tree, is_leaf=is_delta)


def loraplus(tx: optax.GradientTransformation, ratio: float = 16.0) -> optax.GradientTransformation:
    """LoRA+ (Hayou, Ghosh and Yu 2024, arXiv:2402.12354): `tx`, with b's updates `ratio` times larger.

    With ``a: (in, r)`` and ``b: (r, out)``, LoRA+ trains b with a learning rate λ times that of a; the paper
    shows that equal rates are inefficient for wide models and recommends λ = 2⁴ = 16 as the default
    (section 5; PEFT's ``create_loraplus_optimizer`` uses the same value). `tx`'s update is scaled
    afterwards, which is the same as scaling b's learning rate for every optax optimizer whose update is
    proportional to its learning rate (sgd, adam, adamw with its weight decay, ...). A DoRA magnitude ``m``
    gets b's rate, as in PEFT (its 1-D LoRA parameters join b's group). A fully trained leaf
    (``LoraSpec.train_full``) gets a's rate, the base one (PEFT gives 1-D ones, biases, b's). Leaves outside deltas are passed
    through, so compose with `optimizer` for a combined tree: ``optimizer(loraplus(tx))``.

    Args:
      tx: the optimizer for a (e.g. ``optax.adamw(2e-4)``).
      ratio: λ = lr_b / lr_a, a finite number > 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax.delta import LoraDelta
      >>> d = {"w": LoraDelta(jnp.ones((2, 1)), jnp.zeros((1, 2)))}
      >>> tx = loraplus(optax.sgd(0.1), ratio=16.0)
      >>> u, _ = tx.update(jax.tree.map(jnp.ones_like, d), tx.init(d), d)
      >>> float(u["w"].a[0, 0]), float(u["w"].b[0, 0])
      (-0.10000000149011612, -1.600000023841858)
    """
    if (
        not isinstance(ratio, numbers.Real)
        or isinstance(ratio, bool)
        or not math.isfinite(ratio)
        or ratio <= 0
    ):
        raise ValueError(
            f"loraplus: ratio={ratio!r} must be a finite number > 0 (lr_b / lr_a; the paper "
            f"recommends 16.0, and 1.0 is plain LoRA)"
        )
    return optax.chain(tx, optax.masked(optax.scale(float(ratio)), _b_mask))
