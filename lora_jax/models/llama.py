"""Llama-style decoders in Flax Linen: Llama 2/3, Mistral, Qwen2/2.5, Qwen3 from one configurable module.

The architecture of Touvron et al. 2023 (arXiv 2302.13971) as implemented by Hugging Face
``LlamaForCausalLM`` (rotary embeddings in the ``rotate_half`` layout), so Hugging Face checkpoints load
with transposes only (:func:`from_hf`). SmolLM2-135M is one (``lora_jax.models.load("smollm2-135m")``).
The other families differ from it by a few :class:`LlamaConfig` switches, read from ``config.json``
(:func:`config_from_hf`, chosen by its ``model_type``):

==========  ==================================================================================
model_type  differences from Llama 2
==========  ==================================================================================
llama       Llama 3.x: ``rope_scaling`` of type ``"llama3"`` (:class:`RopeScaling`)
mistral     ``sliding_window``: a token attends to itself and the ``W - 1`` tokens before it
qwen2       biases on the query/key/value projections (``qkv_bias``); Qwen2.5 is the same type
qwen3       RMSNorm over each query and key head before the rotary embedding (``qk_norm``)
==========  ==================================================================================

Each type is a :class:`~lora_jax.models.family.ModelFamily` (:data:`FAMILIES`) with the same
Hugging Face module names, so PEFT adapter files name the same modules.

Parameter paths (``L`` layers, ``d`` hidden, ``H``/``K`` query/key-value heads of size ``D``, ``F`` MLP):

=====================================  ===========  =======================
path                                   shape        logical axes
=====================================  ===========  =======================
``embed/embedding``                    (V, d)       (vocab, embed)
``layers_{i}/attn_norm/scale``         (d,)         (norm,)
``layers_{i}/attn/query/kernel``       (d, H·D)     (embed, heads)
``layers_{i}/attn/{key,value}/kernel`` (d, K·D)     (embed, kv_heads)
``layers_{i}/attn/query/bias`` (qwen2) (H·D,)       (heads,)
``layers_{i}/attn/{key,value}/bias``   (K·D,)       (kv_heads,)
``layers_{i}/attn/{q,k}_norm/scale``   (D,)         (norm,) (qwen3)
``layers_{i}/attn/out/kernel``         (H·D, d)     (heads, embed)
``layers_{i}/mlp_norm/scale``          (d,)         (norm,)
``layers_{i}/mlp/{gate,up}/kernel``    (d, F)       (embed, mlp)
``layers_{i}/mlp/down/kernel``         (F, d)       (mlp, embed)
``final_norm/scale``                   (d,)         (norm,)
``lm_head/kernel`` (untied only)       (d, V)       (embed, vocab)
=====================================  ===========  =======================

With ``scan_layers=True`` the blocks are one ``nn.scan`` and their parameters are stacked under
``layers/...`` with a leading ``(L,)`` axis (logical axis ``layers``); :func:`stack_layers` and
:func:`unstack_layers` convert between the two layouts.

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    ...                   num_heads=4, num_kv_heads=2, head_dim=8)
    >>> model = Llama(cfg)
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> variables = model.init(jax.random.key(0), ids)
    >>> model.apply(variables, ids).shape
    (1, 5, 64)
    >>> generate(model.apply, variables, ids, 3).shape
    (1, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import layers, lazy
from lora_jax.models.family import ModelFamily
from lora_jax.models.layers import attention
from lora_jax.models.weights import hf_leaf_names

__all__ = [
    "DEFAULT_TARGETS",
    "FAMILIES",
    "FAMILY",
    "HF_PROJECTIONS",
    "LOGICAL_AXIS_RULES_DEFAULT",
    "MODEL_TYPES",
    "REMAT_POLICIES",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "RopeScaling",
    "apply_rotary",
    "attention",
    "config_from_hf",
    "cos_sin",
    "decoder_inputs",
    "from_hf",
    "generate",
    "logical_partition_specs",
    "rope_inv_freq",
    "rotary_cos_sin",
    "self_attention_masks",
    "stack_layers",
    "to_hf",
    "unstack_layers",
]

# Logical axis name -> mesh axis name (None = replicated). Use with nn.logical_to_mesh_sharding.
# The activation_* names are for activations (nn.with_logical_constraint, as in MaxText): batch over
# the data-parallel axes everywhere, heads/mlp/vocab over tensor; the train step activates them.
LOGICAL_AXIS_RULES_DEFAULT: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)
_BTD = ("activation_batch", "activation_length", "activation_embed")

# LoRA targets when none are given: the attention query and value projections (as in the paper).
DEFAULT_TARGETS = r".*/attn/(query|value)/kernel"

# The Hugging Face model types this module builds (config.json `model_type`).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# `LlamaConfig.remat` -> the `jax.checkpoint` policy of each block (None: save nothing, recompute all).
# "dots" saves the results of matmuls without batch dimensions, i.e. the projections x·W (and their
# LoRA paths), and recomputes the attention scores, softmax, norms and activations in the backward pass.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": None,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x rotary frequency scaling (``rope_scaling: {"rope_type": "llama3", ...}``).

    Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` are kept, those
    longer than ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``, and
    the ones in between are interpolated smoothly (what Hugging Face's ``_compute_llama3_parameters``
    computes).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama hyper-parameters (field names follow Hugging Face's ``LlamaConfig`` where they exist).

    ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); norms, softmax and logits are float32.
    ``param_dtype`` is the dtype of freshly initialised parameters.

    ``remat``: ``"none"``, ``"full"`` (each block recomputed in the backward pass, only its input kept)
    or ``"dots"`` (each block rematerialised with :data:`REMAT_POLICIES` ``["dots"]``, i.e.
    ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``: the projection matmuls are kept, the
    rest is recomputed); ``True``/``False`` mean ``"full"``/``"none"``.

    The family switches (see the module docstring): ``model_type`` (which Hugging Face architecture
    :func:`to_hf` writes), ``rope_scaling`` (Llama 3.x), ``sliding_window`` (Mistral: a query at slot
    ``i`` sees the key slots ``i - W < j <= i``, counted in cache slots as Hugging Face does),
    ``qkv_bias`` (Qwen2) and ``qk_norm`` (Qwen3).

    ``attention``: the attention kernel of :func:`lora_jax.models.layers.attention`: ``"auto"`` (cuDNN's
    fused attention on a GPU backend where it accepts the shapes and dtypes, else XLA's), ``"xla"`` or
    ``"cudnn"``. Not architecture: Hugging Face configs do not set it.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    scan_layers: bool = False
    remat: bool | str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    model_type: str = "llama"
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    attention: str = "auto"

    def __post_init__(self):
        """Fills ``head_dim``, turns a bool ``remat`` into ``"full"``/``"none"`` and checks the fields."""
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if isinstance(self.rope_scaling, Mapping):  # e.g. read back from JSON (dataclasses.asdict)
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}."
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"remat={self.remat!r} is not a remat policy; use one of {list(REMAT_POLICIES)} "
                f"(or True = 'full', False = 'none')."
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not built by this module; use one of {MODEL_TYPES}."
            )
        if self.attention not in layers.ATTENTION:
            raise ValueError(f"attention={self.attention!r}: expected one of {layers.ATTENTION}.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 (or None: full attention).")


class KVCache(NamedTuple):
    """Static-size key/value cache.

    Attributes:
      k, v: ``(L, B, S, K, D)`` keys and values; ``None`` in a fresh cache from :meth:`empty` (the model
        allocates them on first use, as it alone knows ``L, K, D``).
      valid: ``(B, S)`` bool, which slots hold a real (non-padding) token.
      index: ``()`` int32, the next slot to write.
    """

    k: jax.Array | None
    v: jax.Array | None
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, batch: int, size: int) -> KVCache:
        """A fresh cache with room for ``size`` tokens per row."""
        return cls(None, None, jnp.zeros((batch, size), bool), jnp.zeros((), jnp.int32))


def _dense(features: int, axes: tuple[str, str], name: str, cfg: LlamaConfig, bias: bool = False) -> nn.Dense:
    return layers.dense(
        features,
        axes,
        name,
        init=nn.initializers.lecun_normal(),
        use_bias=bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · scale``, computed in float32."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """The ``(D/2,)`` float32 rotary frequencies ``theta^(-2i/D)``, rescaled for Llama 3.x by ``scaling``.

    Example:
        >>> f = rope_inv_freq(8, 10000.0, RopeScaling(factor=8.0, original_max_position_embeddings=16))
        >>> [round(float(x), 4) for x in rope_inv_freq(8, 10000.0)]   # wavelengths 2π/f: 6.3, 63, 628, 6283
        [1.0, 0.1, 0.01, 0.001]
        >>> [round(float(x), 4) for x in f]   # > 16 positions: divided by 8; 4..16: interpolated
        [0.5761, 0.0125, 0.0012, 0.0001]
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return jnp.where(medium, smoothed, scaled)


