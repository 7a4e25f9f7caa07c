"""`wrap(fn)(p, d, x) == fn(merge(p, d), x)`: values and delta gradients on many kinds of models.

Tolerances: relative to the largest reference magnitude, 2e-5 in float32 (the factored and merged
computations sum in different orders) and 3e-2 in bfloat16 (one bf16 rounding of W + s·a·b in the merged
reference versus bf16 low-rank products in the factored one).
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import Stack, all_eqns, nonzero

import lora_jax as lj

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))


def check(fn, params, spec, args, *, dtype=jnp.float32, use_jit=True, init_fn=None, grads=True):
    """Compare wrap against merge on values and on gradients w.r.t. the deltas."""
    deltas = lj.init(
        jax.random.key(0), params, spec, **({} if init_fn is None else dict(fn=init_fn, args=args))
    )
    deltas = nonzero(deltas)
    wrapped = lj.wrap(fn)
    got_f = lambda d: wrapped(params, d, *args)
    want_f = lambda d: fn(lj.merge(params, d), *args)
    if use_jit:
        got_f, want_f = jax.jit(got_f), jax.jit(want_f)
    got, want = got_f(deltas), want_f(deltas)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < TOL[dtype], rel_err(g, w)
    if grads:
        loss = lambda f: (
            lambda d: sum(jnp.sum(jnp.square(o.astype(jnp.float32))) for o in jax.tree.leaves(f(d)))
        )
        gg = jax.grad(loss(got_f))(deltas)
        gw = jax.grad(loss(want_f))(deltas)
        for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(gg)[0], jax.tree.leaves(gw)):
            assert rel_err(g, w) < 5 * TOL[dtype], (jax.tree_util.keystr(path), rel_err(g, w))
    return deltas


both = pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
dtypes = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])


# ---- models -----------------------------------------------------------------------------------------


class MLP(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, name="query", dtype=self.dtype, param_dtype=self.dtype)(x)
        x = nn.gelu(x)
        return nn.Dense(8, name="value", dtype=self.dtype, param_dtype=self.dtype)(x)


@both
@dtypes
def test_linen_mlp(use_jit, dtype):
    m = MLP(dtype)
    x = jax.random.normal(jax.random.key(1), (4, 5, 16), dtype)
    v = m.init(jax.random.key(0), x)
    check(m.apply, v, lj.LoraSpec(rank=4, targets=".*/kernel"), (x,), dtype=dtype, use_jit=use_jit)


def test_f32_params_bf16_compute():
    """Flax's dtype= casts the f32 kernel to bf16 before the matmul: the cast is a view op."""
    m = MLP(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (4, 16), jnp.bfloat16)
    v = m.init(jax.random.key(0), x)
    v = jax.tree.map(lambda t: t.astype(jnp.float32), v)
    check(m.apply, v, lj.LoraSpec(rank=4, targets=".*/kernel"), (x,), dtype=jnp.bfloat16)


class Attention(nn.Module):
    """Multi-head attention with DenseGeneral kernels (embed, heads, head_dim) and (heads, head_dim, embed)."""

    heads: int = 4
    head_dim: int = 8

    @nn.compact
    def __call__(self, x):
        proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), name=name)(x)
        q, k, v = proj("query"), proj("key"), proj("value")
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim).astype(np.float32))
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


@both
def test_dense_general_attention_inferred_axes(use_jit):
    m = Attention()
    x = jax.random.normal(jax.random.key(1), (2, 6, 24))
    v = m.init(jax.random.key(0), x)
    spec = lj.LoraSpec(rank=4, targets=".*/(query|value|out)/kernel")
    d = check(m.apply, v, spec, (x,), use_jit=use_jit, init_fn=m.apply)
    assert d["params"]["query"]["kernel"].axes == lj.LoraAxes((), (0,), (1, 2))
    assert d["params"]["out"]["kernel"].axes == lj.LoraAxes((), (0, 1), (2,))
    assert d["params"]["query"]["kernel"].a.shape == (24, 4)
    assert d["params"]["query"]["kernel"].b.shape == (4, 4, 8)


