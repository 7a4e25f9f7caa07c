"""`lora_jax.models.layers.attention` (``jax.nn.dot_product_attention``) against explicit einsum-softmax.

The reference below is the attention the decoders computed before: float32 scores ``q·k·scale``, a
boolean ``(B, T, S)`` mask of which key slots each query sees (causal, banded, padding, segments, cache
slots), softmax, weighted values; grouped-query heads by reshaping the queries. Values and gradients must
agree to 1e-5 in float32, under ``jax.jit`` and not. Rows of padding queries are compared for being
finite only: the reference averages all values there, the kernels may give zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import layers
from lora_jax.models.gemma import Gemma, GemmaConfig
from lora_jax.models.llama import Llama, LlamaConfig
from lora_jax.train import plan_targets

TOL = dict(atol=1e-5, rtol=1e-5)
B, T, D = 2, 8, 8


def reference(q, k, v, allowed, scale=None):
    """Explicit grouped-query attention: ``q (B,T,H,D)``, ``k, v (B,S,K,D)``, ``allowed (B,T,S)``."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, h // kh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * jnp.float32(scale)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def allowed_mask(t, s, *, index=0, window=None, valid=None, segments=None):
    """``(B, T, S)``: key slot j seen by query slot i = index + row (the decoders' old mask)."""
    q_slot = index + np.arange(t)[:, None]
    k_slot = np.arange(s)[None, :]
    m = k_slot <= q_slot
    if window is not None:
        m = m & (k_slot > q_slot - window)
    m = np.broadcast_to(m, (B, t, s))
    if valid is not None:
        m = m & np.asarray(valid, bool)[:, None, :]
    if segments is not None:
        seg = np.asarray(segments)
        m = m & (seg[:, :, None] == seg[:, None, :])
    return jnp.asarray(m)


def qkv(h=4, kh=2, t=T, s=None, seed=0):
    s = t if s is None else s
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (B, t, h, D), jnp.float32),
        jax.random.normal(kk, (B, s, kh, D), jnp.float32),
        jax.random.normal(kv, (B, s, kh, D), jnp.float32),
    )


RIGHT = np.array([[1] * T, [1] * 5 + [0] * 3])
LEFT = np.array([[1] * T, [0] * 3 + [1] * 5])
HOLES = np.array([[1, 0, 1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1, 0]])
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 2, 2, 3]])

# name -> (kwargs of layers.attention, kwargs of allowed_mask, heads, kv heads, rows compared)
CASES = {
    "causal": ({}, {}, 4, 2, None),
    "gqa_k1": ({}, {}, 4, 1, None),
    "sliding": ({"window": 3}, {"window": 3}, 4, 2, None),
    "sliding_1": ({"window": 1}, {"window": 1}, 4, 1, None),
    "right_padded": ({"valid": RIGHT}, {"valid": RIGHT}, 4, 2, RIGHT),
    "left_padded": ({"valid": LEFT}, {"valid": LEFT}, 4, 2, LEFT),
    "left_padded_sliding": ({"valid": LEFT, "window": 3}, {"valid": LEFT, "window": 3}, 4, 1, LEFT),
    "holes": ({"valid": HOLES}, {"valid": HOLES}, 4, 2, HOLES),
    "packed": (
        {"valid": SEGMENTS > 0, "mask": jnp.asarray(SEGMENTS[:, :, None] == SEGMENTS[:, None, :])[:, None]},
        {"valid": SEGMENTS > 0, "segments": SEGMENTS},
        4,
        2,
        SEGMENTS > 0,
    ),
}


def _masked(x, rows):
    return x if rows is None else x * jnp.asarray(rows, x.dtype)[:, :, None, None]


def _check(fn, ref_fn, args, rows, use_jit):
    """Values on real rows, and the gradient of a loss on real rows, against the reference."""

    def both(f):
        def g(*a):
            out, vjp = jax.vjp(f, *a)
            return out, vjp(jnp.cos(_masked(out, rows)) * _masked(jnp.ones_like(out), rows))  # d sum(sin)

        return jax.jit(g) if use_jit else g

    (out, grads), (want, want_grads) = both(fn)(*args), both(ref_fn)(*args)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(_masked(out, rows), _masked(want, rows), **TOL)
    for a, b in zip(grads, want_grads, strict=True):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(a, b, **TOL)