def rotary_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
    """``positions: (B, T)`` -> ``cos, sin: (B, T, D)`` float32 (Hugging Face layout, halves repeated)."""
    return cos_sin(positions, rope_inv_freq(head_dim, theta, scaling))


def cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``positions: (B, T)``, ``inv_freq: (D/2,)`` -> ``cos, sin: (B, T, D)`` float32, halves repeated."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.reshape((1,) * positions.ndim + (-1,))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x: (B, T, N, D)``; ``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = [-x2, x1]``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, valid, mask, index, kv):
        """``valid``: ``(B, T)`` real tokens or None; ``mask``: ``(B, 1, T, S)`` or None (see `Llama`)."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, k_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        q = _dense(h * d, ("embed", "heads"), "query", cfg, bias)(x).reshape(b, t, h, d)
        k = _dense(k_heads * d, ("embed", "kv_heads"), "key", cfg, bias)(x).reshape(b, t, k_heads, d)
        v = _dense(k_heads * d, ("embed", "kv_heads"), "value", cfg, bias)(x).reshape(b, t, k_heads, d)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's D features, before the rotary embedding
            q = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="k_norm")(k)
        q = nn.with_logical_constraint(q, _BTD[:2] + ("activation_heads", None))
        k, v = (nn.with_logical_constraint(y, _BTD[:2] + ("activation_kv_heads", None)) for y in (k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            ck, cv = kv
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            kv = (k, v)
        # No cache: causal (banded for a sliding window) self-attention, the kernel's own masks; with a
        # cache, `mask` holds all of it (slots, window, padding).
        out = attention(
            q.astype(cfg.dtype),
            k.astype(cfg.dtype),
            v.astype(cfg.dtype),
            causal=kv is None,
            window=cfg.sliding_window if kv is None else None,
            valid=valid,
            mask=mask,
            implementation=cfg.attention,
        ).reshape(b, t, h * d)
        return _dense(cfg.hidden_size, ("heads", "embed"), "out", cfg)(out), kv


class MLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg.intermediate_size, ("embed", "mlp"), "gate", cfg)(x)
        up = _dense(cfg.intermediate_size, ("embed", "mlp"), "up", cfg)(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, _BTD[:2] + ("activation_mlp",))
        return _dense(cfg.hidden_size, ("mlp", "embed"), "down", cfg)(hidden)


class Block(nn.Module):
    """Pre-norm decoder block; returns ``(x, kv)`` so that it can be the body of ``nn.scan``."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, valid, mask, index, kv):
        cfg = self.cfg
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        x = nn.with_logical_constraint(x, _BTD)
        a, kv = Attention(cfg, name="attn")(norm(name="attn_norm")(x), cos, sin, valid, mask, index, kv)
        x = nn.with_logical_constraint(x + a, _BTD)
        x = x + MLP(cfg, name="mlp")(norm(name="mlp_norm")(x))
        return nn.with_logical_constraint(x, _BTD), kv


