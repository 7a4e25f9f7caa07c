"""Building blocks shared by the model families: LayerNorm, annotated Dense/Embed, attention, partition specs.

Every parameter carries logical axis names (``"embed"``, ``"heads"``, ``"mlp"``, ``"vocab"``, ...)
through ``nn.with_logical_partitioning``; each family maps them to mesh axes with its own rules
(``ModelFamily.logical_axis_rules``). A ``Dense`` kernel is ``(in, out)`` with axes ``(in_axis,
out_axis)``, its bias ``(out,)`` with ``(out_axis,)``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> ln = LayerNorm(1e-5)
    >>> variables = ln.init(jax.random.key(0), jnp.ones((2, 3, 8)))
    >>> ln.apply(variables, jnp.ones((2, 3, 8))).shape
    (2, 3, 8)
    >>> tuple(logical_partition_specs(ln, jnp.ones((1, 8)))["params"]["scale"])
    ('embed',)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ATTENTION", "LayerNorm", "attention", "dense", "embed", "logical_partition_specs"]

Axes = tuple[str | None, ...]


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with ``scale``/``bias`` params ``(D,)`` (logical axis ``"embed"``).

    Statistics in float32, output in ``dtype``. (Flax's ``nn.LayerNorm`` with a bfloat16 ``dtype``
    fails under ``jax_numpy_dtype_promotion="strict"``.)
    """

    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: (..., D)`` -> ``(..., D)`` in ``dtype``."""
        features = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            (features,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            (features,),
            self.param_dtype,
        )
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + jnp.asarray(self.epsilon, jnp.float32))
        y = y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (features,))
        y = y + bias.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (features,))
        return y.astype(self.dtype)


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    name: str,
    *,
    init: Callable,
    dtype: Any,
    param_dtype: Any,
    use_bias: bool = True,
) -> nn.Dense:
    """``nn.Dense``: kernel ``(in, features)`` with logical ``axes``, zero bias ``(features,)`` with ``axes[1:]``.

    Args:
        features: output width.
        axes: logical names of the kernel's ``(in, out)`` axes.
        name: the submodule name (a path component, e.g. ``"query"``).
        init: the kernel initializer (unannotated; the axes are added here).
        dtype, param_dtype: compute and parameter dtypes.
        use_bias: add a bias.
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
    )


def embed(
    num: int,
    features: int,
    axes: tuple[str | None, str | None],
    name: str,
    *,
    init: Callable,
    dtype: Any,
    param_dtype: Any,
) -> nn.Embed:
    """``nn.Embed`` with table ``(num, features)`` carrying the logical ``axes``."""
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        embedding_init=nn.with_logical_partitioning(init, axes),
    )


def logical_partition_specs(model: nn.Module, *example_inputs: Any) -> Any:
    """The logical-axis ``PartitionSpec`` of every variable of ``model`` (abstract init, no FLOPs).

    For ``nn.logical_to_mesh_sharding``; variables without annotations get ``PartitionSpec()``.

    Args:
        model: a Flax Linen module.
        *example_inputs: arguments of ``model.init`` after the key, e.g. ``jnp.zeros((1, 8), jnp.int32)``.
    """
    return nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), *example_inputs))


