"""`QuantizedArray`: a frozen base weight stored as block-quantized codes, a registered pytree.

Its array leaves are the codes and the block scales (and, with double quantization, the scales' own
float32 log2 step and offset per 256 scales); its static metadata is what is needed to rebuild the
dense weight: shape, dtype, format, block size and block axis. With ``QuantSpec(outlier_rows=k)`` it also holds the k rows
(along the block axis) with the largest weights, exactly, and their indices. Because it is a pytree, a
params tree holding quantized leaves goes through ``jax.jit``, ``jax.device_put``, orbax and optax like
any other; `lj.wrap` sees a `QuantizedArray` leaf as one weight of ``shape`` and ``dtype`` and
dequantizes it at each use.

A stacked one (``(layers, in, out)`` quantized along ``in``) can be sliced along its leading axes by
tree functions (``jax.tree.map(lambda a: a[0], q)``, ``lax.scan`` over it, ``jax.vmap``): its shape
follows the codes' leading axes. Casting its parts (``jax.tree.map(lambda a: a.astype(...), q)``)
destroys the codes: dequantize with a ``dtype`` instead.

Example:
    >>> import jax.numpy as jnp
    >>> q = QuantizedArray.quantize(jnp.ones((128, 4)), "nf4", 64, 0, double_quant=False)
    >>> q.shape, q.codes.shape, q.scales.shape, q.nbytes     # 256 B of codes + 32 B of scales
    ((128, 4), (64, 4), (2, 4), 288)
    >>> q.dequantize().tolist()[0]
    [1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lora_jax import _explicit
from lora_jax.quant import codes as _codes

__all__ = [
    "QuantizedArray",
    "QuantMeta",
    "QuantLeaf",
    "is_quantized",
    "box_quantized",
    "dequantize_arrays",
    "encode_arrays",
]


@dataclasses.dataclass(frozen=True)
class QuantMeta:
    """The static part of a `QuantizedArray` (hashable: it is the pytree's aux data).

    Attributes:
        shape: the dense weight's shape ``S``.
        dtype: its dtype name (what `dequantize` gives back).
        format: ``"nf4"`` or ``"int8"``.
        block_size: elements per absmax block.
        axis: the block axis (non-negative).
    """

    shape: tuple[int, ...]
    dtype: str
    format: str
    block_size: int
    axis: int


_FIELDS = ("codes", "scales", "scale_scales", "scale_offset", "outlier_index", "outlier_values")


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
    """A weight of `shape` and `dtype` held as block-quantized codes (see `lora_jax.quant.codes`).

    Attributes:
        codes: ``S`` with the block axis halved (nf4, two codes per uint8) or ``S`` (int8).
        scales: ``S`` with the block axis divided by ``block_size``: float32 absmax per block, or their
            uint8 log-domain codes with double quantization (see `lora_jax.quant.codes`).
        scale_scales: with double quantization, the log2 step of the scale codes per block of 256 scales,
            ``(*S[:axis], ceil(n / 256))`` float32 (n the scales per leading index); else None.
        scale_offset: with double quantization, the log2 of the smallest positive scale per block of 256,
            ``(*S[:axis], ceil(n / 256))`` float32; else None.
        outlier_index: with outlier rows, ``(*S[:axis], k)`` int32, the rows kept exactly; else None.
        outlier_values: with outlier rows, ``S`` with ``S[axis] = k`` in W's dtype, those rows; else None.
        meta: the `QuantMeta` (shape, dtype, format, block_size, axis).
    """

    def __init__(
        self,
        codes,
        scales,
        scale_scales,
        scale_offset,
        meta: QuantMeta,
        outlier_index=None,
        outlier_values=None,
    ):
        self.codes, self.scales, self.scale_scales, self.scale_offset = (
            codes,
            scales,
            scale_scales,
            scale_offset,
        )
        self.outlier_index, self.outlier_values = outlier_index, outlier_values
        self.meta = meta

    # --- pytree ---
    def tree_flatten_with_keys(self):
        children = tuple((jax.tree_util.GetAttrKey(k), getattr(self, k)) for k in _FIELDS)
        return children, self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(*children[:4], _sliced_meta(meta, children[0]), *children[4:])

    # --- what a weight looks like ---
    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    @property
    def dtype(self):
        return jnp.dtype(self.meta.dtype)

    @property
    def ndim(self) -> int:
        return len(self.meta.shape)

    @property
    def format(self) -> str:
        return self.meta.format

    @property
    def double_quant(self) -> bool:
        return self.scale_scales is not None

    @property
    def outlier_rows(self) -> int:
        """Rows along the block axis kept exactly (0 without outlier rows)."""
        return 0 if self.outlier_index is None else int(self.outlier_index.shape[-1])

    @property
    def arrays(self) -> tuple:
        """``(codes, scales, scale_scales, scale_offset, outlier_index, outlier_values)``; the scale parts
        None without double quant, the outlier parts None without outlier rows."""
        return tuple(getattr(self, k) for k in _FIELDS)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (what the quantized weight takes in memory)."""
        return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in self.arrays if x is not None))

    def __repr__(self):
        m = self.meta
        dq = ", double_quant" if self.double_quant else ""
        dq += f", outlier_rows={self.outlier_rows}" if self.outlier_rows else ""
        return (
            f"QuantizedArray(shape={m.shape}, dtype={m.dtype}, format={m.format}, block_size={m.block_size}, "
            f"axis={m.axis}{dq})"
        )

    # --- conversions ---
    @classmethod
    def quantize(
        cls, w, fmt: str, block_size: int, axis: int, *, double_quant: bool, outlier_rows: int = 0
    ) -> QuantizedArray:
        """Quantize the float array `w` (shape and divisibility already checked by the caller)."""
        meta = QuantMeta(
            tuple(int(s) for s in w.shape), jnp.dtype(w.dtype).name, fmt, int(block_size), int(axis)
        )
        return cls.of_arrays(encode_arrays(w, fmt, block_size, axis, double_quant, outlier_rows), meta)

    @classmethod
    def of_arrays(cls, arrays: Sequence, meta: QuantMeta) -> QuantizedArray:
        """From the parts in the order of `arrays` (four, without outlier rows, or six) and the `QuantMeta`."""
        return cls(*arrays[:4], meta, *arrays[4:])

    def dequantize(self, dtype: Any = None):
        """The dense weight, in `dtype` (default: the original dtype)."""
        return dequantize_arrays(self.arrays, self.meta, dtype)


