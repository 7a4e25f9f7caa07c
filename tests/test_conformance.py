"""`wrap` on models written the way people write them: tied embeddings, remat'ed and reused layers, fused
gate kernels, flipped and grouped conv kernels, weight norm, spectral norm, weight standardisation,
split/padded/tiled kernels, (out, in) layouts; and strictness for every kind of tracked weight.

Each model is checked the same way (`conform`):
- values and gradients w.r.t. the deltas agree with ``fn(merge(params, deltas), ...)``: float32 values
  within 1e-5 of the LoRA effect's magnitude (``max |fn(merged) - fn(params)|``), gradients within 2e-4
  of the largest reference gradient;
- no `FallbackWarning` (every use has a factored rule) and ``wrap(strict=True)`` traces;
- no op of the differentiated step that depends on the deltas outputs an array of a targeted W's shape
  (no ``W + s·a·b``, no W-shaped gradient), and the merge-on-the-fly step does have one.
"""

import dataclasses
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import nonzero, sub_jaxprs

import lora_jax as lj

VALUE_TOL, GRAD_TOL = 1e-5, 2e-4


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def _max(x):
    return max(float(np.max(np.abs(np.asarray(v, np.float64)))) for v in jax.tree.leaves(x))


def _diff(x, y):
    return max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


def _tainted_w_shaped(jaxpr, tainted, w_shapes):
    """(primitive, shape) of every equation, at any depth, that depends on a tainted input and outputs
    an array of one of `w_shapes`."""
    bad, taint = [], set(tainted)
    for eqn in jaxpr.eqns:
        ins = [not isinstance(v, jax.extend.core.Literal) and v in taint for v in eqn.invars]
        if not any(ins):
            continue
        taint.update(eqn.outvars)
        bad += [
            (eqn.primitive.name, o.aval.shape)
            for o in eqn.outvars
            if tuple(getattr(o.aval, "shape", ())) in w_shapes
        ]
        for sub in sub_jaxprs(eqn.params):
            flags = (
                ins
                if len(sub.invars) == len(ins)
                else ins[1:]
                if len(sub.invars) == len(ins) - 1
                else [True] * len(sub.invars)
            )
            bad += _tainted_w_shaped(sub, [v for v, f in zip(sub.invars, flags) if f], w_shapes)
    return bad


def _traced_value_and_grad(f, deltas):
    """``f(d)`` and the gradient of ``Σ f(d)²`` w.r.t. the deltas, traced once (``jax.jit(...).trace``):
    returns the traced step (its jaxpr for the structural check), the compiled one and its results."""

    def run(d):
        out, pull = jax.vjp(f, d)
        return out, pull(jax.tree.map(lambda o: (2 * o.astype(jnp.float32)).astype(o.dtype), out))[0]

    traced = jax.jit(run).trace(deltas)
    compiled = traced.lower().compile()
    return traced, compiled, compiled(deltas)


def conform(fn, params, spec, args, *, deltas=None, init_fn=True, structural=True):
    """Check `wrap(fn)` against merged weights on values, gradients, fallbacks and structure.

    One trace and one compile per side: the forward and backward pass of ``Σ fn(...)²``, checked for
    W-shaped equations that depend on the deltas on the same jaxpr that is compiled and run.
    """
    if deltas is None:
        deltas = lj.init(jax.random.key(0), params, spec, **(dict(fn=fn, args=args) if init_fn else {}))
    deltas = nonzero(deltas)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)
        got_t, _, (got, gg) = _traced_value_and_grad(lambda d: lj.wrap(fn)(params, d, *args), deltas)
        jax.eval_shape(lambda d: lj.wrap(fn, strict=True)(params, d, *args), deltas)  # raises at trace time
    want_t, want_c, (want, gw) = _traced_value_and_grad(lambda d: fn(lj.merge(params, d), *args), deltas)
    zero_b = jax.tree.map(
        lambda d: dataclasses.replace(d, b=jnp.zeros_like(d.b)),
        deltas,
        is_leaf=lambda x: isinstance(x, lj.LoraDelta),
    )
    base = want_c(zero_b)[0]  # fn(params): a zero b merges to W
    effect = _diff(want, base)
    assert effect > 1e-3, effect  # the deltas do change the output
    assert _diff(got, want) <= VALUE_TOL * effect, (_diff(got, want), effect)
    assert _diff(gg, gw) <= GRAD_TOL * _max(gw), (_diff(gg, gw), _max(gw))
    if structural:
        w_shapes = {
            tuple(np.shape(w))
            for w, d in zip(
                jax.tree.leaves(params),
                jax.tree.leaves(deltas, is_leaf=lambda x: x is None or isinstance(x, lj.LoraDelta)),
            )
            if d is not None
        }
        n = len(jax.tree.leaves(deltas))
        jaxpr = got_t.jaxpr.jaxpr
        bad = _tainted_w_shaped(jaxpr, jaxpr.invars[:n], w_shapes)
        assert not bad, bad
        ref = want_t.jaxpr.jaxpr
        assert _tainted_w_shaped(ref, ref.invars[:n], w_shapes)  # the check can fail
    return deltas


