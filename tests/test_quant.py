"""QLoRA's quantized base: NF4/int8 codes, `lj.quantize` / `lj.dequantize`, `wrap` on quantized leaves.

Tolerances: `wrap(fn)(q, d, x)` against ``fn(merge(dequantize(q), d), x)`` (the same decoded weights,
summed in another order): 1e-5 relative to the largest reference magnitude for float32 values, 1e-4
for gradients. Round-trip errors on N(0, 1) data are stated bounds of the measured RMS error.
"""

import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Stack, all_eqns, nonzero, run_processes

import lora_jax as lj
from lora_jax import quant
from lora_jax.models import llama

# The NF4 levels as printed in the QLoRA paper (Dettmers et al. 2023, Appendix E).
PAPER_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))


# ---- the codes -------------------------------------------------------------------------------------


def test_nf4_levels_equal_the_papers_table():
    assert quant.NF4_LEVELS.dtype == np.float32 and quant.NF4_LEVELS.shape == (16,)
    np.testing.assert_allclose(quant.NF4_LEVELS, PAPER_NF4, rtol=0, atol=1e-7)
    assert quant.NF4_LEVELS[7] == 0.0  # an exact zero


# Measured RMS error of the round trip on N(0, 1), (1024, 512), block 64: nf4 0.0920 (0.0920 with double
# quantization), int8 0.00592 (0.00601; 0.00608 with the earlier linear int8 scale codes).
@pytest.mark.parametrize(
    "fmt,dq,bound",
    [("nf4", False, 0.095), ("nf4", True, 0.095), ("int8", False, 0.0062), ("int8", True, 0.0063)],
)
def test_round_trip_error_on_normal_data(fmt, dq, bound):
    w = jax.random.normal(jax.random.key(0), (1024, 512))
    q = lj.quantize({"w": w}, lj.QuantSpec(format=fmt, double_quant=dq, targets="w"))["w"]
    rms = float(jnp.sqrt(jnp.mean(jnp.square(q.dequantize() - w))))
    assert rms < bound, rms
    assert q.dequantize().dtype == jnp.float32
    bits = {
        ("nf4", False): 4.5,
        ("nf4", True): 4 + 8 / 64 + 64 / 64 / 256,
        ("int8", False): 8.5,
        ("int8", True): 8 + 8 / 64 + 64 / 64 / 256,
    }[fmt, dq]
    assert q.nbytes * 8 / w.size == pytest.approx(bits, abs=2e-3)


def nf4_numpy(w, block=64):
    """NF4 round trip of ``(..., in, out)`` from the paper, in NumPy float64: absmax per block of `block`
    input rows, each value the nearest printed level (argmin of the distance)."""
    w = np.asarray(w, np.float64)
    b = w.reshape(w.shape[:-2] + (w.shape[-2] // block, block, w.shape[-1]))
    absmax = np.abs(b).max(axis=-2, keepdims=True)
    x = b / np.where(absmax == 0, 1.0, absmax)
    levels = np.asarray(PAPER_NF4)
    return (levels[np.abs(x[..., None] - levels).argmin(-1)] * absmax).reshape(w.shape)


def _heavy_tailed(shape):
    """Student-t (3 dof) values: outliers like real weights, so block scales vary."""
    return jnp.asarray(np.random.default_rng(0).standard_t(3, size=shape).astype(np.float32) * 0.02)


def test_nf4_equals_a_numpy_reference_from_the_paper():
    """Same values as the NumPy reference (float64, argmin over the printed levels): at most 1e-3 of the
    codes differ (values within float32 rounding of a midpoint), RMS errors equal to 1e-5 relative."""
    w = _heavy_tailed((2, 256, 96))
    got = np.asarray(lj.dequantize(lj.quantize({"w": w}, lj.QuantSpec(double_quant=False, targets="w")))["w"])
    want = nf4_numpy(w)
    # A differing code moves a value by a level gap (>= 0.08 of its block's absmax); equal codes agree to
    # the < 1e-7 gap between our levels and the printed ones.
    close = np.isclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(w).max()))
    assert close.mean() > 1 - 1e-3, close.mean()
    rms = lambda a: float(np.sqrt(np.mean((a - np.asarray(w, np.float64)) ** 2)))  # noqa: E731
    assert rms(got) == pytest.approx(rms(want), rel=1e-5)


