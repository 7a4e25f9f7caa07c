"""Gemma 2 and Gemma 3 (text) in Flax Linen: one decoder for both, exact against Hugging Face.

Gemma 2 (Gemma Team 2024, arXiv 2408.00118) and Gemma 3 (arXiv 2503.19786) are Llama-like decoders
with these differences, all implemented here as Hugging Face's ``Gemma2ForCausalLM`` and
``Gemma3ForCausalLM`` compute them (so their checkpoints load with transposes only, :func:`from_hf`):

- the token embedding is multiplied by ``√d`` (rounded to the compute dtype, as Hugging Face does);
- RMSNorm multiplies by ``(1 + w)`` (``w`` is stored, initialised at 0) and is applied before *and*
  after both attention and MLP (four norms per block);
- the MLP is GeGLU with the tanh approximation of GELU;
- attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` rather than ``head_dim ** -0.5``;
- soft-capping ``c · tanh(x / c)`` of the attention logits (Gemma 2 only; Hugging Face's Gemma 3 does
  not apply it) and of the final logits (both, where the config sets it);
- sliding-window layers (a token sees the ``sliding_window`` latest positions, itself included)
  interleaved with global layers: every other layer in Gemma 2, five local to one global in Gemma 3
  (``config.layer_types``);
- Gemma 3 only: RMSNorm of each query and key head before the rotary embedding, and two RoPE bases
  (``rope_local_base_freq`` for local layers, ``rope_theta`` with optional linear scaling for global
  ones).

The layer type is data, not structure: every block has the same parameters, and the block reads its
type from a flag (a Python bool per layer, or with ``scan_layers=True`` a scanned ``(L,)`` array), so
``nn.scan`` covers the mixed stack. The KV cache, :func:`generate` and the parameter layout
(``layers_{i}/attn/query/kernel``, ``layers/...`` when scanned) are those of
:mod:`lora_jax.models.llama`, with four norms per block (``attn_norm``, ``post_attn_norm``,
``mlp_norm``, ``post_mlp_norm``) and, for Gemma 3, ``attn/{q,k}_norm/scale`` of shape ``(D,)``. The
output projection is the module ``lm_head`` (tied: it reads ``embed/embedding``; untied: its own
``lm_head/kernel`` ``(d, V)``) and includes the final soft-cap (:class:`Head`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = GemmaConfig(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=4)
    >>> cfg.layer_types
    ('sliding_attention', 'full_attention')
    >>> model = Gemma(cfg)
    >>> ids = jnp.zeros((1, 6), jnp.int32)
    >>> variables = model.init(jax.random.key(0), ids)
    >>> model.apply(variables, ids).shape
    (1, 6, 64)
    >>> generate(model.apply, variables, ids, 3).shape
    (1, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import layers, lazy
from lora_jax.models.family import ModelFamily
from lora_jax.models.llama import (
    LOGICAL_AXIS_RULES_DEFAULT,
    KVCache,
    apply_rotary,
    cos_sin,
    decoder_inputs,
    generate,
    rope_inv_freq,
    self_attention_masks,
    stack_layers,
    unstack_layers,
)
from lora_jax.models.weights import hf_leaf_names

__all__ = [
    "DEFAULT_TARGETS",
    "FAMILY",
    "FAMILY_GEMMA3",
    "FAMILY_GEMMA3_MULTIMODAL",
    "HF_PROJECTIONS",
    "LOGICAL_AXIS_RULES_DEFAULT",
    "MODEL_TYPES",
    "REMAT_POLICIES",
    "Gemma",
    "GemmaConfig",
    "KVCache",
    "config_from_hf",
    "from_hf",
    "generate",
    "logical_partition_specs",
    "to_hf",
]

MODEL_TYPES = ("gemma2", "gemma3_text")
LAYER_TYPES = ("sliding_attention", "full_attention")
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # all the tanh approximation of GELU
_BTD = ("activation_batch", "activation_length", "activation_embed")
_NEG = float(np.finfo(np.float32).min)

# ``GemmaConfig.remat`` -> the ``jax.checkpoint`` policy of each block, as for Llama: "full" keeps only the
# block input, "dots" also the projections x·W (matmuls without batch dimensions).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": None,
}

# LoRA targets when none are given: the attention query and value projections (as in the paper).
DEFAULT_TARGETS = r".*/attn/(query|value)/kernel"


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Gemma 2 / Gemma 3 hyper-parameters (names follow Hugging Face's configs where they exist).

    ``layer_types`` defaults to the family's pattern: Gemma 2 alternates sliding and full layers
    (layer 0 sliding); Gemma 3 makes every ``sliding_window_pattern``-th layer (6: layers 5, 11, ...)
    full. ``rope_theta``/``rope_scaling_factor`` are the global layers' RoPE base and linear scaling
    factor, ``rope_local_base_freq``/``rope_local_scaling_factor`` the sliding layers' (Gemma 2 uses
    ``rope_theta`` for both). ``remat``: ``"none"``, ``"full"`` or ``"dots"`` (see
    :data:`REMAT_POLICIES`; ``True``/``False`` mean ``"full"``/``"none"``). ``dtype`` is the compute
    dtype; norms, softmax and logits are float32. ``attention`` is the kernel of
    :func:`lora_jax.models.layers.attention` (``"auto"``, ``"xla"``, ``"cudnn"``); layers with
    ``attn_logit_softcapping`` (Gemma 2) always compute explicit float32 scores.
    """

    model_type: str = "gemma2"
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_layers: int = 26
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    sliding_window_pattern: int = 6
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    rope_local_base_freq: float | None = None
    rope_local_scaling_factor: float = 1.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    scan_layers: bool = False
    remat: bool | str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in layers.ATTENTION:
            raise ValueError(f"attention={self.attention!r}: expected one of {layers.ATTENTION}.")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not a Gemma text model; use one of {MODEL_TYPES}."
            )
        if self.layer_types is None:
            every = 2 if self.model_type == "gemma2" else self.sliding_window_pattern
            types = tuple(LAYER_TYPES[(i + 1) % every == 0] for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ValueError(
                f"layer_types={list(self.layer_types)} must give one of {list(LAYER_TYPES)} for each of the "
                f"num_layers={self.num_layers} layers."
            )
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"remat={self.remat!r} is not a remat policy; use one of {list(REMAT_POLICIES)}."
            )
        if self.rope_local_base_freq is None:
            object.__setattr__(self, "rope_local_base_freq", self.rope_theta)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}."
            )

    @property
    def qk_norm(self) -> bool:
        """Gemma 3 normalises each query and key head (RMSNorm over ``head_dim``)."""
        return self.model_type == "gemma3_text"

    @property
    def sliding(self) -> tuple[bool, ...]:
        """Per layer: is it a sliding-window layer."""
        return tuple(t == "sliding_attention" for t in self.layer_types)


