"""Block-wise quantization of one array: NF4 and int8 codes, absmax scales, double quantization.

The arithmetic of QLoRA (Dettmers et al. 2023, arXiv:2305.14314), on plain arrays and static metadata:

- W is cut into blocks of ``block_size`` consecutive elements along one axis (the *block axis*, an
  input axis of the kernel), and each block is divided by its absolute maximum, its *scale*.
- **nf4**: each normalised value becomes the index of the nearest of 16 levels, the NormalFloat4 data
  type (quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0; the paper's Appendix E), and two
  4-bit indices are packed into one uint8 (the lower nibble holds the even element of the pair).
  **int8**: ``round(127 · value)`` as int8.
- **double quantization**: the float32 scales are centred on their mean and quantized again, to int8
  with one float32 absmax per block of 256 scales (section 3 of the paper), which takes the scales from
  32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits per parameter.

Every array keeps W's layout (the block axis shrunk by 2 for packed codes, by ``block_size`` for the
scales), so it can be sharded like W. The second-level blocks of 256 run over the scales flattened from
the block axis on; axes before the block axis (stacked layers) stay leading axes of every array, so a
``lax.scan`` over layers slices all of them alike.

- **outlier rows** (an option, off by default): the ``k`` slices along the block axis (input rows of a
  Dense kernel) holding the largest absolute values are kept exactly, in W's dtype, with their indices,
  and are zeroed before the blocks are quantized, so they neither lose precision nor inflate the block
  scales. These are the rows of the "super weights" (Yu et al. 2024, arXiv:2411.07191): a few huge
  weights in the MLP down projection whose input channels carry massive activations, so that any error
  in those rows is multiplied by activations hundreds of times larger than the others
  (``experiments/qlora.py --diagnose``). Like SpQR (Dettmers et al. 2023, arXiv:2306.03078) it keeps a
  small float side table, here whole rows chosen from the weights alone.

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.linspace(-1.0, 1.0, 256).reshape(128, 2)
    >>> parts = encode(w, "nf4", 64, 0, double_quant=False)
    >>> parts[0].shape, parts[0].dtype, parts[1].shape       # codes (64, 2) uint8, scales (2, 2)
    ((64, 2), dtype('uint8'), (2, 2))
    >>> back = decode(*parts, shape=(128, 2), dtype="float32", fmt="nf4", block_size=64, axis=0)
    >>> bool(jnp.abs(back - w).max() < 0.15)   # levels are up to 0.28 apart
    True
"""

from __future__ import annotations

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FORMATS",
    "NF4_LEVELS",
    "SCALE_BLOCK",
    "nf4_levels",
    "encode",
    "decode",
    "decode_scales",
    "nbits",
    "split_outliers",
    "put_outliers",
]

FORMATS = ("nf4", "int8")
SCALE_BLOCK = 256  # second-level block size of double quantization (the paper's)


def nf4_levels() -> np.ndarray:
    """The 16 NF4 levels, built as in the paper's reference code (bitsandbytes ``create_normal_map``).

    8 quantiles of N(0, 1) for the positive half and 7 for the negative half, at probabilities evenly
    spaced from ``0.9677083`` to 0.5 (float32, as the reference), plus an exact 0, divided by the largest.

    Returns:
        ``(16,)`` float32, ascending from -1 to 1.
    """
    offset = 0.9677083
    pos = np.linspace(np.float32(offset), 0.5, 9, dtype=np.float32)[:-1]
    neg = np.linspace(np.float32(offset), 0.5, 8, dtype=np.float32)[:-1]
    nd = NormalDist()
    v = np.sort([nd.inv_cdf(float(p)) for p in pos] + [0.0] + [-nd.inv_cdf(float(p)) for p in neg])
    return (v / v.max()).astype(np.float32)


