"""`wrap` on a quantized base, edge cases: empty batches, conv kernels, gather modes, residual inits on an
already-quantized base, forward-mode autodiff.

Every value test compares ``wrap(fn)(q, d, *args)`` with ``fn(merge(dequantize(q), d), *args)`` (float32;
values ≤ 1e-5 relative, gradients ≤ 1e-4 relative).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import all_eqns

import lora_jax as lj
from lora_jax.delta import LoraDelta


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want), initial=0.0) / max(np.max(np.abs(want), initial=0.0), 1e-6))


def compare(fn, q, d, args, *, use_jit):
    """wrap vs the merged dense function: values and delta gradients, with no FallbackWarning."""
    got_f = lambda d, *a: lj.wrap(fn)(q, d, *a)  # noqa: E731
    want_f = jax.jit(lambda d, *a: fn(lj.merge(lj.dequantize(q), d), *a))
    if use_jit:
        got_f = jax.jit(got_f)
    loss = lambda f: lambda d: jnp.mean(jnp.square(f(d, *args)))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)
        got, gg = got_f(d, *args), jax.grad(loss(got_f))(d)
    want, gw = want_f(d, *args), jax.grad(loss(want_f))(d)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(gg)[0], jax.tree.leaves(gw), strict=True):
        assert rel_err(g, w) <= 1e-4, (jax.tree_util.keystr(path), rel_err(g, w))


# ---- the shared base: two Dense kernels, three conv kernels (one grouped), an embedding table -----------

DN = ("NHWC", "HWIO", "NHWC")


def conv(x, k, groups=1, batch_groups=1):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=groups, batch_group_count=batch_groups
    )


def convs(p, img):
    """Three convs on ``img (n, 5, 5, 16)``: 3×3, 3×3 in 2 groups, 1×1."""
    h = conv(img, p["c1"])
    h = conv(jax.nn.relu(h), p["c2"], groups=2)
    return conv(jax.nn.relu(h), p["c3"])


def model(p, x, img, ids):
    """A Dense pair on ``x (n, 64)``, `convs` on ``img (n, 5, 5, 16)``, a lookup of ``ids (n,)``."""
    return jnp.tanh(x @ p["w1"]) @ p["w2"], convs(p, img), jnp.take(p["emb"], ids, axis=0)


def delta(rng, shape, n_in, n_stack=0, rank=2):
    """A rank-2 `LoraDelta` for a kernel of `shape` (stack axes, then `n_in` input axes, then outputs) with
    random a and b (a fresh delta's b = 0 would hide errors in the low-rank path)."""
    stack, ins, outs = shape[:n_stack], shape[n_stack : n_stack + n_in], shape[n_stack + n_in :]
    a = 0.3 * rng.normal(size=(*stack, *ins, rank)).astype(np.float32)
    b = 0.3 * rng.normal(size=(*stack, rank, *outs)).astype(np.float32)
    ax = lj.LoraAxes(
        tuple(range(n_stack)), tuple(range(n_stack, n_stack + n_in)), tuple(range(n_stack + n_in, len(shape)))
    )
    return LoraDelta(jnp.asarray(a), jnp.asarray(b), scale=0.5, axes=ax)


@pytest.fixture(scope="module")
def base():
    """``(q, deltas by name)``: every kernel quantized in blocks of 8 along an input axis; ``emb`` blocked
    along its features (a lookup decodes the gathered rows), ``emb0`` along its rows (the table is decoded)."""
    rng = np.random.default_rng(0)
    shapes = {
        **{"w1": (64, 32), "w2": (32, 8), "c1": (3, 3, 16, 16), "c2": (3, 3, 8, 16), "c3": (1, 1, 16, 8)},
        **{"emb": (16, 64), "emb0": (16, 64)},
    }
    p = {k: jnp.asarray(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()}
    axes = {"w.*": 0, "c.*": 2, "emb": 1, "emb0": 0}
    q = lj.quantize(p, lj.QuantSpec(block_size=8, targets="w.|c.|emb.?", block_axis=axes))
    d = {k: delta(rng, s, n_in=3 if len(s) == 4 else 1) for k, s in shapes.items()}
    deltas = {
        "all": d,
        "some": {k: v if k in ("w1", "c2", "emb0") else None for k, v in d.items()},
        "none": dict.fromkeys(d),
    }
    return q, deltas


def batch(n):
    k = jax.random.split(jax.random.key(2), 3)
    return (
        jax.random.normal(k[0], (n, 64)),
        jax.random.normal(k[1], (n, 5, 5, 16)),
        jax.random.randint(k[2], (n,), 0, 16),
    )


# ---- an empty batch ----------------------------------------------------------------------------------


def test_empty_batch(base):
    """A batch of 0 rows (Dense, conv, lookup; LoRA on some kernels): the shapes of the dense base, zero
    delta gradients."""
    q, deltas = base
    d = deltas["some"]
    args = batch(0)
    want = jax.eval_shape(lambda d: model(lj.merge(lj.dequantize(q), d), *args), d)
    loss = lambda d: (sum(jnp.sum(o) for o in lj.wrap(model)(q, d, *args)), lj.wrap(model)(q, d, *args))  # noqa: E731
    (_, got), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(d)
    assert [g.shape for g in got] == [w.shape for w in want] == [(0, 8), (0, 5, 5, 8), (0, 64)]
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g))
    # Eagerly (the interpreter binds each op as it goes) the Dense pair alone.
    assert lj.wrap(lambda p, x: x @ p["w1"])(q, d, args[0]).shape == (0, 32)


