"""PEFT interop: our export loads into Hugging Face PEFT and gives the same logits as `lj.wrap`; a PEFT
adapter loads into lora_jax and gives the same logits as PEFT. float32, max abs logit diff <= 1e-4."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import peft as lpeft
from lora_jax.models import hf as lhf
from lora_jax.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
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
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return folder


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def random_deltas(variables, spec, seed=3):
    d = lj.init(jax.random.key(seed), variables, spec)
    leaves, tree = jax.tree_util.tree_flatten(d)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_export_loads_in_peft_with_same_logits(tiny_llama, tmp_path, scan):
    model, variables, _ = lhf.load_hf(tiny_llama, scan_layers=scan)
    axes = {".*": lj.LoraAxes((0,), (1,), (2,))} if scan else {}
    spec = lj.LoraSpec(
        rank=4,
        alpha=8.0,
        targets=r".*/(attn/(query|value)|mlp/down)/kernel",
        rank_pattern={r".*/mlp/down/kernel": 2},
        alpha_pattern={r".*/mlp/down/kernel": 5.0},
        axes=axes,
    )
    deltas = random_deltas(variables, spec)
    lpeft.save_peft(tmp_path, deltas, "llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and len(cfg["target_modules"]) == 6
    hf = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tiny_llama), tmp_path
    ).eval()
    ids = jax.random.randint(jax.random.key(0), (2, 7), 0, 64)
    ours = jax.jit(lj.wrap(model.apply))(variables, deltas, ids)
    theirs = hf_logits(hf, ids)
    base = hf_logits(transformers.LlamaForCausalLM.from_pretrained(tiny_llama).eval(), ids)
    assert np.abs(theirs - base).max() > 1e-2  # the adapter does change the model ...
    assert np.abs(np.asarray(ours) - theirs).max() < 1e-4  # ... the same way in both libraries
    # merge_and_unload in PEFT == lj.merge
    merged = hf.merge_and_unload()
    assert (
        np.abs(hf_logits(merged, ids) - np.asarray(model.apply(lj.merge(variables, deltas), ids))).max()
        < 1e-4
    )


def test_peft_adapter_loads_into_lora_jax(tiny_llama, tmp_path):
    torch.manual_seed(1)
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_llama)
    conf = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True
    )
    hf = peft.get_peft_model(base, conf)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path)
    model, variables, _ = lhf.load_hf(tiny_llama)
    deltas = lpeft.load_peft(tmp_path, variables, "llama")
    assert lj.count_params(deltas) == sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n)
    assert deltas["params"]["layers_0"]["attn"]["query"]["kernel"].scale == pytest.approx(16 / 2.0)  # rsLoRA
    ids = jax.random.randint(jax.random.key(0), (2, 7), 0, 64)
    ours = np.asarray(jax.jit(lj.wrap(model.apply))(variables, deltas, ids))
    assert np.abs(ours - hf_logits(hf.eval(), ids)).max() < 1e-4


def test_peft_errors(tiny_llama, tmp_path):
    model, variables, _ = lhf.load_hf(tiny_llama)
    deltas = random_deltas(variables, lj.LoraSpec(rank=2, targets=r".*/attn/query/kernel"))
    lpeft.save_peft(tmp_path / "ok", deltas, "llama")
    other = llama.Llama(
        llama.LlamaConfig(
            vocab_size=64, hidden_size=48, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
        )
    )
    other_vars = nn.unbox(jax.jit(other.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    with pytest.raises(
        ValueError, match=r"q_proj -> params/layers_0/attn/query/kernel: adapter shapes .* do not fit"
    ):
        lpeft.load_peft(tmp_path / "ok", other_vars, "llama")
    small = llama.Llama(
        llama.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2
        )
    )
    small_vars = nn.unbox(jax.jit(small.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    with pytest.raises(ValueError, match=r"match no parameter .*refusing a partial load"):
        lpeft.load_peft(tmp_path / "ok", small_vars, "llama")
    (tmp_path / "ok" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read the adapter tensors"):
        lpeft.load_peft(tmp_path / "ok", variables, "llama")
    with pytest.raises(ValueError, match=r"not a PEFT adapter folder"):
        lpeft.load_peft(tmp_path / "missing", variables, "llama")
    with pytest.raises(ValueError, match=r"model_type='t5' is not supported"):
        lpeft.save_peft(tmp_path / "x", deltas, "t5")
    bad = random_deltas(variables, lj.LoraSpec(rank=2, targets=r".*/embed/embedding"))
    with pytest.raises(ValueError, match=r"params/embed/embedding: no Hugging Face llama module"):
        lpeft.to_peft(bad, "llama")


def test_bert_adapter_both_ways(tmp_path):
    """PEFT on a BertModel -> lora_jax, and lora_jax -> PEFT: same hidden states (max abs diff <= 1e-4)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    base = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    base.save_pretrained(tmp_path / "bert")
    model, variables, _ = lhf.load_hf(tmp_path / "bert")
    hf = peft.get_peft_model(
        base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "dense"])
    )
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path / "adapter")
    ids = np.random.default_rng(0).integers(0, 50, (2, 7))
    mask = np.ones_like(ids)
    with torch.no_grad():
        theirs = hf.eval()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).last_hidden_state.numpy()
    deltas = lpeft.load_peft(tmp_path / "adapter", variables, "bert")
    ours = np.asarray(lj.wrap(model.apply)(variables, deltas, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(ours - theirs).max() < 1e-4
    # and back: our export of those deltas reloads in PEFT with the same outputs
    lpeft.save_peft(tmp_path / "ours", deltas, "bert")
    again = peft.PeftModel.from_pretrained(
        transformers.BertModel.from_pretrained(tmp_path / "bert", add_pooling_layer=False), tmp_path / "ours"
    ).eval()
    with torch.no_grad():
        back = again(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert np.abs(back - theirs).max() < 1e-4
