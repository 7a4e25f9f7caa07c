"""GPT-2 in Flax Linen, with Hugging Face weight loading.

GPT-2 (Radford et al. 2019): learned token and position embeddings, pre-LN decoder blocks
``x = x + Attn(LN(x)); x = x + MLP(LN(x))`` with causal self-attention and a tanh-approximated GELU,
a final LayerNorm, and an LM head tied to the token embedding (``wte.attend``). Every projection is a
2-D ``nn.Dense`` kernel ``(in, out)`` with a bias; Hugging Face's fused ``c_attn`` (a Conv1D, already
``(in, 3*out)``) is split into separate query/key/value kernels::

    params/wte/embedding                                 (V, D)    (also the LM head)
    params/wpe/embedding                                 (P, D)
    params/layers_{i}/ln_1/{scale,bias}                  (D,)
    params/layers_{i}/attn/{query,key,value,out}/kernel  (D, D)    bias (D,)
    params/layers_{i}/ln_2/{scale,bias}                  (D,)
    params/layers_{i}/mlp/up/kernel                      (D, F)    bias (F,)
    params/layers_{i}/mlp/down/kernel                    (F, D)    bias (D,)
    params/ln_f/{scale,bias}                             (D,)

Logical axis names as in :mod:`lora_jax.models.bert` (``"vocab"``, ``"embed"``, ``"heads"``, ``"mlp"``),
mapped to mesh axes by :data:`LOGICAL_AXIS_RULES`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> config = GPT2Config(vocab_size=100, max_position_embeddings=16, hidden_size=32, num_layers=2, num_heads=4)
    >>> model, variables = init(jax.random.key(0), config)
    >>> logits = model.apply(variables, jnp.ones((2, 5), jnp.int32))
    >>> logits.shape, logits.dtype
    ((2, 5, 100), dtype('float32'))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import layers, lazy
from lora_jax.models.family import ModelFamily
from lora_jax.models.layers import LayerNorm
from lora_jax.models.weights import hf_leaf_names, param_shapes, strip_prefix

Array = jax.Array

_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")
ATTENTION = ("auto", "xla", "cudnn", "einsum")

# Logical axis name -> mesh axis (None = replicated). GPT-2's vocabulary (50257) is odd, so it is never
# split; the token table (also the LM head) is split along "embed".
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", None),
)
_BTD = ("activation_batch", "activation_length", "activation_embed")  # activations (B, T, D)

# LoRA targets when none are given: the attention query and value projections (as in the paper).
DEFAULT_TARGETS = r".*/attn/(query|value)/kernel"


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyper-parameters (defaults: GPT-2 small, 124M).

    ``intermediate_size=None`` means ``4 * hidden_size``. ``activation`` is ``"gelu_new"`` (tanh
    approximation, GPT-2's) or ``"gelu"`` (exact erf). ``dtype`` is the compute dtype, ``param_dtype``
    the storage dtype; LayerNorm statistics, softmax and the logits are float32.

    ``attention`` picks the attention kernel: ``"auto"``, ``"xla"`` or ``"cudnn"`` as in
    ``lora_jax.models.layers.attention`` (the decoders' one selection; cuDNN's flash attention never
    stores the ``(B, H, T, T)`` scores), or ``"einsum"`` (an explicit einsum-softmax-einsum, the
    reference form). Attention dropout (``dropout_rate > 0``, not deterministic) always takes the einsum
    path.
    """

    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int | None = None
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    dropout_rate: float = 0.0
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTION}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})."
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}; expected one of {_ACTIVATIONS}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **overrides) -> GPT2Config:
        """Reads a Hugging Face GPT-2 ``config.json`` dict."""
        kwargs = dict(
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("n_positions", 1024),
            hidden_size=config["n_embd"],
            num_layers=config["n_layer"],
            num_heads=config["n_head"],
            intermediate_size=config.get("n_inner"),
            layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
            activation=config.get("activation_function", "gelu_new"),
            initializer_range=config.get("initializer_range", 0.02),
        )
        if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
            raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not implemented.")
        kwargs.update(overrides)
        return cls(**kwargs)


