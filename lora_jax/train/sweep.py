"""Sweeps: train one configuration for several seeds at once, with ``jax.vmap``.

A seed sweep is how LoRA papers report results (Hu et al. 2021 give the mean and spread over seeds),
and on one accelerator it is cheap: every tree that trains gets a leading *run* axis ``S`` (one run per
seed), the train step is ``jax.jit(jax.vmap(step))``, and the frozen base weights are broadcast, not
copied, across runs. Each run has its own adapter and head initialisation and its own data order.

The pieces are the training engine's: the optimizer is :func:`lora_jax.train.step.make_optimizer`
(adamw, linear warm-up then cosine decay), LoRA runs go through ``lj.wrap(apply)`` (so the step
computes ``x·W + s·((x·a)·b)`` and no gradient of W), :func:`lm_task` scores and trains exactly like
the engine's ``make_train_step`` / ``make_score_step``, and batches come from
:func:`lora_jax.data.batches`. A LoRA run of seed ``k`` gives the same deltas as ``lora-jax finetune
--seed k`` would with the same data, batch and schedule (up to float rounding).

What trains in a run (its *trainable tree*, every leaf with the leading run axis ``S``):

* ``{"deltas": deltas}``: LoRA (``Config.spec``). A task's new head (a classifier on a pretrained
  encoder) is a fully trained leaf of the deltas, ``LoraSpec(train_full="params/<head_key>/.*")``: a
  `lora_jax.FullLeaf` at each head leaf, freshly initialised per run, with its own learning rate
  (``Config.lr_head``) through the optimizer's per-leaf labels. Without a spec the deltas hold the head
  alone (None elsewhere); without a spec or a head nothing trains (``deltas=None``).
* ``{"params": variables}``: full fine-tuning (``Config(full=True)``), the head included.

LoRA's variants are configurations too: DoRA (``LoraSpec(dora=True)``), PiSSA / OLoRA
(``LoraSpec(init="pissa" | "olora")``: every run trains on the residual base of
`lora_jax.init_with_residual`, :attr:`Result.base`) and LoRA+ (``Config(loraplus_ratio=16.0)``).
``train(..., eval_every=k)`` also records the validation loss and accuracy every ``k`` steps
(:attr:`Result.curve`).

Several configurations (ranks, targets, learning rates, variants) run one after another in :func:`run`;
each compiles its own step. :func:`make_step` gives that step on its own (to time one configuration's
step against another's, or to drive a loop of your own).

Example:
    >>> import jax, jax.numpy as jnp, numpy as np, lora_jax as lj
    >>> from lora_jax.train import sweep
    >>> def apply(v, x, mask):  # a linear "model": (B, T, 4) -> (B, 2) class scores
    ...     return (x * mask[..., None]).sum(1) @ v["params"]["w"]
    >>> variables = {"params": {"w": jnp.ones((4, 2))}}
    >>> task = sweep.classifier_task(apply, inputs=("x", "attention_mask"))
    >>> arrays = {"x": np.random.default_rng(0).normal(size=(16, 3, 4)).astype(np.float32),
    ...           "attention_mask": np.ones((16, 3), np.int32), "labels": np.arange(16) % 2}
    >>> cfg = sweep.Config("LoRA r=1", spec=lj.LoraSpec(rank=1, alpha=1.0, targets="params/w"), lr=0.1)
    >>> result = sweep.train(task, cfg, variables, arrays, arrays, seeds=(0, 1, 2), steps=4, batch_size=8)
    >>> result.trainable["deltas"]["params"]["w"].a.shape   # (S, in, r)
    (3, 4, 1)
    >>> result.losses.shape, result.accuracy.shape          # (steps, S), (S,)
    ((4, 3), (3,))
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax import data
from lora_jax.spec import path_str
from lora_jax.train import step as step_lib

__all__ = [
    "Config",
    "Result",
    "Task",
    "classifier_task",
    "evaluate",
    "evaluate_loss",
    "head_spec",
    "init",
    "lm_task",
    "make_step",
    "run",
    "seed_batches",
    "step_keys",
    "table",
    "train",
]


@dataclasses.dataclass(frozen=True)
class Task:
    """What a model contributes to a sweep.

    Attributes:
        apply: ``apply(variables, *inputs)``, the network. LoRA runs call ``lj.wrap(apply)``.
        loss: ``loss(model, batch) -> scalar`` of one run, where ``model(*inputs)`` is `apply` with that
            run's weights (base + deltas, with its head, or its fully fine-tuned params).
        scores: ``scores(model, batch) -> (B, C)`` class scores of one run; a row's prediction is the
            argmax, compared with ``batch["labels"]`` on rows with ``batch["valid"] == 1``.
        head_key: name of a new head under ``variables["params"]`` that every run trains in full (a
            classifier on top of a pretrained encoder): it is added to the LoRA spec's ``train_full``,
            so it lives in the deltas as `lora_jax.FullLeaf` s. None for none.
        init_head: ``key -> head params``, each run's fresh head; required with `head_key`.
    """

    apply: Callable
    loss: Callable
    scores: Callable
    head_key: str | None = None
    init_head: Callable | None = None

    def __post_init__(self):
        if (self.head_key is None) != (self.init_head is None):
            raise ValueError(
                f"Task: head_key ({self.head_key!r}) and init_head ({self.init_head!r}) go together: "
                f"give both for a task with a new head, or neither."
            )


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration of a sweep; each of its seeds is one run.

    Attributes:
        name: the configuration's label in results and tables.
        spec: the LoRA spec; None trains no adapter (only the task's head, if it has one). The task's
            head is added to its ``train_full``.
        full: full fine-tuning: every parameter trains (no `spec`).
        lr: peak learning rate of the adapter (or of every parameter with `full`).
        lr_head: peak learning rate of the task's head; None: `lr`.
        weight_decay: adamw weight decay.
        loraplus_ratio: LoRA+ (`lora_jax.loraplus`): b (and a DoRA magnitude) at this many times `lr`;
            None for plain LoRA. Needs a `spec`.
    """

    name: str
    spec: lj.LoraSpec | None = None
    full: bool = False
    lr: float = 1e-3
    lr_head: float | None = None
    weight_decay: float = 0.0
    loraplus_ratio: float | None = None

    def __post_init__(self):
        if self.full and self.spec is not None:
            raise ValueError(
                f"Config {self.name!r}: full=True trains every parameter, so it takes no LoRA spec; "
                f"drop spec= or full=True."
            )
        if self.loraplus_ratio is not None:
            if self.spec is None:
                raise ValueError(
                    f"Config {self.name!r}: loraplus_ratio={self.loraplus_ratio} scales the learning rate of "
                    f"LoRA's b, but the configuration has no LoRA spec; give spec= or drop loraplus_ratio."
                )
            if not self.loraplus_ratio > 0:
                raise ValueError(
                    f"Config {self.name!r}: loraplus_ratio must be > 0, got {self.loraplus_ratio}; "
                    f"the LoRA+ paper recommends 16.0."
                )
        init = None if self.spec is None else self.spec.init
        if init is not None and lj.residual.loftq_rounds(init):
            raise ValueError(
                f"Config {self.name!r}: LoraSpec(init={init!r}) (LoftQ) fits the adapters to a quantized base, "
                f"which sweeps do not have; train it with lj.init_with_residual(key, params, spec, qspec=...) "
                f"and lj.wrap, or use init='pissa' / 'olora' here."
            )
        if init is not None and lj.spec.residual_init(init) and init not in ("pissa", "olora"):
            raise ValueError(
                f"Config {self.name!r}: LoraSpec(init={init!r}) draws a random residual base per key, but "
                f"a sweep's runs share one base; use init='pissa' (exact SVD) or 'olora'."
            )


