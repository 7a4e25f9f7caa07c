"""LoRA+ (`lj.loraplus`) and PiSSA / OLoRA (`lj.init_with_residual`): exact steps and reconstructions,
errors, and the PEFT export of a converted adapter against the original base (logits <= 1e-4)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import residual as lres

# ---- LoRA+ ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [16.0, 2.5])
def test_loraplus_sgd_b_step_is_ratio_times_a_step(ratio):
    p = {"w": jnp.ones((6, 4)), "bias": jnp.zeros(4)}
    d = lj.init(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w"))
    g = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), d)
    tx = lj.loraplus(optax.sgd(0.1), ratio=ratio)
    state = tx.init(d)
    upd, _ = tx.update(g, state, d)
    np.testing.assert_allclose(upd["w"].a, -0.05 * jnp.ones((6, 2)), rtol=1e-6)
    np.testing.assert_allclose(upd["w"].b, -0.05 * ratio * jnp.ones((2, 4)), rtol=1e-6)
    plain, _ = optax.sgd(0.1).update(g, optax.sgd(0.1).init(d), d)
    np.testing.assert_allclose(upd["w"].b, ratio * plain["w"].b, rtol=1e-6)


@pytest.mark.standard_promotion  # optax.adam's bias correction (optax.tree.bias_correction) computes `float ** int32`
def test_loraplus_adam_state_and_combined_tree():
    p = {"w": jax.random.normal(jax.random.key(0), (6, 4))}
    spec = lj.LoraSpec(rank=2, targets="w", dora=True)
    d = lj.init(jax.random.key(0), p, spec)
    tree = {"p": p, "d": d}
    tx = lj.optimizer(lj.loraplus(optax.adam(1e-2), ratio=16.0))
    state = tx.init(tree)
    # Adam's state holds the deltas' moments only (no state for the frozen base).
    mu_leaves = [x.shape for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape") and x.ndim > 0]
    assert (6, 4) not in mu_leaves and (6, 2) in mu_leaves
    g = jax.tree_util.tree_map(jnp.ones_like, tree)
    upd, _ = tx.update(g, state, tree)
    # First Adam step is lr·sign(g): b and m move 16x as far as a; the base does not move.
    np.testing.assert_allclose(upd["d"]["w"].a, -1e-2, rtol=1e-4)
    np.testing.assert_allclose(upd["d"]["w"].b, -16e-2, rtol=1e-4)
    np.testing.assert_allclose(upd["d"]["w"].m, -16e-2, rtol=1e-4)
    assert float(jnp.abs(upd["p"]["w"]).max()) == 0.0


@pytest.mark.parametrize("ratio", [0.0, -1.0, float("nan"), float("inf"), True, "16"])
def test_loraplus_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"loraplus: ratio=.* must be a finite number > 0"):
        lj.loraplus(optax.sgd(0.1), ratio=ratio)


# ---- PiSSA / OLoRA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("stacked", [False, True])
def test_residual_reconstructs_params(init, stacked):
    shape = (3, 32, 24) if stacked else (32, 24)
    p = {"w": jax.random.normal(jax.random.key(0), shape), "bias": jnp.ones(24)}
    axes = {"w": lj.LoraAxes((0,), (1,), (2,))} if stacked else {}
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets="w", init=init, axes=axes)
    res, d = lj.init_with_residual(jax.random.key(1), p, spec)
    merged = lj.merge(res, d)
    rel = float(jnp.linalg.norm(merged["w"] - p["w"]) / jnp.linalg.norm(p["w"]))
    assert rel <= 1e-6, rel
    assert res["bias"] is p["bias"] and d["bias"] is None
    assert float(jnp.abs(d["w"].b).max()) > 0  # the principal part is in the delta


def test_pissa_takes_the_top_singular_part():
    w = jax.random.normal(jax.random.key(0), (20, 12))
    res, d = lj.init_with_residual(
        jax.random.key(1), {"w": w}, lj.LoraSpec(rank=3, targets="w", init="pissa")
    )
    s = jnp.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(jnp.linalg.svd(res["w"], compute_uv=False)[:9], s[3:12], rtol=1e-4)
    fast = lj.init_with_residual(
        jax.random.key(1), {"w": w}, lj.LoraSpec(rank=3, targets="w", init="pissa_niter_8")
    )[1]
    np.testing.assert_allclose(lj.delta_weight(fast["w"]), lj.delta_weight(d["w"]), atol=1e-3)


def test_residual_init_errors():
    p = {"w": jnp.ones((8, 4))}
    with pytest.raises(
        ValueError, match=r"init_with_residual: LoraSpec\(init='kaiming'\) leaves the base unchanged"
    ):
        lj.init_with_residual(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w"))
    with pytest.raises(
        ValueError, match=r"lj.init: LoraSpec\(init='pissa'\) .*use residual, deltas = lj.init_with_residual"
    ):
        lj.init(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w", init="pissa"))
    with pytest.raises(ValueError, match=r"LoraSpec.init='svd' is not one of"):
        lj.LoraSpec(init="svd")


@pytest.mark.torch
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_in_peft_on_the_original_base(tmp_path, init):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_jax import peft as lpeft
    from lora_jax.models import hf as lhf

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
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "base")
    model, variables, _ = lhf.load_hf(tmp_path / "base")
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets=r".*/attn/(query|value)/kernel", init=init)
    res, d0 = lj.init_with_residual(jax.random.key(0), variables, spec)
    leaves, tree = jax.tree_util.tree_flatten(d0)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    tuned = jax.tree_util.tree_unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )
    lpeft.save_peft(tmp_path / "adapter", lres.to_original_base(tuned, d0), "llama")
    cfg_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 8 and cfg_json["lora_alpha"] == 16.0
    hf = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    ids = jax.random.randint(jax.random.key(0), (2, 7), 0, 64)
    ours = np.asarray(jax.jit(lj.wrap(model.apply))(res, tuned, ids))
    with torch.no_grad():
        theirs = hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
        base = (
            transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
            .eval()(torch.tensor(np.asarray(ids), dtype=torch.long))
            .logits.numpy()
        )
    assert np.abs(theirs - base).max() > 1e-2
    assert np.abs(ours - theirs).max() < 1e-4
