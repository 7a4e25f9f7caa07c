"""The model families the library knows, by Hugging Face ``model_type``, by model instance or by name.

Adding a family is one module that ends with ``FAMILY = ModelFamily(...)`` (see
:class:`~lora_jax.models.family.ModelFamily`) and one line in :data:`FAMILIES`.

Llama, Mistral, Qwen2 and Qwen3 are one decoder module (:mod:`lora_jax.models.llama`) with one family
per ``model_type``; :func:`family_of` tells them apart by the model's ``config.model_type``.

Example:
    >>> {"bert", "gpt2", "llama", "mistral", "qwen2", "qwen3"} <= set(FAMILIES)
    True
    >>> get("qwen2").hf_module("attn/query", 0)
    'model.layers.0.self_attn.q_proj'
    >>> get("bert").hf_module("attn/query", 0)
    'encoder.layer.0.attention.self.query'
    >>> from lora_jax.models import llama
    >>> family_of(llama.Llama(llama.LlamaConfig(num_layers=1))).model_type
    'llama'
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from lora_jax.models import bert, gemma, gpt2, llama
from lora_jax.models.family import ModelFamily

__all__ = ["ASSETS", "FAMILIES", "ModelFamily", "family_for", "family_of", "get", "resolve_targets"]

FAMILIES: dict[str, ModelFamily] = {
    "bert": bert.FAMILY,
    "gemma2": gemma.FAMILY,
    "gemma3": gemma.FAMILY_GEMMA3_MULTIMODAL,
    "gemma3_text": gemma.FAMILY_GEMMA3,
    "gpt2": gpt2.FAMILY,
    **llama.FAMILIES,  # llama, mistral, qwen2, qwen3
}

# The pretrained assets of `lora_jax.models.load` and their families.
ASSETS = {"smollm2-135m": "llama", "minilm": "bert"}


def get(model_type: str) -> ModelFamily:
    """The family of a Hugging Face ``model_type``.

    Raises:
        ValueError: an unknown ``model_type`` (the message lists the known ones).
    """
    if model_type not in FAMILIES:
        raise ValueError(f"Unknown model family {model_type!r}; known: {sorted(FAMILIES)}.")
    return FAMILIES[model_type]


def family_of(model: Any) -> ModelFamily | None:
    """The family whose Flax module ``model`` is an instance of; ``None`` for a model outside the registry.

    Families sharing a module (Llama, Mistral, Qwen) are told apart by ``model.config.model_type``.
    """
    matches = [f for f in FAMILIES.values() if isinstance(model, f.model_classes)]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in matches:
        if family.model_type == model_type:
            return family
    return matches[0] if matches else None


def family_for(name_or_path: str | os.PathLike) -> ModelFamily | None:
    """The family of an asset name (``"smollm2-135m"``) or a Hugging Face folder (its ``config.json``).

    ``None`` when neither applies (no such folder, no ``config.json``, or an unknown ``model_type``).
    """
    if isinstance(name_or_path, str) and name_or_path in ASSETS:
        return FAMILIES[ASSETS[name_or_path]]
    config = pathlib.Path(name_or_path) / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return FAMILIES.get(model_type)


def resolve_targets(model: str | os.PathLike, targets: str | None) -> str:
    """The LoRA targets regex for ``model`` (asset name or folder): ``None`` -> its family's default
    (attention query and value), ``"all-linear"`` -> every per-layer projection (PEFT's shorthand, the
    output head excluded), a regex -> itself. A model outside the registry is treated as Llama.

    Example:
        >>> resolve_targets("smollm2-135m", None)
        '.*/attn/(query|value)/kernel'
    """
    family = family_for(name_or_path=model) or FAMILIES["llama"]
    return family.targets(targets)
