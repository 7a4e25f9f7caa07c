"""Small helpers shared by several test modules (import them: ``from helpers import nonzero``)."""

import jax


def nonzero(deltas, key=jax.random.key(7)):
    """Deltas with every factor random (a fresh delta has b = 0, which would hide errors in the low-rank
    path): each leaf ~ 0.3 · N(0, 1) in its own shape and dtype."""
    leaves, tree = jax.tree_util.tree_flatten(deltas)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )
