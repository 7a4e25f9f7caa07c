"""Public model configurations for the memory planner: shapes only, no weights.

Each entry holds the fields of the model's Hugging Face ``config.json`` that fix parameter and
activation shapes (copied from the published file named in ``source``). The planner builds the
project's Llama module from them (:func:`llama_config`), so only the architecture facts that change
memory are needed.

Families without their own module yet are planned with the Llama module and a plain note saying what
differs (``ModelSpec.notes``, printed with every plan):

- Qwen2.5: the same decoder, plus biases on the q/k/v projections (``(H·D + 2·K·D)`` numbers per layer,
  under 0.01% of the parameters); these biases are left out.
- Gemma 2: the same matmul shapes (d, heads of 256, GQA, a ``(V, d)`` tied embedding); left out are
  two extra RMSNorm vectors per layer (``2·d`` numbers), logit soft-capping and the sliding-window
  pattern (both element-wise, no parameters), and GELU is replaced by SiLU (same shapes).
- Llama-3.1's ``llama3`` RoPE scaling rescales rotary frequencies only; it does not change any shape,
  so it is dropped for planning.

Example:
    >>> spec = resolve("llama-3-8b")
    >>> spec.config["hidden_size"], spec.family
    (4096, 'llama')
    >>> llama_config(spec).num_kv_heads
    8
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

__all__ = ["PUBLIC_CONFIGS", "ModelSpec", "known_models", "llama_config", "resolve"]

_LLAMA3 = dict(
    model_type="llama",
    vocab_size=128256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
)

PUBLIC_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "source": "meta-llama/Meta-Llama-3-8B config.json",
        "config": dict(
            _LLAMA3,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=8192,
        ),
    },
    "llama-3-70b": {
        "source": "meta-llama/Meta-Llama-3-70B config.json",
        "config": dict(
            _LLAMA3,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=8192,
        ),
    },
    "llama-3.1-405b": {
        "source": "meta-llama/Llama-3.1-405B config.json",
        "config": dict(
            _LLAMA3,
            hidden_size=16384,
            intermediate_size=53248,
            num_hidden_layers=126,
            num_attention_heads=128,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=131072,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    },
    "qwen2.5-7b": {
        "source": "Qwen/Qwen2.5-7B config.json",
        "config": dict(
            model_type="qwen2",
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            hidden_act="silu",
        ),
    },
    "gemma-2-9b": {
        "source": "google/gemma-2-9b config.json",
        "config": dict(
            model_type="gemma2",
            vocab_size=256000,
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
        ),
    },
    "smollm2-135m": {
        "source": "HuggingFaceTB/SmolLM2-135M-Instruct config.json",
        "config": dict(
            model_type="llama",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            hidden_act="silu",
        ),
    },
}

# model_type -> what the Llama module leaves out for planning ("" = nothing: the same architecture).
_APPROXIMATED = {
    "llama": "",
    "mistral": "",
    "qwen2": (
        "Qwen2 planned with the Llama module: same shapes except the q/k/v biases, which are "
        "left out (<0.01% of the parameters)."
    ),
    "gemma2": (
        "Gemma 2 planned with the Llama module: same matmul shapes; left out are 2 extra norm "
        "vectors per layer, logit soft-capping and sliding-window attention; SiLU stands in for "
        "GELU (same shapes)."
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to plan: its name, the module family that builds it, its config and caveats.

    Attributes:
      name: table name or folder path.
      family: the module that builds it (``"llama"``).
      config: the Hugging Face ``config.json`` dict.
      notes: what differs from the real architecture (empty if nothing), printed with every plan.
    """

    name: str
    family: str
    config: dict
    notes: tuple[str, ...] = ()


def known_models() -> list[str]:
    """The names of the public configurations."""
    return sorted(PUBLIC_CONFIGS)


def resolve(name_or_folder: str | pathlib.Path) -> ModelSpec:
    """A :class:`ModelSpec` from a table name or a folder holding ``config.json``.

    Raises:
      ValueError: an unknown name (the known ones are listed), or an architecture the planner cannot
        build.
    """
    key = str(name_or_folder)
    if key.lower() in PUBLIC_CONFIGS:
        config = dict(PUBLIC_CONFIGS[key.lower()]["config"])
        name = key.lower()
    else:
        path = pathlib.Path(name_or_folder)
        file = path / "config.json" if path.is_dir() else path
        if not (file.name == "config.json" and file.is_file()):
            raise ValueError(
                f"unknown model {key!r}: give one of {known_models()} or a folder with a config.json."
            )
        config = json.loads(file.read_text())
        name = str(path)
    model_type = config.get("model_type", "llama")
    if model_type not in _APPROXIMATED:
        raise ValueError(
            f"model {name!r} has model_type {model_type!r}; the planner builds "
            f"{sorted(_APPROXIMATED)} (all with the Llama module)."
        )
    notes = [_APPROXIMATED[model_type]] if _APPROXIMATED[model_type] else []
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        notes.append(
            f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} dropped (it changes no shape)."
        )
    return ModelSpec(name, "llama", config, tuple(notes))


def llama_config(spec: ModelSpec, **overrides):
    """The ``LlamaConfig`` that plans `spec` (``overrides``: e.g. ``scan_layers``, ``remat``, ``dtype``)."""
    from lora_jax.models import llama

    keep = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
    )
    shape_only = {k: spec.config[k] for k in keep if spec.config.get(k) is not None}
    return llama.config_from_hf(shape_only, **overrides)