def test_rms_error_not_above_qwix_nf4():
    """Where qwix is installed: ours (block 64 along the input axis) <= qwix's nf4 with the same tiles."""
    qwix = pytest.importorskip("qwix")
    w = _heavy_tailed((256, 96))
    ours = lj.dequantize(lj.quantize({"w": w}, lj.QuantSpec(double_quant=False, targets="w")))["w"]
    theirs = qwix.dequantize(qwix.quantize(w, "nf4", channelwise_axes=(1,), tiled_axes={0: 64}))
    rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a - w))))  # noqa: E731
    assert rms(ours) <= rms(theirs) * (1 + 1e-6), (rms(ours), rms(theirs))


def test_exact_values_survive():
    """Block maxima, zeros and levels times the scale come back (to the < 1e-7 gap to the printed table)."""
    w = jnp.asarray(np.tile(np.array(PAPER_NF4, np.float32) * 3.0, (4, 2)).T)  # (32, 4), absmax 3 per block
    q = lj.quantize({"w": w}, lj.QuantSpec(block_size=16, double_quant=False, targets="w"))["w"]
    np.testing.assert_allclose(q.dequantize(), w, rtol=2e-6)
    z = lj.quantize({"w": jnp.zeros((64, 3))}, lj.QuantSpec(targets="w"))["w"]
    assert not np.any(np.asarray(z.dequantize()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_under_jit_is_bit_identical_and_keeps_dtype(dtype):
    params = {
        "a": {"kernel": jax.random.normal(jax.random.key(1), (3, 128, 32), dtype), "bias": jnp.zeros(32)}
    }
    spec = lj.QuantSpec(targets=".*/kernel")
    eager = lj.quantize(params, spec)
    jitted = jax.jit(lambda p: lj.quantize(p, spec))(params)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(x, y)
    q = eager["a"]["kernel"]
    assert q.codes.shape == (3, 64, 32) and q.codes.dtype == jnp.uint8  # block axis -2: the input axis
    assert q.scales.shape == (3, 2, 32) and q.scales.dtype == jnp.uint8  # log-domain scale codes
    assert q.scale_scales.shape == (3, 1) and q.scale_offset.shape == (3, 1)  # per 256 scales
    d = jax.jit(lj.dequantize)(eager)
    assert d["a"]["kernel"].dtype == dtype
    # (decoding may fuse into FMAs under jit: equal to a float rounding, not bit for bit)
    np.testing.assert_allclose(
        d["a"]["kernel"].astype(jnp.float32),
        lj.dequantize(eager)["a"]["kernel"].astype(jnp.float32),
        rtol=1e-6 if dtype == jnp.float32 else 1e-2,
    )


# ---- bad input ---------------------------------------------------------------------------------------


def test_bad_input_errors():
    params = {
        "dense": {"kernel": jnp.ones((100, 8)), "bias": jnp.zeros(8)},
        "ids": jnp.zeros((64, 4), jnp.int32),
    }
    with pytest.raises(TypeError, match=r"ids: only floating-point arrays can be quantized"):
        lj.quantize(params, lj.QuantSpec(targets="ids"))
    with pytest.raises(ValueError, match=r"dense/bias: quantized weights need at least 2 dims.*'/kernel'"):
        lj.quantize(params, lj.QuantSpec(targets="dense/.*"))
    with pytest.raises(ValueError, match=r"match no parameter.*Closest available paths: \['dense/kernel'"):
        lj.quantize(params, lj.QuantSpec(targets=".*/kernal"))
    with pytest.raises(
        ValueError,
        match=r"dense/kernel: its block axis 0 has size 100, not divisible by "
        r"QuantSpec.block_size=64.*divides 100 \(e.g. \[4, 2\]\).*block_axis",
    ):
        lj.quantize(params, lj.QuantSpec(targets=".*/kernel"))
    with pytest.raises(ValueError, match=r"QuantSpec.format='fp4' is not one of"):
        lj.QuantSpec(format="fp4")
    with pytest.raises(ValueError, match=r"block_size=63 must be an even int"):
        lj.QuantSpec(block_size=63)


# ---- wrap on quantized leaves ------------------------------------------------------------------------


def check(fn, params, qspec, lspec, args, *, init_fn=False, use_jit=True):
    """wrap(fn)(q, d, x) against fn(merge(dequantize(q), d), x): values and delta gradients; no fallback."""
    q = lj.quantize(params, qspec)
    d = lj.init(jax.random.key(0), q, lspec, **(dict(fn=fn, args=args) if init_fn else {}))
    d = nonzero(d)
    got_f = lambda d: lj.wrap(fn)(q, d, *args)  # noqa: E731
    want_f = lambda d: fn(lj.merge(lj.dequantize(q), d), *args)  # noqa: E731
    if use_jit:
        got_f, want_f = jax.jit(got_f), jax.jit(want_f)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)
        got = got_f(d)
        loss = lambda f: lambda d: jnp.mean(jnp.square(f(d)))  # noqa: E731
        gg = jax.grad(loss(got_f))(d)
    want = want_f(d)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    # And merge(q, d) itself dequantizes on the way.
    assert rel_err(fn(lj.merge(q, d), *args), want) < 1e-6
    gw = jax.grad(loss(want_f))(d)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(gg)[0], jax.tree.leaves(gw), strict=True):
        assert rel_err(g, w) < 1e-4, (jax.tree_util.keystr(path), rel_err(g, w))
    return q, d


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64, name="query")(x))
        x = nn.gelu(nn.Dense(32, name="key")(x))
        return nn.Dense(16, name="value")(x)


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_dense(use_jit, fmt):
    """LoRA on quantized leaves (query, value) and a quantized leaf without LoRA (key)."""
    m = MLP()
    x = jax.random.normal(jax.random.key(1), (4, 32))
    v = m.init(jax.random.key(0), x)
    check(
        m.apply,
        v,
        lj.QuantSpec(format=fmt, block_size=16, targets=".*/kernel"),
        lj.LoraSpec(rank=4, targets=".*/(query|value)/kernel"),
        (x,),
        use_jit=use_jit,
    )


class General(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((4, 8), axis=-1, name="qkv")(x)  # kernel (32, 4, 8)
        return nn.DenseGeneral(16, axis=(-2, -1), name="out")(jnp.tanh(h))  # kernel (4, 8, 16)


def test_dense_general():
    m = General()
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    v = m.init(jax.random.key(0), x)
    qspec = lj.QuantSpec(
        block_size=8, targets=".*/kernel", block_axis={".*/qkv/kernel": 0, ".*/out/kernel": 1}
    )
    check(m.apply, v, qspec, lj.LoraSpec(rank=3, targets=".*/kernel"), (x,), init_fn=True)


STACKED = lj.LoraAxes((0,), (1,), (2,))


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan+remat"])
def test_scan_stacked(remat):
    m = Stack(remat=remat)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    v = m.init(jax.random.key(0), x)
    q, _ = check(
        m.apply,
        v,
        lj.QuantSpec(block_size=16, targets=".*/kernel"),
        lj.LoraSpec(rank=3, targets=".*/query/kernel", axes={".*/kernel": STACKED}),
        (x,),
    )
    assert q["params"]["layers"]["query"]["kernel"].codes.shape == (3, 16, 32)


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(64, 32, name="embed")
        h = nn.Dense(32, name="query")(emb(ids))
        return emb.attend(h)


@pytest.mark.parametrize("block_axis", [-1, 0], ids=["rows-decoded", "table-decoded"])
def test_tied_embedding(block_axis):
    m = TiedLM()
    ids = jax.random.randint(jax.random.key(1), (3, 7), 0, 64)
    v = m.init(jax.random.key(0), ids)
    qspec = lj.QuantSpec(
        block_size=16, targets=".*/(embedding|kernel)", block_axis={".*/embedding": block_axis}
    )
    check(m.apply, v, qspec, lj.LoraSpec(rank=4, targets=".*/(embedding|kernel)"), (ids,))


def test_raw_jax_nested_jit_views_and_fallback():
    """Views (transpose, cast, slice) and nested jit reach the use; an elementwise use warns."""

    @jax.jit
    def layer(w, x):
        return x @ w.T.astype(jnp.float32)[:, :8]

    fn = lambda p, x: layer(p["w"], x)  # noqa: E731
    p = {"w": jax.random.normal(jax.random.key(0), (16, 32))}
    x = jax.random.normal(jax.random.key(1), (3, 32))
    q = lj.quantize(p, lj.QuantSpec(block_size=16, targets="w", block_axis=-1))
    d = nonzero(
        lj.init(
            jax.random.key(2), q, lj.LoraSpec(rank=2, targets="w", axes={"w": lj.LoraAxes((), (1,), (0,))})
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)
        got = lj.wrap(fn)(q, d, x)
    assert rel_err(got, fn(lj.merge(q, d), x)) < 1e-5
    with pytest.warns(lj.FallbackWarning, match=r"w is used by primitive `sin`"):
        out = lj.wrap(lambda p, x: x @ jnp.sin(p["w"]).T)(q, d, x)
    np.testing.assert_allclose(out, x @ jnp.sin(lj.merge(q, d)["w"]).T, rtol=1e-5, atol=1e-5)


def test_llama_generate_and_scan_remat_on_a_quantized_base():
    cfg = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
    )
    targets = r".*/(attn/(query|value)|mlp/(gate|down))/kernel"
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 64, jnp.int32)
    for scan in (False, True):
        with jax.numpy_dtype_promotion("standard"):  # the Llama model mixes int and bool masks
            _llama_case(cfg, targets, ids, scan)


def _llama_case(cfg, targets, ids, scan):
    if True:
        model = llama.Llama(llama.LlamaConfig(**cfg, scan_layers=scan, remat=scan))
        v = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids))
        # The inputs and the dense reference are each one jitted program (op by op, every small op compiles
        # on its own); `test_quantize_under_jit_is_bit_identical_and_keeps_dtype` covers jitted quantize.
        q = jax.jit(lj.quantize, static_argnums=1)(v, lj.QuantSpec(block_size=16))
        spec = lj.LoraSpec(rank=4, targets=targets, axes={targets: STACKED} if scan else {})
        d = jax.jit(nonzero)(lj.init(jax.random.key(2), q, spec))
        ref = jax.jit(lambda q, d: lj.merge(lj.dequantize(q), d))(q, d)
        with warnings.catch_warnings():
            warnings.simplefilter("error", lj.FallbackWarning)
            got = jax.jit(lj.wrap(model.apply))(q, d, ids)
            assert rel_err(got, jax.jit(model.apply)(ref, ids)) < 1e-5
            if not scan:
                wrapped = lj.wrap(model.apply)
                out = llama.generate(lambda v, *a, **k: wrapped(v, d, *a, **k), q, ids[:, :4], 5)
                np.testing.assert_array_equal(out, llama.generate(model.apply, ref, ids[:, :4], 5))


# ---- nothing W-shaped in the gradient step, and compiled memory -------------------------------------


def test_gradient_step_has_no_weight_shaped_dot_and_no_base_gradient():
    m = Stack(layers=2)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    v = m.init(jax.random.key(0), x)
    q = lj.quantize(v, lj.QuantSpec(block_size=16, targets=".*/kernel"))
    d = nonzero(
        lj.init(jax.random.key(0), q, lj.LoraSpec(rank=3, targets=".*/kernel", axes={".*/kernel": STACKED}))
    )
    loss = lambda d, p, x: jnp.mean(jnp.square(lj.wrap(m.apply)(p, d, x)))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(d, q, x).jaxpr
    w_shapes = {(2, 32, 32), (32, 32)}
    dots = [e for e in all_eqns(jaxpr) if e.primitive.name == "dot_general"]
    assert dots and not [e for e in dots if tuple(e.outvars[0].aval.shape) in w_shapes]
    ref = jax.value_and_grad(lambda d, p, x: jnp.mean(jnp.square(m.apply(lj.merge(lj.dequantize(p), d), x))))
    assert [
        e
        for e in all_eqns(jax.make_jaxpr(ref)(d, q, x).jaxpr)
        if e.primitive.name == "dot_general" and tuple(e.outvars[0].aval.shape) in w_shapes
    ]  # the check can fail
    # Differentiating w.r.t. the quantized base too: codes get no gradient (float0), scales a zero one.
    gq = jax.grad(loss, argnums=1, allow_int=True)(d, q, x)["params"]["layers"]["query"]["kernel"]
    assert gq.codes.dtype == jax.dtypes.float0 and not np.any(np.asarray(gq.scale_scales))