def _dense(features: int, axes: tuple[str, str], name: str, cfg: GemmaConfig) -> nn.Dense:
    return layers.dense(
        features,
        axes,
        name,
        init=nn.initializers.lecun_normal(),
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / sqrt(mean(x²) + eps) · (1 + w)`` in float32, ``w`` initialised at 0."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = 1.0 + w.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (y * scale).astype(self.dtype)


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float, factor: float = 1.0):
    """``positions: (B, T)`` -> ``cos, sin: (B, T, D)`` float32; ``factor`` is linear RoPE scaling."""
    return cos_sin(positions, rope_inv_freq(head_dim, theta) / jnp.float32(factor))


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / jnp.asarray(cap, x.dtype)) * jnp.asarray(cap, x.dtype)


def _pick(sliding, local, full):
    """``local`` on a sliding layer, ``full`` on a global one; ``sliding`` a Python bool or a traced flag."""
    if isinstance(sliding, bool):
        return local if sliding else full
    return jax.tree_util.tree_map(lambda a, b: jnp.where(sliding, a, b), local, full)


def _pick_mask(sliding, local, full):
    """`_pick` for boolean masks where None means "everything allowed"."""
    if isinstance(sliding, bool):
        return local if sliding else full
    if local is full:
        return full
    everything = jnp.ones((1, 1, 1, 1), bool)
    return jnp.where(sliding, everything if local is None else local, everything if full is None else full)


