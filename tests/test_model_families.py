"""Model families: the registry, each family's own tables, and its own mesh rules in `param_shardings`."""

import json
import re
import subprocess
import sys

import flax.linen as nn
import jax
import pytest
from helpers import child_env

import lora_jax as lj
from lora_jax import peft
from lora_jax.models import bert, gpt2, llama, registry
from lora_jax.train import config as config_lib

TINY = {
    "llama": lambda: llama.Llama(
        llama.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
        )
    ),
    "bert": lambda: bert.BertModel(
        bert.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_layers=2,
            num_heads=4,
            intermediate_size=32,
            max_position_embeddings=8,
        )
    ),
    "gpt2": lambda: gpt2.GPT2LMHeadModel(
        gpt2.GPT2Config(vocab_size=61, max_position_embeddings=8, hidden_size=16, num_layers=2, num_heads=4)
    ),
}


def _param_paths(model) -> set[str]:
    specs = registry.family_of(model).logical_partition_specs(model)
    leaves = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    return {jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves}


def _hf_tensor_names(family_name: str, model) -> set[str]:
    """The Hugging Face state-dict names the family's own loader reads."""
    if family_name == "llama":
        return set(llama._expected_hf_shapes(model.config))
    if family_name == "bert":
        return {hf for hf, _ in bert._hf_names(model.config).values()}
    return set(gpt2._hf_names(model.config).values())


def test_registry_lookups(tmp_path):
    assert {"bert", "gpt2", "llama", "mistral", "qwen2", "qwen3"} <= set(registry.FAMILIES)
    for name, make in TINY.items():
        family = registry.get(name)
        assert family.model_type == name and registry.family_of(make()) is family
    clf = bert.BertClassifier(
        bert.BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
    )
    assert registry.family_of(clf) is bert.FAMILY
    assert registry.family_of(object()) is None
    assert (
        registry.family_for("smollm2-135m") is llama.FAMILY and registry.family_for("minilm") is bert.FAMILY
    )
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert registry.family_for(tmp_path) is gpt2.FAMILY
    assert registry.family_for(tmp_path / "missing") is None
    with pytest.raises(ValueError, match=r"Unknown model family 't5'; known: \['bert', .*'gpt2', 'llama', "):
        registry.get("t5")