# ---- tied embeddings -----------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """A Linen decoder LM whose logits use the input embedding (``Embed.attend``)."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(40, 16, name="embed")
        h = emb(ids)
        h = h + nn.Dense(16, name="mlp")(nn.gelu(nn.Dense(24, name="up")(h)))
        return emb.attend(nn.LayerNorm()(h))


IDS = jax.random.randint(jax.random.key(3), (3, 5), 0, 40)


def test_linen_tied_lm_inferred_axes():
    m = TiedLM()
    p = m.init(jax.random.key(0), IDS)
    spec = lj.LoraSpec(rank=3, targets=".*/(embedding|kernel)")
    d = conform(m.apply, p, spec, (IDS,))
    assert d["params"]["embed"]["embedding"].a.shape == (40, 3)  # rows are the lookup's inputs


def test_tied_embedding_explicit_axes_skip_inference():
    """Explicit axes are used as given (the fix the inference error suggests), and only what needs
    inferring is inferred: a kernel fn never contracts is fine when its axes are given."""
    m = TiedLM()
    p = m.init(jax.random.key(0), IDS)
    p["params"]["unused"] = {"kernel": jnp.ones((4, 5, 6))}
    spec = lj.LoraSpec(
        rank=3,
        targets=".*/(embedding|kernel)",
        axes={".*/embedding": lj.LoraAxes((), (0,), (1,)), ".*/unused/kernel": lj.LoraAxes((), (0,), (1, 2))},
    )
    d = lj.init(jax.random.key(0), p, spec, fn=m.apply, args=(IDS,))
    assert d["params"]["unused"]["kernel"].b.shape == (3, 5, 6)
    del p["params"]["unused"]
    del d["params"]["unused"]
    conform(m.apply, p, spec, (IDS,), deltas=d)


class EncDec(nn.Module):
    """An encoder-decoder sharing one embedding between encoder, decoder and output projection."""

    def setup(self):
        self.shared = nn.Embed(40, 16)
        self.enc = nn.DenseGeneral((2, 8), name="enc")  # (embed, heads, head_dim): inferred axes
        self.dec = nn.Dense(16, name="dec")
        self.cross = nn.DenseGeneral(16, axis=(-2, -1), name="cross")

    def __call__(self, src, tgt):
        mem = self.cross(jnp.tanh(self.enc(self.shared(src))))  # (b, s, 16)
        h = self.dec(self.shared(tgt)) + jnp.mean(mem, axis=1, keepdims=True)
        return self.shared.attend(h)


def test_encoder_decoder_shared_embedding():
    m = EncDec()
    tgt = IDS[:, :4]
    p = m.init(jax.random.key(0), IDS, tgt)
    d = conform(m.apply, p, lj.LoraSpec(rank=2, targets=".*/(embedding|kernel)"), (IDS, tgt))
    assert d["params"]["enc"]["kernel"].b.shape == (2, 2, 8)
    assert d["params"]["cross"]["kernel"].a.shape == (2, 8, 2)