class Attention(nn.Module):
    cfg: GemmaConfig

    @nn.compact
    def __call__(self, x, cos, sin, valid, masks, sliding, index, kv):
        """``valid``: ``(B, T)`` or None; ``masks``: explicit ``(local, full)`` masks, ``(B|1, 1, T, S)`` or
        None (see `Gemma`); ``sliding``: a Python bool or a traced ``()`` flag."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, k_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense(h * d, ("embed", "heads"), "query", cfg)(x).reshape(b, t, h, d)
        k = _dense(k_heads * d, ("embed", "kv_heads"), "key", cfg)(x).reshape(b, t, k_heads, d)
        v = _dense(k_heads * d, ("embed", "kv_heads"), "value", cfg)(x).reshape(b, t, k_heads, d)
        q = nn.with_logical_constraint(q, _BTD[:2] + ("activation_heads", None))
        k, v = (nn.with_logical_constraint(y, _BTD[:2] + ("activation_kv_heads", None)) for y in (k, v))
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="k_norm")(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            ck, cv = kv
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            kv = (k, v)
        causal, scale = kv is None, cfg.query_pre_attn_scalar**-0.5
        local, full = masks
        if cfg.attn_logit_softcapping is None:
            # The window as the kernel's own mask where the layer type is static (no cache, unscanned);
            # a scanned layer's type is data, so there the band is part of the explicit mask.
            static = causal and isinstance(sliding, bool) and cfg.sliding_window is not None
            out = layers.attention(
                q.astype(cfg.dtype),
                k.astype(cfg.dtype),
                v.astype(cfg.dtype),
                scale=scale,
                causal=causal,
                window=cfg.sliding_window if static and sliding else None,
                valid=valid,
                mask=full if static else _pick_mask(sliding, local, full),
                implementation=cfg.attention,
            ).reshape(b, t, h * d)
            return _dense(cfg.hidden_size, ("heads", "embed"), "out", cfg)(out), kv
        # Gemma 2 soft-caps the logits, c·tanh(s / c), before the mask: jax.nn.dot_product_attention has no
        # such step (nor has cuDNN's kernel), so these layers keep explicit float32 scores.
        allowed = _pick_mask(sliding, local, full)
        allowed = jnp.ones((1, 1, 1, 1), bool) if allowed is None else allowed
        if causal:
            allowed = allowed & jnp.tril(jnp.ones((t, t), bool))[None, None]
        if valid is not None:
            allowed = allowed & valid[:, None, None, :]
        q = q.reshape(b, t, k_heads, h // k_heads, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
        scores = scores * jnp.float32(scale)
        scores = _softcap(scores, cfg.attn_logit_softcapping)
        scores = jnp.where(allowed[:, :, None], scores, _NEG)  # (B, 1, 1, T, S) against (B, K, G, T, S)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(cfg.dtype)).reshape(b, t, h * d)
        return _dense(cfg.hidden_size, ("heads", "embed"), "out", cfg)(out), kv


class MLP(nn.Module):
    """GeGLU: ``down(gelu_tanh(gate(x)) · up(x))``."""

    cfg: GemmaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg.intermediate_size, ("embed", "mlp"), "gate", cfg)(x)
        up = _dense(cfg.intermediate_size, ("embed", "mlp"), "up", cfg)(x)
        hidden = nn.with_logical_constraint(
            nn.gelu(gate, approximate=True) * up, _BTD[:2] + ("activation_mlp",)
        )
        return _dense(cfg.hidden_size, ("mlp", "embed"), "down", cfg)(hidden)


class Block(nn.Module):
    """Sandwich-norm decoder block; returns ``(x, kv)`` so that it can be the body of ``nn.scan``.

    ``sliding`` (module attribute) fixes the layer type of an unscanned block; with ``None`` the type
    comes from the ``flag`` argument (a scanned ``()`` bool).
    """

    cfg: GemmaConfig
    sliding: bool | None = None

    @nn.compact
    def __call__(self, x, rope, valid, masks, index, flag, kv):
        cfg = self.cfg
        sliding = self.sliding if self.sliding is not None else flag
        cos, sin = _pick(sliding, rope[0], rope[1])
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        x = nn.with_logical_constraint(x, _BTD)
        a, kv = Attention(cfg, name="attn")(
            norm(name="attn_norm")(x), cos, sin, valid, masks, sliding, index, kv
        )
        x = nn.with_logical_constraint(x + norm(name="post_attn_norm")(a), _BTD)
        m = MLP(cfg, name="mlp")(norm(name="mlp_norm")(x))
        x = x + norm(name="post_mlp_norm")(m)
        return nn.with_logical_constraint(x, _BTD), kv


class Head(nn.Module):
    """The output projection *and* the final soft-cap, as one call of the module named ``lm_head``.

    So code that intercepts the head (the train step projects only the loss positions, or computes the
    cross-entropy chunk by chunk) gets soft-capped logits. ``x: (..., d)`` -> float32 ``(..., V)``;
    tied: ``embedding: (V, d)`` is the token embedding; untied: the module's own ``kernel: (d, V)``.
    """

    cfg: GemmaConfig

    @nn.compact
    def __call__(self, x, embedding=None):
        cfg = self.cfg
        if embedding is None:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size),
                cfg.param_dtype,
            )
            logits = jnp.einsum("...d,dv->...v", x.astype(cfg.dtype), kernel.astype(cfg.dtype))
        else:
            logits = jnp.einsum("...d,vd->...v", x.astype(cfg.dtype), embedding.astype(cfg.dtype))
        return _softcap(logits.astype(jnp.float32), cfg.final_logit_softcapping)


class Gemma(nn.Module):
    """Gemma 2 / Gemma 3 (text) causal language model.

    ``__call__(input_ids (B, T) int, attention_mask (B, T) {0,1} = None, positions (B, T) = None,
    cache: KVCache = None, segment_ids (B, T) int = None)`` returns float32 logits ``(B, T, V)``, or
    ``(logits, cache)`` when a cache is given; the same contract as :class:`lora_jax.models.llama.Llama`
    (left padding, packed rows with ``segment_ids``), so :func:`generate` and the training code take
    either. The sliding window counts cache slots, as Hugging Face's mask does.
    """

    config: GemmaConfig

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None, segment_ids=None
    ):
        cfg = self.config
        t = input_ids.shape[1]
        valid, index, kv, positions = decoder_inputs(
            cfg, input_ids, attention_mask, positions, cache, segment_ids
        )
        rope = (
            rotary_cos_sin(positions, cfg.head_dim, cfg.rope_local_base_freq, cfg.rope_local_scaling_factor),
            rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor),
        )
        # Explicit masks (B|1, 1, T, S) or None: with a cache, everything (slots, padding, window); without,
        # only packed segments and, for the sliding layers, the band (the kernel adds causality, padding).
        cached = cache is not None
        keys, full = self_attention_masks(
            valid, attention_mask is not None, segment_ids, index, t, None, cached
        )
        local = full
        if cfg.sliding_window is not None:
            if cached:
                local = self_attention_masks(valid, True, None, index, t, cfg.sliding_window, True)[1]
            else:
                steps = jnp.arange(t)
                band = (steps[None, :] > steps[:, None] - cfg.sliding_window)[None, None]  # (1, 1, T, T)
                local = band if full is None else full & band

        embed = layers.embed(
            cfg.vocab_size,
            cfg.hidden_size,
            ("vocab", "embed"),
            "embed",
            init=nn.initializers.normal(0.02),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
        )
        # √d rounded to the compute dtype (Hugging Face rounds it to the weights' dtype: 55.5 for d=3072 in bf16).
        x = embed(input_ids) * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.dtype)
        x = nn.with_logical_constraint(x, _BTD)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 4 + (0, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            x, kv = scanned(x, rope, keys, (local, full), index, jnp.asarray(cfg.sliding), kv)
        else:
            new = []
            for i, sliding in enumerate(cfg.sliding):
                layer_kv = None if kv is None else (kv[0][i], kv[1][i])
                x, layer_kv = block(cfg, sliding, name=f"layers_{i}")(
                    x, rope, keys, (local, full), index, None, layer_kv
                )
                new.append(layer_kv)
            if kv is not None:
                kv = (jnp.stack([k for k, _ in new]), jnp.stack([v for _, v in new]))

        x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
        x = nn.with_logical_constraint(x, _BTD)
        head = Head(cfg, name="lm_head")
        logits = head(x, embed.embedding) if cfg.tie_word_embeddings else head(x)
        logits = nn.with_logical_constraint(logits, _BTD[:2] + ("activation_vocab",))
        if cache is None:
            return logits
        return logits, KVCache(kv[0], kv[1], valid, index + t)


def logical_partition_specs(model: Gemma) -> Any:
    """The logical-axis ``PartitionSpec`` of every variable, for ``nn.logical_to_mesh_sharding``.

    Example:
        >>> cfg = GemmaConfig(model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, scan_layers=True)
        >>> specs = logical_partition_specs(Gemma(cfg))["params"]["layers"]["attn"]
        >>> tuple(specs["key"]["kernel"]), tuple(specs["k_norm"]["scale"])
        (('layers', 'embed', 'kv_heads'), ('layers', 'norm'))
    """
    return layers.logical_partition_specs(model, jnp.zeros((1, 1), jnp.int32))


# --------------------------------------------------------------------------------------------------
# Hugging Face conversion

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
HF_NORMS = {
    "attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}
HF_QK_NORMS = {"attn/q_norm": "self_attn.q_norm", "attn/k_norm": "self_attn.k_norm"}
HF_TOP = {
    "embed": ("model.embed_tokens", "embedding"),
    "final_norm": ("model.norm", "scale"),
    "lm_head": ("lm_head", "kernel"),
}
# The multimodal Gemma 3 (Gemma3ForConditionalGeneration) keeps the text model under these prefixes
# (transformers >= 4.52 first, the original checkpoints second); its vision tower is not read.
_MULTIMODAL_TEXT = (("model.language_model.", "model."), ("language_model.model.", "model."))
_MULTIMODAL_HEAD = ("language_model.lm_head.", "lm_head.")
_MULTIMODAL_SKIP = re.compile(r"(model\.)?(vision_tower|multi_modal_projector)\..*")
_IGNORED = re.compile(r".*rotary_emb\..*inv_freq")
# transformers' defaults for fields a config.json may leave out.
_HF_DEFAULTS = {
    "gemma2": dict(
        query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        sliding_window=4096,
        max_position_embeddings=8192,
    ),
    "gemma3_text": dict(
        query_pre_attn_scalar=256,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        sliding_window=4096,
        max_position_embeddings=131072,
    ),
}


def _rope(config: Mapping[str, Any], layer_type: str, model_type: str) -> tuple[float, float]:
    """``(theta, linear factor)`` of one layer type from a ``config.json`` (either of transformers' layouts)."""
    params = config.get("rope_parameters") or {}
    if model_type == "gemma3_text":
        params = params.get(layer_type) or {}
        legacy = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
        default = 1e4 if layer_type == "sliding_attention" else 1e6
        theta = params.get("rope_theta", config.get(legacy, default))
        key = f"rope_parameters[{layer_type!r}]"
        if layer_type == "full_attention" and config.get("rope_scaling") and not params:
            params, key = config["rope_scaling"], "rope_scaling"
    else:
        theta = params.get("rope_theta", config.get("rope_theta", 1e4))
        key = "rope_parameters"
        if config.get("rope_scaling") and not params:
            params, key = config["rope_scaling"], "rope_scaling"
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), 1.0
    if kind == "linear":
        return float(theta), float(params["factor"])
    raise ValueError(
        f"{key} has rope_type={kind!r}, which is not supported for {model_type}; supported: "
        f"'default' and 'linear'."
    )


