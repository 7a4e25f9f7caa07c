"""`lora_jax.models.layers.attention` (``jax.nn.dot_product_attention``) against explicit einsum-softmax.

The reference below is the attention the decoders computed before: float32 scores ``q·k·scale``, a
boolean ``(B, T, S)`` mask of which key slots each query sees (causal, banded, padding, segments, cache
slots), softmax, weighted values; grouped-query heads by reshaping the queries. Values and gradients must
agree to 1e-5 in float32, under ``jax.jit`` and not. Rows of padding queries are compared for being
finite only: the reference averages all values there, the kernels may give zeros.

All cases run in one jitted function (one compile on a loaded CPU); one case also runs op by op. The
``"auto"`` selection is checked by recording the ``implementation`` of every ``jax.nn.dot_product_attention``
call on a faked GPU backend: cuDNN tried first, XLA after jax's refusal, other errors not swallowed.
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
    rng = np.random.default_rng(seed)  # NumPy: jax.random would compile again under each promotion mode
    return tuple(
        jnp.asarray(rng.standard_normal(shape, np.float32))
        for shape in ((B, t, h, D), (B, s, kh, D), (B, s, kh, D))
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


def _vjp(f, args, rows):
    """``f(*args)`` and the gradient of ``sum(sin(f(*args)))`` over the ``rows`` compared."""
    out, vjp = jax.vjp(f, *args)
    return out, vjp(jnp.cos(_masked(out, rows)) * _masked(jnp.ones_like(out), rows))


def _real(x, rows):
    """``x`` with the rows not compared zeroed, in NumPy (eager jnp ops would each compile)."""
    x = np.asarray(x)
    return x if rows is None else x * np.asarray(rows, x.dtype)[:, :, None, None]


def _compare(got, want, rows, name):
    (out, grads), (want_out, want_grads) = got, want
    assert np.all(np.isfinite(out)), name
    np.testing.assert_allclose(_real(out, rows), _real(want_out, rows), err_msg=name, **TOL)
    for a, b in zip(grads, want_grads, strict=True):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, err_msg=name, **TOL)


def _kwargs(kw):
    return {k: (jnp.asarray(x) if k in ("valid", "mask") else x) for k, x in kw.items()}


def _equivalence_cases():
    """name -> (function under test, reference, (q, k, v), rows compared)."""
    cases = {}
    for name, (kw, mask_kw, h, kh, rows) in CASES.items():
        allowed, kw = allowed_mask(T, T, **mask_kw), _kwargs(kw)
        cases[name] = (
            lambda q, k, v, kw=kw: layers.attention(q, k, v, implementation="xla", **kw),
            lambda q, k, v, allowed=allowed: reference(q, k, v, allowed),
            qkv(h, kh),
            rows,
        )
    # The path cuDNN takes for padding (real tokens moved first, sequence lengths), run by XLA here.
    for name, valid in (("right", RIGHT), ("left", LEFT), ("holes", HOLES)):
        allowed, valid = allowed_mask(T, T, valid=valid), jnp.asarray(valid)
        cases[f"compacted_{name}"] = (
            lambda q, k, v, valid=valid: layers._cudnn_compacted(
                q, k, v, valid, True, None, implementation="xla"
            ),
            lambda q, k, v, allowed=allowed: reference(q, k, v, allowed),
            qkv(4, 2),
            valid,
        )
    # One query at slot 6 of a 10-slot cache whose second row is left-padded (slots 0-2) and ends at 6.
    s, index = 10, 6
    cache_valid = np.array([[1] * 7 + [0] * 3, [0] * 3 + [1] * 4 + [0] * 3])
    for window in (None, 3):
        allowed = allowed_mask(1, s, index=index, window=window, valid=cache_valid)
        cases[f"kv_cache_decode_window_{window}"] = (
            lambda q, k, v, allowed=allowed: layers.attention(
                q, k, v, causal=False, mask=allowed[:, None], implementation="xla"
            ),
            lambda q, k, v, allowed=allowed: reference(q, k, v, allowed),
            qkv(4, 2, t=1, s=s),
            None,
        )
    # Gemma's ``query_pre_attn_scalar ** -0.5`` instead of ``D ** -0.5``.
    cases["scale"] = (
        lambda q, k, v: layers.attention(q, k, v, scale=0.3, implementation="xla"),
        lambda q, k, v: reference(q, k, v, allowed_mask(T, T), scale=0.3),
        qkv(4, 2),
        None,
    )
    return cases


EQUIVALENCE = _equivalence_cases()


@pytest.fixture(scope="module")
def jitted_results():
    """Every case's values and gradients, and the reference's, from one jitted function (one compile)."""
    with jax.numpy_dtype_promotion("strict"):
        run = jax.jit(
            lambda args: {
                name: (_vjp(fn, args[name], rows), _vjp(ref, args[name], rows))
                for name, (fn, ref, _, rows) in EQUIVALENCE.items()
            }
        )
        return run({name: case[2] for name, case in EQUIVALENCE.items()})


@pytest.mark.parametrize("case", sorted(EQUIVALENCE))
def test_attention_equals_einsum_softmax_jit(case, jitted_results):
    """Under ``jax.jit``: values on real rows, and the gradient of a loss on them, to 1e-5."""
    got, want = jitted_results[case]
    _compare(got, want, EQUIVALENCE[case][3], case)


def test_attention_equals_einsum_softmax_eager(jitted_results):
    """One case op by op (slow on CPU; the masked cases run jitted above)."""
    fn, _, args, rows = EQUIVALENCE["causal"]
    _compare(_vjp(fn, args, rows), jitted_results["causal"][1], rows, "causal")  # the reference jitted


def test_query_that_sees_no_key_is_finite_and_isolated():
    """Left padding: padding queries see no key at all (explicit mask and compacted paths). Finite output
    and gradients, and perturbing the padding rows' queries and keys changes neither the real rows nor
    the gradient of a loss on them."""
    q, k, v = qkv(4, 2)
    valid = jnp.asarray(LEFT)
    real = lambda x: _masked(x, LEFT)
    paths = {
        "explicit": lambda q, k, v: layers.attention(q, k, v, valid=valid, implementation="xla"),
        "compacted": lambda q, k, v: layers._cudnn_compacted(
            q, k, v, valid, True, None, implementation="xla"
        ),
    }

    def outputs(fn, *args):
        """Output; gradients of sum(out) (padding rows in the loss too) and of sum(real(out) ** 2)."""
        out, vjp = jax.vjp(fn, *args)
        grads = jax.vmap(vjp)(jnp.stack([jnp.ones_like(out), 2 * real(out)]))  # one backward pass, twice
        return out, tuple(g[0] for g in grads), tuple(g[1] for g in grads)

    run = jax.jit(lambda *args: {name: outputs(fn, *args) for name, fn in paths.items()})

    pad = (1 - LEFT)[:, :, None, None].astype(np.float32)  # 1 on padding slots (NumPy: no eager compiles)
    q, k, v = (np.asarray(x) for x in (q, k, v))
    first, second = run(q, k, v), run(q + 1e3 * pad, k - 1e3 * pad, v + 1e3 * pad)
    for name in paths:
        (out, grads, g1), (out2, _, g2) = first[name], second[name]
        assert np.all(np.isfinite(out)), name
        assert all(np.all(np.isfinite(g)) for g in grads), name
        np.testing.assert_allclose(_real(out2, LEFT), _real(out, LEFT), err_msg=name, **TOL)
        for a, b in zip(g1, g2, strict=True):
            np.testing.assert_allclose(a, b, err_msg=name, **TOL)


def _record_calls(monkeypatch, cudnn_error=None):
    """Wrap ``jax.nn.dot_product_attention``: record each call's ``implementation``; optionally fail the
    cuDNN calls with ``cudnn_error`` (else they run for real: on a host without cuDNN jax refuses them)."""
    calls, real = [], jax.nn.dot_product_attention

    def recording(*args, implementation=None, **kw):
        calls.append(implementation)
        if implementation == "cudnn" and cudnn_error is not None:
            raise cudnn_error
        return real(*args, implementation=implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    return calls


def test_auto_tries_cudnn_on_a_gpu_backend_then_falls_back_to_xla(monkeypatch):
    """On a (faked) GPU backend "auto" first calls cuDNN (padding: the compacted path; a window: the
    kernel's own mask type), and after jax's refusal XLA, with XLA's result. On other backends XLA only."""
    q, k, v = qkv(4, 2)
    valid = jnp.asarray(LEFT)
    both = lambda: (
        layers.attention(q, k, v, valid=valid, implementation="auto"),
        layers.attention(q, k, v, window=3, implementation="auto"),
    )
    if jax.default_backend() != "gpu":  # the real refusal: this host has no cuDNN
        calls = _record_calls(monkeypatch)
        want = jax.jit(both)()
        assert calls == ["xla", "xla"]
        calls.clear()
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        got = jax.jit(lambda: both())()  # a new function: traced again, now on the "GPU"
        assert calls == ["cudnn", "xla", "cudnn", "xla"]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, **TOL)
    # A refusal for the shapes (what jax raises for a head dim cuDNN does not take), faked: same fallback.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    calls = _record_calls(monkeypatch, NotImplementedError("The head dim must be <= 128 and a multiple of 8"))
    jax.eval_shape(lambda: both())  # traced only, not compiled
    assert calls == ["cudnn", "xla", "cudnn", "xla"]