class NNXTied(nnx.Module):
    """NNX: a layer run under nnx.remat and used again after it; logits through Embed.attend."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(40, 16, rngs=rngs)
        self.block = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = nnx.remat(lambda blk, h: jnp.tanh(blk(h)))(self.block, h)
        h = self.block(h)  # the same layer again, after the remat'ed call
        return self.embed.attend(h)


def test_nnx_remat_reused_layer_and_attend():
    model = NNXTied(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fn = lambda s, ids: nnx.merge(graphdef, s)(ids)  # noqa: E731
    conform(fn, state, lj.LoraSpec(rank=2, targets="(embed/embedding|block/kernel)/value"), (IDS,))


def test_weight_returned_through_checkpoint_is_carried():
    """A checkpoint that returns the weight: carried with its factors, used after it, no materialising."""

    def fn(p, x):
        y, w = jax.checkpoint(lambda w, x: (jnp.tanh(x @ w), w))(p["w"], x)
        return y @ w

    p = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
    x = jax.random.normal(jax.random.key(1), (3, 16))
    conform(fn, p, lj.LoraSpec(rank=2, targets="w"), (x,))


# ---- view-like ops: fused gates, flips, per-channel scales ----------------------------------------------


def test_lstm_fused_gates():
    m = nn.RNN(nn.OptimizedLSTMCell(12))
    x = jax.random.normal(jax.random.key(1), (3, 5, 6))
    p = m.init(jax.random.key(0), x)
    conform(m.apply, p, lj.LoraSpec(rank=2, targets=".*/kernel"), (x,))


def test_concatenate_along_input_axis_and_with_plain_kernel():
    """[x, h] @ concat([Wx; Wh]) (blocks on a's side) and concat with a kernel that is not adapted."""

    def fn(p, x, h):
        w_in = jnp.concatenate([p["wx"], p["wh"]], axis=0)  # (6 + 8, 8)
        w_out = jnp.concatenate([p["wq"], p["frozen"], p["wv"]], axis=1)  # (8, 24)
        return jnp.tanh(jnp.concatenate([x, h], -1) @ w_in) @ w_out

    k = jax.random.split(jax.random.key(0), 7)
    p = {
        "wx": jax.random.normal(k[0], (6, 8)),
        "wh": jax.random.normal(k[1], (8, 8)),
        "wq": jax.random.normal(k[2], (8, 8)),
        "frozen": jax.random.normal(k[3], (8, 8)),
        "wv": jax.random.normal(k[4], (8, 8)),
    }
    spec = lj.LoraSpec(rank=2, targets="wx|wh|wq|wv", rank_pattern={"wh": 3})
    conform(fn, p, spec, (jax.random.normal(k[5], (3, 6)), jax.random.normal(k[6], (3, 8))), init_fn=False)


def test_conv_transpose_flipped_kernel():
    m = nn.ConvTranspose(6, (3, 3), transpose_kernel=True, strides=(2, 2))
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 4))
    p = m.init(jax.random.key(0), x)
    d = conform(m.apply, p, lj.LoraSpec(rank=2, targets=".*/kernel"), (x,))
    assert d["params"]["kernel"].a.shape == (3, 3, 4, 2)  # kernel (kh, kw, out, in): inputs kh, kw, in


def test_flip_and_per_channel_scales():
    """jnp.flip of a kernel; a kernel scaled per output channel and per input channel (in any order)."""

    def fn(p, x):
        w = jnp.flip(p["w"], 0) * p["g_out"] / p["g_in"][:, None]
        return jnp.tanh(x @ w) @ (p["u"] * 2.0)

    k = jax.random.split(jax.random.key(0), 5)
    p = {
        "w": jax.random.normal(k[0], (8, 12)),
        "g_out": jax.random.normal(k[1], (12,)),
        "g_in": 1.5 + jax.random.uniform(k[2], (8,)),
        "u": jax.random.normal(k[3], (12, 4)),
    }
    conform(fn, p, lj.LoraSpec(rank=2, targets="w|u"), (jax.random.normal(k[4], (3, 8)),))


def test_weight_norm():
    """Linen WeightNorm: ‖W + s·a·b‖ per output channel from thin contractions, and g/‖V‖ applied to the
    layer's output, not to W: no fallback, and no W-shaped op in the differentiated step."""
    m = nn.Sequential([nn.WeightNorm(nn.Dense(12)), nn.gelu, nn.WeightNorm(nn.Dense(4))])
    x = jax.random.normal(jax.random.key(1), (3, 8))
    p = m.init(jax.random.key(0), x)
    conform(m.apply, p, lj.LoraSpec(rank=2, targets=".*/kernel"), (x,))


def test_weight_norm_conv():
    """WeightNorm(Conv) (norm over kh, kw, in per output feature) and a grouped one."""
    m = nn.Sequential(
        [
            nn.WeightNorm(nn.Conv(6, (3, 3))),
            nn.relu,
            nn.WeightNorm(nn.Conv(8, (3, 3), feature_group_count=2)),
        ]
    )
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 4))
    p = m.init(jax.random.key(0), x)
    conform(m.apply, p, lj.LoraSpec(rank=2, targets=".*/kernel"), (x,))


