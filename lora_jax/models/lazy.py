"""Lazy checkpoint tensors: the Hugging Face -> Flax layout as index arithmetic, read block by block.

A family's ``from_hf`` turns a state dict into our parameters with a handful of operations: transpose
an ``nn.Linear`` weight ``(out, in) -> (in, out)``, cut a fused tensor along an axis (GPT-2's
``c_attn`` ``(D, 3D)`` into query/key/value), cast, and stack the layers ``(L, ...)`` for ``nn.scan``.
Given numpy arrays, the helpers :func:`as_source`, :func:`to_param` and :func:`stack` compute those
(the whole-model path). Given :class:`Lazy` tensors (``weights.open_weights``), the same code builds
*views*: nothing is read until :meth:`Lazy.read` asks for one block of the result, and the view maps
that block back to the rows and columns of its source tensors, so a device's shard of a parameter
reads only its own bytes from disk. For a stacked scan parameter ``(L, ...)`` only the layers in the
block are read; a transposed block reads the transposed block of the source.

Views: :class:`Transposed`, :class:`Sliced` (contiguous ranges, step 1), :class:`Stacked`,
:class:`Cast`. Leaves: :class:`SafetensorsTensor` (one named tensor of a ``.safetensors`` file, read
with ``safe_open(...).get_slice(name)[index]``; the file is opened per read, so no mapping of the
whole file stays resident) and :class:`ArrayTensor` (an array already in memory, e.g. a dequantized
GGUF tensor). A layout that needs more (splitting an axis into heads) adds a view here; none of the
current families does (kernels stay 2-D, ``(d, H·D)``).

Example:
    >>> import numpy as np
    >>> w = ArrayTensor(np.arange(12.0).reshape(3, 4))   # (out=3, in=4), as nn.Linear stores it
    >>> k = to_param(as_source(w).T, np.float32)          # our kernel (in=4, out=3), nothing read yet
    >>> k.shape, k.dtype
    ((4, 3), dtype('float32'))
    >>> k.read((slice(0, 2), slice(1, 3)))                # rows 1..2, cols 0..1 of the source
    array([[4., 8.],
           [5., 9.]], dtype=float32)
    >>> stack([k, k]).read((slice(1, 2), slice(None), slice(0, 1))).shape
    (1, 4, 1)
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ArrayTensor",
    "Cast",
    "Lazy",
    "SafetensorsTensor",
    "Sliced",
    "Stacked",
    "Transposed",
    "as_source",
    "stack",
    "to_param",
]

Bounds = tuple[tuple[int, int], ...]  # (start, stop) per axis


class Lazy:
    """A tensor described by where its values come from; :meth:`read` reads one block of it.

    Attributes:
        shape: the tensor's shape.
        dtype: its numpy dtype (``ml_dtypes.bfloat16`` for bfloat16).
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def T(self) -> Lazy:
        return self.transpose(*reversed(range(self.ndim)))

    def transpose(self, *axes: int) -> Lazy:
        """Axes permuted as ``np.transpose(x, axes)``."""
        return Transposed(self, tuple(axes))

    def astype(self, dtype: Any) -> Lazy:
        """Cast to ``dtype`` when read (``None``: unchanged)."""
        return self if dtype is None or np.dtype(dtype) == self.dtype else Cast(self, dtype)

    def __getitem__(self, key: Any) -> Lazy:
        """Basic slicing with contiguous ranges (``x[..., a:b]``, ``x[a:b, :]``); no integers or steps."""
        key = key if isinstance(key, tuple) else (key,)
        if key.count(Ellipsis) > 1 or not all(isinstance(k, slice) or k is Ellipsis for k in key):
            raise TypeError(f"lazy tensors take slices and at most one '...' only, got {key!r}.")
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        if len(key) != self.ndim:
            raise TypeError(f"{len(key)} indices for a tensor of shape {self.shape}.")
        bounds = []
        for k, n in zip(key, self.shape):
            start, stop, step = k.indices(n)
            if step != 1:
                raise TypeError(f"lazy tensors take contiguous slices only (step 1), got {k!r}.")
            bounds.append((start, max(start, stop)))
        return Sliced(self, tuple(bounds))

    def read(self, index: Sequence[slice] | None = None) -> np.ndarray:
        """The block ``self[index]`` as a numpy array, reading only what it needs.

        Args:
            index: one ``slice`` per axis (``jax.make_array_from_callback`` passes these), step 1;
                ``None``: the whole tensor.

        Returns:
            ``(stop - start for each axis)`` array of :attr:`dtype`.
        """
        if index is None:
            index = (slice(None),) * self.ndim
        if len(index) != self.ndim:
            raise ValueError(f"index {index!r} has {len(index)} entries for a tensor of shape {self.shape}.")
        bounds = []
        for s, n in zip(index, self.shape):
            start, stop, step = s.indices(n)
            if step != 1:
                raise ValueError(f"index {index!r}: only step-1 slices can be read.")
            bounds.append((start, max(start, stop)))
        return self._read(tuple(bounds))

    def _read(self, bounds: Bounds) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype.name})"