def _codes_shape(meta: QuantMeta) -> tuple[int, ...]:
    """The codes' shape for `meta`: W's, with the block axis halved for nf4."""
    s, ax = meta.shape, meta.axis
    return s[:ax] + ((s[ax] // 2 if meta.format == "nf4" else s[ax]),) + s[ax + 1 :]


def _sliced_meta(meta: QuantMeta, codes) -> QuantMeta:
    """`meta` with its leading (stacked) axes taken from `codes`, when they are what changed.

    A tree function that slices or stacks every part alike (``lax.scan`` over layers, ``vmap``,
    ``jax.tree.map(lambda a: a[0], q)``) changes the axes before the block axis: the codes then still end in
    the codes' axes from the block axis on, and the new leading axes are theirs. Anything else (no shape, a
    reduction, a cut through the block axis) leaves `meta` as it is; `dequantize` then says what is wrong.
    """
    shape = getattr(codes, "shape", None)
    if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
        return meta
    want = _codes_shape(meta)
    tail = want[meta.axis :]
    if shape == want or len(shape) < len(tail) or shape[len(shape) - len(tail) :] != tail:
        return meta
    lead = shape[: len(shape) - len(tail)]
    return dataclasses.replace(meta, shape=lead + meta.shape[meta.axis :], axis=len(lead))


def _check_parts(arrays: tuple, meta: QuantMeta) -> None:
    """Raises when the parts cannot be decoded with `meta` (cast or cut by a tree function)."""
    codes, scales, scale_scales = arrays[:3]
    want_codes = jnp.dtype(jnp.uint8 if meta.format == "nf4" else jnp.int8)
    want_scales = jnp.dtype(jnp.uint8) if scale_scales is not None else None
    found = jnp.dtype(codes.dtype), jnp.dtype(scales.dtype)
    if found[0] != want_codes or (want_scales is not None and found[1] != want_scales):
        raise TypeError(
            f"QuantizedArray(shape={meta.shape}, format={meta.format}): its codes are {found[0]} and its "
            f"scales {found[1]}, expected {want_codes} and {want_scales or 'float'}: the parts were cast "
            f"(e.g. by jax.tree.map(lambda a: a.astype(...), params)), which destroys the codes. Cast the "
            f"dense weights instead: lj.dequantize(params, dtype=...) or lj.merge(params, deltas, dtype=...), "
            f"or skip quantized leaves when casting (jax.tree.map(f, params, is_leaf=lj.quant.is_quantized) "
            f"with f returning a QuantizedArray unchanged)."
        )
    if tuple(codes.shape) != _codes_shape(meta):
        raise ValueError(
            f"QuantizedArray(shape={meta.shape}, format={meta.format}, axis={meta.axis}): its codes have shape "
            f"{tuple(codes.shape)}, expected {_codes_shape(meta)}. Only the axes before the block axis (stacked "
            f"layers) can be sliced or mapped over part by part (lax.scan, vmap, jax.tree.map(lambda a: a[i], "
            f"q)); for anything else dequantize first (lj.dequantize) and slice the dense weight."
        )


def encode_arrays(
    w, fmt: str, block_size: int, axis: int, double_quant: bool, outlier_rows: int = 0
) -> tuple:
    """The six parts of a `QuantizedArray` of `w` (see its attributes).

    On a mesh with Explicit axes each part is typed with W's sharding (the per-256 scale parameters and
    outlier indices with that of W's leading axes only; the k outlier rows unsplit along the block axis),
    computed with the axes in Auto mode.
    """

    def parts(w):
        if not outlier_rows:
            return (*_codes.encode(w, fmt, block_size, axis, double_quant=double_quant), None, None)
        rest, index, values = _codes.split_outliers(w, outlier_rows, axis)
        return (*_codes.encode(rest, fmt, block_size, axis, double_quant=double_quant), index, values)

    if _explicit.mesh_of(w) is None:
        return parts(w)
    spec = _explicit.spec_of(w)
    lead = PartitionSpec(*spec[:axis], None)
    dq = (lead, lead) if double_quant else (None, None)
    rows = (lead, PartitionSpec(*spec[:axis], None, *spec[axis + 1 :])) if outlier_rows else (None, None)
    return _explicit.auto(parts, w, out_specs=(spec, spec, *dq, *rows))


def dequantize_arrays(arrays: tuple, meta: QuantMeta, dtype: Any = None):
    """The dense weight from a `QuantizedArray`'s `arrays` and its `QuantMeta`."""
    _check_parts(arrays, meta)
    decode = functools.partial(
        _codes.decode,
        shape=meta.shape,
        dtype=meta.dtype if dtype is None else dtype,
        fmt=meta.format,
        block_size=meta.block_size,
        axis=meta.axis,
    )
    if _explicit.mesh_of(arrays[0]) is None:
        return decode(*arrays)
    # Explicit mesh axes: W is typed with its codes' sharding (they keep W's layout).
    return _explicit.auto(decode, *arrays, out_specs=_explicit.spec_of(arrays[0]))


def is_quantized(x) -> bool:
    """Whether `x` is a `QuantizedArray` (an ``is_leaf`` for tree functions that stop at them)."""
    return isinstance(x, QuantizedArray)


class QuantLeaf:
    """A `QuantizedArray` seen as one leaf (``shape``, ``dtype``), for walks that pair params with deltas.

    `QuantizedArray` is a pytree (its codes and scales are leaves), but `wrap`, `init` and `merge` pair
    each weight with one delta; `box_quantized` puts each quantized weight in this unregistered box first.
    """

    __slots__ = ("q",)

    def __init__(self, q: QuantizedArray):
        self.q = q

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def ndim(self) -> int:
        return self.q.ndim


def box_quantized(tree: Any) -> Any:
    """`tree` with every `QuantizedArray` boxed in a `QuantLeaf` (a leaf of the same shape and dtype)."""
    return jax.tree_util.tree_map(
        lambda x: QuantLeaf(x) if is_quantized(x) else x, tree, is_leaf=is_quantized
    )
