"""Serving many adapters: load a bank from adapter files, and decode a batch with one adapter per row.

`load_bank` reads adapter files into an `AdapterBank` (comparing their stored base-model identities);
`generate` decodes a batch in which row e uses the adapter in slot ``ids[e]`` (−1: the base model), with
`lora_jax.models.llama.generate`'s KV cache; `mixed_apply` is the apply function it decodes with. Kept
apart from `lora_jax.bank` (the pytree, below `wrap`) because these sit above `wrap`, the adapter files
and the models.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.adapter import adapter_info, load_adapter
from lora_jax.bank import AdapterBank, stack_adapters
from lora_jax.transform.wrapping import wrap

__all__ = ["load_bank", "mixed_apply", "generate"]


def load_bank(
    paths: Mapping[str, Any], params: Any, *, max_rank: int | None = None, allow_partial: bool = False
) -> AdapterBank:
    """Loads adapter files (name -> file or folder) with `load_adapter` and stacks them.

    Each file's stored base-model identity is compared (`stack_adapters`' ``base_models``), as well as
    each delta against `params`.

    Example:
        >>> import jax, jax.numpy as jnp, tempfile, os
        >>> import lora_jax as lj
        >>> from lora_jax.adapter import save_adapter
        >>> params = {"w": jnp.ones((4, 3))}
        >>> spec = lj.LoraSpec(rank=2, targets="w")
        >>> files = {}
        >>> for n in ("x", "y"):
        ...     files[n] = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
        ...     _ = save_adapter(files[n], lj.init(jax.random.key(0), params, spec), spec,
        ...                      base_model={"name": "toy"}, verbose=False)
        >>> load_bank(files, params).names
        ('x', 'y')
    """
    trees = {n: load_adapter(p, params, allow_partial=allow_partial) for n, p in paths.items()}
    bases = {n: adapter_info(p).get("base_model") or None for n, p in paths.items()}
    if any(v is None for v in bases.values()) and not all(v is None for v in bases.values()):
        missing = [n for n, v in bases.items() if v is None]
        raise ValueError(
            f"load_bank: adapters {missing} store no base model identity while the others do "
            f"({ {n: v for n, v in bases.items() if v is not None} }); save them with "
            f"save_adapter(..., base_model=...) to compare them."
        )
    base_models = None if all(v is None for v in bases.values()) else bases
    return stack_adapters(trees, max_rank, base_models=base_models)


def _decode_axes(path: str, shape: tuple) -> int | None:
    """Example axes for a decoder with a `KVCache` (keys and values ``(L, B, S, K, D)``: axis 1)."""
    if path.endswith(("/k", "/v")) and len(shape) == 5:
        return 1
    return 0 if len(shape) else None


@functools.lru_cache(maxsize=64)
def mixed_apply(apply_fn):
    """``f((params, bank, ids), *args, **kw) == wrap(apply_fn)(params, bank, *args, adapter_ids=ids, **kw)``
    with the example axes of a KV-cache decoder (cache keys/values ``(L, B, ...)``), for ``generate``.

    The same `apply_fn` gives the same `f` (cached), so a jitted ``generate`` compiles once per shape.
    """
    wrapped = wrap(apply_fn, in_axes=_decode_axes, out_axes=_decode_axes)

    def f(variables, *args, **kwargs):
        params, bank, ids = variables
        return wrapped(params, bank, *args, adapter_ids=ids, **kwargs)

    return f


def generate(apply_fn, params, bank: AdapterBank, adapter_ids, prompt_ids, max_new_tokens: int, **kw):
    """Mixed-adapter decoding: row e of `prompt_ids` decodes with the adapter in slot ``adapter_ids[e]``.

    One batch, one compiled program (`lora_jax.models.llama.generate` with `mixed_apply`); each row gets
    the tokens it gets when decoded alone with its adapter (−1: the base model).

    Args:
        apply_fn: the model's apply, ``apply_fn(params, ids, attention_mask=..., cache=...)``.
        params: the base params.
        bank: the adapters (`stack_adapters`).
        adapter_ids: int ``(B,)``, a slot per row, −1 for the base model.
        prompt_ids: ``(B, T)`` int, left-padded; max_new_tokens and `kw` as in ``llama.generate``.

    Returns:
        ``(B, max_new_tokens)`` int32.
    """
    from lora_jax.models import llama  # the models sit above this module's other imports

    ids = jnp.asarray(adapter_ids, jnp.int32)
    if ids.shape != (np.shape(prompt_ids)[0],):
        raise ValueError(
            f"generate: adapter_ids has shape {ids.shape}, expected one id per prompt row "
            f"({np.shape(prompt_ids)[0]},)"
        )
    return llama.generate(mixed_apply(apply_fn), (params, bank, ids), prompt_ids, max_new_tokens, **kw)
