"""Full fine-tuning's train step, the counterpart of the LoRA step in :mod:`lora_jax.train.step`.

The memory planner compiles both to compare them: the same loss, built from the same pieces of
:mod:`lora_jax.train.step` (`at_positions` or, for many loss positions, the chunked `chunked_lm_loss`),
the same activation sharding, gradient accumulation over micro-batches and optimizer; only what is
differentiated changes (every parameter instead of the deltas), and the optimizer state then has the
size of the whole model.

Shapes: ``batch["input_ids"], ["attention_mask"], ["loss_mask"]: (A, b, T)`` for ``A`` micro-batches of
``b`` rows.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lora_jax.train import step as step_lib

__all__ = ["make_full_train_step"]


def make_full_train_step(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    num_targets: int | None = None,
    shardings: dict | None = None,
    loss_chunk: int | None = 512,
    rules=None,
) -> Callable:
    """``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``, jitted.

    Args:
      apply_fn: ``apply_fn(variables, ids, attention_mask=...) -> logits (B, T, V)``, e.g. ``Llama.apply``.
      tx: the optimizer, over the whole of ``params``.
      num_targets, loss_chunk, rules: as in `lora_jax.train.step.make_train_step` (None targets = every
        next token; more loss positions than ``loss_chunk`` = the chunked cross-entropy).
      shardings: ``{"params", "opt_state", "batch", "replicated"}`` shardings for ``jit``; None = let jit
        pick. With shardings the step is traced under `activation_sharding` on their mesh. ``params``
        and ``opt_state`` are donated.

    Example:
        >>> import optax
        >>> from lora_jax.train.loop import tiny_llama
        >>> model, variables = tiny_llama(64)
        >>> tx = optax.adamw(1e-3)
        >>> step = make_full_train_step(model.apply, tx)
        >>> ids = jnp.ones((1, 2, 6), jnp.int32)
        >>> batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
        >>> _, _, m = step(variables, tx.init(variables), batch, jax.random.key(0))
        >>> m["loss_tokens"]
        Array(10., dtype=float32)
    """
    if loss_chunk is not None and loss_chunk < 1:
        raise ValueError(f"loss_chunk must be a positive number of positions or None, got {loss_chunk}.")
    mesh = None if shardings is None else shardings["replicated"].mesh
    picked = step_lib.at_positions(apply_fn)
    chunked = None if loss_chunk is None else step_lib.chunked_lm_loss(apply_fn, chunk=loss_chunk)

    def sum_loss(params, b):  # the LoRA step's loss, with the base weights as the variables
        ids, mask, lm = b["input_ids"], b["attention_mask"], b["loss_mask"]
        t = ids.shape[-1]
        k = t - 1 if num_targets is None else min(num_targets, t - 1)
        if chunked is not None and k > loss_chunk:
            if num_targets is None:
                tgt = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
                w = jnp.pad(lm[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
                return chunked(params, ids, mask, tgt, w)
            pos, tgt, w = step_lib.completion_targets(ids, lm, num_targets)
            return chunked(params, ids, mask, tgt, w, pos)
        if num_targets is None:
            pos = jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (ids.shape[0], t - 1))
            tgt, w = ids[:, 1:], lm[:, 1:].astype(jnp.float32)
        else:
            pos, tgt, w = step_lib.completion_targets(ids, lm, num_targets)
        return step_lib.token_loss(picked(params, ids, mask, pos), tgt, w)

    keep = (
        (lambda tree: tree)
        if shardings is None
        else (lambda tree: jax.lax.with_sharding_constraint(tree, shardings["params"]))
    )

    def step(params, opt_state, batch, key):
        del key  # no dropout in full fine-tuning; kept for the LoRA step's signature
        with step_lib.activation_sharding(mesh, rules):

            def micro(carry, b):
                gsum, lsum, nsum = carry
                (l, n), g = jax.value_and_grad(sum_loss, has_aux=True)(params, b)
                return (keep(jax.tree_util.tree_map(jnp.add, gsum, g)), lsum + l, nsum + n), None

            zeros = keep(jax.tree_util.tree_map(jnp.zeros_like, params))
            (g, l, n), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), jnp.zeros(())), batch)
            n = jnp.maximum(n, 1.0)
            grads = jax.tree_util.tree_map(lambda x: (x / n).astype(x.dtype), g)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics = {
                "loss": l / n,
                "loss_tokens": n,
                "tokens": jnp.sum(batch["attention_mask"]),
                "grad_norm": optax.tree.norm(grads),
            }
            return params, opt_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    s = shardings
    return jax.jit(
        step,
        in_shardings=(s["params"], s["opt_state"], s["batch"], s["replicated"]),
        out_shardings=(s["params"], s["opt_state"], s["replicated"]),
        donate_argnums=(0, 1),
    )