def test_auto_does_not_swallow_other_errors(monkeypatch):
    """An error that is not jax's cuDNN refusal (out of memory, say) propagates: no silent XLA retry."""
    q, k, v = qkv(4, 2)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    calls = _record_calls(monkeypatch, RuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED: Out of memory"):
        jax.eval_shape(lambda: layers.attention(q, k, v, implementation="auto"))
    assert calls == ["cudnn"]


def test_forced_cudnn_refusal_names_the_setting_and_the_fix(monkeypatch):
    """``"cudnn"`` where jax refuses it is an error (never a silent fallback) naming what cuDNN needs."""
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(4, 2))
    message = r'attention="cudnn": cuDNN cannot run here .*multiple of 8.*Fix: attention="auto".*"xla"'
    if jax.default_backend() != "gpu":  # the real refusal of this host: no cuDNN
        with pytest.raises(ValueError, match=message + r"(?s:.*)") as info:
            layers.attention(q, k, v, implementation="cudnn")
        assert isinstance(info.value.__cause__, RuntimeError | NotImplementedError)
    calls = _record_calls(monkeypatch, NotImplementedError("Q must be fp16/bf16/fp8_e4m3fn/fp8_e5m2"))
    with pytest.raises(ValueError, match=message):
        layers.attention(q, k, v, valid=jnp.asarray(RIGHT), implementation="cudnn")
    assert calls == ["cudnn"]


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
    ids = np.random.default_rng(3).integers(0, 32, (B, T), dtype=np.int32)  # NumPy: no eager compiles
    mask = jnp.asarray(LEFT)
    variables = jax.jit(model.init)(jax.random.key(0), ids)  # op by op it takes longer than the step
    ids2 = np.where(LEFT > 0, ids, (ids + 7) % 32).astype(np.int32)

    def loss(v, x):
        logits = model.apply(v, x, attention_mask=mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l1, lg1), g1 = step(variables, ids)
    (l2, lg2), g2 = step(variables, ids2)
    assert np.all(np.isfinite(lg1)) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g1))
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