@dataclasses.dataclass
class Result:
    """What :func:`train` returns for one configuration trained with seeds ``S = len(seeds)``.

    Attributes:
        config: the configuration.
        seeds: one per run.
        trainable: the trained trees, every leaf with a leading run axis ``(S, ...)``.
        losses: ``(steps, S)`` float32 training loss of every step and run.
        accuracy: ``(S,)`` accuracy on the evaluation arrays, or None without them.
        trainable_params: trainable scalars of one run.
        adapter_params: the adapter's share of them (0 without LoRA).
        train_s: seconds spent on initialisation and training (compilation included).
        total_s: the same plus evaluation.
        base: the frozen variables the runs' deltas apply to (the residual base for PiSSA / OLoRA, with
            a placeholder at a new head's path); pass it to :func:`evaluate`.
        curve: with ``train(..., eval_every=k)``, one entry every ``k`` steps and at the last:
            ``{"step": int, "loss": [S floats], "accuracy": [S floats]}`` on the evaluation arrays.
        step: ``(step, tx)`` of :func:`make_step`, the compiled step that trained the runs (None when
            nothing trained): one more step of them costs no new compilation (e.g. to time it).
    """

    config: Config
    seeds: tuple[int, ...]
    trainable: Any
    losses: np.ndarray
    accuracy: np.ndarray | None
    trainable_params: int
    adapter_params: int
    train_s: float
    total_s: float
    base: Any = None
    curve: list = dataclasses.field(default_factory=list)
    step: tuple[Callable, optax.GradientTransformation] | None = None

    def run(self, i: int) -> Any:
        """The trainable tree of run ``i`` (seed ``seeds[i]``), without the run axis."""
        return jax.tree_util.tree_map(lambda x: x[i], self.trainable)

    def summary(self) -> dict:
        """JSON-ready: name, seeds, parameter counts, accuracy per run with mean and std, the mean
        training loss of the last tenth of the steps per run (None without training), times."""
        acc = None if self.accuracy is None else [float(a) for a in self.accuracy]
        tail = None
        if len(self.losses):
            tail = [float(x) for x in self.losses[-max(1, len(self.losses) // 10) :].mean(0)]
        return {
            "name": self.config.name,
            "trainable_params": self.trainable_params,
            "adapter_params": self.adapter_params,
            "acc": acc,
            "acc_mean": None if acc is None else float(np.mean(acc)),
            "acc_std": None if acc is None else float(np.std(acc)),
            "final_train_loss": tail,
            "seeds": list(self.seeds),
            "train_s": self.train_s,
            "total_s": self.total_s,
        }


# --- tasks --------------------------------------------------------------------------------------------


def classifier_task(
    apply: Callable,
    *,
    head_key: str | None = None,
    init_head: Callable | None = None,
    inputs: Sequence[str] = ("input_ids", "attention_mask"),
) -> Task:
    """Sequence classification: ``apply(variables, *batch[inputs]) -> logits (B, C)``.

    The loss is the softmax cross-entropy against ``batch["labels"] (B,)``, averaged over rows with
    ``valid == 1``; the scores are the logits.

    Args:
        apply: e.g. ``BertClassifier(...).apply``.
        head_key, init_head: a new head (e.g. ``"classifier"``) trained in every run; see :class:`Task`.
        inputs: batch keys passed to `apply`, in order.
    """
    inputs = tuple(inputs)

    def logits(model, batch):
        return model(*(batch[k] for k in inputs))

    def loss(model, batch):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits(model, batch), batch["labels"])
        valid = batch["valid"].astype(jnp.float32)
        return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)

    return Task(apply=apply, loss=loss, scores=logits, head_key=head_key, init_head=init_head)


def lm_task(apply: Callable, candidate_ids: Sequence[int], *, num_targets: int = 1) -> Task:
    """Prompt completion with a causal LM, as the training engine does it (``lora-jax finetune``).

    Batches are :func:`lora_jax.data.encode_lm` rows: ``input_ids, attention_mask, loss_mask (B, T)``,
    ``prompt_len, labels (B,)``. The loss is the cross-entropy of the completion tokens (``loss_mask``),
    summed and divided by their number; the scores are the log-probabilities of the candidates'
    single tokens at the last prompt position, ``(B, len(candidate_ids))``. The output projection runs
    only at those positions (:func:`lora_jax.train.step.at_positions`).

    Args:
        apply: a Llama-style ``apply(variables, input_ids, attention_mask=...) -> (B, T, V)``.
        candidate_ids: the token of each label word, indexed by label.
        num_targets: at least the most completion tokens of any row (1 for one label word, no EOS).
    """
    cand = jnp.asarray(candidate_ids, jnp.int32)

    def loss(model, batch):
        pos, tgt, w = step_lib.completion_targets(batch["input_ids"], batch["loss_mask"], num_targets)
        total, count = step_lib.token_loss(model(batch["input_ids"], batch["attention_mask"], pos), tgt, w)
        return total / jnp.maximum(count, 1.0)

    def scores(model, batch):
        pos = (batch["prompt_len"] - 1)[:, None].astype(jnp.int32)
        logits = model(batch["input_ids"], batch["attention_mask"], pos)[:, 0]
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, cand]

    return Task(apply=step_lib.at_positions(apply), loss=loss, scores=scores)


