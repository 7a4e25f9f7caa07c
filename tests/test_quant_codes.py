"""Double quantization's log-domain scale codes, non-finite weights, sliced stacks and input checks.

The block scales of double quantization are 8-bit codes linear in log2(scale) per block of 256 scales
(`lora_jax.quant.codes`). References: a NumPy float64 coding written from that description (codes equal
but for rounding ties, decoded scales to 1e-6 relative), the scales without double quantization (each
decoded scale within ``2 ** (step / 2) - 1`` of it, plus 1e-6 for float32 rounding), and the weights
without double quantization (other blocks' error within 1% of theirs next to one huge weight).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.quant.codes import decode_scales


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def quantized(w, dq=True, fmt="nf4", **kw):
    return lj.quantize({"w": w}, lj.QuantSpec(format=fmt, double_quant=dq, targets="w", **kw))["w"]


def decoded_scales(q):
    return np.asarray(decode_scales(q.scales, q.scale_scales, q.scale_offset, q.meta.axis), np.float64)


def scale_codes_numpy(scales, axis):
    """The log-domain coding in float64: per 256 scales (flattened from `axis` on, per leading index),
    ``offset = log2(min positive)``, ``step = log2(max / min) / 253``, code ``round((log2 s - offset) /
    step) + 1``, 0 for a zero scale. Returns (codes, step, offset, decoded)."""
    s = np.asarray(scales, np.float64)
    lead = s.shape[:axis]
    flat = s.reshape(lead + (-1,))
    n = flat.shape[-1]
    m = -(-n // 256)
    blocks = np.pad(flat, [(0, 0)] * len(lead) + [(0, m * 256 - n)]).reshape(lead + (m, 256))
    pos = blocks > 0
    logs = np.log2(np.where(pos, blocks, 1.0))
    lo = np.where(pos.any(-1), np.min(np.where(pos, logs, np.inf), -1), 0.0)
    hi = np.where(pos.any(-1), np.max(np.where(pos, logs, -np.inf), -1), 0.0)
    step = (hi - lo) / 253
    k = np.round((logs - lo[..., None]) / np.where(step > 0, step, 1.0)[..., None])
    codes = np.where(pos, k + 1, 0)
    dec = np.where(codes > 0, 2.0 ** (lo[..., None] + (codes - 1) * step[..., None]), 0.0)
    cut = lambda x: x.reshape(lead + (m * 256,))[..., :n].reshape(s.shape)  # noqa: E731
    return cut(codes).astype(np.int64), step, lo, cut(dec)


def test_scale_codes_equal_a_numpy_reference():
    """Stacked heavy-tailed weights, 3 × 320 scales (a padded second block of 256), some blocks all zero."""
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(3, 512, 40)).astype(np.float32) * 0.02
    w[1, 64:128, 5] = 0.0  # one zero scale
    w[2] = 0.0  # a layer of zero scales: two second-level blocks without any positive scale
    w = jnp.asarray(w)
    q, plain = quantized(w), quantized(w, dq=False)
    codes, step, lo, dec = scale_codes_numpy(plain.scales, axis=1)
    assert q.scales.dtype == jnp.uint8 and q.scale_scales.shape == q.scale_offset.shape == (3, 2)
    got = np.asarray(q.scales, np.int64)
    assert np.abs(got - codes).max() <= 1 and np.mean(got != codes) < 1e-3  # ties may round either way
    np.testing.assert_allclose(q.scale_scales, step, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(q.scale_offset, lo, rtol=1e-6, atol=1e-6)
    same = got == codes
    np.testing.assert_allclose(decoded_scales(q)[same], dec[same], rtol=1e-6)
    assert got[1, 1, 5] == 0 and not got[2].any()


@pytest.mark.parametrize("factor", [None, 10.0, 100.0, 1000.0], ids=["gaussian", "10x", "100x", "1000x"])
def test_decoded_scales_keep_a_relative_error_bound(factor):
    """Each decoded scale within ``2 ** (step / 2) - 1`` of its float32 scale, none <= 0; measured: 0.160%
    (Gaussian), 0.53% / 1.00% / 1.46% with one block of 64 weights 10 / 100 / 1000× larger."""
    w = jax.random.normal(jax.random.key(0), (1024, 16))  # 256 scales: one second-level block
    if factor is not None:
        w = w.at[64:128, 3].multiply(factor)
    s0 = np.asarray(quantized(w, dq=False).scales, np.float64)
    s1 = decoded_scales(quantized(w))
    bound = 2 ** (np.log2(s0.max() / s0.min()) / 253 / 2) - 1
    rel = np.abs(s1 - s0) / s0
    assert s1.min() > 0 and rel.max() <= bound + 1e-6, (rel.max(), bound)
    assert bound < {None: 0.0017, 10.0: 0.0055, 100.0: 0.0101, 1000.0: 0.0147}[factor]


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_one_huge_weight_leaves_the_other_blocks_as_without_double_quant(fmt):
    """The reviewer's case: one weight 1000× the RMS (linear int8 scale codes made the other blocks' nf4
    error 15× larger, 133 of 256 scales <= 0). nf4: the other blocks' relative RMS error with double
    quantization is within 1% of theirs without. Both formats: within the scale bound ``δ`` (each decoded
    scale within a factor 1 ± δ), ``|d1 - w| <= |d0 - w| + δ·|d0|``. Measured, other blocks: nf4 0.0928
    -> 0.0931; int8 0.0060 -> 0.0093 (int8's own error is below the 1.5% scale error a 1000× spread
    allows; on Gaussian weights it is 0.00594 -> 0.00603)."""
    w = jax.random.normal(jax.random.key(0), (1024, 16)).at[5, 0].set(1000.0)
    others = np.ones(w.shape, bool)
    others[0:64, 0] = False
    ws = np.asarray(w, np.float64)[others]
    q0, q1 = quantized(w, dq=False, fmt=fmt), quantized(w, fmt=fmt)
    d0, d1 = (np.asarray(q.dequantize(), np.float64)[others] for q in (q0, q1))
    s0 = np.asarray(q0.scales, np.float64)
    delta = 2 ** (np.log2(s0.max() / s0.min()) / 253 / 2) - 1 + 1e-6
    norm = np.linalg.norm
    assert norm(d1 - ws) <= norm(d0 - ws) + delta * norm(d0)
    if fmt == "nf4":
        assert norm(d1 - ws) <= 1.01 * norm(d0 - ws), (norm(d0 - ws) / norm(ws), norm(d1 - ws) / norm(ws))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_all_zero_blocks_decode_to_exact_zero(fmt):
    decode = jax.jit(lambda q: q.dequantize())
    w = jnp.zeros((256, 8)).at[128:, :4].set(jax.random.normal(jax.random.key(1), (128, 4)))
    for dq in (False, True):
        d = np.asarray(decode(quantized(w, dq=dq, fmt=fmt)))
        assert not d[:128].any() and not d[:, 4:].any()
    assert not np.asarray(decode(quantized(jnp.zeros((64, 3)), fmt=fmt))).any()  # no positive scale


def test_kernels_keep_the_byte_budget():
    """nf4 + double quant, block 64, at SmolLM2-135M's kernel shapes: <= 0.13× float32 (from shapes)."""
    shapes = {"q": (30, 576, 576), "k": (30, 576, 192), "up": (30, 576, 1536), "down": (30, 1536, 576)}
    abstract = {k: {"kernel": jax.ShapeDtypeStruct(s, jnp.float32)} for k, s in shapes.items()}
    q = lj.quant.abstract_quantize(abstract, lj.QuantSpec())
    for k, s in shapes.items():
        ratio = q[k]["kernel"].nbytes / (np.prod(s) * 4)
        assert 0.128 < ratio <= 0.13, (k, ratio)


