"""Reading checkpoint weights: safetensors files and folders, state-dict prefixes, parameter shapes.

The low-level layer below the model families: each family's ``from_hf`` reads tensors with these
helpers and names them with its own table; :func:`lora_jax.models.hf.load_hf` dispatches to the
families from above.

Hugging Face names a parameter ``<module>.weight`` / ``<module>.bias``; our Flax leaves are
``kernel`` (``(in, out)``, PyTorch's ``nn.Linear`` stores ``(out, in)``), ``bias``, ``scale`` (norms)
and ``embedding``. :func:`hf_leaf_names` applies that convention to one module.

:func:`read_weights` reads a whole folder into numpy arrays; :func:`open_weights` reads only the
headers and returns lazy tensors (:mod:`lora_jax.models.lazy`) for sharded loading, where each device
reads just its own block of each parameter (:mod:`lora_jax.models.sharded`).

Example:
    >>> hf_leaf_names(("layers_0", "attn", "query"), "model.layers.0.self_attn.q_proj", ("kernel",))
    {('layers_0', 'attn', 'query', 'kernel'): ('model.layers.0.self_attn.q_proj.weight', True)}
    >>> strip_prefix({"bert.embeddings.x": 1, "cls.y": 2}, "bert.")
    {'embeddings.x': 1}
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "HF_LEAVES",
    "checkpoint_files",
    "hf_leaf_names",
    "open_safetensors",
    "open_weights",
    "param_shapes",
    "read_safetensors",
    "read_weights",
    "strip_prefix",
]

# Our Flax leaf -> Hugging Face tensor suffix.
HF_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def hf_leaf_names(
    path: tuple[str, ...], hf_module: str, leaves: Iterable[str], *, transpose_kernel: bool = True
) -> dict[tuple[str, ...], tuple[str, bool]]:
    """``{Flax leaf path: (Hugging Face tensor name, stored transposed)}`` for the ``leaves`` of one module.

    Args:
        path: our module path under ``params``, e.g. ``("layers_0", "attn", "query")``.
        hf_module: the Hugging Face module name, e.g. ``"model.layers.0.self_attn.q_proj"``.
        leaves: which of ``kernel``/``bias``/``scale``/``embedding`` the module has.
        transpose_kernel: ``nn.Linear`` stores ``(out, in)`` (True); GPT-2's ``Conv1D`` ``(in, out)`` (False).
    """
    return {
        path + (leaf,): (f"{hf_module}.{HF_LEAVES[leaf]}", transpose_kernel and leaf == "kernel")
        for leaf in leaves
    }


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays (``safetensors.numpy.load_file``).

    bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays: numpy has no bfloat16, and
    safetensors (>= 0.4.3) resolves it through ``ml_dtypes`` once that is imported.

    Raises:
        ValueError: the file is not readable safetensors.
    """
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(os.fspath(path))
    except (SafetensorError, OSError, TypeError) as e:
        raise ValueError(f"{pathlib.Path(path).name}: cannot read the safetensors file ({e}).") from None


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """State-dict names without a task head's ``prefix`` (``"bert."``, ``"transformer."``) when present."""
    if any(k.startswith(prefix) for k in tensors):
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return dict(tensors)


def param_shapes(model: Any, *example_inputs) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path under "params": shape}`` of ``model``'s variables, from an abstract init (no FLOPs)."""
    import flax.linen as nn
    import jax

    tree = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *example_inputs))["params"]
    return {tuple(k.key for k in p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def checkpoint_files(folder: str | os.PathLike) -> list[pathlib.Path]:
    """The safetensors files of a Hugging Face folder: ``model.safetensors`` or the shards its index lists.

    Raises:
        ValueError: a shard named in ``model.safetensors.index.json`` is missing (the message names the
            file and a tensor it should hold), or the folder has no safetensors checkpoint.
    """
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            holds = {s: sorted(n for n, f in weight_map.items() if f == s) for s in missing}
            detail = "; ".join(f"{s} holds {len(h)} tensors, e.g. {h[0]!r}" for s, h in holds.items())
            raise ValueError(
                f"{folder}: missing safetensors shards {missing} listed in {index.name} ({detail}). "
                f"Download the complete checkpoint."
            )
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in folder.iterdir())
    raise ValueError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (found {found}). "
        f"Only safetensors checkpoints are supported; convert .bin files with transformers' "
        f"save_pretrained(..., safe_serialization=True)."
    )


def read_weights(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face folder: ``model.safetensors`` or the shards its index lists."""
    tensors: dict[str, np.ndarray] = {}
    for path in checkpoint_files(folder):
        tensors.update(read_safetensors(path))
    return tensors


# safetensors dtype names -> numpy (bfloat16 and float8 through ml_dtypes).
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def open_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Every tensor of one ``.safetensors`` file as a lazy :class:`~lora_jax.models.lazy.SafetensorsTensor`.

    Only the header is read (names, shapes, dtypes); the values are read block by block later.

    Raises:
        ValueError: the file is not readable safetensors, or holds a dtype numpy cannot represent.
    """
    import ml_dtypes
    from safetensors import SafetensorError, safe_open

    from lora_jax.models.lazy import SafetensorsTensor

    path = pathlib.Path(path)
    out = {}
    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                info = f.get_slice(name)
                kind = info.get_dtype()
                if kind not in _SAFETENSORS_DTYPES:
                    raise ValueError(
                        f"{path.name}: tensor {name!r} has dtype {kind}, which cannot be loaded."
                    )
                dtype = _SAFETENSORS_DTYPES[kind]
                dtype = getattr(ml_dtypes, dtype) if dtype in _ML_DTYPES else np.dtype(dtype)
                out[name] = SafetensorsTensor(path, name, info.get_shape(), dtype)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path.name}: cannot read the safetensors file ({e}).") from None
    return out


def open_weights(folder: str | os.PathLike) -> dict[str, Any]:
    """Like :func:`read_weights`, but lazy: ``{name: SafetensorsTensor}`` from the headers only.

    A family's ``from_hf`` turns these into views of our parameters (:mod:`lora_jax.models.lazy`);
    :mod:`lora_jax.models.sharded` then reads each device's block of each parameter.

    Raises:
        ValueError: as :func:`checkpoint_files`, or an unreadable file.
    """
    tensors: dict[str, Any] = {}
    for path in checkpoint_files(folder):
        tensors.update(open_safetensors(path))
    return tensors
