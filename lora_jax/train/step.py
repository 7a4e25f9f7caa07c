"""Jitted LoRA train and eval steps: gradients of the deltas only, computed factored with `lj.wrap`.

The loss is the causal-LM cross-entropy on the completion tokens (``loss_mask``). Only the logits at
those positions are needed, so the LM head is applied there alone: `at_positions` intercepts the
model's output projection (``lm_head`` or the tied ``embed.attend``) and gathers the hidden states at
``positions`` first. For a prompt -> one-word completion this skips almost all of the
``(B, T, vocab)`` logits, the largest single matmul of a small LM.

When there are many loss positions (``num_targets=None``: every next-token position, as in plain LM
training), `chunked_lm_loss` intercepts the same projection and computes the cross-entropy
``loss_chunk`` positions at a time (:func:`lora_jax.train.loss.chunked_token_loss`), so no more than a
chunk of float32 logits ever exists.

On a mesh the step runs under the model's logical-axis rules (``activation_batch`` ->
``("data", "fsdp")``, ...), so the models' and the loss's activation constraints keep every activation
sharded along the batch: per-device memory at a fixed per-device batch does not grow with the number
of devices.

Shapes: ``input_ids, attention_mask, loss_mask: (A, b, T)`` for a train batch of ``A`` micro-batches
of ``b`` rows (gradient accumulation scans over ``A``), ``(B, T)`` for eval.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax.train.loss import chunked_token_loss, token_loss

__all__ = [
    "activation_sharding",
    "at_positions",
    "chunked_lm_loss",
    "completion_targets",
    "make_optimizer",
    "make_score_step",
    "make_train_step",
    "token_loss",
]


def _is_head(context) -> bool:
    name = context.method_name
    return name == "attend" or (name == "__call__" and context.module.name == "lm_head")


def _present_axes(axes, names):
    if axes is None or axes is P.UNCONSTRAINED:
        return axes
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in names)
    return P.UNCONSTRAINED if not kept else kept[0] if len(kept) == 1 else kept


@contextlib.contextmanager
def activation_sharding(mesh=None, rules=None):
    """Context for tracing a step: the logical-axis `rules` (Flax) and, if given, `mesh` as the abstract mesh.

    Inside it, ``nn.with_logical_constraint`` in the models and the loss becomes a sharding constraint on
    `mesh`; without a mesh (and no mesh set by the caller) the constraints stay no-ops. Usable inside
    ``jax.jit``. `rules` default to the Llama family's ``LOGICAL_AXIS_RULES_DEFAULT`` (parameter and
    activation names); rules given are looked up first, the defaults fill in the names they lack. Mesh
    axes a rule names but `mesh` lacks are left to the compiler (``PartitionSpec.UNCONSTRAINED``). A mesh
    with ``Explicit`` axes carries shardings in the types: no constraints are added there.
    """
    from lora_jax.models import llama

    if mesh is not None and any(t != AxisType.Auto for t in mesh.axis_types):
        yield
        return
    rules = tuple(rules or ()) + tuple(llama.LOGICAL_AXIS_RULES_DEFAULT)
    if mesh is not None:
        rules = tuple((name, _present_axes(axes, mesh.axis_names)) for name, axes in rules)
    with contextlib.ExitStack() as stack:
        stack.enter_context(nn.logical_axis_rules(rules))
        if mesh is not None:
            # jax.set_mesh cannot be entered inside jit; the abstract mesh can (jax.sharding in 0.10 and later).
            use = getattr(jax.sharding, "use_abstract_mesh", None) or jax.use_abstract_mesh
            stack.enter_context(use(getattr(mesh, "abstract_mesh", mesh)))
        yield


def at_positions(apply_fn: Callable) -> Callable:
    """``f(variables, ids, mask, positions (B, K)) -> logits (B, K, V)`` from a Llama-style ``apply``.

    The hidden states entering the output projection (a module named ``lm_head`` or an ``attend`` call,
    i.e. tied embeddings) are gathered at `positions` first, so the projection runs on ``B·K`` rows only.
    """

    def fn(variables, ids, mask, positions):
        def pick(next_fun, args, kwargs, context):
            if _is_head(context):
                x = jnp.take_along_axis(args[0], positions[..., None], axis=1)
                return next_fun(x, *args[1:], **kwargs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(pick):
            logits = apply_fn(variables, ids, attention_mask=mask)
        if logits.shape[1] != positions.shape[1]:
            raise ValueError(
                f"at_positions: the model's output has {logits.shape[1]} positions, expected {positions.shape[1]}: "
                f"its output projection is neither a module named 'lm_head' nor an 'attend' call."
            )
        return logits

    return fn


def chunked_lm_loss(apply_fn: Callable, *, chunk: int = 512) -> Callable:
    """``f(variables, ids, mask, targets, weights, positions=None) -> (loss_sum, weight_sum)``, chunked.

    Runs the Llama-style ``apply_fn`` and, at its output projection (a module named ``lm_head`` or an
    ``attend`` call, as in `at_positions`), computes the cross-entropy of the projection's output with
    :func:`~lora_jax.train.loss.chunked_token_loss` instead of returning logits: the projection is called
    on ``chunk`` positions at a time, so ``lj.wrap(f)`` adapts a LoRA on the head as well. Logits
    post-processed by the model after that call (e.g. soft-capping) are not seen by this loss.

    Args:
      apply_fn: ``apply_fn(variables, ids, attention_mask=mask)``.
      chunk: positions per chunk.

    The returned function takes ``ids, mask: (B, T)``; ``targets, weights: (B, K)``; ``positions:
    (B, K)`` int (the hidden states are gathered there first) or None (``K == T``: every position).
    """

    def fn(variables, ids, mask, targets, weights, positions=None):
        out = []

        def head(next_fun, args, kwargs, context):
            if out or not _is_head(context):  # once claimed, calls from inside the loss pass through
                return next_fun(*args, **kwargs)
            out.append(None)
            x = args[0]
            if positions is not None:
                x = jnp.take_along_axis(x, positions[..., None], axis=1)
            project = lambda h: next_fun(h, *args[1:], **kwargs)
            out[0] = chunked_token_loss(x, project, targets, weights, chunk=chunk)
            return args[0][:, :0]  # (B, 0, d): no logits leave the model

        with nn.intercept_methods(head):
            apply_fn(variables, ids, attention_mask=mask)
        if not out:
            raise ValueError(
                "chunked_lm_loss: the model never called its output projection: it is neither a "
                "module named 'lm_head' nor an 'attend' call; pass loss_chunk=None to make_train_step."
            )
        return out[0]

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


def make_optimizer(lr: float, steps: int, warmup: int, weight_decay: float = 0.0):
    """adamw with linear warmup from 0 to `lr`, then cosine decay to 0 at `steps`; also the schedule."""
    warmup = min(warmup, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.0)
    return optax.adamw(schedule, weight_decay=weight_decay), schedule


def make_train_step(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    num_targets: int | None = None,
    dropout: bool = False,
    shardings: dict | None = None,
    loss_chunk: int | None = 512,
    rules=None,
) -> Callable:
    """``step(deltas, opt_state, params, batch, key) -> (deltas, opt_state, metrics)``, jitted.

    Differentiates only the deltas: ``value_and_grad(loss)(deltas, params, micro_batch)`` with the
    factored ``lj.wrap(apply_fn)``. Gradients of the ``A`` micro-batches are summed (``lax.scan``) and
    divided by the total number of loss tokens, so ``A`` micro-batches of ``b`` rows give the same update
    as one batch of ``A·b`` rows. ``metrics``: ``loss``, ``loss_tokens``, ``tokens``, ``grad_norm``.

    Args:
      num_targets: loss positions per row: the first ``num_targets`` positions whose next token has
        ``loss_mask == 1`` (completions); None = every position ``t < T - 1`` predicting ``t + 1``,
        weighted by ``loss_mask[:, t + 1]`` (language modelling over the whole sequence).
      shardings: ``{"deltas", "opt_state", "params", "batch", "replicated"}`` shardings for ``jit`` (all
        ``NamedSharding`` on one mesh); None = let jit pick. With shardings, the step is traced under
        `activation_sharding` on their mesh, which keeps activations and logits sharded along the batch.
      loss_chunk: when a row has more than this many loss positions, the cross-entropy is computed this
        many positions at a time (`chunked_lm_loss`); else the head runs on the loss positions only and
        their logits are materialised (`at_positions`). None = never chunk.
      rules: logical-axis rules looked up before the model family's defaults (see `activation_sharding`).
    """
    if loss_chunk is not None and loss_chunk < 1:
        raise ValueError(f"loss_chunk must be a positive number of positions or None, got {loss_chunk}.")
    mesh = None if shardings is None else shardings["replicated"].mesh
    picked = lj.wrap(at_positions(apply_fn))
    chunked = None if loss_chunk is None else lj.wrap(chunked_lm_loss(apply_fn, chunk=loss_chunk))

    def sum_loss(deltas, params, b, key):
        ids, mask, lm = b["input_ids"], b["attention_mask"], b["loss_mask"]
        key = key if dropout else None
        t = ids.shape[-1]
        k = t - 1 if num_targets is None else min(num_targets, t - 1)
        if chunked is not None and k > loss_chunk:
            if num_targets is None:  # every position; the last one (nothing to predict) gets weight 0
                tgt = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
                w = jnp.pad(lm[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
                return chunked(params, deltas, ids, mask, tgt, w, dropout_key=key)
            pos, tgt, w = completion_targets(ids, lm, num_targets)
            return chunked(params, deltas, ids, mask, tgt, w, pos, dropout_key=key)
        if num_targets is None:
            pos = jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (ids.shape[0], t - 1))
            tgt, w = ids[:, 1:], lm[:, 1:].astype(jnp.float32)
        else:
            pos, tgt, w = completion_targets(ids, lm, num_targets)
        logits = picked(params, deltas, ids, mask, pos, dropout_key=key)
        return token_loss(logits, tgt, w)

    # The gradient accumulator lives where the deltas live (not replicated).
    keep = (
        (lambda tree: tree)
        if shardings is None
        else (lambda tree: jax.lax.with_sharding_constraint(tree, shardings["deltas"]))
    )

    def step(deltas, opt_state, params, batch, key):
        with activation_sharding(mesh, rules):

            def micro(carry, xs):
                gsum, lsum, nsum = carry
                b, i = xs
                (l, n), g = jax.value_and_grad(sum_loss, has_aux=True)(
                    deltas, params, b, jax.random.fold_in(key, i)
                )
                return (keep(jax.tree_util.tree_map(jnp.add, gsum, g)), lsum + l, nsum + n), None

            zeros = keep(jax.tree_util.tree_map(jnp.zeros_like, deltas))
            num_micro = batch["input_ids"].shape[0]
            (g, l, n), _ = jax.lax.scan(
                micro, (zeros, jnp.zeros(()), jnp.zeros(())), (batch, jnp.arange(num_micro))
            )
            n = jnp.maximum(n, 1.0)
            grads = jax.tree_util.tree_map(lambda x: x / n, g)
            updates, opt_state = tx.update(grads, opt_state, deltas)
            deltas = optax.apply_updates(deltas, updates)
            # attention_mask > 0: packed rows hold segment ids 1, 2, ... there (lora_jax.data.packing)
            metrics = {
                "loss": l / n,
                "loss_tokens": n,
                "tokens": jnp.sum(batch["attention_mask"] > 0),
                "grad_norm": optax.global_norm(grads),
            }
            return deltas, opt_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    s = shardings
    return jax.jit(
        step,
        in_shardings=(s["deltas"], s["opt_state"], s["params"], s["batch"], s["replicated"]),
        out_shardings=(s["deltas"], s["opt_state"], s["replicated"]),
        donate_argnums=(0, 1),
    )


def make_score_step(apply_fn: Callable, candidate_ids, *, shardings: dict | None = None) -> Callable:
    """``score(deltas, params, batch) -> {"correct", "count", "logprobs" (B, C)}``, jitted.

    Zero-shot-style classification by the label words' likelihood: at the last prompt position
    (``prompt_len - 1``) compare the log-probabilities of the candidates' (single) tokens; the prediction
    is the most likely candidate. Rows with ``valid == 0`` (padding) are not counted. Deltas fresh from
    ``lj.init`` (b = 0) score exactly like the base model.
    """
    f = lj.wrap(at_positions(apply_fn))
    cand = jnp.asarray(candidate_ids, jnp.int32)
    mesh = None if shardings is None else shardings["replicated"].mesh

    def score(deltas, params, batch):
        pos = (batch["prompt_len"] - 1)[:, None].astype(jnp.int32)
        with activation_sharding(mesh):
            logits = f(params, deltas, batch["input_ids"], batch["attention_mask"], pos)[:, 0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, cand]
        pred = jnp.argmax(logp, axis=-1)
        valid = batch["valid"].astype(jnp.float32)
        return {
            "correct": jnp.sum((pred == batch["labels"]).astype(jnp.float32) * valid),
            "count": jnp.sum(valid),
            "logprobs": logp,
        }

    if shardings is None:
        return jax.jit(score)
    s = shardings
    return jax.jit(
        score,
        in_shardings=(s["deltas"], s["params"], s["eval_batch"]),
        out_shardings={"correct": s["replicated"], "count": s["replicated"], "logprobs": s["replicated"]},
    )