# --- one run ------------------------------------------------------------------------------------------


def _head_pattern(task: Task) -> str:
    """The ``train_full`` regex of the task's head: every leaf under ``params/<head_key>``."""
    return rf"params/{re.escape(task.head_key)}/.*"


def head_spec(task: Task, spec: lj.LoraSpec) -> lj.LoraSpec:
    """`spec` with the task's new head (if any) added to its ``train_full``: what a LoRA run trains.

    Example:
        >>> import lora_jax as lj
        >>> task = classifier_task(lambda v, x, m: x, head_key="classifier", init_head=lambda k: {})
        >>> head_spec(task, lj.LoraSpec(targets="params/w")).train_full
        ('params/classifier/.*',)
    """
    if task.head_key is None:
        return spec
    return dataclasses.replace(spec, train_full=(*spec.train_full, _head_pattern(task)))


def _with_head(task: Task, variables, head):
    """`variables` with `head` at ``params/<head_key>`` (added, or replacing a placeholder)."""
    if head is None:
        return variables
    return {**variables, "params": {**variables["params"], task.head_key: head}}


def _base(task: Task, variables):
    """The frozen base every LoRA run applies its deltas to: `variables`, with a zero placeholder at
    ``params/<head_key>`` when the task has a new head and `variables` lack it (each run's `FullLeaf`
    head replaces it in `wrap`)."""
    if task.head_key is None or task.head_key in variables["params"]:
        return variables
    shapes = jax.eval_shape(task.init_head, jax.random.key(0))
    return _with_head(task, variables, jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))


