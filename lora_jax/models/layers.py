"""Building blocks shared by the model families: LayerNorm, annotated Dense/Embed, logical partition specs.

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

__all__ = ["LayerNorm", "dense", "embed", "logical_partition_specs"]

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
