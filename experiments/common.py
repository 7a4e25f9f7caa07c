"""Shared pieces of the experiments: configs, a train loop over several seeds at once, tables and plots.

One run trains one configuration (LoRA on a target set at a rank, head only, or full fine-tuning) for
several seeds *at once*: the trainable tree gets a leading seed axis, and the jitted step is
``jax.jit(jax.vmap(step))`` with the frozen base weights broadcast (not copied) across seeds. Each
seed has its own adapter/head init and its own data order. LoRA runs go through ``lj.wrap``, so the
step computes ``x·W + s·((x·a)·b)`` and never a gradient of W.

A trainable tree is one of
  ``{"deltas": deltas, "head": head}``  LoRA (head trained too, as in the paper's GLUE runs) or head only
                                        (``deltas=None``); ``head=None`` when the model has no new head;
  ``{"params": variables}``            full fine-tuning.
Leaves whose path contains ``head_key`` get the head learning rate, all others the body one.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

MATRICES = {"q": "query", "k": "key", "v": "value", "o": "out"}
PRETTY = {"q": "Wq", "k": "Wk", "v": "Wv", "o": "Wo"}


def target_regex(targets: str) -> str:
  """``"qv"`` -> a regex for the q and v attention kernels of every layer (BERT and Llama paths)."""
  unknown = sorted(set(targets) - set(MATRICES))
  if unknown or not targets:
    raise ValueError(f"targets {targets!r}: use letters from {sorted(MATRICES)}, e.g. 'qv'.")
  names = "|".join(MATRICES[t] for t in targets)
  return rf"params/(.*/)?layers_\d+/attn/({names})/kernel"


@dataclasses.dataclass(frozen=True)
class Config:
  """One row of a sweep: ``kind`` is "lora", "head" (head only) or "full" (full fine-tuning)."""

  kind: str
  targets: str = ""
  rank: int = 0
  group: str = ""

  @property
  def name(self) -> str:
    if self.kind == "full":
      return "full fine-tuning"
    if self.kind == "head":
      return "head only"
    if self.kind == "zero-shot":
      return "no training"
    return f"LoRA {{{','.join(PRETTY[t] for t in self.targets)}}} r={self.rank}"

  def spec(self, alpha: float) -> lj.LoraSpec:
    return lj.LoraSpec(rank=self.rank, alpha=alpha, targets=target_regex(self.targets))


def linear_warmup_decay(lr: float, steps: int, warmup: int) -> optax.Schedule:
  warmup = max(1, min(warmup, steps - 1))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, max(1, steps - warmup))],
      [warmup])


def make_optimizer(lr_body: float, lr_head: float, steps: int, warmup: int, head_key: str):
  """Adam with a linear warm-up and linear decay; leaves under `head_key` get `lr_head`."""
  def labels(tree):
    def label(path, _):
      p = lj.spec.path_str(path)
      return "head" if p.startswith("head/") or (head_key and f"/{head_key}/" in p) else "body"
    return jax.tree_util.tree_map_with_path(label, tree)
  return optax.multi_transform(
      {"body": optax.adam(linear_warmup_decay(lr_body, steps, warmup)),
       "head": optax.adam(linear_warmup_decay(lr_head, steps, warmup))}, labels)


def make_forward(apply: Callable, head_key: str | None) -> Callable:
  """``forward(trainable, variables, *args)`` for any trainable tree (see the module doc)."""
  wrapped = lj.wrap(apply)

  def forward(trainable, variables, *args):
    if "params" in trainable:
      return apply(trainable["params"], *args)
    v = variables
    if trainable.get("head") is not None:
      v = {**v, "params": {**v["params"], head_key: trainable["head"]}}
    if trainable.get("deltas") is None:
      return apply(v, *args)
    return wrapped(v, trainable["deltas"], *args)
  return forward


def subset(examples: Sequence, n: int, seed: int = 0) -> list:
  """`n` examples drawn at random (fixed `seed`), in their original order.

  A fixed sample keeps every experiment's data independent of how a split happens to be ordered.
  """
  if n >= len(examples):
    return list(examples)
  idx = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
  return [examples[i] for i in idx]


def stacked_batches(arrays: dict[str, np.ndarray], batch_size: int, seeds: Sequence[int]) -> Iterator[dict]:
  """Endless training batches, one independent shuffle per seed, stacked: ``(num_seeds, batch, ...)``."""
  from lora_jax import data
  its = [data.batches(arrays, batch_size, seed=int(s), shuffle=True, num_epochs=None, drop_remainder=True)
         for s in seeds]
  while True:
    parts = [next(it) for it in its]
    yield {k: np.stack([p[k] for p in parts]) for k in parts[0]}


@dataclasses.dataclass
class Task:
  """What a model contributes to a run.

  Attributes:
    loss: ``loss(trainable, variables, batch) -> scalar`` for one seed.
    scores: ``scores(trainable, variables, batch) -> (B, num_classes)``; accuracy is argmax == labels.
    init_head: ``key -> head params`` or None (no new head).
    head_key: name of the head under ``variables["params"]`` (also selects the head learning rate).
  """

  loss: Callable
  scores: Callable
  init_head: Callable | None
  head_key: str | None


def init_trainable(cfg: Config, key, variables, task: Task, alpha: float):
  """The trainable tree of one seed for `cfg`."""
  k_delta, k_head = jax.random.split(key)
  head = task.init_head(k_head) if task.init_head is not None else None
  if cfg.kind == "full":
    params = dict(variables["params"])
    if head is not None:
      params[task.head_key] = head
    return {"params": {**variables, "params": params}}
  deltas = lj.init(k_delta, variables, cfg.spec(alpha)) if cfg.kind == "lora" else None
  return {"deltas": deltas, "head": head}


def count_trainable(cfg: Config, trainable) -> dict[str, int]:
  """Trainable scalars per seed (trainable carries a leading seed axis), and the adapter's share."""
  per_seed = lambda t: int(sum(np.prod(x.shape[1:]) for x in jax.tree_util.tree_leaves(t)))
  if cfg.kind == "full":
    return {"trainable_params": per_seed(trainable["params"]["params"]), "adapter_params": 0}
  adapter = per_seed(trainable["deltas"]) if trainable["deltas"] is not None else 0
  head = per_seed(trainable["head"]) if trainable["head"] is not None else 0
  return {"trainable_params": adapter + head, "adapter_params": adapter}