def _init_one(task: Task, config: Config, variables, seed) -> dict:
    """The trainable tree of one run: deltas from ``key(seed)`` (as the engine), the head from
    ``fold_in(key(seed), 1)``, trained in full as `FullLeaf` s of the deltas."""
    key = jax.random.key(seed)
    head = task.init_head(jax.random.fold_in(key, 1)) if task.head_key is not None else None
    v = _with_head(task, variables, head)
    if config.full:
        return {"params": v}
    if config.spec is not None:
        spec = head_spec(task, config.spec)
        if lj.spec.residual_init(spec.init):  # PiSSA / OLoRA: the residual base is made once, in train()
            return {"deltas": lj.init_with_residual(key, v, spec)[1]}
        return {"deltas": lj.init(key, v, spec)}
    if head is None:
        return {"deltas": None}
    pattern = _head_pattern(task)
    only_head = lambda path, x: (
        lj.FullLeaf(jnp.asarray(x, jnp.float32)) if re.fullmatch(pattern, path_str(path)) else None
    )
    return {"deltas": jax.tree_util.tree_map_with_path(only_head, v)}


def _model(task: Task, wrapped: Callable, trainable, base, dropout_key=None) -> Callable:
    """``model(*inputs)``: the task's network with one run's weights (`base` from :func:`_base`)."""
    if "params" in trainable:
        return lambda *inputs: task.apply(trainable["params"], *inputs)
    if trainable["deltas"] is None:
        return lambda *inputs: task.apply(base, *inputs)
    return lambda *inputs: wrapped(base, trainable["deltas"], *inputs, dropout_key=dropout_key)


