"""Llama weights from a GGUF file (llama.cpp's format), dequantized to float32.

The ``gguf`` package (pure numpy) reads the file and dequantizes every tensor type it knows (F32, F16,
BF16, Q4_0/Q4_1/Q5_x/Q8_0, the K-quants, ...). GGUF names tensors its own way and stores weights in
PyTorch's ``(out, in)`` row order, but llama.cpp's converter permutes the rows of the query and key
projections so that rotary embeddings rotate *adjacent* pairs (GPT-J style). We undo that permutation,
so the result is a Hugging Face ``LlamaForCausalLM`` state dict (``rotate_half`` layout) and goes
through :func:`lora_jax.models.llama.from_hf`. The GGUF name of each Hugging Face tensor comes from the
``gguf`` package's own name map (``gguf.get_tensor_name_map``, what llama.cpp's converter uses), applied
to the Llama family's Hugging Face names.

Example (needs the asset)::

    path = lora_jax.assets.fetch("smollm2-135m")
    config, variables = load_gguf(path)
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from lora_jax.models import llama

__all__ = ["gguf_names", "gguf_to_hf", "load_gguf", "read_gguf", "unpermute_rotary"]

SUPPORTED_ARCHITECTURES = ("llama",)

_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def read_gguf(path_or_reader: Any):
    """A ``gguf.GGUFReader`` for a path (or the reader itself); clear error for a missing file."""
    import gguf

    if isinstance(path_or_reader, gguf.GGUFReader):
        return path_or_reader
    path = pathlib.Path(os.fspath(path_or_reader))
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {str(path)!r}.")
    return gguf.GGUFReader(path)


def _field(reader, key: str, default: Any = ...) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise ValueError(f"GGUF metadata lacks {key!r}.")
        return default
    return f.contents()


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: ``w: (n_heads·D, in)`` -> Hugging Face row order.

    llama.cpp (``convert_hf_to_gguf.py``) applies
    ``w.reshape(n_heads, 2, D // 2, in).swapaxes(1, 2).reshape(w.shape)``; this is its inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(arch: str, hf_names: Iterable[str], num_layers: int) -> dict[str, str]:
    """``{GGUF tensor name: Hugging Face name}`` for ``hf_names``, from the ``gguf`` package's name map.

    Example:
        >>> gguf_names("llama", ["model.layers.1.self_attn.q_proj.weight"], 2)
        {'blk.1.attn_q.weight': 'model.layers.1.self_attn.q_proj.weight'}
    """
    import gguf

    arch_id = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(arch_id, num_layers)
    names = {hf: name_map.get_name(hf, try_suffixes=(".weight", ".bias")) for hf in hf_names}
    return {name: hf for hf, name in names.items() if name is not None}


def gguf_to_hf(path_or_reader: Any) -> tuple[dict, dict[str, np.ndarray]]:
    """A GGUF Llama file -> ``(Hugging Face config.json dict, state dict of float32 arrays)``.

    Raises:
      ValueError: missing file, an architecture other than ``llama``, missing metadata, or a tensor
        whose name or shape does not fit the config (naming the tensor, expected and found shape).
    """
    import gguf

    reader = read_gguf(path_or_reader)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"Unknown GGUF architecture {arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}.")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(
            f"Partial rotary embeddings (rope.dimension_count={rope_dim} < head_dim="
            f"{head_dim}) are not supported."
        )
    if reader.fields.get(f"{arch}.rope.scaling.type") is not None and _field(
        reader, f"{arch}.rope.scaling.type"
    ) not in ("none", ""):
        raise ValueError(f"rope scaling {_field(reader, f'{arch}.rope.scaling.type')!r} is not supported.")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    config = {
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    cfg = llama.config_from_hf(config)
    expected_hf = llama._expected_hf_shapes(cfg)  # noqa: SLF001 (same package)
    to_hf = gguf_names(arch, expected_hf, cfg.num_layers)
    rotary = {
        f".{llama.HF_PROJECTIONS['attn/query']}.weight": heads,
        f".{llama.HF_PROJECTIONS['attn/key']}.weight": kv_heads,
    }

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        hf = to_hf.get(t.name)
        if hf is None:
            m = _BLK.fullmatch(t.name)
            if m and int(m.group(1)) >= cfg.num_layers:
                raise ValueError(
                    f"GGUF tensor {t.name!r} does not fit the config (block_count={cfg.num_layers})."
                )
            raise ValueError(f"Unexpected GGUF tensor {t.name!r} for architecture {arch!r}.")
        # ggml lists dims fastest-first; PyTorch order is the reverse.
        found = tuple(int(n) for n in reversed(t.shape))
        if found != expected_hf[hf]:
            raise ValueError(
                f"GGUF tensor {t.name!r} has shape {found}, expected {expected_hf[hf]} from the metadata."
            )
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(found)
        for suffix, n_heads in rotary.items():
            if hf.endswith(suffix):
                w = unpermute_rotary(w, n_heads)
        tensors[hf] = w
    missing = [n for n in expected_hf if n not in tensors]
    if missing:
        raise ValueError(
            f"GGUF file lacks tensors (Hugging Face names): {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}."
        )
    return config, tensors


def load_gguf(
    path_or_reader: Any,
    *,
    scan_layers: bool = False,
    remat: bool = False,
    dtype: Any = None,
    param_dtype: Any = None,
) -> tuple[llama.LlamaConfig, dict]:
    """A GGUF Llama file -> ``(LlamaConfig, {"params": ...})`` for :class:`lora_jax.models.llama.Llama`.

    Args:
      path_or_reader: path of the ``.gguf`` file, or an open ``gguf.GGUFReader``.
      scan_layers, remat, dtype, param_dtype: see :class:`~lora_jax.models.llama.LlamaConfig`.
    """
    config, tensors = gguf_to_hf(path_or_reader)
    model, variables = llama.from_hf(
        config, tensors, scan_layers=scan_layers, remat=remat, dtype=dtype, param_dtype=param_dtype
    )
    return model.config, variables
