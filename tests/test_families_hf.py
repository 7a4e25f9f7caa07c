"""Llama 3.x, Mistral, Qwen2 and Qwen3 against Hugging Face transformers and PEFT (PyTorch, float32).

Each family is a tiny random model built and saved by transformers itself (``save_pretrained``), with
random norm weights and biases, loaded by ``lj.models.load(folder)``. Checked per family:

- logits within 1e-4 relative (max |ours - theirs| / max |theirs|), with and without ``nn.scan``
  layers; the family's feature matters (Llama 3 RoPE scaling, Mistral's window on a sequence longer
  than it, Qwen2's biases, Qwen3's q/k norms: leaving it out moves the logits by more than 1e-2);
- greedy generation of 16 tokens with the KV cache identical to ``generate(do_sample=False)``;
- ``lj.wrap`` with non-zero deltas on every linear layer (``all-linear``), no fallback, equals PEFT's
  LoRA on the adapter exported by ``save_peft`` (1e-4 relative), and ``load_peft`` reads it back.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import peft as lpeft
from lora_jax.models import hf as lhf
from lora_jax.models import llama, registry

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch

VOCAB = 64
WINDOW = 5  # Mistral's sliding window: prompts of 12 and 4 + 16 generated tokens are longer
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attn_implementation="eager",
)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so that the scaling changes the tiny model
}


def _hf_model(family):
    """A random transformers model of `family` with non-trivial norm weights and biases."""
    if family == "llama":
        config = transformers.LlamaConfig(**_COMMON, rope_parameters=_LLAMA3_ROPE)
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        config = transformers.MistralConfig(**_COMMON, sliding_window=WINDOW)
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**_COMMON)
        cls = transformers.Qwen2ForCausalLM
    else:  # qwen3: head_dim given (16 != 32 / 4), tied head
        config = transformers.Qwen3Config(**_COMMON, head_dim=16, tie_word_embeddings=True)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)  # larger than the default 0.02: clear argmax margins, no ties
    return model


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    name = request.param
    hf = _hf_model(name)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    model, variables, tok = lj.models.load(folder)
    return {"name": name, "hf": hf, "folder": folder, "model": model, "variables": variables}


def _rel(ours, theirs):
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()


IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))


def test_logits_match_transformers(family):
    model, variables = family["model"], family["variables"]
    cfg = model.config
    assert cfg.model_type == family["name"] and registry.family_of(model).model_type == family["name"]
    expected = {
        "llama": dict(rope_scaling=llama.RopeScaling(8.0, 1.0, 4.0, 16)),
        "mistral": dict(sliding_window=WINDOW),
        "qwen2": dict(qkv_bias=True),
        "qwen3": dict(qk_norm=True, head_dim=16, tie_word_embeddings=True),
    }[family["name"]]
    assert {k: getattr(cfg, k) for k in expected} == expected
    ref = _hf_logits(family["hf"], IDS)
    ours = jax.jit(model.apply)(variables, jnp.asarray(IDS))
    # bfloat16 compute (float32 parameters, norms, softmax and logits): close, under strict promotion.
    bf16, bvars, _ = lj.models.load(family["folder"], dtype=jnp.bfloat16)
    ours_bf16 = jax.jit(bf16.apply)(bvars, jnp.asarray(IDS))
    print(
        f"{family['name']}: logits vs transformers, relative: fp32 {_rel(ours, ref):.1e}, bf16 {_rel(ours_bf16, ref):.1e}"
    )
    assert _rel(ours, ref) <= 1e-4
    assert _rel(ours_bf16, ref) <= 3e-2
    if family["name"] == "llama":  # scanned layers, rematerialised with the "dots" policy: the same numbers
        scanned, svars, _ = lj.models.load(family["folder"], scan_layers=True, remat="dots")
        assert scanned.config.remat == "dots" and "layers" in svars["params"]
        assert _rel(jax.jit(scanned.apply)(svars, jnp.asarray(IDS)), ref) <= 1e-4
    # The family's feature is exercised: without it the logits move.
    plain = {
        "llama": dict(rope_scaling=None),
        "mistral": dict(sliding_window=None),
        "qwen2": dict(qkv_bias=False),
        "qwen3": dict(qk_norm=False),
    }[family["name"]]
    without = llama.Llama(dataclasses.replace(cfg, **plain))
    params = {"params": _drop(variables["params"], {"bias", "q_norm", "k_norm"})}  # what `without` lacks
    assert _rel(jax.jit(without.apply)(params, jnp.asarray(IDS)), ref) > 1e-2


def _drop(tree, names):
    if not isinstance(tree, dict):
        return tree
    return {k: _drop(v, names) for k, v in tree.items() if k not in names}


def test_greedy_generation_matches_transformers(family):
    prompt = IDS[:, :4]
    hf = family["hf"]
    with torch.no_grad():
        theirs = hf.generate(
            torch.from_numpy(prompt),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, 4:].numpy()
    ours = llama.generate(family["model"].apply, family["variables"], jnp.asarray(prompt), 16)
    np.testing.assert_array_equal(np.asarray(ours), theirs)
    assert len(set(theirs[0].tolist())) > 2  # not a degenerate repetition


def test_wrap_equals_peft_lora_on_the_exported_adapter(family, tmp_path):
    name, model, variables = family["name"], family["model"], family["variables"]
    targets = registry.get(name).targets("all-linear")
    deltas = lj.init(jax.random.key(1), variables, lj.LoraSpec(rank=4, alpha=8.0, targets=targets))
    deltas = jax.tree_util.tree_map(  # non-zero b (a fresh delta changes nothing)
        lambda x: 0.3 * jax.random.normal(jax.random.key(x.size), x.shape), deltas
    )
    ours = jax.jit(lj.wrap(model.apply, strict=True))(variables, deltas, jnp.asarray(IDS))  # no fallback
    lpeft.save_peft(tmp_path, deltas, model_type=name)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 2 * 7  # q, k, v, o, gate, up, down in both layers
    hf = peft.PeftModel.from_pretrained(family["hf"], tmp_path).eval()
    try:
        assert lj.count_params(deltas) == sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n)
        theirs = _hf_logits(hf, IDS)
    finally:
        hf.unload()  # give the shared base model back without its LoRA layers
    assert _rel(theirs, _hf_logits(family["hf"], IDS)) > 1e-2  # the adapter changes the model ...
    print(f"{name}: lj.wrap vs PEFT LoRA, relative: {_rel(ours, theirs):.1e}")
    assert _rel(ours, theirs) <= 1e-4  # ... the same way in both libraries
    back = lpeft.load_peft(tmp_path, variables, model_type=name)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), back, deltas)


def test_remat_dots_keeps_values_and_grads():
    """``remat="dots"`` (projection matmuls saved) under ``nn.scan``: same loss and delta gradients as no remat."""
    tiny = dict(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )
    ids = jnp.asarray(IDS[:1, :6] % 32)
    model = llama.Llama(llama.LlamaConfig(**tiny, scan_layers=True))
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids))  # the same parameters for both
    spec = lj.LoraSpec(rank=2, targets=llama.DEFAULT_TARGETS, axes={".*": lj.LoraAxes((0,), (1,), (2,))})
    deltas = jax.tree_util.tree_map(lambda x: 0.1 + 0 * x, lj.init(jax.random.key(1), variables, spec))

    def value_and_grads(remat):
        model = llama.Llama(llama.LlamaConfig(**tiny, scan_layers=True, remat=remat))
        loss = lambda d: jnp.mean(lj.wrap(model.apply, strict=True)(variables, d, ids) ** 2)
        return jax.jit(jax.value_and_grad(loss))(deltas)

    assert llama.LlamaConfig(**tiny, remat=True).remat == "full"
    assert llama.LlamaConfig(**tiny, remat=False).remat == "none"
    dots = llama.Llama(llama.LlamaConfig(**tiny, scan_layers=True, remat="dots"))
    assert "policy=DotsSaveable(only_if_no_batch_dims=True)" in str(
        jax.make_jaxpr(lambda v: dots.apply(v, ids))(variables)
    )  # the policy reaches jax.checkpoint
    (v0, g0), (v1, g1) = value_and_grads("none"), value_and_grads("dots")
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), g1, g0)


def test_all_linear_targets_every_projection_not_the_head():
    regex = registry.get("qwen2").targets("all-linear")
    model = llama.Llama(
        llama.LlamaConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            model_type="qwen2",
            qkv_bias=True,
        )
    )
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    paths = [lj.spec.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    hit = sorted(p for p in paths if lj.LoraSpec(rank=1, targets=regex).matches(p))
    assert hit == sorted(f"params/layers_0/{m}/kernel" for m in llama.HF_PROJECTIONS)
    assert registry.get("qwen3").targets(None) == llama.DEFAULT_TARGETS
    assert registry.resolve_targets("smollm2-135m", r".*/up/kernel") == r".*/up/kernel"


@pytest.mark.parametrize("family", ["qwen2"], indirect=True)
def test_bad_folders_and_configs(family, tmp_path):
    """Unsupported model_type / config fields and tensors that do not fit: named, with the fix."""
    folder = family["folder"]
    config = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(folder / "model.safetensors")

    def load_with(cfg):
        (bad / "config.json").write_text(json.dumps(cfg))
        return lj.models.load(bad)

    with pytest.raises(
        ValueError,
        match=r"Unsupported model_type 'mamba'.*supported: \[.*'llama'.*'mistral'"
        r".*'qwen2'.*'qwen3'.*\]",
    ):
        load_with({**config, "model_type": "mamba"})
    with pytest.raises(
        ValueError,
        match=r"rope_parameters=.*not supported: rope_type 'yarn'; supported rope "
        r"types: \['default', 'llama3'\]",
    ):
        load_with({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
    with pytest.raises(
        ValueError, match=r"rope_scaling=.*rope_type 'llama3' needs .*missing \['low_freq_factor'"
    ):
        load_with({**config, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(
        ValueError, match=r"layer_types=\['full_attention', 'sliding_attention'\] is not supported"
    ):
        load_with(
            {
                **config,
                "use_sliding_window": True,
                "sliding_window": 4,
                "max_window_layers": 1,
                "layer_types": None,
            }
        )
    with pytest.raises(ValueError, match=r"mlp_bias is not supported \(\{'mlp_bias': True\}\)"):
        load_with({**config, "mlp_bias": True})
    with pytest.raises(ValueError, match=r"hidden_act='gelu' is not supported"):
        load_with({**config, "hidden_act": "gelu"})
    with pytest.raises(
        ValueError,
        match=r"remat='sometimes' is not a remat policy; use one of "
        r"\['none', 'dots', 'full'\]",
    ):
        lj.models.load(folder, remat="sometimes")
    # A folder whose tensors do not fit its config: the tensor and both shapes.
    with pytest.raises(
        ValueError,
        match=r"(?s)qwen2 checkpoint does not fit its config.*tensor "
        r"'model.layers.0.self_attn.q_proj.weight' has shape \(32, 32\), expected \(48, 32\)",
    ):
        load_with({**config, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8})
    # All layers sliding (max_window_layers=0) is one window for every layer: supported.
    (bad / "config.json").write_text(
        json.dumps(
            {
                **config,
                "use_sliding_window": True,
                "sliding_window": 4,
                "max_window_layers": 0,
                "layer_types": None,
            }
        )
    )
    assert lhf.load_hf(bad)[0].config.sliding_window == 4