def _optimizer(task: Task, config: Config, steps: int, warmup: int) -> optax.GradientTransformation:
    """The engine's optimizer; the new head gets its own (``lr_head``) through ``optax.multi_transform``
    with a label per leaf: ``"head"`` under ``params/<head_key>`` (a `FullLeaf` of the deltas, or the
    head inside fully trained params), ``"body"`` elsewhere."""
    body, _ = step_lib.make_optimizer(config.lr, steps, warmup, config.weight_decay)
    if config.loraplus_ratio is not None:
        body = lj.loraplus(body, config.loraplus_ratio)
    if task.head_key is None:
        return body
    lr_head = config.lr if config.lr_head is None else config.lr_head
    head, _ = step_lib.make_optimizer(lr_head, steps, warmup, config.weight_decay)

    heads = (f"deltas/params/{task.head_key}/", f"params/params/{task.head_key}/")

    def label(path, _):
        return "head" if path_str(path).startswith(heads) else "body"

    return optax.multi_transform(
        {"body": body, "head": head}, lambda tree: jax.tree_util.tree_map_with_path(label, tree)
    )


def _num_runs(trainable) -> int | None:
    leaves = jax.tree_util.tree_leaves(trainable)
    return leaves[0].shape[0] if leaves else None


def _check_seeds(seeds) -> tuple[int, ...]:
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed, e.g. seeds=(0, 1, 2).")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeat a seed: runs with the same seed are identical.")
    return seeds


def init(task: Task, config: Config, variables, seeds: Sequence[int]) -> dict:
    """The initial trainable trees of `config`'s runs, stacked: every leaf ``(S, ...)``.

    Run ``i`` initialises its deltas with ``jax.random.key(seeds[i])`` (as ``lora-jax finetune --seed``
    does) and the task's head with ``fold_in(key, 1)``. :func:`train` starts from exactly these.
    """
    seeds = _check_seeds(seeds)
    one = jax.vmap(lambda s, v: _init_one(task, config, v, s), in_axes=(0, None))
    return jax.jit(one)(jnp.asarray(seeds, jnp.int32), variables)