def _text_config(config: Mapping[str, Any]) -> dict:
    """The text model's config: ``config`` itself, or a multimodal Gemma 3's ``text_config``."""
    model_type = config.get("model_type")
    if model_type == "gemma3":
        text = dict(config.get("text_config") or {})
        text.setdefault("model_type", "gemma3_text")
        if "tie_word_embeddings" in config and "tie_word_embeddings" not in text:
            text["tie_word_embeddings"] = config["tie_word_embeddings"]
        if text["model_type"] != "gemma3_text":
            raise ValueError(
                f"gemma3 text_config has model_type={text['model_type']!r}; expected 'gemma3_text'."
            )
        return text
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not a Gemma 2/3 text model; supported: {[*MODEL_TYPES, 'gemma3']}."
        )
    return dict(config)


def config_from_hf(config: Mapping[str, Any], **overrides) -> GemmaConfig:
    """A :class:`GemmaConfig` from a Hugging Face ``config.json`` dict (``overrides`` win).

    Accepts ``model_type`` ``"gemma2"``, ``"gemma3_text"`` and the multimodal ``"gemma3"`` (its
    ``text_config``; the vision tower is not modelled).

    Raises:
        ValueError: a field value this implementation does not compute (the message names the field):
            an activation other than tanh-GELU, ``attention_bias``, ``use_bidirectional_attention``, a
            RoPE type other than default/linear, an unknown layer type.
    """
    config = _text_config(config)
    model_type = config["model_type"]
    for field in ("hidden_activation", "hidden_act"):
        if config.get(field) is not None and config[field] not in _GELU_TANH:
            raise ValueError(
                f"{field}={config[field]!r} is not supported for {model_type}; Gemma uses the tanh "
                f"approximation of GELU ({', '.join(map(repr, _GELU_TANH))})."
            )
    for field in ("attention_bias", "use_bidirectional_attention"):
        if config.get(field):
            raise ValueError(f"{field}={config[field]!r} is not supported for {model_type}; set it to false.")
    theta, factor = _rope(config, "full_attention", model_type)
    local_theta, local_factor = theta, factor
    if model_type == "gemma3_text":
        local_theta, local_factor = _rope(config, "sliding_attention", model_type)
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    defaults = _HF_DEFAULTS[model_type]
    kw = dict(
        model_type=model_type,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        query_pre_attn_scalar=float(config.get("query_pre_attn_scalar", defaults["query_pre_attn_scalar"])),
        # Hugging Face's Gemma 3 does not soft-cap attention logits, whatever the config says.
        attn_logit_softcapping=(
            config.get("attn_logit_softcapping", defaults["attn_logit_softcapping"])
            if model_type == "gemma2"
            else None
        ),
        final_logit_softcapping=config.get("final_logit_softcapping", defaults["final_logit_softcapping"]),
        sliding_window=config.get("sliding_window", defaults["sliding_window"]),
        layer_types=tuple(config["layer_types"]) if config.get("layer_types") else None,
        sliding_window_pattern=config.get("sliding_window_pattern") or 6,
        rope_theta=theta,
        rope_scaling_factor=factor,
        rope_local_base_freq=local_theta,
        rope_local_scaling_factor=local_factor,
        max_position_embeddings=config.get("max_position_embeddings", defaults["max_position_embeddings"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
    )
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return GemmaConfig(**kw)


def _hf_names(cfg: GemmaConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Flax path (unstacked layout) -> (Hugging Face name, stored transposed) for every parameter."""
    names = {}
    for ours, (hf, leaf) in HF_TOP.items():
        if not (ours == "lm_head" and cfg.tie_word_embeddings):
            names.update(hf_leaf_names((ours,), hf, (leaf,)))
    for i in range(cfg.num_layers):
        layer, prefix = (f"layers_{i}",), HF_LAYER.format(i=i)
        for ours, hf in HF_PROJECTIONS.items():
            names.update(hf_leaf_names(layer + tuple(ours.split("/")), prefix + hf, ("kernel",)))
        norms = {**HF_NORMS, **(HF_QK_NORMS if cfg.qk_norm else {})}
        for ours, hf in norms.items():
            names.update(hf_leaf_names(layer + tuple(ours.split("/")), prefix + hf, ("scale",)))
    return names


def _flax_shape(cfg: GemmaConfig, path: tuple[str, ...]) -> tuple[int, ...]:
    """Shape of the parameter at ``path`` (unstacked layout)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    module = "/".join(path[1:-1]) if path[0].startswith("layers_") else path[0]
    if module.endswith("_norm") and module.startswith("attn/"):
        return (cfg.head_dim,)
    if module.endswith("norm"):
        return (d,)
    return {
        "embed": (v, d),
        "lm_head": (d, v),
        "attn/query": (d, q),
        "attn/key": (d, kv),
        "attn/value": (d, kv),
        "attn/out": (q, d),
        "mlp/gate": (d, f),
        "mlp/up": (d, f),
        "mlp/down": (f, d),
    }[module]


def _expected_hf_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape in PyTorch layout (``(out, in)`` weights) for every parameter."""
    out = {}
    for path, (hf, transposed) in _hf_names(cfg).items():
        shape = _flax_shape(cfg, path)
        out[hf] = shape[::-1] if transposed else shape
    return out


def _text_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A multimodal Gemma 3 state dict -> the text model's, under the text model's own names."""
    out = {}
    for name, x in tensors.items():
        if _MULTIMODAL_SKIP.fullmatch(name):
            continue
        for old, new in (*_MULTIMODAL_TEXT, _MULTIMODAL_HEAD):
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = x
    return out


def from_hf(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    *,
    scan_layers: bool = False,
    remat: bool | str = False,
    dtype: Any = None,
    param_dtype: Any = None,
) -> tuple[Gemma, dict]:
    """A Hugging Face Gemma 2 / Gemma 3 state dict -> ``(Gemma model, {"params": ...})``.

    Args:
      config: the ``config.json`` dict (``model_type`` ``gemma2``, ``gemma3_text`` or ``gemma3``; of a
        multimodal ``gemma3`` only the text model is read).
      tensors: name -> array in PyTorch layout (``(out, in)`` weights), or lazy tensors
        (:func:`lora_jax.models.weights.open_weights`) for sharded loading.
      scan_layers, remat, dtype: set on the :class:`GemmaConfig`; ``dtype`` is the compute dtype.
      param_dtype: dtype of the returned parameters (default float32).

    Raises:
      ValueError: an unsupported config field (see :func:`config_from_hf`), or a missing, unexpected or
        wrongly-shaped tensor (all of them listed at once, each with both shapes).
    """
    multimodal = config.get("model_type") == "gemma3"
    cfg = config_from_hf(config, scan_layers=scan_layers, remat=remat, dtype=dtype, param_dtype=param_dtype)
    if multimodal:
        tensors = _text_tensors(tensors)
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
        raise ValueError(
            f"{cfg.model_type} checkpoint does not fit its config.json (hidden_size={cfg.hidden_size}, "
            f"num_hidden_layers={cfg.num_layers}, head_dim={cfg.head_dim}):\n  " + "\n  ".join(problems)
        )

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
    return Gemma(cfg), {"params": params}


def to_hf(cfg: GemmaConfig, variables: Mapping) -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of :func:`from_hf`: ``(config.json dict, state dict of float32 numpy arrays)``.

    The config is a text model's (``gemma2`` or ``gemma3_text``) in transformers 5's layout.
    """
    params = dict(nn.meta.unbox(variables["params"]))  # fresh `init` output carries axis metadata
    if cfg.scan_layers:
        params = unstack_layers(params, cfg.num_layers)
    out: dict[str, np.ndarray] = {}
    for path, (name, transposed) in _hf_names(cfg).items():
        x = np.array(functools.reduce(lambda t, k: t[k], path, params), np.float32)
        out[name] = x.T if transposed else x

    def rope(theta, factor):
        if factor == 1.0:
            return {"rope_type": "default", "rope_theta": theta}
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}

    gemma2 = cfg.model_type == "gemma2"
    config = {
        "model_type": cfg.model_type,
        "architectures": ["Gemma2ForCausalLM" if gemma2 else "Gemma3ForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "rope_parameters": (
            rope(cfg.rope_theta, cfg.rope_scaling_factor)
            if gemma2
            else {
                "full_attention": rope(cfg.rope_theta, cfg.rope_scaling_factor),
                "sliding_attention": rope(cfg.rope_local_base_freq, cfg.rope_local_scaling_factor),
            }
        ),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
    }
    return config, out


def _family(model_type: str, hf_layer: str) -> ModelFamily:
    return ModelFamily(
        model_type=model_type,
        model_classes=(Gemma,),
        layers="layers",
        hf_layer=hf_layer,
        hf_projections=HF_PROJECTIONS,
        logical_axis_rules=LOGICAL_AXIS_RULES_DEFAULT,
        default_targets=DEFAULT_TARGETS,
        logical_partition_specs=logical_partition_specs,
        from_hf=from_hf,
        peft_task_type="CAUSAL_LM",
        scan_layers=True,
    )


FAMILY = _family("gemma2", HF_LAYER)
FAMILY_GEMMA3 = _family("gemma3_text", HF_LAYER)
# A multimodal Gemma 3 folder: its text model loads; PEFT names follow Gemma3ForConditionalGeneration.
FAMILY_GEMMA3_MULTIMODAL = _family("gemma3", "model.language_model.layers.{i}.")