def _init(config: GPT2Config, scale: float = 1.0):
    return nn.initializers.normal(config.initializer_range * scale)


def _dense(config: GPT2Config, features: int, axes, name: str, scale: float = 1.0) -> nn.Dense:
    return layers.dense(
        features, axes, name, init=_init(config, scale), dtype=config.dtype, param_dtype=config.param_dtype
    )


def _layer_norm(config: GPT2Config, name: str) -> LayerNorm:
    return LayerNorm(config.layer_norm_eps, config.dtype, config.param_dtype, name=name)


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention with separate ``query/key/value/out`` kernels ``(D, D)``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, deterministic: bool = True) -> Array:
        c = self.config
        batch, seq_len, _ = x.shape
        # Residual projections scaled by 1/sqrt(2 * num_layers) at init, as GPT-2.
        out_scale = 1.0 / math.sqrt(2 * c.num_layers)
        split = lambda y: y.reshape(batch, seq_len, c.num_heads, c.head_dim)
        q = split(_dense(c, c.hidden_size, ("embed", "heads"), "query")(x))
        k = split(_dense(c, c.hidden_size, ("embed", "heads"), "key")(x))
        v = split(_dense(c, c.hidden_size, ("embed", "heads"), "value")(x))
        if c.attention == "einsum" or (c.dropout_rate > 0 and not deterministic):
            mask = causal_mask(None, seq_len, batch) if mask is None else mask
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
            logits = logits / jnp.asarray(math.sqrt(c.head_dim), jnp.float32)
            logits = jnp.where(mask, logits, jnp.asarray(jnp.finfo(jnp.float32).min, jnp.float32))
            probs = jax.nn.softmax(logits, axis=-1)
            probs = nn.Dropout(c.dropout_rate)(probs, deterministic=deterministic)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        else:
            # None: plain causal attention; a padding mask (B, 1, T, T) already holds causality.
            out = layers.attention(q, k, v, causal=mask is None, mask=mask, implementation=c.attention)
        out = out.reshape(batch, seq_len, c.hidden_size)
        return _dense(c, c.hidden_size, ("heads", "embed"), "out", out_scale)(out)


class GPT2MLP(nn.Module):
    """``down(gelu(up(x)))``, kernels ``up: (D, F)``, ``down: (F, D)``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        h = _dense(c, c.mlp_size, ("embed", "mlp"), "up")(x)
        h = nn.gelu(h, approximate=c.activation != "gelu")
        return _dense(c, c.hidden_size, ("mlp", "embed"), "down", 1.0 / math.sqrt(2 * c.num_layers))(h)


class GPT2Block(nn.Module):
    """One pre-LN decoder block."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, deterministic: bool = True) -> Array:
        c = self.config
        drop = nn.Dropout(c.dropout_rate)
        x = x + drop(
            GPT2Attention(c, name="attn")(_layer_norm(c, "ln_1")(x), mask, deterministic),
            deterministic=deterministic,
        )
        x = nn.with_logical_constraint(x, _BTD)
        x = x + drop(GPT2MLP(c, name="mlp")(_layer_norm(c, "ln_2")(x)), deterministic=deterministic)
        return nn.with_logical_constraint(x, _BTD)


def causal_mask(attention_mask: Array | None, seq_len: int, batch: int) -> Array:
    """Boolean ``(B, 1, T, T)``: query ``q`` sees key ``k`` iff ``k <= q`` and ``attention_mask[b, k]``."""
    causal = jnp.tril(jnp.ones((seq_len, seq_len), jnp.bool_))[None, None]
    if attention_mask is None:
        return jnp.broadcast_to(causal, (batch, 1, seq_len, seq_len))
    return jnp.logical_and(causal, attention_mask.astype(jnp.bool_)[:, None, None, :])