def test_attention_flag_reaches_the_model_not_the_adapter_identity(monkeypatch):
    """``--attention`` (finetune, eval, generate) sets the model's kernel; it is a per-run choice, so it is
    left out of the identity an adapter is checked against, and eval/generate do not inherit it."""
    from lora_jax.train import cli, loop
    from lora_jax.train import config as config_lib

    assert config_lib.TrainConfig().attention == "auto"
    assert config_lib.ATTENTION == layers.ATTENTION
    with pytest.raises(ValueError, match=r"--attention must be one of auto, xla, cudnn, got 'flash'"):
        config_lib.from_args(["--attention", "flash"])
    models = {}
    for choice in ("auto", "xla"):
        cfg = config_lib.from_args(["--model", "tiny-llama", "--attention", choice])
        model, variables, _, identity = loop.load_model(cfg)
        models[choice] = (model, variables, identity)
    assert models["xla"][0].config.attention == "xla" and models["auto"][0].config.attention == "auto"
    assert models["xla"][2] == models["auto"][2] and "attention" not in models["xla"][2]["config"]
    # On a (faked) GPU backend: "auto" tries cuDNN first (refused on this host), "xla" never does.
    model, variables, _ = models["xla"]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    calls = _record_calls(monkeypatch, NotImplementedError("The head dim must be <= 128 and a multiple of 8"))
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 4), jnp.int32))
    assert calls and set(calls) == {"xla"}
    calls.clear()
    model, variables, _ = models["auto"]
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 4), jnp.int32))
    assert calls[0] == "cudnn" and "xla" in calls
    # eval / generate: this machine's choice (default auto), never the one stored with the adapter.
    info = {"extra": {"config": {"model": "tiny-llama", "attention": "cudnn"}}}
    assert config_lib.from_adapter(info, "a.safetensors").attention == "auto"
    assert config_lib.from_adapter(info, "a.safetensors", attention="xla").attention == "xla"
    args = cli._parser().parse_args(["eval", "--adapter", "a", "--attention", "xla"])
    assert args.attention == "xla"
    assert cli._parser().parse_args(["generate", "--adapter", "a"]).attention == "auto"
