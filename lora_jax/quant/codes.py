"""Block-wise quantization of one array: NF4 and int8 codes, absmax scales, double quantization.

The arithmetic of QLoRA (Dettmers et al. 2023, arXiv:2305.14314), on plain arrays and static metadata:

- W is cut into blocks of ``block_size`` consecutive elements along one axis (the *block axis*, an
  input axis of the kernel), and each block is divided by its absolute maximum, its *scale*.
- **nf4**: each normalised value becomes the index of the nearest of 16 levels, the NormalFloat4 data
  type (quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0; the paper's Appendix E), and two
  4-bit indices are packed into one uint8 (the lower nibble holds the even element of the pair).
  **int8**: ``round(127 · value)`` as int8.
- **double quantization**: the float32 scales are coded again in 8 bits, in blocks of 256 scales with
  two float32 each: code ``c`` in 1..254 stands for ``2 ** (offset + (c - 1) * step)``, levels evenly
  spaced in log2 between the block's smallest positive scale (``offset`` = its log2) and its largest;
  code 0 is an exact 0 (an all-zero block of weights) and code 255 a non-finite scale (NaN or inf in W:
  that block of weights decodes to NaN, no other block is touched). That takes the scales from
  32/64 = 0.5 to 8/64 + 64/(64·256) ≈ 0.129 bits per parameter, as in the paper. The paper (section 3)
  centres the scales on their mean and codes them as dynamic 8-bit floats; these codes are linear in
  log2(scale) instead, so every scale's relative error is at most ``2 ** (step / 2) - 1`` with
  ``step = log2(max / min) / 253`` over its block of 256, whatever the spread: 0.16% for Gaussian
  weights in blocks of 64, 1.5% next to a block 1000× larger, never a sign flip. (Codes linear in the
  scale around a mean have an *absolute* error set by the largest scale: one huge weight, a "super
  weight" below, rounds the small scales of the 255 other blocks to a level or two, or below zero.)

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


_SCALE_STEPS = 253  # codes 1..254 span 253 steps of log2(scale); 0 is an exact 0, 255 a non-finite scale
_NONFINITE = 255
_TINY = float(np.finfo(np.float32).tiny)  # smaller scales are coded as 0 (CPUs flush them to 0 anyway)


def _scale_blocks(x, axis: int):
    """``x: S`` as ``(*S[:axis], m, 256)``: flattened from `axis` on, padded with zeros to m·256."""
    lead = _lead(x.shape, axis)
    flat = x.reshape(lead + (-1,))
    n = flat.shape[-1]
    m = -(-n // SCALE_BLOCK)
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, m * SCALE_BLOCK - n)])
    return flat.reshape(lead + (m, SCALE_BLOCK))


def _per_scale(x, shape, axis: int):
    """A per-256-block value ``x: (*S[:axis], m)`` repeated for each scale of ``shape``."""
    lead = _lead(shape, axis)
    n = int(np.prod(shape[axis:]))
    per = jnp.broadcast_to(x[..., None], x.shape + (SCALE_BLOCK,))
    return per.reshape(lead + (x.shape[-1] * SCALE_BLOCK,))[..., :n].reshape(shape)


def _encode_scales(scales, axis: int):
    """uint8 log-domain codes of the scales (their shape), float32 step and offset per 256 ``(lead, m)``."""
    blocks = _scale_blocks(scales, axis)
    finite = jnp.isfinite(blocks)
    pos = finite & (blocks >= _TINY)
    logs = jnp.log2(jnp.where(pos, blocks, 1.0))
    lo = jnp.min(jnp.where(pos, logs, jnp.inf), axis=-1)
    hi = jnp.max(jnp.where(pos, logs, -jnp.inf), axis=-1)
    any_pos = jnp.any(pos, axis=-1)
    lo = jnp.where(any_pos, lo, 0.0)
    step = jnp.where(any_pos, (hi - lo) / _SCALE_STEPS, 0.0)
    k = jnp.round((logs - lo[..., None]) / jnp.where(step > 0, step, 1.0)[..., None])
    k = jnp.clip(k, 0, _SCALE_STEPS) + 1
    q = jnp.where(pos, k, jnp.where(finite, 0, _NONFINITE)).astype(jnp.uint8)
    lead = _lead(scales.shape, axis)
    q = q.reshape(lead + (-1,))[..., : int(np.prod(scales.shape[axis:]))].reshape(scales.shape)
    return q, step, lo


def decode_scales(qscales, scale_scales, scale_offset, axis: int):
    """float32 block scales from their double-quantized form (inverse of the encoding above).

    Args:
        qscales: uint8 codes, the scales' shape ``T``.
        scale_scales: the log2 step per block of 256 scales, ``(*T[:axis], m)`` float32.
        scale_offset: the log2 of the smallest positive scale per block, ``(*T[:axis], m)`` float32.
        axis: the block axis.

    Returns:
        ``T`` float32: 0 where the code is 0, NaN where it is 255.
    """
    shape = qscales.shape
    step = _per_scale(scale_scales, shape, axis)
    off = _per_scale(scale_offset, shape, axis)
    s = jnp.exp2(off + (qscales.astype(jnp.float32) - 1.0) * step)
    return jnp.where(qscales == 0, 0.0, jnp.where(qscales == _NONFINITE, jnp.nan, s))


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
        ``S`` (int8); scales ``S`` with ``S[axis] / block_size`` (float32 absmax, or their uint8 log-domain
        codes with double_quant); with double_quant ``scale_scales`` (the log2 step) and ``scale_offset``
        (the log2 of the smallest positive scale), both ``(*S[:axis], ceil(n / 256))`` float32 (n the number
        of scales per leading index), else None and None. Non-finite values are not checked here (the
        caller does, outside a trace): they make their own block's scale NaN or inf, and with double_quant
        that block decodes to NaN while the other scales of its 256 keep their precision.
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