# ---- conv kernels ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lora,use_jit",
    [("all", True), ("some", False), ("none", True)],
    ids=["lora-all-jit", "lora-c2-eager", "no-lora-jit"],
)
def test_conv_kernels(base, lora, use_jit):
    """Quantized conv kernels (plain and grouped): factored (no FallbackWarning), values and delta gradients
    as the merged dense convs, with LoRA on every kernel, on some, or on none."""
    q, deltas = base
    _, img, _ = batch(2)
    compare(
        convs,
        q,
        deltas[lora],
        (img,),
        use_jit=use_jit,
    )


def test_conv_gradient_has_no_kernel_shaped_product(base):
    """The differentiated step has no conv/dot producing a kernel-shaped array (no W-shaped gradient)."""
    q, deltas = base
    d = deltas["all"]
    _, img, _ = batch(2)
    fn = lambda p: convs(p, img)  # noqa: E731
    shapes = {tuple(q[k].shape) for k in ("c1", "c2", "c3")}

    def kernel_shaped(f):
        jaxpr = jax.make_jaxpr(jax.grad(lambda d: jnp.mean(jnp.square(f(d)))))(d).jaxpr
        return [
            e
            for e in all_eqns(jaxpr)
            if e.primitive.name in ("conv_general_dilated", "dot_general")
            and tuple(e.outvars[0].aval.shape) in shapes
        ]

    assert not kernel_shaped(lambda d: lj.wrap(lambda p: fn(p))(q, d))
    assert kernel_shaped(lambda d: fn(lj.merge(lj.dequantize(q), d)))  # the check can fail


def test_conv_fallback_cases_warn_with_the_reason(base):
    """LoRA on a conv with batch_group_count > 1, or factors not split along the kernel's input/output
    axes, still decode W + s·a·b for that use (values as the merged conv), with a warning naming why; the
    same conv without LoRA is factored and does not warn."""
    q = {"c1": base[0]["c1"]}
    x = batch(2)[1]
    grouped = lambda p, x: conv(x, p["c1"], batch_groups=2)  # noqa: E731
    plain = lambda p, x: conv(x, p["c1"])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)
        got = jax.jit(lj.wrap(grouped))(q, {"c1": None}, x)
    assert rel_err(got, grouped(lj.dequantize(q), x)) <= 1e-5
    rng = np.random.default_rng(1)
    cases = (
        (grouped, dict(n_in=3), r"batch_group_count > 1"),
        (plain, dict(n_stack=1, n_in=2), r"LoRA factors not split along the kernel"),  # b varies along axis 0
    )
    for fn, axes, why in cases:
        d = {"c1": delta(rng, (3, 3, 16, 16), **axes)}
        with pytest.warns(
            lj.FallbackWarning, match=rf"c1 is used by primitive `conv_general_dilated \({why}"
        ):
            got = jax.jit(lj.wrap(fn))(q, d, x)
        assert rel_err(got, fn(lj.merge(lj.dequantize(q), d), x)) <= 1e-5


# ---- gather modes ------------------------------------------------------------------------------------

IDS = np.array([[3, 0, 15], [-1, -16, 16], [100, -17, 7]], np.int32)  # in range, negative, out of range