def test_abstract_shapes_of_the_parts():
    """`abstract_quantize` and `jax.eval_shape` give the parts `quantize` gives (shape and dtype)."""
    w = jax.random.normal(jax.random.key(0), (2, 128, 600))  # 1200 scales per layer: 5 blocks of 256
    spec = lj.QuantSpec(targets="w", outlier_rows=1)
    real = lj.quantize({"w": w}, spec)["w"]
    shaped = jax.ShapeDtypeStruct(w.shape, w.dtype)
    for q in (
        lj.quant.abstract_quantize({"w": shaped}, spec)["w"],
        jax.eval_shape(lambda p: lj.quantize(p, spec), {"w": shaped})["w"],
    ):
        assert q.meta == real.meta
        got = [None if x is None else (x.shape, x.dtype) for x in q.arrays]
        assert got == [(x.shape, x.dtype) for x in real.arrays]
    assert real.scale_offset.shape == real.scale_scales.shape == (2, 5)


# ---- non-finite weights --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_quantize_refuses_non_finite_values(bad):
    w = jax.random.normal(jax.random.key(0), (256, 4)).at[3, 0].set(bad).at[200, 3].set(bad)
    with pytest.raises(ValueError, match=r"w: 2 of its 1024 values are not finite.*QuantSpec\(exclude='w'\)"):
        quantized(w)
    with pytest.raises(ValueError, match=r"w: 2 of its 1024 values are not finite"):
        quantized(np.asarray(w))  # a NumPy leaf too
    with pytest.raises(ValueError, match=r"p/w: 4 of its 2048 values are not finite"):
        lj.quantize({"p": {"w": jnp.stack([w, w])}}, lj.QuantSpec(targets="p/w"))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_under_jit_a_non_finite_value_spoils_only_its_block(fmt):
    """Nothing can be raised under jit: the block holding NaN/inf decodes to NaN, the other 15 blocks of
    its 256 scales decode as they would without it (to the scale codes' relative error, 0.2%)."""
    w = jax.random.normal(jax.random.key(0), (256, 4))
    spec = lj.QuantSpec(format=fmt, targets="w")
    clean = np.asarray(lj.dequantize(lj.quantize({"w": w}, spec))["w"])
    for bad in (np.nan, np.inf):
        d = np.asarray(
            jax.jit(lambda p: lj.dequantize(lj.quantize(p, spec)))({"w": w.at[3, 0].set(bad)})["w"]
        )
        block = np.zeros(d.shape, bool)
        block[0:64, 0] = True
        assert np.isnan(d[block]).all() and np.isfinite(d[~block]).all()
        np.testing.assert_allclose(d[~block], clean[~block], rtol=2e-3, atol=0)


