"""`Setup`: what `lora_jax.train.loop.build` places on the mesh and the steps of a run use.

A plain record, in its own module so the task and resume modules (`sentiment`, `filetask`, `resume`)
can name it without importing the loop that composes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lora_jax as lj

__all__ = ["Setup"]


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
    initial: Any = None  # PiSSA / OLoRA (`--init`): the deltas at init, to export against the original base
