"""Cross-entropy over the vocabulary in sequence chunks: never all of ``(B, T, V)`` float32 logits at once.

A causal LM's loss over every position needs the logits ``(B, T, V)``; in float32 that is the largest
array of a training step (Llama-3's ``V = 128,256`` at ``B·T = 8·2,048`` is 8 GiB), larger than a whole
transformer layer's activations. :func:`chunked_token_loss` applies the output projection to ``c``
positions at a time inside a ``lax.scan`` and keeps only a running sum of the loss; each chunk's body
is a ``jax.checkpoint``, so the backward pass recomputes that chunk's logits instead of storing them.
Peak memory for logits is ``B·c·V`` floats instead of ``B·T·V``; the FLOPs are those of the plain loss
plus one more head matmul (the recompute).

The sum is the same as :func:`token_loss` on the full logits (up to float rounding): ``log_softmax``
of a row does not depend on other rows, and padded positions get weight 0.

Logical-axis constraints (``activation_batch``, ``activation_length``, ``activation_embed``,
``activation_vocab``) keep each chunk's hidden states and logits sharded along the batch; they are
no-ops unless logical-axis rules and a mesh are in context (the train step sets both).

Example:
    >>> import jax, jax.numpy as jnp
    >>> h = jax.random.normal(jax.random.key(0), (2, 10, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 32))
    >>> t = jnp.zeros((2, 10), jnp.int32)
    >>> m = jnp.ones((2, 10))
    >>> loss, n = chunked_token_loss(h, w, t, m, chunk=4)
    >>> ref, _ = token_loss(h @ w, t, m)
    >>> bool(jnp.allclose(loss, ref, rtol=1e-5)), float(n)
    (True, 20.0)
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["chunked_token_loss", "token_loss"]

HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed weighted cross-entropy (float32) and the summed weight.

    Args:
      logits: ``(..., V)``, any float dtype (computed in float32).
      targets: ``(...)`` int token ids.
      weights: ``(...)`` per-position weights (0 = no loss).

    Returns:
      ``(loss_sum, weight_sum)``, two float32 scalars.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ll = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(ll * weights), jnp.sum(weights.astype(jnp.float32))


def _chunk_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum(w · (logsumexp(z) - z[target]))`` for ``logits (B, c, V)``, float32.

    The target logit is picked with a comparison against an iota rather than a gather, so a
    vocabulary-sharded ``logits`` needs no all-gather (only the reductions communicate).
    """
    z = nn.with_logical_constraint(logits.astype(jnp.float32), LOGITS_AXES)
    lse = jax.nn.logsumexp(z, axis=-1)
    vocab = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    picked = jnp.sum(jnp.where(vocab == targets[..., None], z, 0.0), axis=-1)
    return jnp.sum((lse - picked) * weights)


def chunked_token_loss(
    hidden: jax.Array,
    head: Callable[[jax.Array], jax.Array] | jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """:func:`token_loss` of ``head(hidden)``, computed ``chunk`` positions at a time.

    Args:
      hidden: ``(B, T, d)`` hidden states entering the output projection.
      head: the output projection, either a callable ``(B, c, d) -> (B, c, V)`` (e.g. a module's bound
        ``__call__`` / ``attend``, or a function of weights that ``lora_jax.wrap`` adapts) or a kernel
        ``(d, V)`` (applied as ``hidden @ kernel`` in ``hidden``'s dtype).
      targets: ``(B, T)`` int, the token each position predicts.
      weights: ``(B, T)`` per-position weights (0 = no loss).
      chunk: positions per chunk; ``T`` is padded (weight 0) to a multiple of it.

    Returns:
      ``(loss_sum, weight_sum)``, float32 scalars, equal to ``token_loss(head(hidden), targets, weights)``.

    Raises:
      ValueError: mismatched shapes or a non-positive ``chunk``.
    """
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or weights.shape != hidden.shape[:2]:
        raise ValueError(
            f"chunked_token_loss: expected hidden (B, T, d) and targets, weights (B, T); got "
            f"hidden {hidden.shape}, targets {targets.shape}, weights {weights.shape}."
        )
    if chunk < 1:
        raise ValueError(f"chunked_token_loss: chunk must be >= 1, got {chunk}.")
    if not callable(head):
        kernel = jnp.asarray(head)
        if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
            raise ValueError(
                f"chunked_token_loss: a kernel head must be (d, V) with d = {hidden.shape[-1]}, "
                f"got {kernel.shape}."
            )
        head = lambda h: h @ kernel.astype(h.dtype)
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    weights = weights.astype(jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    hidden = nn.with_logical_constraint(hidden, HIDDEN_AXES)
    # (B, n·c, ...) -> (n, B, c, ...): scan over chunks, the batch axis (and its sharding) kept.
    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
    xs = (split(hidden), split(targets), split(weights))

    @jax.checkpoint
    def one(h, tgt, w):
        h = nn.with_logical_constraint(h, HIDDEN_AXES)
        return _chunk_loss(head(h), tgt, w)

    def body(total, x):
        return total + one(*x), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(weights)
