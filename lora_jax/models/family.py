"""`ModelFamily`: what the library knows about one architecture, declared once in the family's module.

Each model module (``llama``, ``bert``, ``gpt2``) ends with ``FAMILY = ModelFamily(...)``;
:mod:`lora_jax.models.registry` lists them. Everything outside the model modules that needs model
knowledge reads it from there: Hugging Face names (:mod:`lora_jax.peft`, the GGUF reader), mesh rules
(:func:`lora_jax.train.mesh.param_shardings`), default LoRA targets (the training config), the
loader (:func:`lora_jax.models.hf.load_hf`).

Example:
    >>> from lora_jax.models import llama
    >>> llama.FAMILY.hf_module("attn/query", 3)
    'model.layers.3.self_attn.q_proj'
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ModelFamily"]

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family.

    Attributes:
        model_type: the Hugging Face ``config.json`` ``model_type`` (``"llama"``).
        model_classes: the Flax modules of the family (lookup by instance).
        layers: our path of the layer stack under ``params``: layer ``i`` is ``f"{layers}_{i}"``, an
            ``nn.scan`` stack is ``layers`` itself (``"layers"``, ``"encoder/layers"``).
        hf_layer: Hugging Face prefix of layer ``i`` (``"model.layers.{i}."``).
        hf_projections: our per-layer projection -> its Hugging Face ``Linear`` module, relative to
            ``hf_layer`` (``{"attn/query": "self_attn.q_proj", ...}``). The family's name table; its
            ``from_hf``/``to_hf`` and the PEFT files use it.
        logical_axis_rules: logical axis name -> mesh axis (``None``: replicated), for
            ``nn.logical_to_mesh_sharding``.
        default_targets: the LoRA targets regex used when none is given.
        logical_partition_specs: ``model -> tree of logical PartitionSpec`` of its variables.
        from_hf: ``(config.json dict, state dict, **kw) -> (model, {"params": ...})``.
        peft_task_type: PEFT ``task_type`` of adapter files; ``None``: no PEFT files for this family.
        scan_layers: ``from_hf`` takes ``scan_layers``/``remat``.
        folder_tokenizer: ``folder -> tokenizer | None`` for a Hugging Face folder without
            ``tokenizer.json`` (e.g. BERT's ``vocab.txt``).
    """

    model_type: str
    model_classes: tuple[type, ...]
    layers: str
    hf_layer: str
    hf_projections: Mapping[str, str]
    logical_axis_rules: Rules
    default_targets: str
    logical_partition_specs: Callable[[Any], Any]
    from_hf: Callable[..., tuple[Any, dict]]
    peft_task_type: str | None = None
    scan_layers: bool = False
    folder_tokenizer: Callable[[pathlib.Path], Any] | None = None

    def targets(self, targets: str | None = None) -> str:
        """The LoRA targets regex for ``targets``: ``None`` -> :attr:`default_targets`; ``"all-linear"``
        (PEFT's shorthand) -> every per-layer projection of :attr:`hf_projections`, not the output head;
        anything else is returned as it is.

        Example:
            >>> from lora_jax.models import llama
            >>> import re
            >>> regex = llama.FAMILY.targets("all-linear")
            >>> [bool(re.fullmatch(regex, p)) for p in ("params/layers_0/mlp/down/kernel",
            ...                                         "params/layers/attn/key/kernel", "params/lm_head/kernel")]
            [True, True, False]
        """
        if targets is None:
            return self.default_targets
        if targets == "all-linear":
            projections = "|".join(re.escape(p) for p in self.hf_projections)
            return rf"(?:.*/)?{re.escape(self.layers)}(?:_\d+)?/(?:{projections})/kernel"
        return targets

    def hf_module(self, projection: str, layer: int | str) -> str:
        """Hugging Face module name of our ``projection`` (``"attn/query"``) in ``layer``.

        Raises:
            KeyError: ``projection`` is not in :attr:`hf_projections`.
        """
        return self.hf_layer.format(i=layer) + self.hf_projections[projection]