LOOKUPS = (
    lambda e, ids: jnp.take(e, ids, axis=0),  # mode "fill": NaN rows out of range
    lambda e, ids: jnp.take(e, ids, axis=0, fill_value=-2.0),
    lambda e, ids: jnp.take(e, ids, axis=0, mode="clip"),
    lambda e, ids: jnp.take(e, ids, axis=0, mode="wrap"),
    lambda e, ids: e[ids],  # promise_in_bounds
    lambda e, ids: e.at[ids].get(mode="fill", fill_value=-1.0),
    lambda e, ids: e.at[ids].get(mode="clip"),
    lambda e, ids: e.at[ids].get(mode="promise_in_bounds"),
)


@pytest.mark.parametrize("lora", ["all", "none"])
def test_gather_modes(base, lora):
    """Every gather mode of jnp.take / x[ids] / .at[].get on quantized tables (rows decoded or the whole
    table), with LoRA or without: as the merged dense tables, for in-range, negative and out-of-range ids
    (NaN and fill-value rows included), and so is the dense base through wrap."""
    q, deltas = base
    q, d = ({k: t[k] for k in ("emb", "emb0")} for t in (q, deltas[lora]))
    fn = lambda p, ids: [look(p[k], ids) for look in LOOKUPS for k in ("emb", "emb0")]  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)
        got = jax.jit(lj.wrap(fn))(q, d, IDS)
    want = jax.jit(fn)(lj.merge(lj.dequantize(q), d), IDS)
    dense = jax.jit(lj.wrap(fn))(lj.dequantize(q), d, IDS)
    for g, w, x in zip(got, want, dense, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(np.asarray(x), np.asarray(w), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.isnan(np.asarray(got[0])[1, 2]).all() and (np.asarray(got[10])[1, 2] == -1.0).all()


# ---- residual inits on a quantized base ----------------------------------------------------------------


@pytest.mark.parametrize(
    "init,kw,fix",
    [
        ("loftq", {"qspec": lj.QuantSpec()}, r"LoftQ quantizes the base itself: pass the dense params"),
        ("pissa", {}, r"pass the dense params .*quantize the residual afterwards with lj.quantize"),
    ],
)
def test_residual_init_on_a_quantized_base_raises(init, kw, fix):
    p = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 16)), "bias": jnp.zeros(16)}}
    q = lj.quantize(p, lj.QuantSpec(targets=".*/kernel"))
    spec = lj.LoraSpec(rank=2, targets=".*/kernel", init=init)
    with pytest.raises(ValueError, match=rf"dense/kernel is already quantized .*init='{init}'.*{fix}"):
        lj.init_with_residual(jax.random.key(1), q, spec, **kw)


# ---- forward-mode autodiff -----------------------------------------------------------------------------


def test_forward_mode_names_the_leaf_and_the_alternatives(base):
    """jvp / jacfwd through a quantized kernel fail with lora_jax's reason (eagerly); the Hessian-vector
    product jvp(grad) and forward mode on the dequantized base agree with the merged function."""
    q, deltas = base
    q, d = ({k: t[k] for k in ("w1", "w2")} for t in (q, deltas["some"]))  # LoRA on w1 only
    x = batch(3)[0]
    f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    loss = lambda base: lambda d: jnp.sum(jnp.square(lj.wrap(f)(base, d, x)))  # noqa: E731
    merged = lambda d: jnp.sum(jnp.square(f(lj.merge(lj.dequantize(q), d), x)))  # noqa: E731
    t = jax.tree.map(jnp.ones_like, d)
    msg = r"lora_jax.wrap: forward-mode autodiff .* quantized base leaf w2 .*reverse mode.*lj.dequantize"
    with pytest.raises(TypeError, match=msg):  # w2's input depends on w1's delta
        jax.jvp(loss(q), (d,), (t,))
    with pytest.raises(TypeError, match=msg.replace("w2", "w1")):  # w.r.t. the input: the first layer
        jax.jacfwd(lambda x: lj.wrap(f)(q, d, x))(x)
    # The Hessian-vector product through the quantized base, forward mode through the dequantized one.
    both = lambda hvp_f, jvp_f: jax.jit(  # noqa: E731
        lambda d, t: (jax.jvp(jax.grad(hvp_f), (d,), (t,))[1], jax.jvp(jvp_f, (d,), (t,))[1])
    )(d, t)
    (hvp, jvp), (hvp_want, jvp_want) = both(loss(q), loss(lj.dequantize(q))), both(merged, merged)
    for g, w in zip(jax.tree.leaves(hvp), jax.tree.leaves(hvp_want), strict=True):
        assert rel_err(g, w) <= 1e-4
    assert rel_err(jvp, jvp_want) <= 1e-5