def test_dense_general_explicit_axes_match_inferred():
    m = Attention()
    x = jax.random.normal(jax.random.key(1), (2, 6, 24))
    v = m.init(jax.random.key(0), x)
    spec = lj.LoraSpec(
        rank=4,
        targets=".*/(query|out)/kernel",
        axes={
            ".*/query/kernel": lj.LoraAxes((), (0,), (1, 2)),
            ".*/out/kernel": lj.LoraAxes((), (0, 1), (2,)),
        },
    )
    check(m.apply, v, spec, (x,))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), strides=(2, 2), padding="SAME", name="conv1")(x)
        x = nn.relu(x)
        x = nn.Conv(4, (3, 3), kernel_dilation=(2, 2), padding="VALID", name="conv2")(x)
        return x


@both
@dtypes
def test_conv(use_jit, dtype):
    m = ConvNet()
    x = jax.random.normal(jax.random.key(1), (2, 12, 12, 3), jnp.float32)
    v = m.init(jax.random.key(0), x)
    v = jax.tree.map(lambda t: t.astype(dtype), v)
    spec = lj.LoraSpec(rank=2, targets=".*/kernel", axes={".*/kernel": lj.LoraAxes((), (0, 1, 2), (3,))})
    check(m.apply, v, spec, (x.astype(dtype),), dtype=dtype, use_jit=use_jit)


class TiedLM(nn.Module):
    vocab: int = 50
    dim: int = 16

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(self.vocab, self.dim, name="embed")
        h = emb(ids)
        h = nn.Dense(self.dim, name="query")(h)
        return emb.attend(h)


@both
@dtypes
def test_embed_lookup_and_attend(use_jit, dtype):
    m = TiedLM()
    ids = jax.random.randint(jax.random.key(1), (3, 7), 0, 50)
    v = m.init(jax.random.key(0), ids)
    v = jax.tree.map(lambda t: t.astype(dtype), v)
    check(
        m.apply, v, lj.LoraSpec(rank=4, targets=".*/(embedding|kernel)"), (ids,), dtype=dtype, use_jit=use_jit
    )


@both
@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_nn_scan_stacked_layers(use_jit, remat):
    m = Stack(remat=remat)
    x = jax.random.normal(jax.random.key(1), (2, 5, 12))
    v = m.init(jax.random.key(0), x)
    assert v["params"]["layers"]["query"]["kernel"].shape == (3, 12, 12)
    spec = lj.LoraSpec(rank=3, targets=".*/kernel", axes={".*/kernel": lj.LoraAxes((0,), (1,), (2,))})
    check(m.apply, v, spec, (x,), use_jit=use_jit)


def test_nn_scan_axes_inferred():
    m = Stack()
    x = jax.random.normal(jax.random.key(1), (2, 5, 12))
    v = m.init(jax.random.key(0), x)
    d = lj.init(jax.random.key(0), v, lj.LoraSpec(rank=3, targets=".*/kernel"), fn=m.apply, args=(x,))
    assert d["params"]["layers"]["query"]["kernel"].axes == lj.LoraAxes((0,), (1,), (2,))


class RematMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.remat(MLP)(name="mlp")(x)


@both
def test_nn_remat(use_jit):
    m = RematMLP()
    x = jax.random.normal(jax.random.key(1), (4, 16))
    v = m.init(jax.random.key(0), x)
    check(m.apply, v, lj.LoraSpec(rank=4, targets=".*/kernel"), (x,), use_jit=use_jit)