def decoder_inputs(
    cfg: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    positions: jax.Array | None,
    cache: KVCache | None,
    segment_ids: jax.Array | None,
) -> tuple[jax.Array, Any, tuple[jax.Array, jax.Array] | None, jax.Array]:
    """``(valid, index, kv, positions)`` of a decoder call (:class:`Llama` and the Gemma decoder share it).

    ``valid``: ``(B, S)`` bool, the real tokens (``S = T`` without a cache, the cache's slots with one);
    ``index``: the first slot written (0 without a cache); ``kv``: the ``(L, B, S, K, D)`` key/value
    stacks, allocated on a fresh cache, or None; ``positions``: given, or restarting at each segment of
    packed rows, or the count of earlier real tokens (so left padding works). ``cfg`` needs
    ``num_layers``, ``num_kv_heads``, ``head_dim`` and ``dtype``.
    """
    b, t = input_ids.shape
    if segment_ids is not None and cache is not None:
        raise ValueError(
            "segment_ids (packed rows) cannot be combined with a KV cache; decode one "
            "sequence per row instead."
        )
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
        valid, index, offset, kv = mask, 0, jnp.zeros((b, 1), jnp.int32), None
    else:
        size = cache.valid.shape[1]
        index = cache.index
        offset = jnp.sum(cache.valid, axis=1, keepdims=True, dtype=jnp.int32)
        valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
        if cache.k is None:
            shape = (cfg.num_layers, b, size, cfg.num_kv_heads, cfg.head_dim)
            kv = (jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
        else:
            kv = (cache.k, cache.v)
    if positions is None and segment_ids is not None:
        start = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
        steps = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = steps - jax.lax.cummax(jnp.where(start, steps, 0), axis=1)  # restarts at each segment
    if positions is None:
        positions = offset + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    return valid, index, kv, positions


def self_attention_masks(
    valid: jax.Array,
    padded: bool,
    segment_ids: jax.Array | None,
    index: Any,
    t: int,
    window: int | None,
    cached: bool,
) -> tuple[jax.Array | None, jax.Array | None]:
    """``(valid keys (B, T) or None, explicit mask (B, 1, T, S) or None)`` for :func:`layers.attention`.

    Without a cache the kernel applies causality and the ``window`` itself; only padding (``padded``:
    an attention mask was given) and packed segments are passed on. With a cache (``valid: (B, S)``, the
    cache's slots; queries at slots ``index + [0, t)``) everything is one explicit mask: key slot ``j``
    is seen by query slot ``i`` when ``j <= i``, ``j > i - window`` and slot ``j`` holds a real token.
    """
    if not cached:
        seg = None
        if segment_ids is not None:  # block-diagonal: only within a segment
            seg = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        return (valid if padded else None), seg
    q_slot = index + jnp.arange(t)
    k_slot = jnp.arange(valid.shape[1])
    allowed = k_slot[None, :] <= q_slot[:, None]  # (T, S)
    if window is not None:  # banded: the W most recent slots, this one included
        allowed = allowed & (k_slot[None, :] > q_slot[:, None] - window)
    return None, (allowed[None] & valid[:, None, :])[:, None]


class Llama(nn.Module):
    """Llama causal language model.

    ``__call__(input_ids (B, T) int, attention_mask (B, T) {0,1} = None, positions (B, T) = None,
    cache: KVCache = None, segment_ids (B, T) int = None)`` returns float32 logits ``(B, T, V)``, or
    ``(logits, cache)`` when a cache is given. Positions default to the count of earlier non-padding
    tokens (so left padding works).

    ``segment_ids`` (packed rows, no cache): tokens attend only to earlier tokens of their own segment
    (a block-diagonal causal mask) and positions restart at 0 where a segment starts, so each example
    packed into a row computes what it computes alone (:mod:`lora_jax.data.packing`).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None, segment_ids=None
    ):
        cfg = self.config
        t = input_ids.shape[1]
        valid, index, kv, positions = decoder_inputs(
            cfg, input_ids, attention_mask, positions, cache, segment_ids
        )
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        keys, allowed = self_attention_masks(
            valid, attention_mask is not None, segment_ids, index, t, cfg.sliding_window, cache is not None
        )

        embed = layers.embed(
            cfg.vocab_size,
            cfg.hidden_size,
            ("vocab", "embed"),
            "embed",
            init=nn.initializers.normal(0.02),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
        )
        x = nn.with_logical_constraint(embed(input_ids), _BTD)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 5 + (0,),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            x, kv = scanned(x, cos, sin, keys, allowed, index, kv)
        else:
            new = []
            for i in range(cfg.num_layers):
                layer_kv = None if kv is None else (kv[0][i], kv[1][i])
                x, layer_kv = block(cfg, name=f"layers_{i}")(x, cos, sin, keys, allowed, index, layer_kv)
                new.append(layer_kv)
            if kv is not None:
                kv = (jnp.stack([k for k, _ in new]), jnp.stack([v for _, v in new]))

        x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
        x = nn.with_logical_constraint(x, _BTD)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg.vocab_size, ("embed", "vocab"), "lm_head", cfg)(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), _BTD[:2] + ("activation_vocab",))
        if cache is None:
            return logits
        return logits, KVCache(kv[0], kv[1], valid, index + t)


# --------------------------------------------------------------------------------------------------
# Generation


def generate(
    apply_fn: Callable,
    variables: Any,
    prompt_ids: jax.Array,
    max_new_tokens: int,
    *,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    eos_id: int | None = None,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Decodes ``max_new_tokens`` tokens after ``prompt_ids`` with a static-size KV cache.

    One jitted function: a prefill call, then a ``jax.lax.while_loop`` of one-token calls that stops
    once every row has produced ``eos_id``. ``variables`` is an argument of that function (not a
    constant baked into it), so ``apply_fn`` may be a LoRA-wrapped apply, e.g.
    ``lambda v, *a, **k: lora_jax.wrap(model.apply)(v, deltas, *a, **k)``.

    Args:
      apply_fn: ``apply_fn(variables, ids, attention_mask=..., cache=...) -> (logits, cache)``, e.g.
        ``Llama(...).apply``. Reuse the same callable to reuse the compiled function.
      variables: what ``apply_fn`` takes.
      prompt_ids: ``(B, T)`` int; batch rows of different length must be left-padded.
      max_new_tokens: number of tokens to produce.
      key: PRNG key, required when ``temperature > 0``.
      temperature: 0 for greedy (argmax), else sample from ``softmax(logits / temperature)``.
      eos_id: rows that produced it are filled with ``eos_id`` afterwards.
      attention_mask: ``(B, T)`` {0, 1}, 0 on left padding; default all ones.

    Returns:
      ``(B, max_new_tokens)`` int32, the new tokens only.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if temperature > 0 and key is None:
        raise ValueError(f"temperature={temperature} samples tokens: pass key=jax.random.key(...).")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids must be (batch, length), got shape {prompt_ids.shape}.")
    if attention_mask is None:
        attention_mask = jnp.ones(prompt_ids.shape, jnp.int32)
    if key is None:
        key = jax.random.key(0)  # unused when greedy
    # temperature and eos_id are traced, so changing them does not recompile.
    return _generate(
        apply_fn,
        int(max_new_tokens),
        variables,
        prompt_ids,
        jnp.asarray(attention_mask, jnp.int32),
        key,
        jnp.float32(temperature),
        jnp.int32(-1 if eos_id is None else eos_id),
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(apply_fn, max_new_tokens, variables, prompt_ids, mask, key, temperature, eos_id):
    b, t = prompt_ids.shape

    def pick(logits, k):
        greedy = jnp.argmax(logits, axis=-1)
        # float32 (what standard promotion gives bf16 logits too): strict promotion mixes no dtypes.
        sampled = jax.random.categorical(
            k, logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6), axis=-1
        )
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    cache = KVCache.empty(b, t + max_new_tokens)
    logits, cache = apply_fn(variables, prompt_ids, attention_mask=mask, cache=cache)
    key, sub = jax.random.split(key)
    token = pick(logits[:, -1], sub)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = token == eos_id  # eos_id == -1: never

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, token, cache, done, key = state
        logits, cache = apply_fn(variables, token[:, None], cache=cache)
        key, sub = jax.random.split(key)
        token = jnp.where(done, eos_id, pick(logits[:, -1], sub))
        done = done | (token == eos_id)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return i + 1, out, token, cache, done, key

    state = (jnp.ones((), jnp.int32), out, token, cache, done, key)
    _, out, _, _, done, _ = jax.lax.while_loop(cond, body, state)
    # Rows that stopped early (or when all stopped, the loop ended): eos after the first eos.
    is_eos = (out == eos_id).astype(jnp.int32)
    after_eos = jnp.cumsum(is_eos, axis=1) - is_eos > 0
    return jnp.where(after_eos, eos_id, out)


# --------------------------------------------------------------------------------------------------
# Parameter layouts and Hugging Face conversion


def stack_layers(params: Mapping, num_layers: int) -> dict:
    """``{"layers_0": t0, ..., "layers_{L-1}": t}`` -> ``{"layers": stacked (L, ...)}`` (scan layout)."""
    params = dict(params)
    per = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree_util.tree_map(lambda *xs: lazy.stack(xs), *per)  # jnp.stack, or a lazy view
    return params


def unstack_layers(params: Mapping, num_layers: int) -> dict:
    """Inverse of :func:`stack_layers`."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return params


def logical_partition_specs(model: Llama) -> Any:
    """The logical-axis ``PartitionSpec`` of every variable, for ``nn.logical_to_mesh_sharding``.

    Example:
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
        ...                   num_heads=4, num_kv_heads=2, scan_layers=True)
        >>> tuple(logical_partition_specs(Llama(cfg))["params"]["layers"]["attn"]["key"]["kernel"])
        ('layers', 'embed', 'kv_heads')
    """
    return layers.logical_partition_specs(model, jnp.zeros((1, 1), jnp.int32))


# Hugging Face ``LlamaForCausalLM`` names: the family's one table (from_hf, to_hf, GGUF, PEFT files).
HF_LAYER = "model.layers.{i}."
HF_PROJECTIONS = {
    "attn/query": "self_attn.q_proj",
    "attn/key": "self_attn.k_proj",
    "attn/value": "self_attn.v_proj",
    "attn/out": "self_attn.o_proj",
    "mlp/gate": "mlp.gate_proj",
    "mlp/up": "mlp.up_proj",
    "mlp/down": "mlp.down_proj",
}
HF_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
HF_TOP = {
    "embed": ("model.embed_tokens", "embedding"),
    "final_norm": ("model.norm", "scale"),
    "lm_head": ("lm_head", "kernel"),
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


HF_QK_NORMS = {"attn/q_norm": "self_attn.q_norm", "attn/k_norm": "self_attn.k_norm"}  # qwen3
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ROPE_TYPES = ("default", "llama3")
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_from_hf(config: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, RopeScaling or None)`` from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
    theta = config.get("rope_theta")
    scaling = None
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key) or {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"{key}={rope!r} must be an object (rope_type and its parameters).")
        theta = rope.get("rope_theta", theta)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"{key}={dict(rope)} is not supported: rope_type {rope_type!r}; supported rope types: "
                f"{list(_ROPE_TYPES)} (plain rotary embeddings and Llama 3.x scaling)."
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"{key}.partial_rotary_factor={rope['partial_rotary_factor']} is not supported; "
                f"the rotary embedding covers the whole head here (partial_rotary_factor=1.0)."
            )
        if rope_type == "llama3":
            missing = [f for f in _LLAMA3_FIELDS if f not in rope]
            if missing:
                raise ValueError(
                    f"{key}={dict(rope)}: rope_type 'llama3' needs {list(_LLAMA3_FIELDS)}; missing {missing}."
                )
            scaling = RopeScaling(*(rope[f] for f in _LLAMA3_FIELDS))
    return float(1e4 if theta is None else theta), scaling