def test_raw_jax_weight_norm_and_spectral_norm():
    """Weight norm by hand (``v / ‖v‖ * g`` and ``g * v / sqrt(Σ v²)`` over the input axis) and Linen
    SpectralNorm (``W / σ``, σ from power iteration: dot uses of W, then a scalar scale)."""
    sn = nn.SpectralNorm(nn.Dense(6))

    def fn(p, x):
        v, u = p["v"], p["u"]
        h = jnp.tanh(x @ (v / jnp.linalg.norm(v, axis=0, keepdims=True) * p["g"]))
        h = h @ (p["gu"] * u / jnp.sqrt(jnp.sum(u**2, axis=0)))
        return sn.apply(p["sn"], h, update_stats=False)

    k = jax.random.split(jax.random.key(0), 5)
    p = {
        "v": jax.random.normal(k[0], (8, 12)),
        "g": jax.random.normal(k[1], (12,)),
        "u": jax.random.normal(k[2], (12, 5)),
        "gu": 1.0 + jax.random.uniform(k[3], (5,)),
        "sn": sn.init(k[4], jnp.ones((1, 5)), update_stats=False),
    }
    spec = lj.LoraSpec(rank=2, targets="v|u|sn/params/.*/kernel")
    conform(fn, p, spec, (jax.random.normal(k[4], (3, 8)),), init_fn=False)


def test_pending_scales_on_other_sides():
    """Scales the use moves to its input: a per-input-channel scale (x ⊙ c, then x·V), a per-output
    scale on a weight-tied ``attend`` (it contracts the output axis), a per-feature scale on an embedding
    lookup, a per-input-channel scale on a grouped conv (tiled over the groups), and scaled stacked
    layers run by ``lax.scan`` (a scale per layer and output channel)."""

    def fn(p, ids, img):
        e = p["emb"] / jnp.sqrt(jnp.sum(jnp.square(p["emb"]), axis=0))  # per-feature norm of (vocab, d)
        h = e[ids]  # (b, s, d)
        h = jax.checkpoint(lambda w, h: h @ w)(p["w"] * p["c_in"][:, None], h)  # per-input-channel scale
        ws = p["stack"] * p["c_stack"][:, None, :]  # (layers, d, d) scaled per layer and output channel
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, ws)
        logits = h @ e.T  # tied: contracts e's feature axis, along which its scale varies
        k = -(p["k"] * p["c_k"][None, None, :, None])  # (3, 3, in/G, out), per input channel
        conv = jax.lax.conv_general_dilated(
            img, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
        )
        return logits, conv

    k = jax.random.split(jax.random.key(0), 10)
    p = {
        "emb": jax.random.normal(k[0], (20, 8)),
        "w": jax.random.normal(k[1], (8, 8)) / 3,
        "c_in": 1.0 + jax.random.uniform(k[2], (8,)),
        "stack": jax.random.normal(k[3], (2, 8, 8)) / 3,
        "c_stack": 1.0 + jax.random.uniform(k[4], (2, 8)),
        "k": jax.random.normal(k[5], (3, 3, 2, 6)),
        "c_k": 1.0 + jax.random.uniform(k[6], (2,)),
    }
    ids = jax.random.randint(k[7], (2, 3), 0, 20)
    img = jax.random.normal(k[8], (2, 5, 5, 4))
    spec = lj.LoraSpec(
        rank=2,
        targets="emb|w|stack|k",
        axes={"stack": lj.LoraAxes((0,), (1,), (2,)), "k": lj.LoraAxes((), (0, 1, 2), (3,))},
    )
    conform(fn, p, spec, (ids, img), init_fn=False)


