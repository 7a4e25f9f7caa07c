"""QLoRA's frozen base: block-quantized weights as a pytree transform (Dettmers et al. 2023, arXiv:2305.14314).

QLoRA fine-tunes a model whose frozen base weights are stored in 4 bits (NormalFloat4, block-wise
absmax scales, the scales themselves quantized: "double quantization") with LoRA deltas in full
precision. Here that is a transform of the params pytree:

    qparams = lj.quantize(params, lj.QuantSpec(format="nf4"))  # QuantizedArray at the targets
    logits = lj.wrap(apply)(qparams, deltas, x)                # == apply(merge(dequantize(qparams), deltas), x)

`QuantSpec(outlier_rows=k)` (off by default) also keeps the k rows with each kernel's largest weights
exactly, the "super weight" rows whose errors massive activations multiply (see `codes`).

`lj.wrap` dequantizes each quantized weight right at its use (inside the jitted step, so XLA fuses the
decode into the op), and its backward pass decodes again rather than keeping a dense copy alive.
`save` / `load` keep a quantized base on disk so that quantizing is done once.

Modules: `codes` (the arithmetic on one array), `array` (`QuantizedArray`), `tree` (`QuantSpec`,
`quantize`, `dequantize`; `quantize_leaf` for loaders that quantize as they place each weight,
`abstract_quantize` for the memory planner, `shardings` to place a quantized tree on a mesh), `io`
(safetensors files, checksummed).
"""

from lora_jax.quant.array import QuantizedArray, QuantMeta, is_quantized
from lora_jax.quant.codes import NF4_LEVELS
from lora_jax.quant.io import info, load, save
from lora_jax.quant.tree import QuantSpec, abstract_quantize, dequantize, quantize, quantize_leaf, shardings

__all__ = [
    "QuantSpec",
    "QuantizedArray",
    "QuantMeta",
    "quantize",
    "dequantize",
    "quantize_leaf",
    "abstract_quantize",
    "is_quantized",
    "NF4_LEVELS",
    "save",
    "load",
    "info",
    "shardings",
    "base_bytes",
]


def base_bytes(params, *, dense: bool = False) -> int:
    """Bytes of every array in `params`: a `QuantizedArray` counts its codes and scales, or with `dense`
    the dense weight it stands for (the bytes before quantizing)."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_quantized if dense else None)
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in leaves))