class GPT2LMHeadModel(nn.Module):
    """GPT-2 language model: ``(input_ids (B, T), attention_mask (B, T) | None) -> logits (B, T, V)`` float32.

    Positions are ``0..T-1`` (use right padding); ``attention_mask`` (1 = token, 0 = padding) only
    hides padded keys. Pass ``deterministic=False`` and a ``"dropout"`` rng to enable dropout.
    """

    config: GPT2Config

    @nn.compact
    def __call__(
        self, input_ids: Array, attention_mask: Array | None = None, deterministic: bool = True
    ) -> Array:
        c = self.config
        batch, seq_len = input_ids.shape
        if seq_len > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings={c.max_position_embeddings}; "
                f"truncate the inputs."
            )
        wte = layers.embed(
            c.vocab_size,
            c.hidden_size,
            ("vocab", "embed"),
            "wte",
            init=_init(c),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
        )
        wpe = layers.embed(
            c.max_position_embeddings,
            c.hidden_size,
            (None, "embed"),
            "wpe",
            init=_init(c, 0.5),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
        )
        positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), input_ids.shape)
        x = nn.with_logical_constraint(wte(input_ids) + wpe(positions), _BTD)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        # None: plain causal attention (the kernel builds or skips the mask itself).
        mask = None if attention_mask is None else causal_mask(attention_mask, seq_len, batch)
        for i in range(c.num_layers):
            x = GPT2Block(c, name=f"layers_{i}")(x, mask, deterministic)
        x = nn.with_logical_constraint(_layer_norm(c, "ln_f")(x), _BTD)
        return nn.with_logical_constraint(wte.attend(x).astype(jnp.float32), _BTD[:2] + ("activation_vocab",))


def _example_inputs(seq_len: int = 8):
    return (jnp.zeros((1, seq_len), jnp.int32),)


def init(key: Array, config: GPT2Config) -> tuple[GPT2LMHeadModel, dict]:
    """A randomly initialised GPT-2: ``(model, variables)`` with plain (unboxed) arrays."""
    model = GPT2LMHeadModel(config)
    variables = jax.jit(model.init)(key, *_example_inputs())
    return model, nn.unbox(variables)


def logical_axes(model: GPT2LMHeadModel) -> Any:
    """Logical axis names of the variables, as a tree of ``jax.sharding.PartitionSpec``."""
    return layers.logical_partition_specs(model, *_example_inputs())


# --- Hugging Face weights ------------------------------------------------------------------------

# Hugging Face ``GPT2LMHeadModel`` names: the family's one table. Its layers are ``Conv1D`` (weights
# already ``(in, out)``) and the query/key/value projections are one fused ``c_attn`` ``(D, 3D)``.
HF_LAYER = "h.{i}."
HF_QKV = "attn.c_attn"  # split into attn/query, attn/key, attn/value (in that order)
HF_PROJECTIONS = {"attn/out": "attn.c_proj", "mlp/up": "mlp.c_fc", "mlp/down": "mlp.c_proj"}
HF_NORMS = {"ln_1": "ln_1", "ln_2": "ln_2"}
HF_TOP = {"wte": ("wte", ("embedding",)), "wpe": ("wpe", ("embedding",)), "ln_f": ("ln_f", ("scale", "bias"))}
_QKV = ("query", "key", "value")


def _hf_names(config: GPT2Config) -> dict[tuple[str, ...], str]:
    """Flax path -> HF name for every parameter but the fused query/key/value (see :data:`HF_QKV`)."""
    names = {}
    for ours, (hf, leaves) in HF_TOP.items():
        names.update(hf_leaf_names((ours,), hf, leaves, transpose_kernel=False))
    for i in range(config.num_layers):
        layer, prefix = (f"layers_{i}",), HF_LAYER.format(i=i)
        for ours, hf in HF_NORMS.items():
            names.update(
                hf_leaf_names(layer + (ours,), prefix + hf, ("scale", "bias"), transpose_kernel=False)
            )
        for ours, hf in HF_PROJECTIONS.items():
            names.update(
                hf_leaf_names(
                    layer + tuple(ours.split("/")), prefix + hf, ("kernel", "bias"), transpose_kernel=False
                )
            )
    return {path: hf for path, (hf, _) in names.items()}