def seed_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seeds: Sequence[int]) -> Iterator[dict]:
    """Endless training batches, one independent shuffle per seed, stacked: every array ``(S, B, ...)``.

    Run ``i`` sees ``data.batches(arrays, batch_size, seed=seeds[i], shuffle=True, num_epochs=None,
    drop_remainder=True)``, the engine's training order for ``--seed seeds[i]``.
    """
    its = [
        data.batches(arrays, batch_size, seed=int(s), shuffle=True, num_epochs=None, drop_remainder=True)
        for s in seeds
    ]
    while True:
        parts = [next(it) for it in its]
        yield {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def evaluate(
    task: Task,
    trainable,
    variables,
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    num_runs: int | None = None,
) -> np.ndarray:
    """Accuracy of every run over all rows of `arrays` (padding rows excluded): ``(S,)``.

    Args:
        trainable: stacked trainable trees (leading run axis), e.g. ``Result.trainable``.
        arrays: the task's inputs plus ``labels (N,)``, one row per example.
        num_runs: ``S``; needed only when `trainable` has no leaves (nothing was trained).
    """
    return _evaluator(task, trainable, num_runs, with_loss=False)(trainable, variables, arrays, batch_size)[
        "accuracy"
    ]


def evaluate_loss(
    task: Task,
    trainable,
    variables,
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    num_runs: int | None = None,
) -> dict[str, np.ndarray]:
    """Accuracy and loss of every run over all rows of `arrays`: ``{"accuracy": (S,), "loss": (S,)}``.

    The loss is the task's loss of each batch weighted by its number of valid rows (for
    :func:`lm_task`, the mean completion-token cross-entropy). Arguments as for :func:`evaluate`; the
    arrays also need what the task's loss reads (``loss_mask`` for :func:`lm_task`).
    """
    return _evaluator(task, trainable, num_runs, with_loss=True)(trainable, variables, arrays, batch_size)


def _evaluator(task: Task, trainable, num_runs: int | None, with_loss: bool) -> Callable:
    """``f(trainable, variables, arrays, batch_size) -> {"accuracy": (S,)[, "loss": (S,)]}``, one jitted
    function per call of this (keep it to evaluate the same runs several times)."""
    wrapped = lj.wrap(task.apply)
    n = _num_runs(trainable) or num_runs
    if n is None:
        raise ValueError(
            "evaluate: trainable has no leaves, so the number of runs is unknown; pass num_runs=."
        )

    def one(t, v, b):
        model = _model(task, wrapped, t, v)
        return task.scores(model, b), (task.loss(model, b) if with_loss else jnp.zeros(()))

    fn = jax.jit(jax.vmap(one, in_axes=(0, None, None), axis_size=n))

    def evaluate_all(trainable, variables, arrays, batch_size):
        variables = _base(task, variables)
        correct, loss, total = np.zeros(n), np.zeros(n), 0.0
        for batch in data.batches(arrays, batch_size):
            scores, batch_loss = fn(trainable, variables, batch)
            pred = np.asarray(scores).argmax(-1)  # (S, B)
            valid = batch["valid"].astype(np.float64)
            correct += ((pred == batch["labels"][None]) * valid[None]).sum(-1)
            loss += np.asarray(batch_loss, np.float64) * valid.sum()
            total += valid.sum()
        out = {"accuracy": correct / max(total, 1.0)}
        if with_loss:
            out["loss"] = loss / max(total, 1.0)
        return out

    return evaluate_all


def _count(tree) -> int:
    """Scalars of one run of a stacked tree."""
    return int(sum(np.prod(x.shape[1:]) for x in jax.tree_util.tree_leaves(tree)))


def _adapter_count(task: Task, config: Config, trainable) -> int:
    """Scalars of one run's adapter: the deltas without the task's head (0 for full fine-tuning)."""
    if config.full or trainable["deltas"] is None:
        return 0
    pattern = _head_pattern(task) if task.head_key is not None else None
    return int(
        sum(
            np.prod(x.shape[1:])
            for path, x in jax.tree_util.tree_leaves_with_path(trainable["deltas"])
            if pattern is None or not re.match(pattern, path_str(path))
        )
    )


def train(
    task: Task,
    config: Config,
    variables,
    train_arrays: Mapping[str, np.ndarray],
    eval_arrays: Mapping[str, np.ndarray] | None = None,
    *,
    seeds: Sequence[int],
    steps: int,
    batch_size: int,
    warmup: int = 0,
    eval_batch_size: int = 128,
    eval_every: int = 0,
    log: Callable[[str], Any] | None = None,
) -> Result:
    """Trains `config` for every seed at once (one vmapped, jitted step) and evaluates each run.

    Args:
        task: the model's loss and scores (:func:`classifier_task`, :func:`lm_task`).
        config: what trains and its learning rates.
        variables: the base model's variables; broadcast to every run, never copied (except with
            ``config.full``, where each run trains its own copy). PiSSA / OLoRA runs share the residual
            of these (:attr:`Result.base`).
        train_arrays: one row per example (leading axis ``N``); run ``i`` draws batches of `batch_size`
            rows in its own order (:func:`seed_batches`).
        eval_arrays: scored after training (:func:`evaluate`); None skips evaluation.
        seeds: one run per seed ``S = len(seeds)``; distinct.
        steps: optimizer steps; 0 evaluates the initial state. Nothing trains (and `steps` is ignored)
            when the config has no spec, is not full and the task has no head.
        warmup: linear warm-up steps of the schedule (then cosine decay to 0 at `steps`).
        eval_every: with `eval_arrays`, also evaluate loss and accuracy (:func:`evaluate_loss`) every
            this many steps and after the last (:attr:`Result.curve`); 0: only the final accuracy.
        log: called with a line of progress (compilation time, accuracy), e.g. ``print``.

    Returns:
        A :class:`Result`: trained trees ``(S, ...)``, losses ``(steps, S)``, accuracy ``(S,)``.
    """
    seeds = _check_seeds(seeds)
    if steps < 0 or batch_size < 1:
        raise ValueError(
            f"steps must be >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}."
        )
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0 (0: no evaluation during training), got {eval_every}.")
    log = log or (lambda _: None)
    t0 = time.time()
    trainable = init(task, config, variables, seeds)
    base = _config_base(task, config, variables, seeds[0])
    trains = bool(jax.tree_util.tree_leaves(trainable))
    losses = np.zeros((0, len(seeds)), np.float32)
    curve = []
    if eval_every and eval_arrays is not None:
        metrics = _evaluator(task, trainable, len(seeds), with_loss=True)

        def on_eval(i, t):
            m = metrics(t, base, eval_arrays, eval_batch_size)
            curve.append({"step": i, "loss": m["loss"].tolist(), "accuracy": m["accuracy"].tolist()})
            log(
                f"  {config.name} step {i}: val loss {np.mean(m['loss']):.4f}  "
                f"acc {100 * np.mean(m['accuracy']):.2f}%"
            )
    else:
        eval_every, on_eval = 0, None
    step = None
    if trains and steps > 0:
        step = make_step(task, config, steps=steps, warmup=warmup)
        trainable, losses = _train_loop(
            step,
            base,
            trainable,
            train_arrays,
            seeds,
            steps,
            batch_size,
            lambda: log(f"  {config.name}: compiled + first step {time.time() - t0:.1f}s"),
            eval_every,
            on_eval,
        )
    train_s = time.time() - t0
    acc = None
    if curve and curve[-1]["step"] == steps:
        acc = np.asarray(curve[-1]["accuracy"])
    elif eval_arrays is not None:
        acc = evaluate(task, trainable, base, eval_arrays, eval_batch_size, num_runs=len(seeds))
    counts = (_count(trainable), _adapter_count(task, config, trainable))
    result = Result(
        config, seeds, trainable, losses, acc, *counts, train_s, time.time() - t0, base, curve, step
    )
    if acc is not None:
        loss_msg = (
            f"loss {np.mean(result.summary()['final_train_loss']):.3f}" if len(losses) else "no training"
        )
        log(
            f"  {config.name}: acc {100 * np.mean(acc):.2f} ± {100 * np.std(acc):.2f}  "
            f"({loss_msg}, {result.total_s:.0f}s)"
        )
    return result


def _config_base(task: Task, config: Config, variables, seed: int):
    """The frozen variables `config`'s runs apply their deltas to: `variables` with a placeholder head
    (:func:`_base`), replaced by its residual for PiSSA / OLoRA (the same for every seed: both inits are
    deterministic)."""
    base = _base(task, variables)
    if config.spec is None or not lj.spec.residual_init(config.spec.init):
        return base
    residual = jax.jit(lambda v: lj.init_with_residual(jax.random.key(seed), v, config.spec)[0])
    return residual(base)


def make_step(
    task: Task, config: Config, *, steps: int, warmup: int = 0
) -> tuple[Callable, optax.GradientTransformation]:
    """The train step :func:`train` runs for `config`'s runs, and its optimizer.

    ``step(trainable, opt_state, variables, batch, keys) -> (trainable, opt_state, loss)`` is one
    ``jax.jit(jax.vmap(...))`` optimizer step of every run: `trainable` ``(S, ...)`` (:func:`init`),
    ``opt_state = jax.vmap(tx.init)(trainable)``, `batch` ``(S, B, ...)`` (:func:`seed_batches`),
    ``keys (S,)`` the runs' dropout keys of this step (:func:`step_keys`), `variables` shared by every
    run (:attr:`Result.base`); ``loss (S,)``. `trainable` and `opt_state` are donated: continue from the
    returned ones. For timing a configuration's step, or for training loops of your own.

    Args:
        task, config: as for :func:`train`.
        steps, warmup: the learning-rate schedule (linear warm-up, cosine decay to 0 at `steps`).

    Returns:
        ``(step, tx)``.
    """
    tx = _optimizer(task, config, steps, warmup)
    wrapped = lj.wrap(task.apply)
    dropout = config.spec is not None and config.spec.dropout > 0

    def step(t, opt_state, v, batch, key):
        def loss(t):
            return task.loss(_model(task, wrapped, t, v, key if dropout else None), batch)

        value, grads = jax.value_and_grad(loss)(t)
        updates, opt_state = tx.update(grads, opt_state, t)
        return optax.apply_updates(t, updates), opt_state, value

    return jax.jit(jax.vmap(step, in_axes=(0, 0, None, 0, 0)), donate_argnums=(0, 1)), tx


def step_keys(seeds: Sequence[int], i: int) -> jax.Array:
    """The dropout keys of step `i` of every run, ``(S,)``: ``fold_in(fold_in(key(seed), 2), i)``."""
    run_keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 2))(jnp.asarray(seeds, jnp.int32))
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(run_keys, i)


