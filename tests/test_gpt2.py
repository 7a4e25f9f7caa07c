"""GPT-2: shapes, causality, padding, Hugging Face loading and parity with transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import gpt2

SMALL = gpt2.GPT2Config(vocab_size=61, max_position_embeddings=16, hidden_size=32, num_layers=2, num_heads=4)
HF_SMALL = {
    "vocab_size": 61,
    "n_positions": 16,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
}


@pytest.fixture(scope="module")
def small():
    return gpt2.init(jax.random.key(0), SMALL)


def _to_hf(variables, prefix="transformer."):
    """Flax params -> HF GPT-2 state-dict names (fused c_attn), numpy."""
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    out = {
        "wte.weight": p["wte"]["embedding"],
        "wpe.weight": p["wpe"]["embedding"],
        "ln_f.weight": p["ln_f"]["scale"],
        "ln_f.bias": p["ln_f"]["bias"],
    }
    for i in range(SMALL.num_layers):
        layer, hf = p[f"layers_{i}"], f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[hf + ln + ".weight"], out[hf + ln + ".bias"] = layer[ln]["scale"], layer[ln]["bias"]
        for kind, leaf in (("weight", "kernel"), ("bias", "bias")):
            attn = layer["attn"]
            out[hf + "attn.c_attn." + kind] = np.concatenate(
                [attn[n][leaf] for n in ("query", "key", "value")], -1
            )
            out[hf + "attn.c_proj." + kind] = attn["out"][leaf]
            out[hf + "mlp.c_fc." + kind] = layer["mlp"]["up"][leaf]
            out[hf + "mlp.c_proj." + kind] = layer["mlp"]["down"][leaf]
    return {prefix + k: v for k, v in out.items()}


def test_param_paths_and_logical_axes(small):
    model, variables = small
    paths = {
        jax.tree_util.keystr(p, simple=True, separator="/"): x.shape
        for p, x in jax.tree_util.tree_leaves_with_path(variables)
    }
    assert paths["params/wte/embedding"] == (61, 32)
    assert paths["params/wpe/embedding"] == (16, 32)
    assert paths["params/ln_f/scale"] == (32,)
    for name in ("query", "key", "value", "out"):
        assert paths[f"params/layers_1/attn/{name}/kernel"] == (32, 32)
        assert paths[f"params/layers_1/attn/{name}/bias"] == (32,)
    assert paths["params/layers_0/mlp/up/kernel"] == (32, 128)
    assert paths["params/layers_0/mlp/down/kernel"] == (128, 32)
    assert not any("lm_head" in p for p in paths)  # tied to wte
    axes = gpt2.logical_axes(model)["params"]
    assert tuple(axes["wte"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["layers_0"]["attn"]["value"]["kernel"]) == ("embed", "heads")
    assert tuple(axes["layers_0"]["mlp"]["up"]["kernel"]) == ("embed", "mlp")


@pytest.mark.parametrize("jit", [False, True])
def test_causal_and_right_padding(small, jit):
    model, variables = small
    apply = jax.jit(model.apply) if jit else model.apply
    ids = jnp.asarray([[5, 9, 2, 7, 1, 3]], jnp.int32)
    logits = apply(variables, ids)
    assert logits.shape == (1, 6, 61) and logits.dtype == jnp.float32
    changed = apply(variables, ids.at[0, 4].set(11))
    np.testing.assert_allclose(changed[:, :4], logits[:, :4], atol=1e-6)  # the future does not leak
    assert not np.allclose(changed[:, 4:], logits[:, 4:])
    padded = apply(variables, ids.at[0, 4:].set(0), jnp.asarray([[1, 1, 1, 1, 0, 0]], jnp.int32))
    np.testing.assert_allclose(padded[:, :4], logits[:, :4], atol=1e-6)


def test_bfloat16_compute(small):
    _, variables = small
    model = gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**{**SMALL.__dict__, "dtype": jnp.bfloat16}))
    ids = jnp.ones((2, 5), jnp.int32)
    out = jax.jit(model.apply)(variables, ids)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, jax.jit(gpt2.GPT2LMHeadModel(SMALL).apply)(variables, ids), atol=0.05)


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_from_hf_round_trip(small, prefix):
    _, variables = small
    tensors = _to_hf(variables, prefix)
    tensors["lm_head.weight"] = tensors[prefix + "wte.weight"]  # tied, ignored
    tensors[prefix + "h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), bool))  # old causal buffer, ignored
    _, loaded = gpt2.from_hf(HF_SMALL, tensors)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)


def test_from_hf_errors_name_tensor_and_shapes(small):
    _, variables = small
    tensors = _to_hf(variables)
    bad = {**tensors, "transformer.h.1.attn.c_attn.weight": np.zeros((32, 95), np.float32)}
    with pytest.raises(
        ValueError,
        match=r"tensor 'h\.1\.attn\.c_attn\.weight' "
        r"\(for params/layers_1/attn/query/kernel, "
        r".*\): expected shape \(32, 96\), found \(32, 95\)",
    ):
        gpt2.from_hf(HF_SMALL, bad)
    missing = {k: v for k, v in tensors.items() if k != "transformer.wpe.weight"}
    with pytest.raises(
        ValueError, match=r"missing tensor 'wpe\.weight' \(for params/wpe/embedding, shape \(16, 32\)\)"
    ):
        gpt2.from_hf(HF_SMALL, missing)
    extra = {**tensors, "transformer.h.2.mlp.c_fc.weight": np.zeros((32, 128), np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensors \['h\.2\.mlp\.c_fc\.weight'\]"):
        gpt2.from_hf(HF_SMALL, extra)


def test_config_errors(small):
    with pytest.raises(ValueError, match=r"hidden_size \(30\) must be divisible by num_heads \(4\)"):
        gpt2.GPT2Config(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unsupported activation 'relu'"):
        gpt2.GPT2Config.from_hf({**HF_SMALL, "activation_function": "relu"})
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt2.GPT2Config.from_hf({**HF_SMALL, "scale_attn_by_inverse_layer_idx": True})
    model, variables = small
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_position_embeddings=16"):
        model.apply(variables, jnp.ones((1, 17), jnp.int32))


@pytest.mark.torch
def test_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    # initializer_range=0.2 (not 0.02) so that logits are O(1) and the comparison means something.
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=32,
        vocab_size=97,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
    )
    ref_model = transformers.GPT2LMHeadModel(config).eval()
    ref_model.save_pretrained(tmp_path)
    model, variables = gpt2.from_hf(
        json.loads((tmp_path / "config.json").read_text()), load_file(str(tmp_path / "model.safetensors"))
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, (3, 20)).astype(np.int32)
    mask = np.ones((3, 20), np.int32)
    mask[1, 13:] = 0
    ours = np.asarray(jax.jit(model.apply)(variables, ids, mask))
    with torch.no_grad():
        ref = ref_model(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).logits
    ref = ref.numpy()
    assert np.abs(ref).max() > 1.0
    # fp32; measured max abs diff 4.6e-6 on logits of magnitude up to 6.2.
    diff = np.abs(ours - ref)[mask == 1]
    assert diff.max() <= 1e-3, diff.max()


def test_dot_product_attention_equals_einsum_attention(small):
    """`jax.nn.dot_product_attention` (the default) gives the explicit einsum attention's logits and
    gradients, causal and with padding (float32, jit; max abs difference ≤ 1e-5 on logits of magnitude
    ~1); "auto" traces to the XLA implementation on a CPU backend."""
    _, variables = small
    ids = jax.random.randint(jax.random.key(3), (2, 12), 0, SMALL.vocab_size)
    padded = jnp.ones((2, 12), jnp.int32).at[1, 9:].set(0)
    models = {
        a: gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**{**SMALL.__dict__, "attention": a}))
        for a in ("auto", "xla", "einsum")
    }

    def run(attention, mask):
        def loss(v):
            logits = models[attention].apply(v, ids, mask)
            return jnp.sum(jnp.tanh(logits)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
        return logits, grads

    for mask in (None, padded):
        (got, g_got), (want, g_want) = run("xla", mask), run("einsum", mask)
        rows = np.ones((2, 12), bool) if mask is None else np.asarray(mask, bool)
        np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-5)
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(a, b, atol=1e-5)
    jaxpr = lambda a: str(jax.make_jaxpr(models[a].apply)(variables, ids))
    assert jax.default_backend() != "cpu" or jaxpr("auto") == jaxpr("xla")


def test_unknown_attention_is_named():
    with pytest.raises(
        ValueError, match=r"attention='flash': expected one of \('auto', 'xla', 'cudnn', 'einsum'\)"
    ):
        gpt2.GPT2Config(attention="flash")