def _slices(bounds: Bounds) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in bounds)


def _read_slice(path: str | os.PathLike, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """``name[index]`` from the safetensors file at ``path``: the one place that reads tensor bytes."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            return f.get_slice(name)[index]
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{pathlib.Path(path).name}: cannot read tensor {name!r} ({e}).") from None


class SafetensorsTensor(Lazy):
    """Tensor ``name`` of the ``.safetensors`` file ``path``, of the given shape and dtype (from its header)."""

    def __init__(self, path: str | os.PathLike, name: str, shape: Sequence[int], dtype: Any):
        self.path, self.name = pathlib.Path(path), name
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)

    def _read(self, bounds: Bounds) -> np.ndarray:
        return _read_slice(self.path, self.name, _slices(bounds))

    def __repr__(self) -> str:
        return f"SafetensorsTensor({self.path.name}:{self.name}, shape={self.shape}, dtype={self.dtype.name})"


class ArrayTensor(Lazy):
    """An array already in host memory (e.g. a dequantized GGUF tensor), read by block."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)
        self.shape, self.dtype = self.array.shape, self.array.dtype

    def _read(self, bounds: Bounds) -> np.ndarray:
        return self.array[_slices(bounds)]


class Transposed(Lazy):
    """``np.transpose(base, axes)``: block ``index`` is the transposed block ``index[argsort(axes)]`` of ``base``."""

    def __init__(self, base: Lazy, axes: tuple[int, ...]):
        if sorted(axes) != list(range(base.ndim)):
            raise ValueError(f"axes {axes} do not permute the {base.ndim} axes of {base!r}.")
        self.base, self.axes = base, axes
        self.shape, self.dtype = tuple(base.shape[a] for a in axes), base.dtype

    def _read(self, bounds: Bounds) -> np.ndarray:
        base_bounds = [None] * self.ndim
        for i, a in enumerate(self.axes):
            base_bounds[a] = bounds[i]
        return self.base._read(tuple(base_bounds)).transpose(self.axes)


class Sliced(Lazy):
    """``base[a0:b0, a1:b1, ...]``: a block is the same block shifted by the starts."""

    def __init__(self, base: Lazy, bounds: Bounds):
        self.base, self.starts = base, tuple(a for a, _ in bounds)
        self.shape, self.dtype = tuple(b - a for a, b in bounds), base.dtype

    def _read(self, bounds: Bounds) -> np.ndarray:
        return self.base._read(tuple((s + a, s + b) for s, (a, b) in zip(self.starts, bounds)))


class Stacked(Lazy):
    """``np.stack(parts)`` ``(L, *part.shape)``: a block reads only the parts (layers) it covers."""

    def __init__(self, parts: Sequence[Lazy]):
        parts = tuple(parts)
        if not parts or any(p.shape != parts[0].shape or p.dtype != parts[0].dtype for p in parts):
            raise ValueError(f"cannot stack {parts!r}: need one or more tensors of one shape and dtype.")
        self.parts = parts
        self.shape, self.dtype = (len(parts),) + parts[0].shape, parts[0].dtype

    def _read(self, bounds: Bounds) -> np.ndarray:
        (lo, hi), rest = bounds[0], bounds[1:]
        out = np.empty((hi - lo,) + tuple(b - a for a, b in rest), self.dtype)
        for i in range(lo, hi):
            out[i - lo] = self.parts[i]._read(rest)
        return out


class Cast(Lazy):
    """``base.astype(dtype)``, block by block (a float32 checkpoint read as bfloat16 is never float32 whole)."""

    def __init__(self, base: Lazy, dtype: Any):
        self.base, self.shape, self.dtype = base, base.shape, np.dtype(dtype)

    def _read(self, bounds: Bounds) -> np.ndarray:
        return self.base._read(bounds).astype(self.dtype)


# --- what a family's from_hf calls, so that one code path serves arrays and lazy tensors ---------------


def as_source(x: Any) -> Any:
    """A state-dict entry to convert: a :class:`Lazy` tensor unchanged, anything else ``np.asarray(x)``."""
    return x if isinstance(x, Lazy) else np.asarray(x)


def to_param(x: Any, dtype: Any) -> Any:
    """The parameter leaf: ``jnp.asarray(x, dtype)`` for an array; for a :class:`Lazy` one, a view cast to ``dtype``."""
    if isinstance(x, Lazy):
        return x.astype(dtype)
    import jax.numpy as jnp

    return jnp.asarray(x, dtype)


def stack(xs: Sequence[Any]) -> Any:
    """``jnp.stack(xs)``, or a :class:`Stacked` view when the leaves are lazy (stacking layers for ``nn.scan``)."""
    if any(isinstance(x, Lazy) for x in xs):
        return Stacked([x if isinstance(x, Lazy) else ArrayTensor(x) for x in xs])
    import jax.numpy as jnp

    return jnp.stack(xs)
