"""DoRA (`LoraSpec(dora=True)`): exact at init, `wrap` == `fn(merge(...))` (values and gradients, float32,
relative error <= 1e-5), nothing in×out built in the train step, errors, PEFT interchange (logits <= 1e-4)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import all_eqns

import lora_jax as lj
from lora_jax.dora import DoraDelta, column_norm


def rel_err(a, b):
    return float(
        jnp.linalg.norm((jnp.asarray(a) - jnp.asarray(b)).ravel())
        / (jnp.linalg.norm(jnp.asarray(b).ravel()) + 1e-30)
    )


def perturb(d, seed=3, size=0.3):
    leaves, tree = jax.tree_util.tree_flatten(d)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + size * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(24, name="up")(x))
        q = nn.DenseGeneral((3, 4), name="heads")(h)  # kernel (24, 3, 4)
        return nn.Dense(5, name="down")(q.reshape(q.shape[:-2] + (12,)))


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + jnp.tanh(nn.Dense(12, name="proj")(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scanned(name="layers")(x, None)[0]


MLP_SPEC = dict(
    targets=r".*/(up|heads|down)/kernel", axes={r".*/heads/kernel": lj.LoraAxes((), (0,), (1, 2))}
)
STACK_SPEC = dict(targets=r".*/kernel", axes={r".*/kernel": lj.LoraAxes((0,), (1,), (2,))})


def setup(kind, detach=True, seed=0):
    model, x = (
        (Mlp(), jax.random.normal(jax.random.key(1), (4, 16)))
        if kind == "mlp"
        else (Stack(), jax.random.normal(jax.random.key(1), (2, 5, 12)))
    )
    v = model.init(jax.random.key(seed), x)
    spec = lj.LoraSpec(
        rank=3, alpha=6.0, dora=True, dora_detach_norm=detach, **(MLP_SPEC if kind == "mlp" else STACK_SPEC)
    )
    return model, v, x, spec


@pytest.mark.parametrize("kind", ["mlp", "stack"])
def test_fresh_dora_changes_nothing_bit_for_bit(kind):
    model, v, x, spec = setup(kind)
    d = lj.init(jax.random.key(0), v, spec)
    leaves = [x for x in jax.tree_util.tree_leaves(d, is_leaf=lj.is_delta) if isinstance(x, DoraDelta)]
    assert leaves and all(
        x.m.shape == x.b.shape[: len(x.axes.stack)] + x.b.shape[len(x.axes.stack) + 1 :] for x in leaves
    )
    merged = lj.merge(v, d)
    assert all(
        bool((a == b).all()) for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(v))
    )
    np.testing.assert_array_equal(lj.wrap(model.apply)(v, d, x), model.apply(v, x))


@pytest.mark.parametrize("kind", ["mlp", "stack"])
@pytest.mark.parametrize("detach", [True, False], ids=["detach", "full_grad"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_wrap_matches_merge_values_and_gradients(kind, detach, jit):
    model, v, x, spec = setup(kind, detach)
    d = perturb(lj.init(jax.random.key(0), v, spec))
    maybe = jax.jit if jit else (lambda f: f)
    got = maybe(lj.wrap(model.apply))(v, d, x)
    want = model.apply(lj.merge(v, d), x)
    assert rel_err(got, want) < 1e-5
    loss_w = lambda d: jnp.sum(jnp.sin(lj.wrap(model.apply)(v, d, x)))
    loss_m = lambda d: jnp.sum(jnp.sin(model.apply(lj.merge(v, d), x)))
    gw, gm = maybe(jax.grad(loss_w))(d), jax.grad(loss_m)(d)
    for a, b in zip(jax.tree_util.tree_leaves(gw), jax.tree_util.tree_leaves(gm), strict=True):
        assert rel_err(a, b) < 1e-5
    assert float(jnp.abs(jax.tree_util.tree_leaves(gw)[-1]).max()) > 0  # m does get a gradient


def test_detach_norm_changes_only_the_gradient():
    model, v, x, spec = setup("mlp", True)
    d = perturb(lj.init(jax.random.key(0), v, spec))
    d_full = jax.tree_util.tree_map(
        lambda t: (
            DoraDelta(t.a, t.b, t.scale, t.axes, t.dropout, t.m, detach_norm=False) if t is not None else None
        ),
        d,
        is_leaf=lambda t: t is None or lj.is_delta(t),
    )
    loss = lambda d: jnp.sum(jnp.sin(lj.wrap(model.apply)(v, d, x)))
    assert loss(d) == loss(d_full)
    ga, gb = jax.grad(loss)(d), jax.grad(loss)(d_full)
    assert rel_err(ga["params"]["up"]["kernel"].a, gb["params"]["up"]["kernel"].a) > 1e-4


def test_column_norm_is_the_dense_norm():
    w = jax.random.normal(jax.random.key(0), (2, 7, 3, 5))  # (stack, in, out1, out2)
    ax = lj.LoraAxes((0,), (1,), (2, 3))
    d = perturb(lj.init(jax.random.key(1), {"w": w}, lj.LoraSpec(rank=2, targets="w", axes={"w": ax})))["w"]
    dense = w + lj.delta_weight(d)
    np.testing.assert_allclose(column_norm(w, d), jnp.sqrt(jnp.sum(dense * dense, axis=1)), rtol=1e-5)


@pytest.mark.parametrize("detach", [True, False], ids=["detach", "full_grad"])
def test_train_step_builds_nothing_in_by_out(detach):
    model, v, x, spec = setup("stack", detach)
    d = perturb(lj.init(jax.random.key(0), v, spec))
    step = jax.value_and_grad(lambda d: jnp.mean(jnp.square(lj.wrap(model.apply)(v, d, x))))
    w_shapes = {(3, 12, 12), (12, 12)}
    jaxpr = jax.make_jaxpr(step)(d).jaxpr
    bad = [
        (e.primitive.name, o.aval.shape)
        for e in all_eqns(jaxpr)
        for o in e.outvars
        if tuple(getattr(o.aval, "shape", ())) in w_shapes
    ]
    assert not bad, bad
    ref = jax.make_jaxpr(jax.value_and_grad(lambda d: jnp.mean(jnp.square(model.apply(lj.merge(v, d), x)))))(
        d
    )
    assert any(
        tuple(getattr(o.aval, "shape", ())) in w_shapes for e in all_eqns(ref.jaxpr) for o in e.outvars
    )


def test_optimizer_and_count_include_the_magnitude():
    p = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
    d = lj.init(jax.random.key(1), p, lj.LoraSpec(rank=2, targets="w", dora=True))
    assert lj.count_params(d) == 8 * 2 + 2 * 6 + 6
    tx = lj.optimizer(optax.sgd(0.1))
    tree = {"p": p, "d": d}
    g = jax.tree_util.tree_map(jnp.ones_like, tree)
    upd, _ = tx.update(g, tx.init(tree), tree)
    np.testing.assert_allclose(upd["d"]["w"].m, -0.1 * jnp.ones(6))
    assert float(jnp.abs(upd["p"]["w"]).max()) == 0.0


def test_errors():
    emb = nn.Embed(10, 4)
    v = emb.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    d = lj.init(jax.random.key(0), v, lj.LoraSpec(rank=2, targets=".*/embedding", dora=True))
    with pytest.raises(ValueError, match=r"params/embedding: DoRA is not supported for embedding lookups"):
        lj.wrap(emb.apply)(v, d, jnp.array([1, 2]))
    conv = nn.Conv(4, (3, 3))
    cv = conv.init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))
    cd = lj.init(
        jax.random.key(0),
        cv,
        lj.LoraSpec(rank=2, targets=".*/kernel", dora=True, axes={".*": lj.LoraAxes((), (0, 1, 2), (3,))}),
    )
    with pytest.raises(ValueError, match=r"params/kernel: DoRA is not supported for convolution kernels"):
        lj.wrap(conv.apply)(cv, cd, jnp.ones((1, 5, 5, 2)))
    p = {"w": jnp.ones((4, 3))}
    dd = lj.init(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w", dora=True))
    with pytest.raises(ValueError, match=r"a DoRA merge cannot be undone"):
        lj.unmerge(p, dd)
    q = lj.quantize({"w": jnp.ones((64, 3))}, lj.QuantSpec(targets="w"))
    with pytest.raises(ValueError, match=r"w: DoRA is not supported for a quantized base kernel"):
        lj.init(jax.random.key(0), q, lj.LoraSpec(rank=2, targets="w", dora=True))
    # Quantized after init: wrap must refuse rather than drop the magnitude (silently plain LoRA).
    qd = lj.init(jax.random.key(0), {"w": jnp.ones((64, 3))}, lj.LoraSpec(rank=2, targets="w", dora=True))
    with pytest.raises(ValueError, match=r"w is a quantized base leaf with a DoRA delta"):
        lj.wrap(lambda p, x: x @ p["w"])(q, qd, jnp.ones((2, 64)))
    with pytest.raises(TypeError, match=r"LoraSpec.dora must be True or False"):
        lj.LoraSpec(dora="yes")


# ---- PEFT interchange ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_dora_export_loads_in_peft_with_same_logits(tiny_llama, tmp_path, scan):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_jax import peft as lpeft
    from lora_jax.models import hf as lhf

    model, variables, _ = lhf.load_hf(tiny_llama, scan_layers=scan)
    axes = {".*": lj.LoraAxes((0,), (1,), (2,))} if scan else {}
    spec = lj.LoraSpec(
        rank=4, alpha=8.0, targets=r".*/(attn/(query|value)|mlp/down)/kernel", axes=axes, dora=True
    )
    deltas = perturb(lj.init(jax.random.key(2), variables, spec), size=0.2)
    lpeft.save_peft(tmp_path, deltas, "llama")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    hf = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tiny_llama), tmp_path
    ).eval()
    ids = jax.random.randint(jax.random.key(0), (2, 7), 0, 64)
    ours = np.asarray(jax.jit(lj.wrap(model.apply))(variables, deltas, ids))
    theirs = hf_logits(hf, ids)
    base = hf_logits(transformers.LlamaForCausalLM.from_pretrained(tiny_llama).eval(), ids)
    assert np.abs(theirs - base).max() > 1e-2
    assert np.abs(ours - theirs).max() < 1e-4
    merged = hf.merge_and_unload()
    assert (
        np.abs(hf_logits(merged, ids) - np.asarray(model.apply(lj.merge(variables, deltas), ids))).max()
        < 1e-4
    )
    back = lpeft.load_peft(tmp_path, variables, "llama")
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(deltas), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.torch
def test_peft_dora_adapter_loads_into_lora_jax(tiny_llama, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_jax import peft as lpeft
    from lora_jax.models import hf as lhf

    torch.manual_seed(1)
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_llama)
    hf = peft.get_peft_model(
        base,
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
    )
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
            if "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model, variables, _ = lhf.load_hf(tiny_llama)
    deltas = lpeft.load_peft(tmp_path, variables, "llama")
    assert isinstance(deltas["params"]["layers_0"]["attn"]["query"]["kernel"], DoraDelta)
    assert lj.count_params(deltas) == sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n)
    ids = jax.random.randint(jax.random.key(0), (2, 7), 0, 64)
    ours = np.asarray(jax.jit(lj.wrap(model.apply))(variables, deltas, ids))
    assert np.abs(ours - hf_logits(hf.eval(), ids)).max() < 1e-4


def test_adapter_file_round_trip(tmp_path):
    from lora_jax import adapter

    model, v, x, spec = setup("mlp", detach=False)
    d = perturb(lj.init(jax.random.key(0), v, spec))
    adapter.save_adapter(tmp_path / "a.safetensors", d, spec, verbose=False)
    back = adapter.load_adapter(tmp_path / "a.safetensors", v)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(d)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(d), strict=True):
        np.testing.assert_array_equal(a, b)
    assert adapter.spec_from_json(adapter.spec_to_json(spec)) == spec
    bad = {
        "params": {
            **d["params"],
            "up": {
                **d["params"]["up"],
                "kernel": DoraDelta(
                    d["params"]["up"]["kernel"].a, d["params"]["up"]["kernel"].b, m=jnp.ones(3)
                ),
            },
        }
    }
    with pytest.raises(
        ValueError, match=r"params/up/kernel: delta does not fit .*DoRA magnitude m needs shape \(24,\)"
    ):
        lj.merge(v, bad)
