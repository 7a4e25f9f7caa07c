"""Sharded LoRA training: config + CLI (`lora-jax`), mesh/shardings, jitted steps, the resumable loop,
and sweeps (several seeds trained at once with ``jax.vmap``, `lora_jax.train.sweep`).

    lora-jax finetune    # the main job: SmolLM2-135M-Instruct + LoRA on movie-review sentiment
"""

from lora_jax.train import sweep
from lora_jax.train.config import TrainConfig, from_args
from lora_jax.train.loop import build, finetune, load_model, lora_spec, tiny_llama
from lora_jax.train.mesh import global_batch, init_distributed, make_mesh, param_shardings, parse_mesh
from lora_jax.train.sentiment import evaluate
from lora_jax.train.step import make_optimizer, make_score_step, make_train_step

__all__ = [
    "TrainConfig",
    "build",
    "evaluate",
    "finetune",
    "from_args",
    "global_batch",
    "init_distributed",
    "load_model",
    "lora_spec",
    "make_mesh",
    "make_optimizer",
    "make_score_step",
    "make_train_step",
    "param_shardings",
    "parse_mesh",
    "sweep",
    "tiny_llama",
]