# Every case under jit; a few eagerly too (op by op: slow on CPU).
JIT_CASES = [(c, True) for c in sorted(CASES)] + [("packed", False)]


@pytest.mark.parametrize(
    "case,use_jit", JIT_CASES, ids=[f"{c}-{'jit' if j else 'eager'}" for c, j in JIT_CASES]
)
def test_attention_equals_einsum_softmax(case, use_jit):
    kw, mask_kw, h, kh, rows = CASES[case]
    kw = {k: jnp.asarray(x) for k, x in kw.items() if k in ("valid", "mask")} | {
        k: x for k, x in kw.items() if k not in ("valid", "mask")
    }
    allowed = allowed_mask(T, T, **mask_kw)
    _check(
        lambda q, k, v: layers.attention(q, k, v, implementation="xla", **kw),
        lambda q, k, v: reference(q, k, v, allowed),
        qkv(h, kh),
        rows,
        use_jit,
    )


@pytest.mark.parametrize("use_jit", [True], ids=["jit"])
@pytest.mark.parametrize("valid", [RIGHT, LEFT, HOLES], ids=["right", "left", "holes"])
def test_compacted_padding_path_equals_reference(valid, use_jit):
    """The path cuDNN takes for padding (real tokens moved first, sequence lengths), run by XLA here."""
    allowed = allowed_mask(T, T, valid=valid)
    _check(
        lambda q, k, v: layers._cudnn_compacted(
            q, k, v, jnp.asarray(valid), True, None, implementation="xla"
        ),
        lambda q, k, v: reference(q, k, v, allowed),
        qkv(4, 2),
        valid,
        use_jit,
    )


@pytest.mark.parametrize("window,use_jit", [(None, True), (3, True)])
def test_kv_cache_decode_with_explicit_mask(window, use_jit):
    """One query at slot 6 of a 10-slot cache whose second row is left-padded (slots 0-2) and ends at 6."""
    s, index = 10, 6
    valid = np.array([[1] * 7 + [0] * 3, [0] * 3 + [1] * 4 + [0] * 3])
    allowed = allowed_mask(1, s, index=index, window=window, valid=valid)
    _check(
        lambda q, k, v: layers.attention(q, k, v, causal=False, mask=allowed[:, None], implementation="xla"),
        lambda q, k, v: reference(q, k, v, allowed),
        qkv(4, 2, t=1, s=s),
        None,
        use_jit,
    )


def test_scale_is_passed_through():
    """Gemma's ``query_pre_attn_scalar ** -0.5`` instead of ``D ** -0.5``."""
    q, k, v = qkv(4, 2)
    out = layers.attention(q, k, v, scale=0.3, implementation="xla")
    np.testing.assert_allclose(out, reference(q, k, v, allowed_mask(T, T), scale=0.3), **TOL)


@pytest.mark.parametrize("path", ["explicit", "compacted"])
def test_query_that_sees_no_key_is_finite_and_isolated(path):
    """Left padding: padding queries see no key at all. Finite output and gradients, and perturbing the
    padding rows' queries and keys changes neither the real rows nor the gradient of a loss on them."""
    q, k, v = qkv(4, 2)
    valid = jnp.asarray(LEFT)
    if path == "explicit":
        fn = lambda q, k, v: layers.attention(q, k, v, valid=valid, implementation="xla")
    else:
        fn = lambda q, k, v: layers._cudnn_compacted(q, k, v, valid, True, None, implementation="xla")
    fn = jax.jit(fn)
    out = fn(q, k, v)
    assert bool(jnp.all(jnp.isfinite(out)))
    grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))(q, k, v)  # padding rows in the loss too
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)

    pad = (1 - valid)[:, :, None, None].astype(jnp.float32)  # 1 on padding slots
    q2, k2, v2 = q + 1e3 * pad, k - 1e3 * pad, v + 1e3 * pad
    real = lambda x: _masked(x, LEFT)
    np.testing.assert_allclose(real(fn(q2, k2, v2)), real(out), **TOL)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(real(fn(*a)) ** 2), argnums=(0, 1, 2)))
    g1, g2 = grad(q, k, v), grad(q2, k2, v2)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, **TOL)