class Deep(nn.Module):
    layers: int = 6
    dim: int = 256

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = x + nn.Dense(self.dim, name=f"dense_{i}")(jnp.tanh(x))
        return x


def test_compiled_memory_of_the_qlora_step():
    """Arguments ≤ 0.3× plain LoRA's base; temporaries do not grow by a dense copy of every kernel.

    Measured (CPU, 6 kernels 256×256, batch 8×16, rank 8): base 1.57 MB dense; QLoRA nf4 arguments 0.22 MB
    (0.14× the dense base); temporaries grow by less than 2 dense kernels (0.26 MB) over plain LoRA's.
    """
    m = Deep()
    x = jax.random.normal(jax.random.key(1), (8, 16, 256))
    v = m.init(jax.random.key(0), x)
    spec = lj.LoraSpec(rank=8, targets=".*/kernel")
    q = lj.quantize(v, lj.QuantSpec(targets=".*/kernel"))
    d = lj.init(jax.random.key(0), v, spec)

    def step(d, p, x):
        return jax.grad(lambda d: jnp.mean(jnp.square(lj.wrap(m.apply)(p, d, x))))(d)

    def mem(p):
        return jax.jit(step).lower(d, p, x).compile().memory_analysis()

    lora, qlora = mem(v), mem(q)
    base = quant.base_bytes(v)
    kernel = 256 * 256 * 4
    assert qlora.argument_size_in_bytes <= 0.3 * base, (qlora.argument_size_in_bytes, base)
    growth = qlora.temp_size_in_bytes - lora.temp_size_in_bytes
    assert growth < 2 * kernel, (growth, lora.temp_size_in_bytes, qlora.temp_size_in_bytes)


# ---- merge, save / load ------------------------------------------------------------------------------


def test_merge_then_requantize():
    m = MLP()
    x = jax.random.normal(jax.random.key(1), (4, 32))
    v = m.init(jax.random.key(0), x)
    q = lj.quantize(v, lj.QuantSpec(block_size=16))
    d = nonzero(lj.init(jax.random.key(2), q, lj.LoraSpec(rank=4, targets=".*/kernel")))
    merged = lj.merge(q, d)
    assert not any(
        isinstance(x, lj.QuantizedArray) for x in jax.tree.leaves(merged, is_leaf=quant.is_quantized)
    )
    assert lj.merge(q, d, dtype=jnp.bfloat16)["params"]["key"]["kernel"].dtype == jnp.bfloat16
    q2 = lj.quantize(merged, lj.QuantSpec(block_size=16))
    assert rel_err(m.apply(lj.dequantize(q2), x), m.apply(merged, x)) < 0.25  # 4-bit noise through 3 layers