def run_config(cfg: Config, task: Task, variables, train_arrays: dict, eval_arrays: dict, *, seeds: Sequence[int],
               steps: int, batch_size: int, eval_batch_size: int, lr: float, lr_full: float, lr_head: float,
               alpha: float, warmup_frac: float = 0.1, log: Callable = print) -> tuple[dict, Any]:
  """Trains `cfg` for every seed at once and evaluates accuracy on `eval_arrays`.

  Returns:
    ``(row, trainable)``: a JSON-ready dict (accuracy per seed, mean, std, parameter counts, loss,
    time) and the trained trees with a leading seed axis.
  """
  t0 = time.time()
  keys = jax.vmap(lambda s: jax.random.key(s))(jnp.asarray(list(seeds)))
  trainable = jax.jit(jax.vmap(lambda k, v: init_trainable(cfg, k, v, task, alpha), in_axes=(0, None)))(
      keys, variables)
  counts = count_trainable(cfg, trainable)
  losses = []
  if cfg.kind != "zero-shot" and steps > 0:
    tx = make_optimizer(lr_full if cfg.kind == "full" else lr, lr_head, steps, int(warmup_frac * steps),
                        task.head_key or "")
    opt_state = jax.jit(jax.vmap(tx.init))(trainable)

    def step(t, o, v, batch):
      loss, grads = jax.value_and_grad(task.loss)(t, v, batch)
      updates, o = tx.update(grads, o, t)
      return optax.apply_updates(t, updates), o, loss

    step = jax.jit(jax.vmap(step, in_axes=(0, 0, None, 0)), donate_argnums=(0, 1))
    it = stacked_batches(train_arrays, batch_size, seeds)
    for i in range(steps):
      trainable, opt_state, loss = step(trainable, opt_state, variables, next(it))
      losses.append(loss)
      if i == 0:
        log(f"  {cfg.name}: compiled + first step {time.time() - t0:.1f}s")
    losses = np.asarray(jax.device_get(jnp.stack(losses)))  # (steps, seeds)
  train_s = time.time() - t0
  acc = evaluate(task, trainable, variables, eval_arrays, eval_batch_size, len(seeds))
  tail = losses[-max(1, len(losses) // 10):].mean(0) if len(losses) else None
  row = {
      "name": cfg.name, "kind": cfg.kind, "targets": cfg.targets, "rank": cfg.rank, "group": cfg.group,
      **counts, "adapter_mb_fp32": counts["adapter_params"] * 4 / 2**20,
      "acc": [float(a) for a in acc], "acc_mean": float(np.mean(acc)), "acc_std": float(np.std(acc)),
      "final_train_loss": None if tail is None else [float(x) for x in tail], "seeds": [int(s) for s in seeds],
      "train_s": train_s, "total_s": time.time() - t0,
  }
  loss_msg = "no training" if tail is None else f"loss {np.mean(tail):.3f}"
  log(f"  {cfg.name}: acc {100 * row['acc_mean']:.2f} ± {100 * row['acc_std']:.2f}  "
      f"({loss_msg}, {row['total_s']:.0f}s)")
  return row, trainable


def evaluate(task: Task, trainable, variables, arrays: dict, batch_size: int, num_seeds: int) -> np.ndarray:
  """Accuracy per seed over every example of `arrays` (padding rows excluded)."""
  from lora_jax import data
  scores = jax.jit(jax.vmap(task.scores, in_axes=(0, None, None), axis_size=num_seeds))
  correct, total = 0.0, 0.0
  for batch in data.batches(arrays, batch_size):
    s = np.asarray(scores(trainable, variables, batch))  # (seeds, B, C)
    valid = batch["valid"].astype(np.float64)
    correct = correct + ((s.argmax(-1) == batch["labels"][None]) * valid[None]).sum(-1)
    total += valid.sum()
  return correct / total


def seed_slice(tree, i: int):
  """Seed `i` of a tree with a leading seed axis."""
  return jax.tree_util.tree_map(lambda x: x[i], tree)


# --- outputs ------------------------------------------------------------------------------------------

def markdown_table(rows: Sequence[dict], reference: str | None = None) -> str:
  """Rows as a Markdown table: accuracy mean ± std over seeds, trainable params, adapter size."""
  lines = ["| configuration | accuracy (%) | seeds | trainable params | adapter params | adapter size (fp32) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    size = f"{r['adapter_mb_fp32'] * 1024:.1f} KiB" if r["adapter_params"] else "–"
    lines.append(f"| {r['name']} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {len(r['acc'])} | "
                 f"{r['trainable_params']:,} | {r['adapter_params']:,} | {size} |")
  if reference:
    lines += ["", reference]
  return "\n".join(lines) + "\n"


def save_json(obj, path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=1) + "\n")


def plot_sweep(rows: Sequence[dict], title: str, path: pathlib.Path) -> None:
  """Accuracy vs rank per target set (left) and every configuration as a bar (right), matplotlib Agg."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
  by_targets: dict[str, list] = {}
  for r in rows:
    if r["kind"] == "lora":
      by_targets.setdefault(r["targets"], []).append(r)
  for t, rs in by_targets.items():
    rs = sorted({r["rank"]: r for r in rs}.values(), key=lambda r: r["rank"])
    ax1.errorbar([r["rank"] for r in rs], [100 * r["acc_mean"] for r in rs], [100 * r["acc_std"] for r in rs],
                 marker="o", capsize=3, label="{" + ",".join(PRETTY[c] for c in t) + "}")
  baselines = [r for r in rows if r["kind"] != "lora"]
  for r, c in zip(baselines, ["k", "gray", "tab:red"]):
    ax1.axhline(100 * r["acc_mean"], ls="--", color=c, label=r["name"])
  ax1.set_xscale("log", base=2)
  ax1.set_xlabel("rank r")
  ax1.set_ylabel("accuracy (%)")
  ax1.set_title("accuracy vs rank, per target set")
  ax1.legend(fontsize=7)
  colors = {"baseline": "gray", "budget": "tab:blue", "rank": "tab:orange"}
  names = [r["name"].replace("LoRA ", "").replace(" r=", "\nr=") for r in rows]
  ax2.bar(range(len(rows)), [100 * r["acc_mean"] for r in rows], yerr=[100 * r["acc_std"] for r in rows],
          capsize=3, color=[colors.get(r["group"], "tab:green") for r in rows])
  ax2.set_xticks(range(len(rows)), names, fontsize=6, rotation=60)
  lo = min(100 * (r["acc_mean"] - r["acc_std"]) for r in rows)
  hi = max(100 * (r["acc_mean"] + r["acc_std"]) for r in rows)
  ax2.set_ylim(max(0, lo - 3), min(100, hi + 2))
  ax2.set_title("all configurations (blue: same budget, r × #matrices = 8)", fontsize=9)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