def test_scale_without_a_factored_use_warns_and_quantized_base_folds_it():
    """A scale along a conv kernel's spatial axes cannot leave the product: materialised, with a warning
    naming the conv (an error when strict). On a quantized base a per-channel scale is folded into the
    decoded W at its use, as before: no warning."""

    def conv(p, x):
        k = p["k"] * jnp.array([1.0, 2.0, 0.5])[:, None, None, None]  # varies along kh
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    p = {"k": jax.random.normal(jax.random.key(0), (3, 3, 4, 6))}
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 4))
    spec = lj.LoraSpec(rank=2, targets="k", axes={"k": lj.LoraAxes((), (0, 1, 2), (3,))})
    d = nonzero(lj.init(jax.random.key(2), p, spec))
    with pytest.warns(lj.FallbackWarning, match="k is used by primitive `conv_general_dilated`"):
        got = lj.wrap(conv)(p, d, x)
    np.testing.assert_allclose(got, conv(lj.merge(p, d), x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"strict=True\): k is used by primitive `conv_general_dilated`"):
        jax.eval_shape(lambda d: lj.wrap(conv, strict=True)(p, d, x), d)

    dense = {"w": jax.random.normal(jax.random.key(3), (64, 4)), "g": jnp.array([1.0, 2.0, 3.0, 4.0])}
    q = lj.quantize(dense, lj.QuantSpec(targets="w"))
    dq = nonzero(lj.init(jax.random.key(4), q, lj.LoraSpec(rank=2, targets="w")))
    f = lambda p, x: x @ (p["w"] * p["g"])  # noqa: E731
    xq = jax.random.normal(jax.random.key(5), (3, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)
        got = lj.wrap(f)(q, dq, xq)
    np.testing.assert_allclose(got, f(lj.merge(lj.dequantize(q), dq), xq), rtol=1e-4, atol=1e-4)


def test_weight_standardisation_and_other_views():
    """Weight standardisation of a conv kernel (BiT, NFNet: ``(W - mean) / std`` per output feature):
    the mean is ``Σ W + (Σ a)·b``, subtracting it adds one rank, the std comes from the sum of squares and
    divides the output. Also ``W + P`` (P a plain array), ``c - W``, ``stop_gradient(W)``, ``jnp.split``
    of a fused qkv kernel, ``jnp.tile`` and ``jnp.pad``."""

    def fn(p, x, img):
        k = p["k"]
        mu = jnp.mean(k, axis=(0, 1, 2), keepdims=True)
        k = (k - mu) / jnp.sqrt(jnp.var(k, axis=(0, 1, 2), keepdims=True) + 1e-5)
        y = jax.lax.conv_general_dilated(img, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jnp.tanh(x @ (p["w"] + p["pert"])) @ (0.5 - jax.lax.stop_gradient(p["u"]))
        q, kq, vq = jnp.split(p["qkv"], 3, axis=1)  # (8, 12) -> 3 x (8, 4)
        h = h + jnp.concatenate([x @ q, x @ kq], -1) * (x @ jnp.tile(vq, (1, 2)))
        return y, h + x @ p["u"] + x @ jnp.pad(p["small"], ((1, 1), (0, 2)), constant_values=0.5)

    k = jax.random.split(jax.random.key(0), 6)
    p = {
        "k": jax.random.normal(k[0], (3, 3, 4, 6)),
        "w": jax.random.normal(k[1], (8, 8)) / 3,
        "pert": jax.random.normal(k[2], (8, 8)) / 3,
        "u": jax.random.normal(k[3], (8, 8)) / 3,
        "qkv": jax.random.normal(k[4], (8, 12)) / 3,
        "small": jax.random.normal(k[5], (6, 6)) / 3,
    }
    args = (jax.random.normal(k[4], (3, 8)), jax.random.normal(k[5], (2, 5, 5, 4)))
    conform(fn, p, lj.LoraSpec(rank=2, targets="k|w|u|qkv|small"), args)


def test_masked_kernel_inference_looks_through_then_falls_back():
    """A kernel masked element-wise before a conv (a PixelCNN-style masked conv): init(fn=) infers the
    conv's axes through the mask; wrap materialises for the mask, with a warning."""

    def fn(p, x):
        mask = jnp.ones((3, 3, 4, 6)).at[2].set(0.0)
        return jax.lax.conv_general_dilated(
            x, p["w"] * mask, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    p = {"w": jax.random.normal(jax.random.key(0), (3, 3, 4, 6))}
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 4))
    d = nonzero(lj.init(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w"), fn=fn, args=(x,)))
    assert d["w"].a.shape == (3, 3, 4, 2)
    with pytest.warns(lj.FallbackWarning, match="`mul`"):
        got = lj.wrap(fn)(p, d, x)
    np.testing.assert_allclose(got, fn(lj.merge(p, d), x), rtol=1e-5, atol=1e-5)


# ---- grouped and depthwise convolutions ---------------------------------------------------------------


@pytest.mark.parametrize("groups,features", [(2, 8), (4, 8)], ids=["grouped", "depthwise"])
def test_grouped_and_depthwise_conv(groups, features):
    m = nn.Sequential(
        [
            nn.Conv(features, (3, 3), feature_group_count=groups),
            nn.relu,
            nn.Conv(10, (3, 3), feature_group_count=2),
        ]
    )
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    p = m.init(jax.random.key(0), x)
    conform(m.apply, p, lj.LoraSpec(rank=3, targets=".*/kernel"), (x,))


# ---- foreign (out, in) layouts -------------------------------------------------------------------------


class EqxMLP(eqx.Module):
    """An equinox MLP: eqx.nn.Linear stores its weight as (out, in) and computes ``W @ x``."""

    l1: eqx.nn.Linear
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(8, 12, key=k1)
        self.l2 = eqx.nn.Linear(12, 4, key=k2)

    def __call__(self, x):
        return self.l2(jax.nn.gelu(self.l1(x)))


def test_equinox_out_in_layout():
    model = EqxMLP(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)  # noqa: E731
    x = jax.random.normal(jax.random.key(1), (3, 8))
    spec = lj.LoraSpec(rank=2, targets=".*weight")
    with pytest.warns(UserWarning, match=r"l1/weight .*not as an \(in, out\) kernel"):
        d = conform(fn, params, spec, (x,))
    assert d.l1.weight.a.shape == (8, 2) and d.l1.weight.b.shape == (2, 12)  # a on the input side


def test_raw_jax_out_in_layout_without_fn_keeps_in_out():
    """Without fn there is nothing to infer from: 2-D kernels are (in, out), as documented."""
    p = {"w": jnp.ones((12, 8))}
    d = lj.init(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w"))
    assert d["w"].a.shape == (12, 2)


# ---- strictness: nothing is materialised without the warning --------------------------------------------


def test_every_materialisation_warns(monkeypatch):
    """`materialize` is the one caller of `dense`; every call of it warns (or raises when strict),
    including a weight returned by fn and one flowing into a loop carry."""
    calls = []
    for kind in (lj.transform.value.LoraValue, lj.transform.uses.SquareValue):  # see also the test below
        orig = kind.dense
        monkeypatch.setattr(kind, "dense", lambda self, orig=orig: calls.append(self.path) or orig(self))

    def fn(p, x):
        w = p["w"]
        y = x @ w + jnp.sum(jnp.sin(w))
        y, _ = jax.lax.scan(lambda c, _: (c @ w, None), y, length=2)  # w closed over: no materialising
        z = jax.lax.fori_loop(0, 2, lambda i, c: c + jnp.sum(c), w)  # w as a (scan) carry: materialised
        return y, z, w  # w returned: materialised

    p = {"w": jax.random.normal(jax.random.key(0), (4, 4))}
    d = nonzero(lj.init(jax.random.key(1), p, lj.LoraSpec(rank=2, targets="w")))
    x = jnp.ones((2, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = lj.wrap(fn)(p, d, x)
    msgs = {str(w.message).split("`")[1] for w in caught if issubclass(w.category, lj.FallbackWarning)}
    assert msgs == {"sin", "scan carry", "output of fn"}, msgs
    assert len(calls) == 3
    for g, w in zip(got, fn(lj.merge(p, d), x)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    for bad in (
        lambda p, x: jnp.sin(p["w"]),
        lambda p, x: p["w"],
        lambda p, x: jax.lax.fori_loop(0, 2, lambda i, c: c * 2.0, p["w"]),
    ):
        with pytest.raises(ValueError, match="strict=True"):
            lj.wrap(bad, strict=True)(p, d, x)
    assert _dense_calls_outside_dense() == [], "only interpreter.materialize may call .dense()"


def _dense_calls_outside_dense() -> list:
    """``.dense()`` calls in the transform package other than `interpreter.materialize` and a value kind's
    own ``dense`` (which may build on the value it wraps): any new module or value kind is covered."""
    import ast
    import inspect
    import pkgutil

    import lora_jax.transform as pkg

    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = __import__(f"lora_jax.transform.{info.name}", fromlist=["_"])
        tree = ast.parse(inspect.getsource(mod))

        def visit(node, fn_name, mod_name=info.name):
            for child in ast.iter_child_nodes(node):
                name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn_name
                if (
                    isinstance(child, ast.Call)
                    and isinstance(child.func, ast.Attribute)
                    and child.func.attr == "dense"
                    and name != "dense"
                    and (mod_name, name) != ("interpreter", "materialize")
                ):
                    found.append(f"{mod_name}.{name}: line {child.lineno}")
                visit(child, name)

        visit(tree, None)
    return found


def _kind_params(kind):
    """(params, deltas, view of p["w"] as fn sees it, the TrackedValue class fn's weight becomes)."""
    from lora_jax.transform import dora, quantized, scaled, value

    k = jax.random.split(jax.random.key(0), 3)
    p = {"w": jax.random.normal(k[0], (64, 4)), "c": 1.0 + jax.random.uniform(k[1], (4,))}
    spec = lj.LoraSpec(rank=2, targets="w", dora=kind == "dora")
    d = lj.init(k[2], p, spec)
    d = {"w": dataclasses.replace(d["w"], b=jax.random.normal(k[2], d["w"].b.shape)), "c": None}
    if kind == "quant":
        p = lj.quantize(p, lj.QuantSpec(targets="w"))
    view = {"scaled": lambda p: p["w"] * p["c"]}.get(kind, lambda p: p["w"])
    cls = {
        "lora": value.LoraValue,
        "scaled": scaled.ScaledValue,
        "dora": dora.DoraValue,
        "quant": quantized.QuantValue,
    }[kind]
    return p, d, view, cls


@pytest.mark.parametrize("kind", ["lora", "scaled", "dora", "quant"])
def test_strict_raises_for_every_value_kind(kind, monkeypatch):
    """For each kind of tracked weight: an op without a rule, a loop carry and a returned weight each
    materialise through the warning (and nothing else does), and ``strict=True`` raises for each."""
    p, d, view, cls = _kind_params(kind)
    calls = []
    orig = cls.dense
    monkeypatch.setattr(cls, "dense", lambda self: calls.append(self.path) or orig(self))

    def fn(p, x):
        w = view(p)
        y = x @ w + jnp.sum(jnp.sin(w))
        z = jax.lax.fori_loop(0, 2, lambda i, c: c * 2.0, w)
        return y, z, w

    x = jax.random.normal(jax.random.key(3), (2, 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = jax.jit(lambda d: lj.wrap(fn)(p, d, x))(d)
    msgs = sorted(str(w.message).split("`")[1] for w in caught if issubclass(w.category, lj.FallbackWarning))
    assert msgs == ["output of fn", "scan carry", "sin"], msgs
    assert len(calls) == 3, calls
    dense = lj.dequantize(p) if kind == "quant" else p
    for g, w in zip(got, fn(lj.merge(dense, d), x)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    for bad in (
        lambda p, x: jnp.sin(view(p)),
        lambda p, x: view(p),
        lambda p, x: jax.lax.fori_loop(0, 2, lambda i, c: c * 2.0, view(p)),
    ):
        with pytest.raises(ValueError, match=r"strict=True\): w is used by primitive"):
            lj.wrap(bad, strict=True)(p, d, x)


# ---- bfloat16 compute ------------------------------------------------------------------------------------


def test_bf16_low_rank_path_accumulates_in_f32():
    """In bfloat16, wrap is about as close to the float32 truth as the merged bfloat16 model (before the
    float32 accumulation it was ~2x further: the low-rank path was rounded between its two products)."""
    k = jax.random.split(jax.random.key(0), 3)
    p32 = {"w": jax.random.normal(k[0], (64, 64)) / 8}
    x32 = jax.random.normal(k[1], (32, 64))
    d = nonzero(lj.init(k[2], p32, lj.LoraSpec(rank=8, targets="w")))
    f = lambda p, x: x @ p["w"]  # noqa: E731
    truth = f(lj.merge(p32, d), x32)
    effect = float(jnp.max(jnp.abs(truth - f(p32, x32))))
    p16, x16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32), x32.astype(jnp.bfloat16)
    err = lambda y: float(jnp.max(jnp.abs(y.astype(jnp.float32) - truth))) / effect  # noqa: E731
    got = lj.wrap(f)(p16, d, x16)
    assert got.dtype == jnp.bfloat16
    assert err(got) <= 1.5 * err(f(lj.merge(p16, d), x16)), (err(got), err(f(lj.merge(p16, d), x16)))