@both
def test_nested_jit_and_vmap_raw_jax(use_jit):
    """A model written in raw JAX: nested jit, vmap over the batch, W used on both sides of dot."""

    @jax.jit
    def layer(w, x):
        return jnp.tanh(x @ w)

    def fn(p, x):
        h = jax.vmap(lambda xi: layer(p["w1"], xi))(x)
        h = jnp.einsum("bi,oi->bo", h, p["w2"].T)  # transpose view then einsum
        return (p["w3"] @ h.T).T  # W on the left-hand side

    k = jax.random.split(jax.random.key(0), 4)
    p = {
        "w1": jax.random.normal(k[0], (10, 20)) / 3,
        "w2": jax.random.normal(k[1], (20, 30)) / 4,
        "w3": jax.random.normal(k[2], (6, 30)) / 5,
    }
    x = jax.random.normal(k[3], (5, 10))
    check(fn, p, lj.LoraSpec(rank=3, targets="w[123]"), (x,), use_jit=use_jit)


@both
def test_while_loop_decode(use_jit):
    """A greedy decoding loop whose body closes over the weights."""

    def decode(p, tok0):
        def body(state):
            i, tok, out = state
            h = jnp.tanh(p["embed"][tok] @ p["w"])
            nxt = jnp.argmax(h @ p["embed"].T, axis=-1).astype(jnp.int32)
            return i + 1, nxt, out.at[:, i].set(h.sum(-1))

        return jax.lax.while_loop(
            lambda s: s[0] < 5, body, (jnp.int32(0), tok0, jnp.zeros((tok0.shape[0], 5)))
        )[2]

    k = jax.random.split(jax.random.key(0), 2)
    p = {"embed": jax.random.normal(k[0], (40, 16)), "w": jax.random.normal(k[1], (16, 16)) / 4}
    tok0 = jnp.array([1, 7, 30], jnp.int32)
    check(decode, p, lj.LoraSpec(rank=2, targets="w"), (tok0,), use_jit=use_jit, grads=False)


def test_cond_and_fori_loop():
    def fn(p, x, flag):
        y = jax.lax.cond(flag, lambda x: x @ p["w"], lambda x: -(x @ p["w"]), x)
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["u"]), y)

    k = jax.random.split(jax.random.key(0), 3)
    p = {"w": jax.random.normal(k[0], (8, 8)) / 3, "u": jax.random.normal(k[1], (8, 8)) / 3}
    x = jax.random.normal(k[2], (4, 8))
    for flag in (jnp.bool_(True), jnp.bool_(False)):
        check(fn, p, lj.LoraSpec(rank=2, targets="w|u"), (x, flag))


def test_custom_jvp_and_checkpoint_policy():
    @jax.custom_jvp
    def matmul(x, w):
        return x @ w

    matmul.defjvp(
        lambda primals, tangents: (matmul(*primals), tangents[0] @ primals[1] + primals[0] @ tangents[1])
    )

    def fn(p, x):
        f = jax.checkpoint(
            lambda x: jnp.sin(matmul(x, p["w"])), policy=jax.checkpoint_policies.nothing_saveable
        )
        return f(x)

    k = jax.random.split(jax.random.key(0), 2)
    p = {"w": jax.random.normal(k[0], (8, 6))}
    check(fn, p, lj.LoraSpec(rank=2, targets="w"), (jax.random.normal(k[1], (3, 8)),))


@both
def test_nnx_model(use_jit):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(8, 16, rngs=rngs)
            self.value = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.value(nnx.relu(self.query(x)))

    graphdef, state = nnx.split(Model(nnx.Rngs(0)))
    apply = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
    x = jax.random.normal(jax.random.key(1), (3, 8))
    check(apply, state, lj.LoraSpec(rank=2, targets=r".*/kernel/value"), (x,), use_jit=use_jit)