def test_save_load_round_trip_is_bit_exact(tmp_path):
    v = MLP().init(jax.random.key(0), jnp.ones((1, 32)))
    v = jax.tree.map(lambda t: t.astype(jnp.bfloat16), v)
    for fmt in ("nf4", "int8"):
        q = lj.quantize(v, lj.QuantSpec(format=fmt, block_size=16))
        f = quant.save(tmp_path / f"base-{fmt}", q, model="mlp")
        assert f.suffix == ".safetensors"
        for back in (quant.load(f, model="mlp", format=fmt), quant.load(f, like=v)):
            leaves = jax.tree_util.tree_flatten_with_path(back, is_leaf=quant.is_quantized)[0]
            want = jax.tree_util.tree_flatten_with_path(q, is_leaf=quant.is_quantized)[0]
            assert [p for p, _ in leaves] == [p for p, _ in want]
            for (_, a), (_, b) in zip(leaves, want):
                assert type(a) is type(b)
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                    assert x.dtype == y.dtype
                    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    f = tmp_path / "base-nf4.safetensors"
    with pytest.raises(ValueError, match=r"quantized as \['nf4'\], not 'int8'"):
        quant.load(f, format="int8")
    with pytest.raises(ValueError, match=r"holds a quantized base of model 'mlp', not 'smollm2-135m'"):
        quant.load(f, model="smollm2-135m")
    other = {"params": {"query": {"kernel": jnp.ones((32, 48))}}}
    with pytest.raises(
        ValueError, match=r"does not fit this model.*params/query/kernel: shape \(32, 64\) in the file"
    ):
        quant.load(f, like=other)
    adapter = lj.adapter.save_adapter(
        tmp_path / "ad",
        lj.init(jax.random.key(0), v, lj.LoraSpec(rank=2, targets=".*/kernel")),
        lj.LoraSpec(rank=2, targets=".*/kernel"),
        verbose=False,
    )
    with pytest.raises(ValueError, match=r"is not a quantized base written by lora_jax.quant.save"):
        quant.load(adapter)


# ---- 8 devices ---------------------------------------------------------------------------------------

_MESH_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import lora_jax as lj

    from jax.sharding import AxisType
    mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)  # the library's mesh kind
    w = jax.random.normal(jax.random.key(0), (256, 128))
    ws = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tp")))
    spec = lj.QuantSpec(targets="w")
    q = lj.quantize({"w": ws}, spec)["w"]
    assert q.codes.sharding.spec == P("fsdp", "tp"), q.codes.sharding
    assert q.scales.sharding.spec == P("fsdp", "tp"), q.scales.sharding
    ref = lj.quantize({"w": w}, spec)["w"]
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(ref)):  # codes equal; float32 parts to a rounding
        np.testing.assert_allclose(a, b, rtol=1e-6) if a.dtype == jnp.float32 else np.testing.assert_array_equal(a, b)
    qj = jax.jit(lambda p: lj.quantize(p, spec))({"w": ws})["w"]
    np.testing.assert_array_equal(qj.codes, ref.codes)
    dense = jax.jit(lj.dequantize)({"w": q})["w"]
    np.testing.assert_allclose(dense, ref.dequantize(), rtol=1e-6, atol=1e-6)
    assert dense.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tp")), 2), dense.sharding
    x = jax.random.normal(jax.random.key(1), (4, 256))
    d = lj.init(jax.random.key(2), {"w": w}, lj.LoraSpec(rank=2, targets="w"))
    f = lambda p, x: x @ p["w"]
    np.testing.assert_allclose(jax.jit(lj.wrap(f))({"w": q}, d, x), f(lj.merge({"w": ref}, d), x), rtol=1e-5, atol=1e-5)
    ospec = lj.QuantSpec(targets="w", outlier_rows=2)  # outlier rows: sharded like W but along the block axis
    qo = lj.quantize({"w": ws}, ospec)["w"]
    assert qo.outlier_values.sharding.spec == P(None, "tp"), qo.outlier_values.sharding
    ro = lj.quantize({"w": w}, ospec)["w"]
    np.testing.assert_array_equal(qo.outlier_index, ro.outlier_index)
    np.testing.assert_allclose(qo.dequantize(), ro.dequantize(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(lj.wrap(f))({"w": qo}, d, x), f(lj.merge({"w": ro}, d), x), rtol=1e-5, atol=1e-5)
    bad = jax.device_put(w, NamedSharding(mesh, P(("fsdp", "tp"), None)))
    try:
        lj.quantize({"w": bad}, spec)
    except ValueError as e:
        assert "w: its block axis 0 (size 256) is sharded over mesh axis ('fsdp', 'tp') (8 shards of 32)" in str(e), e
    else:
        raise AssertionError("no error")
    print("OK")
""")


def test_quantize_on_an_8_device_mesh():
    (out,) = run_processes([[sys.executable, "-c", _MESH_SCRIPT]], devices=8)
    assert "OK" in out
