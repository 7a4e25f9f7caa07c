"""Public model configurations for the memory planner: shapes only, no weights.

Each entry holds the fields of the model's Hugging Face ``config.json`` that fix parameter and
activation shapes (copied from the published file named in ``source``). The planner builds the
project's Llama-style decoder from them (:func:`llama_config`): Llama 3.x (with its ``llama3`` RoPE
scaling), Mistral (sliding window), Qwen2/2.5 (q/k/v biases) and Qwen3 (q/k norms) exactly, as
:func:`lora_jax.models.llama.config_from_hf` reads them.

Families without their own module in the planner are planned with the Llama module and a plain note
saying what differs (``ModelSpec.notes``, printed with every plan):

- Gemma 2: the same matmul shapes (d, heads of 256, GQA, a ``(V, d)`` tied embedding); left out are
  two extra RMSNorm vectors per layer (``2·d`` numbers), logit soft-capping and the sliding-window
  pattern (both element-wise, no parameters), and GELU is replaced by SiLU (same shapes).

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

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_QWEN2 = dict(
    model_type="qwen2",
    vocab_size=152064,
    rope_theta=1000000.0,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    hidden_act="silu",
    use_sliding_window=False,
    sliding_window=131072,
)
_QWEN3 = dict(
    model_type="qwen3",
    vocab_size=151936,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    use_sliding_window=False,
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
    "llama-3.1-8b": {
        "source": "meta-llama/Llama-3.1-8B config.json",
        "config": dict(
            _LLAMA3,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=131072,
            rope_scaling=_LLAMA31_ROPE,
        ),
    },
    "llama-3.1-70b": {
        "source": "meta-llama/Llama-3.1-70B config.json",
        "config": dict(
            _LLAMA3,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=131072,
            rope_scaling=_LLAMA31_ROPE,
        ),
    },
    "mistral-7b": {
        "source": "mistralai/Mistral-7B-v0.1 config.json",
        "config": dict(
            model_type="mistral",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=32768,
            sliding_window=4096,
            tie_word_embeddings=False,
            hidden_act="silu",
        ),
    },
    "qwen2.5-7b": {
        "source": "Qwen/Qwen2.5-7B config.json",
        "config": dict(
            _QWEN2,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            max_window_layers=28,
        ),
    },
    "qwen2.5-72b": {
        "source": "Qwen/Qwen2.5-72B config.json",
        "config": dict(
            _QWEN2,
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            max_window_layers=80,
        ),
    },
    "qwen3-8b": {
        "source": "Qwen/Qwen3-8B config.json",
        "config": dict(
            _QWEN3,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_window_layers=36,
        ),
    },
    "qwen3-32b": {
        "source": "Qwen/Qwen3-32B config.json",
        "config": dict(
            _QWEN3,
            hidden_size=5120,
            intermediate_size=25600,
            num_hidden_layers=64,
            num_attention_heads=64,
            num_key_value_heads=8,
            max_window_layers=64,
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
    "gemma-2-27b": {
        "source": "google/gemma-2-27b config.json",
        "config": dict(
            model_type="gemma2",
            vocab_size=256000,
            hidden_size=4608,
            intermediate_size=36864,
            num_hidden_layers=46,
            num_attention_heads=32,
            num_key_value_heads=16,
            head_dim=128,
            query_pre_attn_scalar=144,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
        ),
    },
    "gemma-3-12b": {
        "source": "google/gemma-3-12b-pt config.json (text_config)",
        "config": dict(
            model_type="gemma3_text",
            vocab_size=262208,
            hidden_size=3840,
            intermediate_size=15360,
            num_hidden_layers=48,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            sliding_window_pattern=6,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
        ),
    },
    "gemma-3-27b": {
        "source": "google/gemma-3-27b-pt config.json (text_config)",
        "config": dict(
            model_type="gemma3_text",
            vocab_size=262208,
            hidden_size=5376,
            intermediate_size=21504,
            num_hidden_layers=62,
            num_attention_heads=32,
            num_key_value_heads=16,
            head_dim=128,
            query_pre_attn_scalar=168,
            sliding_window=1024,
            sliding_window_pattern=6,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            max_position_embeddings=131072,
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
    "qwen2": "",
    "qwen3": "",
    "gemma2": (
        "Gemma 2 planned with the Llama module: same matmul shapes; left out are 2 extra norm "
        "vectors per layer, logit soft-capping and sliding-window attention; SiLU stands in for "
        "GELU (same shapes)."
    ),
    "gemma3_text": (
        "Gemma 3 planned with the Llama module: same matmul shapes; left out are 2 extra norm "
        "vectors per layer and the q/k norms (2·head_dim numbers), the 5:1 sliding-window "
        "pattern and the local RoPE base; SiLU stands in for GELU (same shapes)."
    ),
}


# The model types the Llama module builds exactly (lora_jax.models.llama.MODEL_TYPES).
_EXACT = ("llama", "mistral", "qwen2", "qwen3")


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
    if model_type not in _EXACT:
        scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
        if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            notes.append(
                f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} dropped (it changes no shape)."
            )
    return ModelSpec(name, "llama", config, tuple(notes))


def llama_config(spec: ModelSpec, **overrides):
    """The ``LlamaConfig`` that plans `spec` (``overrides``: e.g. ``scan_layers``, ``remat``, ``dtype``).

    The Llama-style families (:data:`_EXACT`) get their whole config (biases, q/k norms, sliding window,
    RoPE scaling); others only the shape fields, planned as a Llama.
    """
    from lora_jax.models import llama

    if spec.config.get("model_type", "llama") in _EXACT:
        return llama.config_from_hf(spec.config, **overrides)

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