def test_pytree_outputs_and_static_kwargs():
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            h = nn.Dense(8, name="query")(x)
            return {"h": nn.Dropout(0.5, deterministic=not train)(h), "n": jnp.sum(h)}

    m = Drop()
    x = jnp.ones((2, 4))
    v = m.init(jax.random.key(0), x, train=False)
    d = nonzero(lj.init(jax.random.key(1), v, lj.LoraSpec(rank=2, targets=".*/kernel")))
    got = lj.wrap(m.apply)(v, d, x, train=True, rngs={"dropout": jax.random.key(3)})
    want = m.apply(lj.merge(v, d), x, train=True, rngs={"dropout": jax.random.key(3)})
    assert rel_err(got["h"], want["h"]) < 1e-5 and rel_err(got["n"], want["n"]) < 1e-5


# ---- structure: nothing W-shaped is computed ----------------------------------------------------------


def test_train_step_builds_nothing_weight_shaped():
    """No op in the gradient step outputs an array of a targeted W's shape: no W + s·a·b, no dW."""
    m = Stack(layers=2)
    x = jax.random.normal(jax.random.key(1), (2, 5, 12))
    v = m.init(jax.random.key(0), x)
    spec = lj.LoraSpec(rank=3, targets=".*/kernel", axes={".*/kernel": lj.LoraAxes((0,), (1,), (2,))})
    d = nonzero(lj.init(jax.random.key(0), v, spec))
    loss = lambda d, p, x: jnp.mean(jnp.square(lj.wrap(m.apply)(p, d, x)))
    step = jax.value_and_grad(loss)
    w_shapes = {(2, 12, 12), (12, 12)}  # the stacked kernels and one layer's slice
    jaxpr = jax.make_jaxpr(step)(d, v, x).jaxpr
    bad = [
        (e.primitive.name, o.aval.shape)
        for e in all_eqns(jaxpr)
        for o in e.outvars
        if tuple(getattr(o.aval, "shape", ())) in w_shapes
    ]
    assert not bad, bad
    # The merged reference does build them, so the check can fail.
    ref = jax.value_and_grad(lambda d, p, x: jnp.mean(jnp.square(m.apply(lj.merge(p, d), x))))
    ref_jaxpr = jax.make_jaxpr(ref)(d, v, x).jaxpr
    assert any(
        tuple(getattr(o.aval, "shape", ())) in w_shapes for e in all_eqns(ref_jaxpr) for o in e.outvars
    )
    # And in the compiled HLO, no instruction but the parameters produces a [12,12] / [2,12,12] f32 array.
    hlo = jax.jit(step).lower(d, v, x).compile().as_text()
    lines = [
        ln
        for ln in hlo.splitlines()
        if ("f32[2,12,12]" in ln.split("=")[-1][:40] or "f32[12,12]" in ln.split("=")[-1][:40])
    ]
    assert not [
        ln
        for ln in lines
        if "parameter(" not in ln
        and "ENTRY" not in ln
        and "get-tuple-element" not in ln
        and "tuple(" not in ln
    ], lines


# ---- fallback, strictness, dropout, errors -----------------------------------------------------------


def test_fallback_warns_once_and_strict_raises():
    def fn(p, x):
        return x @ p["w"] + jnp.sum(jnp.sin(p["w"]))

    p = {"w": jax.random.normal(jax.random.key(0), (4, 4))}
    x = jnp.ones((2, 4))
    d = nonzero(lj.init(jax.random.key(1), p, lj.LoraSpec(rank=2, targets="w")))
    g = lj.wrap(fn)
    with pytest.warns(lj.FallbackWarning, match=r"w is used by primitive `sin`"):
        got = g(p, d, x)
    assert rel_err(got, fn(lj.merge(p, d), x)) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g(p, d, x)  # warned once per wrapped function, not every call
    with pytest.raises(ValueError, match=r"strict=True.*w is used by primitive `sin`"):
        lj.wrap(fn, strict=True)(p, d, x)


