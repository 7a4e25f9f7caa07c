"""The model families the library knows, by Hugging Face ``model_type``, by model instance or by name.

Adding a family is one module that ends with ``FAMILY = ModelFamily(...)`` (see
:class:`~lora_jax.models.family.ModelFamily`) and one line in :data:`FAMILIES`.

Example:
    >>> sorted(FAMILIES)
    ['bert', 'gpt2', 'llama']
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

from lora_jax.models import bert, gpt2, llama
from lora_jax.models.family import ModelFamily

__all__ = ["ASSETS", "FAMILIES", "ModelFamily", "family_for", "family_of", "get"]

FAMILIES: dict[str, ModelFamily] = {
    "bert": bert.FAMILY,
    "gpt2": gpt2.FAMILY,
    "llama": llama.FAMILY,
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
    """The family whose Flax module ``model`` is an instance of; ``None`` for a model outside the registry."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_classes):
            return family
    return None


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