# ---- a stacked QuantizedArray sliced by tree functions ---------------------------------------------


def test_stacked_quantized_array_sliced_by_tree_functions():
    """lax.scan, vmap and tree.map slices of a (layers, in, out) QuantizedArray (double quant and outlier
    rows: every part) decode to the slices of its decoded weight (to float32 rounding, 1e-6); its shape
    follows the codes' leading axes. (Decoded under jit: eager decoding compiles op by op, slowly.)"""
    q = quantized(jax.random.normal(jax.random.key(0), (3, 128, 16)), outlier_rows=1)
    decode = jax.jit(lambda q: q.dequantize())
    dense = np.asarray(decode(q))
    scanned = jax.lax.scan(lambda c, layer: (c, layer.dequantize()), None, q)[1]
    np.testing.assert_allclose(scanned, dense, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.jit(jax.vmap(decode))(q), dense, rtol=1e-6, atol=1e-7)
    one = jax.tree.map(lambda a: a[1], q)  # eagerly
    assert one.shape == (128, 16) and one.meta.axis == 0
    np.testing.assert_allclose(decode(one), dense[1], rtol=1e-6, atol=1e-7)
    two = jax.jit(lambda q: jax.tree.map(lambda a: a[1:], q).dequantize())(q)  # under jit
    np.testing.assert_allclose(two, dense[1:], rtol=1e-6, atol=1e-7)
    again = jax.vmap(lambda layer: layer)(q)  # slices stacked back: the stacked meta again
    assert again.meta == q.meta
    assert jax.eval_shape(lambda q: jax.tree.map(lambda a: a[0], q), q).shape == (128, 16)


def test_a_cut_through_the_block_axis_says_to_dequantize_first():
    q = quantized(jax.random.normal(jax.random.key(0), (3, 128, 16)))
    cut = jax.tree.map(lambda a: a[:, :8], q)  # halves the codes' block axis, not a stacked axis
    with pytest.raises(
        ValueError, match=r"codes have shape \(3, 8, 16\), expected \(3, 64, 16\).*dequantize first"
    ):
        cut.dequantize()


# ---- small errors --------------------------------------------------------------------------------


def test_spec_and_input_errors():
    p = {"w": jnp.ones((64, 8))}
    with pytest.raises(
        TypeError, match=r"block_axis must be an int .* got \(1, 0\).*block_axis=\{'.*/qkv/kernel': 0"
    ):
        lj.QuantSpec(targets="w", block_axis=(1, 0))
    with pytest.raises(TypeError, match=r"block_axis must be an int .* got True"):
        lj.QuantSpec(block_axis=True)
    spec = lj.QuantSpec(block_axis={"w": 1})  # the normalised dict survives dataclasses.replace
    assert dataclasses.replace(spec, format="int8").axis_for("w") == 1
    with pytest.raises(
        ValueError,
        match=r"e: its block axis 0 has size 51, .*No even block size divides 51.*pad that axis to a multiple "
        r"of 64.*block_axis=.*QuantSpec\(exclude='e'\)",
    ):
        lj.quantize({"e": jnp.ones((51, 8))}, lj.QuantSpec(targets="e"))
    q = lj.quantize(p, lj.QuantSpec(targets="w"))
    cast = jax.tree.map(lambda a: a.astype(jnp.bfloat16), q)
    with pytest.raises(
        TypeError, match=r"codes are bfloat16 .* expected uint8 .*lj.dequantize\(params, dtype=\.\.\.\)"
    ):
        lj.dequantize(cast)
    assert lj.dequantize(q, jnp.bfloat16)["w"].dtype == jnp.bfloat16  # the way that works
    with pytest.raises(
        TypeError, match=r"w: lj.quantize needs arrays, found a jax.ShapeDtypeStruct.*abstract_quantize"
    ):
        lj.quantize({"w": jax.ShapeDtypeStruct((64, 8), jnp.float32)}, lj.QuantSpec(targets="w"))