def _sliding_window_from_hf(config: Mapping[str, Any], model_type: str) -> int | None:
    """The one sliding window of every layer (None: full attention); mixed layer patterns are refused."""
    if model_type == "mistral":
        window, layer_types = config.get("sliding_window"), config.get("layer_types")
    elif model_type in ("qwen2", "qwen3"):
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
        layer_types = config.get("layer_types")
        if layer_types is None and window is not None:  # transformers' rule for configs without layer_types
            first = config.get("max_window_layers", 28)
            layer_types = [
                "sliding_attention" if i >= first else "full_attention"
                for i in range(config["num_hidden_layers"])
            ]
    else:
        window, layer_types = config.get("sliding_window"), config.get("layer_types")
        if window is not None:
            raise ValueError(
                f"sliding_window={window} is not supported for model_type {model_type!r}; "
                f"sliding-window attention is read for mistral, qwen2 and qwen3 configs."
            )
    kinds = set(layer_types or [])
    if kinds - {"full_attention", "sliding_attention"} or len(kinds) > 1:
        raise ValueError(
            f"layer_types={layer_types} is not supported: this module gives every layer the same "
            f"attention, all 'full_attention' or all 'sliding_attention' (for Qwen: use_sliding_window "
            f"with max_window_layers=0, or use_sliding_window=false)."
        )
    if kinds == {"full_attention"}:
        return None
    if window is None and kinds == {"sliding_attention"}:
        raise ValueError(
            f"layer_types={layer_types} asks for sliding attention but sliding_window is not set."
        )
    return None if window is None else int(window)