def test_dropout_on_low_rank_path_only():
    p = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    x = jax.random.normal(jax.random.key(1), (32, 16))
    spec = lj.LoraSpec(rank=4, targets="w", dropout=0.5)
    d = nonzero(lj.init(jax.random.key(1), p, spec))
    f = lambda p, x: x @ p["w"]
    g = lj.wrap(f)
    assert rel_err(g(p, d, x), f(lj.merge(p, d), x)) < 1e-5  # no key: inference, no dropout
    k = jax.random.key(5)
    y1, y2 = g(p, d, x, dropout_key=k), g(p, d, x, dropout_key=k)
    np.testing.assert_array_equal(y1, y2)  # explicit key: reproducible
    assert rel_err(y1, f(lj.merge(p, d), x)) > 1e-2  # ... and different
    # Base path untouched: (y - x·W) is the low-rank part, computed from a dropped-out x.
    low = y1 - x @ p["w"]
    dd = d["w"]
    mask = jax.random.bernoulli(jax.random.fold_in(k, 1), 0.5, x.shape)
    want = (jnp.where(mask, x / 0.5, 0.0) @ dd.a) @ (dd.b * dd.scale)
    np.testing.assert_allclose(low, want, rtol=1e-4, atol=1e-4)


def test_axis_inference_conflict_is_an_error():
    def fn(p, x):
        w = p["w"]  # (4, 5, 6) used as (in=0, out=1,2) and as (in=0,1, out=2)
        return (
            jnp.einsum("bi,ijk->bjk", x, w).sum()
            + jnp.einsum("bij,ijk->bk", x[:, :, None] * jnp.ones(5), w).sum()
        )

    p = {"w": jnp.ones((4, 5, 6))}
    with pytest.raises(ValueError, match=r"cannot infer LoRA axes for w .*disagree"):
        lj.init(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w"), fn=fn, args=(jnp.ones((2, 4)),))


def test_axis_inference_unused_weight_is_an_error():
    p = {"w": jnp.ones((4, 5, 6)), "u": jnp.ones((3, 3))}
    with pytest.raises(ValueError, match=r"cannot infer LoRA axes for w .*never contracts"):
        lj.init(
            jax.random.key(0),
            p,
            lj.LoraSpec(rank=2, targets="w"),
            fn=lambda p, x: x @ p["u"],
            args=(jnp.ones((2, 3)),),
        )


def test_wrap_rejects_deltas_for_other_params():
    p = {"w": jnp.ones((4, 4))}
    d = lj.init(jax.random.key(0), {"w": jnp.ones((4, 5))}, lj.LoraSpec(rank=2, targets="w"))
    with pytest.raises(ValueError, match=r"w: delta does not fit.*\(4, 4\).*found a \(4, 2\) and b \(2, 5\)"):
        lj.wrap(lambda p, x: x @ p["w"])(p, d, jnp.ones((1, 4)))


def test_scalar_scaled_and_sliced_weights():
    """Views beyond casts: a scalar multiple, a fused qkv kernel sliced into parts, a dynamic row index."""

    def fn(p, x, i):
        qkv = p["qkv"] * 0.5
        q, k = qkv[:, :8], qkv[:, 8:]
        row = jax.lax.dynamic_index_in_dim(
            p["stack"], i, keepdims=False
        )  # (in, out) picked from (L, in, out)
        return jnp.tanh(x @ q) @ k.T + (x @ row)

    k = jax.random.split(jax.random.key(0), 3)
    p = {"qkv": jax.random.normal(k[0], (8, 16)), "stack": jax.random.normal(k[1], (3, 8, 8))}
    spec = lj.LoraSpec(rank=2, targets="qkv|stack", axes={"stack": lj.LoraAxes((0,), (1,), (2,))})
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)  # all of these have factored rules
        check(fn, p, spec, (jax.random.normal(k[2], (4, 8)), jnp.int32(1)))


def test_custom_vjp_consuming_a_weight():
    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))
    k = jax.random.split(jax.random.key(0), 2)
    p = {"w": jax.random.normal(k[0], (8, 6))}
    check(
        lambda p, x: jnp.sin(matmul(x, p["w"])),
        p,
        lj.LoraSpec(rank=2, targets="w"),
        (jax.random.normal(k[1], (3, 8)),),
    )
