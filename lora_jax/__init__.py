"""lora_jax: LoRA (Hu et al. 2021, arXiv:2106.09685) as a pure-functional transform for JAX and Flax.

spec = lj.LoraSpec(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")
deltas = lj.init(key, params, spec)             # LoraDelta at targets, None elsewhere
logits = lj.wrap(model.apply)(params, deltas, x)  # == model.apply(lj.merge(params, deltas), x)
"""

from lora_jax.arithmetic import combine, dare_merge, magnitude_prune_merge, rerank, ties_merge
from lora_jax.bank import AdapterBank, stack_adapters, unstack_adapters
from lora_jax.core import count_params, delta_weights, init, merge, unmerge
from lora_jax.delta import LoraDelta, delta_weight, is_delta
from lora_jax.dora import DoraDelta
from lora_jax.full import FullLeaf, is_full
from lora_jax.optim import loraplus, optimizer, trainable_mask
from lora_jax.quant import QuantizedArray, QuantSpec, dequantize, quantize
from lora_jax.residual import init_with_residual
from lora_jax.sharding import delta_partition_specs, delta_shardings
from lora_jax.spec import LoraAxes, LoraSpec
from lora_jax.transform import FallbackWarning, infer_axes, wrap

__version__ = "0.1.0"

__all__ = [
    "LoraSpec",
    "LoraAxes",
    "LoraDelta",
    "init",
    "merge",
    "unmerge",
    "wrap",
    "infer_axes",
    "optimizer",
    "trainable_mask",
    "delta_shardings",
    "delta_partition_specs",
    "count_params",
    "delta_weights",
    "delta_weight",
    "is_delta",
    "FallbackWarning",
    "AdapterBank",
    "stack_adapters",
    "unstack_adapters",
    "DoraDelta",
    "FullLeaf",
    "is_full",
    "loraplus",
    "init_with_residual",
    "combine",
    "rerank",
    "ties_merge",
    "dare_merge",
    "magnitude_prune_merge",
    "QuantSpec",
    "QuantizedArray",
    "quantize",
    "dequantize",
]

_SUBMODULES = ("adapter", "analysis", "assets", "checkpoint", "data", "models", "peft", "train")


def __getattr__(name):
    # Heavier submodules (orbax, tokenizers, ...) load on first use: `lj.checkpoint.save_adapter(...)`.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"lora_jax.{name}")
    raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")