# ``attention(implementation=...)``: "auto" is cuDNN where it can run (a GPU backend, shapes and dtypes it
# accepts), else XLA. ``jax.nn.dot_product_attention(implementation=None)`` does not choose cuDNN by itself
# (jax 0.10: it "currently falls back to xla"), so the choice is made here.
ATTENTION = ("auto", "xla", "cudnn")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    valid: jax.Array | None = None,
    mask: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Grouped-query softmax attention by ``jax.nn.dot_product_attention``, masks in the kernel's own terms.

    The masks combine (a key is seen when every one allows it):

    - ``causal``: query slot ``i`` sees key slots ``j <= i`` (slots counted from 0 on both sides: self
      attention, ``T == S``, no cache);
    - ``window`` (with ``causal``): also ``j > i - window``, i.e. the query itself and the ``window - 1``
      slots before it;
    - ``valid``: ``(B, S)`` bool, the real tokens of a self-attention row (left, right or any padding);
    - ``mask``: ``(B, 1, T, S)`` bool, anything else (a KV cache, packed segments).

    The fused cuDNN kernel (a GPU) never stores the ``(B, H, T, S)`` scores. It gets ``causal`` and
    ``window`` as its own mask types; ``valid`` without a window as sequence lengths, after the real
    tokens of each row are moved to its front (order kept; exact for any padding, the identity for right
    padding) and the output moved back; an explicit ``mask`` (or ``valid`` with a window) as a bias. The
    XLA implementation (CPU, TPU, or what cuDNN refuses under ``"auto"``) computes float32 scores.

    What ``"auto"`` covers, and what not: on a GPU backend it calls cuDNN, and falls back to XLA only
    when jax refuses the call while tracing, which is where jax checks what cuDNN needs: 16-bit inputs
    (float16/bfloat16), a head dim that is a multiple of 8 and at most 128 (256 on Hopper and later),
    even sequence lengths with a bias in training, cuDNN being installed (``NotImplementedError``, or
    jax's ``"cuDNN is not detected"`` / ``"Unsupported dtype for inputs"``). A cuDNN failure after
    tracing (XLA's compile of the jitted step, a kernel cuDNN rejects at run time) is not caught and
    propagates, as does anything else (out of memory, a shape error): no silent retry with XLA. Set
    ``"xla"`` to avoid cuDNN. The cuDNN paths compile deviceless for an H200 (the planner's GPU target)
    but none has run on a GPU yet.

    A query that sees no key (a padding query under left padding) gets a finite output (an average of the
    values, or zeros) and a finite gradient, and never affects other rows.

    Args:
      q: ``(B, T, H, D)``; k, v: ``(B, S, K, D)`` with ``K`` dividing ``H`` (not repeated), one dtype.
      scale: multiplies ``q·k``; None = ``D ** -0.5``.
      causal, window, valid, mask: the masks above.
      implementation: ``"auto"``, ``"xla"`` or ``"cudnn"`` (a ``ValueError`` naming the fix where jax
        refuses cuDNN for these inputs or this backend).

    Returns:
      ``(B, T, H, D)`` in ``q``'s dtype (scores and softmax in float32 either way).

    Example:
        >>> q = jnp.ones((1, 4, 4, 8)); kv = jnp.ones((1, 4, 2, 8))
        >>> attention(q, kv, kv, window=2, valid=jnp.array([[False, True, True, True]])).shape
        (1, 4, 4, 8)
    """
    if implementation not in ATTENTION:
        raise ValueError(f"attention implementation={implementation!r}: expected one of {ATTENTION}.")
    if window is not None and (not causal or window < 1):
        raise ValueError(f"attention window={window} needs causal=True and window >= 1.")
    local = None if window is None else (window - 1, 0)
    # jax.nn's implementations promote bfloat16 with float32 inside: allowed here under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        if implementation == "cudnn" or (implementation == "auto" and jax.default_backend() == "gpu"):
            try:  # jax checks what cuDNN needs while tracing (see "What auto covers" above)
                if valid is not None and mask is None and window is None:
                    return _cudnn_compacted(q, k, v, valid, causal, scale)
                bias_mask = _combine(valid, mask)  # cuDNN takes it as a bias with the full (T, S) extent
                if bias_mask is not None:
                    bias_mask = jnp.broadcast_to(bias_mask, bias_mask.shape[:2] + (q.shape[1], k.shape[1]))
                return jax.nn.dot_product_attention(
                    q,
                    k,
                    v,
                    mask=bias_mask,
                    scale=scale,
                    is_causal=causal,
                    local_window_size=local,
                    implementation="cudnn",
                )
            except (NotImplementedError, ValueError, RuntimeError) as e:
                if not _is_cudnn_refusal(e):
                    raise
                if implementation == "cudnn":
                    raise ValueError(
                        f'attention="cudnn": cuDNN cannot run here ({type(e).__name__}: {e}). q {q.dtype} '
                        f"{tuple(q.shape)}, k/v {k.dtype} {tuple(k.shape)}, backend "
                        f"{jax.default_backend()!r}. cuDNN needs a GPU backend with cuDNN installed, "
                        "float16/bfloat16 inputs, a head dim that is a multiple of 8 and at most 128 (256 "
                        'on Hopper and later). Fix: attention="auto" (cuDNN where it runs, else XLA) or '
                        'attention="xla".'
                    ) from e
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=_combine(valid, mask),
            scale=scale,
            is_causal=causal,
            local_window_size=local,
            implementation="xla",
        )


# What jax raises while tracing a cuDNN call it cannot make (jax/_src/cudnn/fused_attention_stablehlo.py):
# NotImplementedError for the dtype, head dim, sequence lengths and GPU generation; RuntimeError when no cuDNN
# is installed; ValueError for a float32 mask turned into a bias (checked before the dtype).
_CUDNN_REFUSALS = ("cuDNN is not detected", "Unsupported dtype for inputs")


def _is_cudnn_refusal(e: Exception) -> bool:
    """Whether ``e`` is jax refusing a cuDNN attention call for these inputs or this backend."""
    return isinstance(e, NotImplementedError) or any(m in str(e) for m in _CUDNN_REFUSALS)


def _combine(valid: jax.Array | None, mask: jax.Array | None) -> jax.Array | None:
    if valid is None:
        return mask
    keys = valid.astype(bool)[:, None, None, :]  # (B, 1, 1, S)
    return keys if mask is None else mask & keys


def _cudnn_compacted(q, k, v, valid, causal, scale, implementation="cudnn"):
    """Self-attention over the real tokens only: each row's real tokens first (stable), sequence lengths."""
    valid = valid.astype(bool)
    order = jnp.argsort(~valid, axis=1, stable=True).astype(jnp.int32)  # (B, T): real slots first
    inverse = jnp.argsort(order, axis=1).astype(jnp.int32)
    lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
    q, k, v = (_permute(x, order, inverse) for x in (q, k, v))
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return _permute(out, inverse, order)


@jax.custom_vjp
def _permute(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x[b, order[b, t]]`` for ``x: (B, T, ...)``; its gradient is the inverse gather (no scatter)."""
    return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


def _permute_fwd(x, order, inverse):
    return _permute(x, order, inverse), (order, inverse)


def _permute_bwd(res, g):
    order, inverse = res
    return _permute(g, inverse, order), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)