def _check(
    name: str, value: np.ndarray, expected: tuple[int, ...], errors: list[str], flax_name: str
) -> bool:
    if tuple(value.shape) != tuple(expected):
        errors.append(
            f"tensor {name!r} (for {flax_name}): expected shape {tuple(expected)}, found {tuple(value.shape)}"
        )
        return False
    return True


def from_hf(
    config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], **overrides
) -> tuple[GPT2LMHeadModel, dict]:
    """A :class:`GPT2LMHeadModel` and its variables from a Hugging Face GPT-2 checkpoint.

    Args:
        config: the ``config.json`` dict.
        tensors: HF state-dict names -> arrays, with or without the ``transformer.`` prefix. Conv1D
            weights are already ``(in, out)``; ``c_attn`` ``(D, 3D)`` is split into query/key/value.
            ``lm_head.weight`` (tied to ``wte``) and the ``attn.bias``/``attn.masked_bias`` buffers are ignored.
            Lazy tensors (:func:`lora_jax.models.weights.open_weights`) give lazy views as leaves.
        **overrides: :class:`GPT2Config` fields to override (e.g. ``dtype=jnp.bfloat16``).

    Raises:
        ValueError: listing every missing, unexpected or misshapen tensor with expected and found shapes.
    """
    cfg = GPT2Config.from_hf(config, **overrides)
    model = GPT2LMHeadModel(cfg)
    tensors = strip_prefix(tensors, "transformer.")
    shapes = param_shapes(model, *_example_inputs())
    d = cfg.hidden_size
    # Flax path -> (HF name, converter from the HF array to the list of (flax path, array)).
    plan: dict[str, list[tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray], tuple[int, ...]]]] = {}

    for path, hf in _hf_names(cfg).items():
        plan[hf] = [(path, lambda a: a, shapes[path])]
    for i in range(cfg.num_layers):
        for kind, leaf in (("weight", "kernel"), ("bias", "bias")):
            plan[f"{HF_LAYER.format(i=i)}{HF_QKV}.{kind}"] = [
                (path, lambda a, j=j: a[..., j * d : (j + 1) * d], shapes[path])
                for j, path in enumerate((f"layers_{i}", "attn", proj, leaf) for proj in _QKV)
            ]

    errors, params = [], {}
    for hf, targets in plan.items():
        flax_names = ", ".join("params/" + "/".join(p) for p, _, _ in targets)
        if len(targets) == 1:
            expected = targets[0][2]
        else:  # fused q/k/v: (D, 3D) or (3D,)
            expected = targets[0][2][:-1] + (len(targets) * targets[0][2][-1],)
        if hf not in tensors:
            errors.append(f"missing tensor {hf!r} (for {flax_names}, shape {expected})")
            continue
        value = lazy.as_source(tensors[hf])  # an array, or a lazy tensor (sharded loading)
        if not _check(hf, value, expected, errors, flax_names):
            continue
        for path, convert, _ in targets:
            node = params
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = lazy.to_param(convert(value), cfg.param_dtype)
    ignored = lambda k: k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias"))
    unexpected = sorted(k for k in tensors if k not in plan and not ignored(k))
    if unexpected:
        errors.append(f"unexpected tensors {unexpected}")
    if errors:
        raise ValueError(
            "Hugging Face tensors do not match the GPT-2 config:\n  "
            + "\n  ".join(errors)
            + "\nCheck that config.json belongs to these weights."
        )
    return model, {"params": params}


FAMILY = ModelFamily(
    model_type="gpt2",
    model_classes=(GPT2LMHeadModel,),
    layers="layers",
    hf_layer=HF_LAYER,
    hf_projections=HF_PROJECTIONS,
    logical_axis_rules=LOGICAL_AXIS_RULES,
    default_targets=DEFAULT_TARGETS,
    logical_partition_specs=logical_axes,
    from_hf=from_hf,
    peft_task_type=None,  # PEFT adapts the fused Conv1D c_attn, which has no single counterpart here
)