def _train_loop(
    step_tx, variables, trainable, arrays, seeds, steps, batch_size, first_step, eval_every, on_eval
):
    step, tx = step_tx
    opt_state = jax.jit(jax.vmap(tx.init))(trainable)
    batches = seed_batches(arrays, batch_size, seeds)
    losses = []
    for i in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state, variables, next(batches), step_keys(seeds, i))
        losses.append(loss)
        if i == 0:
            jax.block_until_ready(loss)
            first_step()
        if eval_every and ((i + 1) % eval_every == 0 or i + 1 == steps):
            on_eval(i + 1, trainable)
    return trainable, np.asarray(jax.device_get(jnp.stack(losses)), np.float32)


def run(
    task: Task,
    configs: Sequence[Config],
    variables,
    train_arrays,
    eval_arrays=None,
    *,
    seeds: Sequence[int],
    steps: int,
    batch_size: int,
    **kwargs,
) -> list[Result]:
    """:func:`train` for each configuration (different ranks, targets, learning rates, full fine-tuning,
    head only), one after another; the seeds of each run at once. Keyword arguments go to `train`."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names repeat: {names}; give each configuration its own name.")
    return [
        train(
            task,
            c,
            variables,
            train_arrays,
            eval_arrays,
            seeds=seeds,
            steps=steps,
            batch_size=batch_size,
            **kwargs,
        )
        for c in configs
    ]


def table(results: Sequence[Result | dict]) -> str:
    """A Markdown table of results (or their :meth:`Result.summary` dicts): accuracy mean ± std over
    seeds, seeds, trainable and adapter parameters per run, the adapter's size in float32."""
    lines = [
        "| configuration | accuracy (%) | seeds | trainable params | adapter params | adapter size (fp32) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        r = r.summary() if isinstance(r, Result) else r
        size = f"{r['adapter_params'] * 4 / 1024:.1f} KiB" if r["adapter_params"] else "–"
        acc = "–" if r["acc"] is None else f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}"
        lines.append(
            f"| {r['name']} | {acc} | {len(r['seeds'])} | {r['trainable_params']:,} | "
            f"{r['adapter_params']:,} | {size} |"
        )
    return "\n".join(lines) + "\n"