def test_auto_falls_back_to_xla_where_cudnn_refuses(monkeypatch):
    """On a GPU backend "auto" tries cuDNN; where cuDNN cannot run (here: float32, or no cuDNN), XLA."""
    q, k, v = qkv(4, 2)
    want = layers.attention(q, k, v, valid=jnp.asarray(LEFT), implementation="xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    got = layers.attention(q, k, v, valid=jnp.asarray(LEFT), implementation="auto")
    np.testing.assert_allclose(got, want, **TOL)


def test_cudnn_on_this_machine_is_an_error_not_a_silent_fallback():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU backend: cuDNN may run here")
    q, k, v = qkv(4, 2)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
        layers.attention(
            q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), implementation="cudnn"
        )


def test_bad_arguments_name_the_fix():
    q, k, v = qkv(4, 2)
    with pytest.raises(
        ValueError, match=r"implementation='flash'.*expected one of \('auto', 'xla', 'cudnn'\)"
    ):
        layers.attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match=r"window=3 needs causal=True"):
        layers.attention(q, k, v, causal=False, window=3)
    with pytest.raises(ValueError, match=r"window=0 needs causal=True and window >= 1"):
        layers.attention(q, k, v, window=0)
    with pytest.raises(ValueError, match=r"attention='einsum': expected one of \('auto', 'xla', 'cudnn'\)"):
        LlamaConfig(attention="einsum")
    with pytest.raises(ValueError, match=r"attention='einsum': expected one of"):
        GemmaConfig(attention="einsum")


TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: Llama(LlamaConfig(**TINY, head_dim=8, sliding_window=3, **kw)),
        lambda **kw: Gemma(GemmaConfig(model_type="gemma3_text", **TINY, head_dim=8, sliding_window=3, **kw)),
    ],
    ids=["mistral", "gemma3"],
)
def test_model_no_key_rows_do_not_reach_loss_or_gradient(make):
    """A left-padded row without a cache: the padding tokens' ids change neither the real positions'
    logits nor the gradient of a loss on them; everything stays finite."""
    model = make()
    ids = jax.random.randint(jax.random.key(3), (B, T), 0, 32)
    mask = jnp.asarray(LEFT)
    variables = model.init(jax.random.key(0), ids)
    ids2 = jnp.where(mask > 0, ids, (ids + 7) % 32)

    def loss(v, x):
        logits = model.apply(v, x, attention_mask=mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l1, lg1), g1 = step(variables, ids)
    (l2, lg2), g2 = step(variables, ids2)
    assert bool(jnp.all(jnp.isfinite(lg1))) and all(
        bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g1)
    )
    np.testing.assert_allclose(np.asarray(lg1)[LEFT > 0], np.asarray(lg2)[LEFT > 0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):  # padding ids: no gradient
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_planner_compiles_gpu_targets_with_the_kernel_auto_would_pick():
    """The planner's compile process runs on the host (``"auto"`` would pick XLA there), so it names the
    kernel a GPU would run: cuDNN for 16-bit inputs and head dims it accepts without the card, else XLA."""
    from lora_jax.train import plan

    gpu, cpu = plan_targets.parse_target("gpu:h200"), plan_targets.parse_target("cpu")
    assert plan._attention_kernel(gpu, jnp.bfloat16, 128) == "cudnn"
    assert plan._attention_kernel(gpu, jnp.float16, 64) == "cudnn"
    assert plan._attention_kernel(gpu, jnp.float32, 64) == "xla"  # cuDNN takes 16-bit inputs only
    assert plan._attention_kernel(gpu, jnp.bfloat16, 256) == "xla"  # Gemma's 256: only on a visible Hopper
    assert plan._attention_kernel(gpu, jnp.bfloat16, 12) == "xla"
    assert plan._attention_kernel(cpu, jnp.bfloat16, 64) == "auto"
    assert plan._attention_kernel(plan_targets.parse_target("tpu:v5e:2x2"), jnp.bfloat16, 64) == "auto"


@pytest.mark.skipif(
    plan_targets._find("jax_plugins.xla_cuda12") is None, reason="needs the CUDA plugin (gpu-plan extra)"
)
def test_planned_gpu_step_calls_cudnn_fused_attention(tmp_path):
    """Deviceless H200 compile of a tiny Llama's LoRA step: the forward and backward fused-attention calls."""
    import json

    from lora_jax.train import plan

    config = {
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    request = plan.PlanRequest(str(tmp_path), devices=1, mesh="fsdp=1", batch=2, seq=64, target="gpu:h200")
    report = plan.plan(request)
    assert report["attention"] == "cudnn" and report["fused_attention_calls"] >= 2
