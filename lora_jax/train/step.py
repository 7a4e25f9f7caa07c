"""Jitted LoRA train and eval steps: gradients of the deltas only, computed factored with `lj.wrap`.

The loss is the causal-LM cross-entropy on the completion tokens (``loss_mask``). Only the logits at
those positions are needed, so the LM head is applied there alone: `at_positions` intercepts the
model's output projection (``lm_head`` or the tied ``embed.attend``) and gathers the hidden states at
``positions`` first. For a prompt -> one-word completion this skips almost all of the
``(B, T, vocab)`` logits, the largest single matmul of a small LM.

Shapes: ``input_ids, attention_mask, loss_mask: (A, b, T)`` for a train batch of ``A`` micro-batches
of ``b`` rows (gradient accumulation scans over ``A``), ``(B, T)`` for eval.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj

__all__ = ["at_positions", "completion_targets", "make_optimizer", "make_score_step", "make_train_step",
           "token_loss"]


def at_positions(apply_fn: Callable) -> Callable:
  """``f(variables, ids, mask, positions (B, K)) -> logits (B, K, V)`` from a Llama-style ``apply``.

  The hidden states entering the output projection (a module named ``lm_head`` or an ``attend`` call,
  i.e. tied embeddings) are gathered at `positions` first, so the projection runs on ``B·K`` rows only.
  """
  def fn(variables, ids, mask, positions):
    def pick(next_fun, args, kwargs, context):
      name = context.method_name
      if name == "attend" or (name == "__call__" and context.module.name == "lm_head"):
        x = jnp.take_along_axis(args[0], positions[..., None], axis=1)
        return next_fun(x, *args[1:], **kwargs)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(pick):
      logits = apply_fn(variables, ids, attention_mask=mask)
    if logits.shape[1] != positions.shape[1]:
      raise ValueError(
          f"at_positions: the model's output has {logits.shape[1]} positions, expected {positions.shape[1]}: "
          f"its output projection is neither a module named 'lm_head' nor an 'attend' call.")
    return logits
  return fn


def completion_targets(ids: jax.Array, loss_mask: jax.Array, num_targets: int):
  """``(positions, targets, weights)``, each ``(B, K)``: where the loss is, the next token, 0/1 weight.

  Position ``t`` predicts token ``t + 1``, so ``loss_mask[:, t + 1] == 1`` selects position ``t``. The
  first `num_targets` such positions of each row are taken (K must be >= the most per row).
  """
  m = loss_mask[:, 1:]
  pos = jnp.argsort(-m, axis=1, stable=True)[:, :num_targets].astype(jnp.int32)
  tgt = jnp.take_along_axis(ids[:, 1:], pos, axis=1)
  w = jnp.take_along_axis(m, pos, axis=1).astype(jnp.float32)
  return pos, tgt, w


def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed weighted cross-entropy (float32) and the summed weight."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ll = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return -jnp.sum(ll * weights), jnp.sum(weights)


def make_optimizer(lr: float, steps: int, warmup: int, weight_decay: float = 0.0):
  """adamw with linear warmup from 0 to `lr`, then cosine decay to 0 at `steps`; also the schedule."""
  warmup = min(warmup, max(steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.0)
  return optax.adamw(schedule, weight_decay=weight_decay), schedule


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, *, num_targets: int,
                    dropout: bool = False, shardings: dict | None = None) -> Callable:
  """``step(deltas, opt_state, params, batch, key) -> (deltas, opt_state, metrics)``, jitted.

  Differentiates only the deltas: ``value_and_grad(loss)(deltas, params, micro_batch)`` with the
  factored ``lj.wrap(apply_fn)``. Gradients of the ``A`` micro-batches are summed (``lax.scan``) and
  divided by the total number of loss tokens, so ``A`` micro-batches of ``b`` rows give the same update
  as one batch of ``A·b`` rows. ``metrics``: ``loss``, ``loss_tokens``, ``tokens``, ``grad_norm``.

  Args:
    shardings: ``{"deltas", "opt_state", "params", "batch"}`` shardings for ``jit``; None = let jit pick.
  """
  f = lj.wrap(at_positions(apply_fn))

  def sum_loss(deltas, params, b, key):
    pos, tgt, w = completion_targets(b["input_ids"], b["loss_mask"], num_targets)
    logits = f(params, deltas, b["input_ids"], b["attention_mask"], pos,
               dropout_key=key if dropout else None)
    return token_loss(logits, tgt, w)

  def step(deltas, opt_state, params, batch, key):
    def micro(carry, xs):
      gsum, lsum, nsum = carry
      b, i = xs
      (l, n), g = jax.value_and_grad(sum_loss, has_aux=True)(deltas, params, b, jax.random.fold_in(key, i))
      return (jax.tree_util.tree_map(jnp.add, gsum, g), lsum + l, nsum + n), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, deltas)
    num_micro = batch["input_ids"].shape[0]
    (g, l, n), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), jnp.zeros(())),
                                (batch, jnp.arange(num_micro)))
    n = jnp.maximum(n, 1.0)
    grads = jax.tree_util.tree_map(lambda x: x / n, g)
    updates, opt_state = tx.update(grads, opt_state, deltas)
    deltas = optax.apply_updates(deltas, updates)
    metrics = {"loss": l / n, "loss_tokens": n, "tokens": jnp.sum(batch["attention_mask"]),
               "grad_norm": optax.global_norm(grads)}
    return deltas, opt_state, metrics

  if shardings is None:
    return jax.jit(step, donate_argnums=(0, 1))
  s = shardings
  return jax.jit(step, in_shardings=(s["deltas"], s["opt_state"], s["params"], s["batch"], s["replicated"]),
                 out_shardings=(s["deltas"], s["opt_state"], s["replicated"]), donate_argnums=(0, 1))


def make_score_step(apply_fn: Callable, candidate_ids, *, shardings: dict | None = None) -> Callable:
  """``score(deltas, params, batch) -> {"correct", "count", "logprobs" (B, C)}``, jitted.

  Zero-shot-style classification by the label words' likelihood: at the last prompt position
  (``prompt_len - 1``) compare the log-probabilities of the candidates' (single) tokens; the prediction
  is the most likely candidate. Rows with ``valid == 0`` (padding) are not counted. Deltas fresh from
  ``lj.init`` (b = 0) score exactly like the base model.
  """
  f = lj.wrap(at_positions(apply_fn))
  cand = jnp.asarray(candidate_ids, jnp.int32)

  def score(deltas, params, batch):
    pos = (batch["prompt_len"] - 1)[:, None].astype(jnp.int32)
    logits = f(params, deltas, batch["input_ids"], batch["attention_mask"], pos)[:, 0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, cand]
    pred = jnp.argmax(logp, axis=-1)
    valid = batch["valid"].astype(jnp.float32)
    return {"correct": jnp.sum((pred == batch["labels"]) * valid), "count": jnp.sum(valid), "logprobs": logp}

  if shardings is None:
    return jax.jit(score)
  s = shardings
  return jax.jit(score, in_shardings=(s["deltas"], s["params"], s["eval_batch"]),
                 out_shardings={"correct": s["replicated"], "count": s["replicated"],
                                "logprobs": s["replicated"]})