def config_from_hf(config: Mapping[str, Any], **overrides) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face ``config.json`` dict (``overrides`` win).

    ``model_type`` (default ``"llama"``) is one of :data:`MODEL_TYPES`; ``overrides`` set fields that
    are not architecture (``scan_layers``, ``remat``, ``dtype``, ``param_dtype``; ``None`` is ignored).

    Raises:
      ValueError: an unsupported ``model_type``, or a field this module does not implement (the field
        is named: a RoPE type other than default/llama3, attention or MLP biases where the family has
        none, another activation, a per-layer mix of sliding and full attention).

    Example:
        >>> cfg = config_from_hf({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
        ...                       "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
        >>> cfg.qkv_bias, cfg.qk_norm, cfg.sliding_window
        (True, False, None)
    """
    model_type = config.get("model_type") or "llama"
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not a Llama-style decoder; this module builds {list(MODEL_TYPES)}."
        )
    theta, scaling = _rope_from_hf(config)
    if model_type == "qwen2":  # Qwen2's q/k/v projections always have biases, o_proj and the MLP none
        unsupported = {}
    else:
        unsupported = {k: config.get(k) for k in ("attention_bias",) if config.get(k)}
    unsupported.update({k: config.get(k) for k in ("mlp_bias",) if config.get(k)})
    if unsupported:
        raise ValueError(
            f"{model_type} with attention_bias or mlp_bias is not supported ({unsupported}); "
            f"biases are read only on Qwen2's q/k/v projections."
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported; Llama uses 'silu'.")
    num_heads = config["num_attention_heads"]
    kw = dict(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        model_type=model_type,
        rope_scaling=scaling,
        sliding_window=_sliding_window_from_hf(config, model_type),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
    )
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return LlamaConfig(**kw)


def _hf_names(cfg: LlamaConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Flax path (unstacked layout) -> (Hugging Face name, stored transposed) for every parameter."""
    names = {}
    for ours, (hf, leaf) in HF_TOP.items():
        if not (ours == "lm_head" and cfg.tie_word_embeddings):
            names.update(hf_leaf_names((ours,), hf, (leaf,)))
    biased = ("attn/query", "attn/key", "attn/value") if cfg.qkv_bias else ()
    for i in range(cfg.num_layers):
        layer, prefix = (f"layers_{i}",), HF_LAYER.format(i=i)
        for ours, hf in HF_PROJECTIONS.items():
            leaves = ("kernel", "bias") if ours in biased else ("kernel",)
            names.update(hf_leaf_names(layer + tuple(ours.split("/")), prefix + hf, leaves))
        norms = {**HF_NORMS, **(HF_QK_NORMS if cfg.qk_norm else {})}
        for ours, hf in norms.items():
            names.update(hf_leaf_names(layer + tuple(ours.split("/")), prefix + hf, ("scale",)))
    return names


def _flax_shape(cfg: LlamaConfig, path: tuple[str, ...]) -> tuple[int, ...]:
    """Shape of the parameter at ``path`` (unstacked layout)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    module = "/".join(path[1:-1]) if path[0].startswith("layers_") else path[0]
    shape = {
        "embed": (v, d),
        "lm_head": (d, v),
        "final_norm": (d,),
        "attn_norm": (d,),
        "mlp_norm": (d,),
        "attn/query": (d, q),
        "attn/key": (d, kv),
        "attn/value": (d, kv),
        "attn/out": (q, d),
        "attn/q_norm": (cfg.head_dim,),
        "attn/k_norm": (cfg.head_dim,),
        "mlp/gate": (d, f),
        "mlp/up": (d, f),
        "mlp/down": (f, d),
    }[module]
    return shape[1:] if path[-1] == "bias" else shape


def _expected_hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape in PyTorch layout (``(out, in)`` weights) for every parameter."""
    out = {}
    for path, (hf, transposed) in _hf_names(cfg).items():
        shape = _flax_shape(cfg, path)
        out[hf] = shape[::-1] if transposed else shape
    return out


def from_hf(
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    *,
    scan_layers: bool = False,
    remat: bool | str = False,
    dtype: Any = None,
    param_dtype: Any = None,
) -> tuple[Llama, dict]:
    """A Hugging Face ``LlamaForCausalLM`` (Mistral, Qwen2, Qwen3) state dict -> ``(Llama, {"params": ...})``.

    Args:
      config: the ``config.json`` dict; its ``model_type`` picks the family (:func:`config_from_hf`).
      tensors: name -> array in PyTorch layout (``(out, in)`` weights), e.g. read from safetensors; or
        lazy tensors (:func:`lora_jax.models.weights.open_weights`), then the leaves are lazy views
        that :mod:`lora_jax.models.sharded` reads block by block.
      scan_layers, remat, dtype: set on the :class:`LlamaConfig`; ``dtype`` is the compute dtype.
      param_dtype: dtype of the returned parameters (default float32).

    Raises:
      ValueError: a missing, unexpected or wrongly-shaped tensor (all of them listed at once, each
        with its name and both shapes), or a config field :func:`config_from_hf` refuses.
    """
    cfg = config_from_hf(config, scan_layers=scan_layers, remat=remat, dtype=dtype, param_dtype=param_dtype)
    expected = _expected_hf_shapes(cfg)
    problems = []
    for name, shape in expected.items():
        if name not in tensors:
            problems.append(f"missing tensor {name!r} (expected shape {shape})")
        elif tuple(tensors[name].shape) != shape:
            problems.append(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
    extra = [
        n
        for n in tensors
        if n not in expected
        and not _IGNORED.fullmatch(n)
        and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    ]
    problems += [f"unexpected tensor {n!r}" for n in sorted(extra)]
    if problems:
        raise ValueError(f"{cfg.model_type} checkpoint does not fit its config:\n  " + "\n  ".join(problems))

    params: dict = {}
    for path, (name, transposed) in _hf_names(cfg).items():
        arr = lazy.as_source(tensors[name])
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = lazy.to_param(
            arr.T if transposed else arr, cfg.param_dtype
        )  # (out, in) -> (in, out)
    if cfg.scan_layers:
        params = stack_layers(params, cfg.num_layers)
    return Llama(cfg), {"params": params}


def to_hf(cfg: LlamaConfig, variables: Mapping) -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of :func:`from_hf`: ``(config.json dict, state dict of float32 numpy arrays)``."""
    params = dict(variables["params"])
    if cfg.scan_layers:
        params = unstack_layers(params, cfg.num_layers)
    out: dict[str, np.ndarray] = {}
    for path, (name, transposed) in _hf_names(cfg).items():
        x = np.array(functools.reduce(lambda t, k: t[k], path, params), np.float32)
        out[name] = x.T if transposed else x
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
    config = {
        "model_type": cfg.model_type,
        "architectures": [HF_ARCHITECTURES[cfg.model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
    }
    if cfg.rope_scaling is not None:
        config["rope_scaling"] = rope
    if cfg.model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    elif cfg.model_type == "mistral":
        config["sliding_window"] = cfg.sliding_window
    else:  # qwen2, qwen3: every layer alike
        config.update(
            use_sliding_window=cfg.sliding_window is not None,
            sliding_window=cfg.sliding_window,
            max_window_layers=0,
        )
    return config, out


def _family(model_type: str) -> ModelFamily:
    return ModelFamily(
        model_type=model_type,
        model_classes=(Llama,),
        layers="layers",
        hf_layer=HF_LAYER,
        hf_projections=HF_PROJECTIONS,
        logical_axis_rules=LOGICAL_AXIS_RULES_DEFAULT,
        default_targets=DEFAULT_TARGETS,
        logical_partition_specs=logical_partition_specs,
        from_hf=from_hf,
        peft_task_type="CAUSAL_LM",
        scan_layers=True,
    )


# One family per Hugging Face model type this module builds; they share the module and its names.
FAMILIES: dict[str, ModelFamily] = {t: _family(t) for t in MODEL_TYPES}
FAMILY = FAMILIES["llama"]