NF4_LEVELS = nf4_levels()
_NF4_MIDPOINTS = ((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).astype(np.float32)


def nbits(fmt: str) -> int:
    """Bits per code of a format."""
    return 4 if fmt == "nf4" else 8


def _blocked(x, axis: int, block: int):
    """``x`` with its `axis` split into ``(size // block, block)``."""
    s = x.shape
    return x.reshape(s[:axis] + (s[axis] // block, block) + s[axis + 1 :])


def _lead(shape, axis: int) -> tuple[int, ...]:
    return tuple(shape[:axis])


def _encode_scales(scales, axis: int):
    """int8 codes of the scales (their shape), float32 absmax per 256 (lead, m), float32 mean (lead)."""
    lead = _lead(scales.shape, axis)
    flat = scales.reshape(lead + (-1,))
    n = flat.shape[-1]
    m = -(-n // SCALE_BLOCK)
    offset = jnp.mean(flat, axis=-1)
    centred = jnp.pad(flat - offset[..., None], [(0, 0)] * len(lead) + [(0, m * SCALE_BLOCK - n)])
    blocks = centred.reshape(lead + (m, SCALE_BLOCK))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    q = jnp.round(blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None] * 127.0)
    q = q.astype(jnp.int8).reshape(lead + (m * SCALE_BLOCK,))[..., :n].reshape(scales.shape)
    return q, absmax, offset


def decode_scales(qscales, scale_scales, scale_offset, axis: int):
    """float32 block scales from their double-quantized form (inverse of the encoding above)."""
    shape = qscales.shape
    lead = _lead(shape, axis)
    n = int(np.prod(shape[axis:]))
    m = scale_scales.shape[-1]
    per = jnp.broadcast_to(scale_scales[..., None], scale_scales.shape + (SCALE_BLOCK,))
    per = per.reshape(lead + (m * SCALE_BLOCK,))[..., :n].reshape(shape)
    off = scale_offset.reshape(lead + (1,) * (len(shape) - len(lead)))
    return qscales.astype(jnp.float32) * (per / 127.0) + off


def encode(w, fmt: str, block_size: int, axis: int, *, double_quant: bool) -> tuple:
    """Quantize `w` block-wise along `axis`.

    Args:
        w: a float array of shape ``S``; ``S[axis]`` must be divisible by `block_size` (checked by the
            caller, who knows the parameter's path).
        fmt: ``"nf4"`` or ``"int8"``.
        block_size: elements per block (even).
        axis: the block axis.
        double_quant: quantize the scales too.

    Returns:
        ``(codes, scales, scale_scales, scale_offset)``: codes ``S`` with ``S[axis] / 2`` (nf4, uint8) or
        ``S`` (int8); scales ``S`` with ``S[axis] / block_size`` (float32, or int8 with double_quant);
        with double_quant ``scale_scales: (*S[:axis], ceil(n / 256))`` and ``scale_offset: S[:axis]``
        float32 (n the number of scales per leading index), else None and None.
    """
    blocks = _blocked(w.astype(jnp.float32), axis, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=axis + 1)
    normed = blocks / jnp.expand_dims(jnp.where(absmax == 0, 1.0, absmax), axis + 1)
    normed = normed.reshape(w.shape)
    if fmt == "nf4":
        # The nearest level: how many midpoints between levels lie below the value (one fused loop).
        idx = sum((normed > float(m)).astype(jnp.uint8) for m in _NF4_MIDPOINTS)
        pairs = _blocked(idx, axis, 2)
        lo = jnp.take(pairs, 0, axis=axis + 1)
        hi = jnp.take(pairs, 1, axis=axis + 1)
        codes = lo | (hi << 4)
    else:
        codes = jnp.round(normed * 127.0).astype(jnp.int8)
    if not double_quant:
        return codes, absmax, None, None
    return (codes, *_encode_scales(absmax, axis))


def _rows(x, axis: int):
    """``x: S`` as ``(prod(S[:axis]), S[axis], prod(S[axis + 1:]))``."""
    s = x.shape
    return x.reshape((int(np.prod(s[:axis])), s[axis], int(np.prod(s[axis + 1 :]))))


def split_outliers(w, k: int, axis: int) -> tuple:
    """The `k` rows of `w` along `axis` with the largest absolute value, per leading index, taken out.

    Args:
        w: a float array of shape ``S``.
        k: rows kept (``0 < k <= S[axis]``).
        axis: the block axis; axes before it are leading (stacked) axes, each index choosing its own rows.

    Returns:
        ``(rest, index, values)``: `w` with those rows zeroed (``S``), their ascending indices
        ``(*S[:axis], k)`` int32, and the rows themselves ``S`` with ``S[axis] = k``, in `w`'s dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, 0.0], [0.0, -9.0], [2.0, 2.0], [0.5, 0.5]])
        >>> rest, index, values = split_outliers(w, 2, 0)
        >>> index.tolist(), values.tolist(), rest[1].tolist()
        ([1, 2], [[0.0, -9.0], [2.0, 2.0]], [0.0, 0.0])
    """
    m = _rows(w, axis)
    score = jnp.max(jnp.abs(m.astype(jnp.float32)), axis=2)
    index = jnp.sort(jax.lax.top_k(score, k)[1], axis=1).astype(jnp.int32)
    values = jnp.take_along_axis(m, index[:, :, None], axis=1)
    rest = jax.vmap(lambda mi, ii: mi.at[ii].set(0))(m, index)
    s = w.shape
    return (
        rest.reshape(s),
        index.reshape(s[:axis] + (k,)),
        values.reshape(s[:axis] + (k,) + s[axis + 1 :]),
    )


def put_outliers(w, index, values, axis: int):
    """`w` (``S``) with the rows `index` (``(*S[:axis], k)``) along `axis` set to `values` (inverse of the above)."""
    m, v = _rows(w, axis), _rows(values.astype(w.dtype), axis)
    out = jax.vmap(lambda mi, ii, vi: mi.at[ii].set(vi))(m, index.reshape(m.shape[0], -1), v)
    return out.reshape(w.shape)


def decode(
    codes,
    scales,
    scale_scales,
    scale_offset,
    outlier_index=None,
    outlier_values=None,
    *,
    shape,
    dtype,
    fmt: str,
    block_size: int,
    axis: int,
):
    """The dense array (``shape``, ``dtype``) from the parts `encode` (and `split_outliers`) returned."""
    shape = tuple(shape)
    if scale_scales is not None:
        scales = decode_scales(scales, scale_scales, scale_offset, axis)
    if fmt == "nf4":
        idx = jnp.stack([codes & 0xF, codes >> 4], axis=axis + 1).reshape(shape)
        vals = jnp.take(jnp.asarray(NF4_LEVELS), idx.astype(jnp.int32), axis=0, mode="clip")
    else:
        vals = codes.astype(jnp.float32) * (1.0 / 127.0)
    w = (_blocked(vals, axis, block_size) * jnp.expand_dims(scales, axis + 1)).reshape(shape)
    if outlier_index is not None:
        w = put_outliers(w, outlier_index, outlier_values, axis)
    return w.astype(dtype)