@pytest.mark.parametrize("name", sorted(TINY))
def test_family_tables_name_real_parameters(name):
    """Every projection of the family's HF table is a kernel of the model and a tensor its loader reads."""
    model = TINY[name]()
    family = registry.family_of(model)
    paths, hf_names = _param_paths(model), _hf_tensor_names(name, model)
    for projection in family.hf_projections:
        for i in range(2):
            assert f"params/{family.layers}_{i}/{projection}/kernel" in paths
            assert family.hf_module(projection, i) + ".weight" in hf_names
    # The default targets hit the attention query and value kernels of every layer, and nothing else.
    targeted = {p for p in paths if re.fullmatch(family.default_targets, p)}
    assert targeted == {
        f"params/{family.layers}_{i}/attn/{m}/kernel" for i in range(2) for m in ("query", "value")
    }
    used = {
        a
        for spec in jax.tree_util.tree_leaves(
            family.logical_partition_specs(model), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
        for a in spec
        if a is not None
    }
    assert used <= {axis for axis, _ in family.logical_axis_rules}  # every logical axis has a rule


def test_train_config_default_targets_come_from_the_family(tmp_path):
    assert config_lib.TrainConfig().targets == llama.DEFAULT_TARGETS
    assert config_lib.TrainConfig(model="tiny-llama").targets == llama.DEFAULT_TARGETS
    assert config_lib.TrainConfig(model="minilm").targets == bert.DEFAULT_TARGETS
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert config_lib.TrainConfig(model=str(tmp_path)).targets == gpt2.DEFAULT_TARGETS
    assert config_lib.TrainConfig(targets=r".*/mlp/up/kernel").targets == r".*/mlp/up/kernel"
    assert config_lib.from_args(["--model", "minilm"]).targets == bert.DEFAULT_TARGETS


def test_peft_files_only_for_families_with_a_task_type(tmp_path):
    _, variables = gpt2.init(jax.random.key(0), TINY["gpt2"]().config)
    deltas = lj.init(jax.random.key(1), variables, lj.LoraSpec(rank=2, targets=gpt2.DEFAULT_TARGETS))
    with pytest.raises(
        ValueError,
        match=r"model_type='gpt2' is not supported for PEFT files; use one of "
        r"\['bert', .*'llama', 'mistral', 'qwen2', 'qwen3'\]",
    ):
        peft.save_peft(tmp_path, deltas, model_type="gpt2")
    assert (
        peft.module_name("params/encoder/layers_1/attn/value/kernel", "bert")
        == "encoder.layer.1.attention.self.value"
    )
    assert (
        peft.module_name("params/layers/mlp/down/kernel", "llama", layer=3) == "model.layers.3.mlp.down_proj"
    )


WORKER = r"""
import json, sys, warnings
import jax, jax.numpy as jnp, numpy as np
from lora_jax.models import bert, gpt2
from lora_jax.train import mesh as mesh_lib

def spec(s):
    return [a if a is None or isinstance(a, str) else list(a) for a in s.spec]

mesh = mesh_lib.make_mesh("data=2,fsdp=2,tensor=2")
models = {
    "bert": bert.init(jax.random.key(0), bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=4,
                                                        intermediate_size=32, max_position_embeddings=8)),
    "gpt2": gpt2.init(jax.random.key(0), gpt2.GPT2Config(vocab_size=61, max_position_embeddings=8, hidden_size=16,
                                                        num_layers=1, num_heads=4)),
}
out = {}
for name, (model, variables) in models.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shardings = mesh_lib.param_shardings(model, variables, mesh)
    ids = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]], jnp.int32)
    placed = mesh_lib.place(variables, shardings)
    diff = float(jnp.max(jnp.abs(jax.jit(model.apply)(placed, ids) - jax.jit(model.apply)(variables, ids))))
    leaves = jax.tree_util.tree_leaves_with_path(shardings)
    out[name] = {"specs": {jax.tree_util.keystr(p, simple=True, separator="/"): spec(s) for p, s in leaves},
                 "warnings": [str(w.message) for w in caught], "diff": diff}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded():
    env = child_env(8)
    proc = subprocess.run(
        [sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_bert_params_follow_berts_own_rules(sharded):
    """On a data=2, fsdp=2, tensor=2 mesh; bert.LOGICAL_AXIS_RULES keeps the vocabulary whole."""
    out = sharded["bert"]
    assert not [w for w in out["warnings"] if "logical-axis" in w]
    specs = out["specs"]
    assert specs["params/encoder/layers_0/attn/query/kernel"] == ["fsdp", "tensor"]  # (embed, heads)
    assert specs["params/encoder/layers_0/attn/out/kernel"] == ["tensor", "fsdp"]  # (heads, embed)
    assert specs["params/encoder/layers_0/mlp/up/bias"] == ["tensor"]  # (mlp,)
    assert specs["params/encoder/layers_0/attn_ln/scale"] == ["fsdp"]  # (embed,)
    assert specs["params/embeddings/word/embedding"] == [None, "fsdp"]  # (vocab, embed)
    # Llama's rules (what every model got before) would have split the vocabulary over "tensor".
    assert tuple(nn.logical_to_mesh_axes(("vocab", "embed"), llama.LOGICAL_AXIS_RULES_DEFAULT)) == (
        "tensor",
        "fsdp",
    )
    assert out["diff"] <= 1e-5  # the sharded forward pass equals the unsharded one (float32)


def test_gpt2_params_follow_gpt2s_own_rules(sharded):
    """GPT-2's odd vocabulary (61 here, 50257 in GPT-2) is never split: its own rules make it placeable."""
    out = sharded["gpt2"]
    assert not [w for w in out["warnings"] if "logical-axis" in w]
    specs = out["specs"]
    assert specs["params/layers_0/attn/query/kernel"] == ["fsdp", "tensor"]
    assert specs["params/layers_0/mlp/down/kernel"] == ["tensor", "fsdp"]
    assert specs["params/wte/embedding"] == [None, "fsdp"]
    assert specs["params/wpe/embedding"] == [None, "fsdp"]
    assert out["diff"] <= 1e-5
