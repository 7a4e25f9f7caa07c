"""Sharded loading (``lora_jax.models.load(folder, mesh=...)``) on 8 simulated CPU devices, fsdp=4 x tensor=2.

Small Hugging Face folders (Llama, GPT-2, BERT; float32 and bfloat16; one file and sharded with an
index) are written with the ``safetensors`` package. A worker process (this file run as a script, with
``--xla_force_host_platform_device_count=8`` set before JAX starts) loads each one sharded and
whole, and reports: bit equality, the sharding of every array against the family's rules, and the
bytes each device's callbacks read (counted in the one function that reads tensor bytes).

Two JAX processes on localhost (4 devices each, gloo) load one folder and count their own reads:
each reads its half. The pinned assets (SmolLM2's GGUF, MiniLM) load sharded by name too.

The error tests run here, on an abstract mesh: both errors come before any tensor is read or any
device is needed.
"""

import json
import os
import pathlib
import sys

import numpy as np
import pytest
from helpers import free_port, result, run_processes

MESH = "data=1,fsdp=4,tensor=2"

LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "hidden_act": "silu",
}
GPT2 = {"model_type": "gpt2", "vocab_size": 61, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 4}
BERT = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
}


def llama_tensors(config):
    """Hugging Face ``LlamaForCausalLM`` names -> shapes (PyTorch layout: ``(out, in)``)."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = (
        config["num_attention_heads"] * config["head_dim"],
        config["num_key_value_heads"] * config["head_dim"],
    )
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    return shapes


def gpt2_tensors(config):
    """Hugging Face ``GPT2LMHeadModel`` names -> shapes (Conv1D: ``(in, out)``; ``c_attn`` fused q/k/v)."""
    d, v, p = config["n_embd"], config["vocab_size"], config["n_positions"]
    shapes = {
        "transformer.wte.weight": (v, d),
        "transformer.wpe.weight": (p, d),
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
        "lm_head.weight": (v, d),
    }  # lm_head: tied, never read
    for i in range(config["n_layer"]):
        h = f"transformer.h.{i}."
        shapes.update(
            {
                h + "ln_1.weight": (d,),
                h + "ln_1.bias": (d,),
                h + "ln_2.weight": (d,),
                h + "ln_2.bias": (d,),
                h + "attn.c_attn.weight": (d, 3 * d),
                h + "attn.c_attn.bias": (3 * d,),
                h + "attn.c_proj.weight": (d, d),
                h + "attn.c_proj.bias": (d,),
                h + "mlp.c_fc.weight": (d, 4 * d),
                h + "mlp.c_fc.bias": (4 * d,),
                h + "mlp.c_proj.weight": (4 * d, d),
                h + "mlp.c_proj.bias": (d,),
            }
        )
    return shapes


def bert_tensors(config):
    """Hugging Face ``BertModel`` names -> shapes; the pooler is ignored by the loader, never read."""
    d, f = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (config["vocab_size"], d),
        "embeddings.position_embeddings.weight": (config["max_position_embeddings"], d),
        "embeddings.token_type_embeddings.weight": (config["type_vocab_size"], d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
        "pooler.dense.weight": (d, d),
        "pooler.dense.bias": (d,),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for m in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            shapes.update({p + m + ".weight": (d, d), p + m + ".bias": (d,)})
        for m in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes.update({p + m + ".weight": (d,), p + m + ".bias": (d,)})
        shapes.update(
            {
                p + "intermediate.dense.weight": (f, d),
                p + "intermediate.dense.bias": (f,),
                p + "output.dense.weight": (d, f),
                p + "output.dense.bias": (d,),
            }
        )
    return shapes


TENSORS = {"llama": llama_tensors, "gpt2": gpt2_tensors, "bert": bert_tensors}


def write_folder(folder, config, dtype="float32", shards=1, seed=0):
    """A Hugging Face folder with random weights: ``model.safetensors``, or ``shards`` files and an index."""
    import ml_dtypes
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    shapes = TENSORS[config["model_type"]](config)
    names = list(shapes)
    tensors = {n: (rng.standard_normal(shapes[n], dtype=np.float32) * 0.1).astype(np_dtype) for n in names}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


# (name, config, checkpoint dtype, shard files, load kwargs); "dtype" in kwargs is a jnp dtype name.
CASES = [
    ("llama_f32", {**LLAMA, "tie_word_embeddings": False}, "float32", 1, {}),
    (
        "llama_bf16_index_scan_tied",
        {**LLAMA, "tie_word_embeddings": True},
        "bfloat16",
        3,
        {"scan_layers": True},
    ),
    ("llama_f32_as_bf16_scan", LLAMA, "float32", 2, {"scan_layers": True, "dtype": "bfloat16"}),
    ("gpt2_f32", GPT2, "float32", 1, {}),
    ("bert_bf16_index", BERT, "bfloat16", 2, {}),
]


# --------------------------------------------------------------------------------------------------
# The worker: runs with 8 CPU devices (python tests/test_sharded_load.py OUT_DIR).


def _worker(out_dir):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lora_jax import models
    from lora_jax.models import lazy, registry, sharded
    from lora_jax.train import mesh as mesh_lib

    assert jax.device_count() == 8, jax.devices()
    mesh = mesh_lib.make_mesh(MESH)
    key = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")

    # Count the bytes each parameter block reads: _global_array is called once per parameter,
    # _read_shard once per distinct block (devices holding the same block share it), _read_slice is
    # the one function that reads tensor bytes from a file.
    leaves, stack = [], []
    orig_global, orig_shard, orig_slice = sharded._global_array, sharded._read_shard, lazy._read_slice

    def global_array(view, sharding):
        leaves.append({"sharding": sharding, "shape": view.shape, "reads": {}})
        return orig_global(view, sharding)

    def read_shard(view, index):
        stack.append(0)
        block = orig_shard(view, index)
        leaves[-1]["reads"][tuple(s.indices(n)[:2] for s, n in zip(index, view.shape))] = stack.pop()
        return block

    def read_slice(path, name, index):
        block = orig_slice(path, name, index)
        stack[-1] += block.nbytes
        return block

    sharded._global_array, sharded._read_shard, lazy._read_slice = global_array, read_shard, read_slice

    results = {}
    for name, config, ckpt_dtype, shards, kwargs in CASES:
        folder = write_folder(pathlib.Path(out_dir) / name, config, ckpt_dtype, shards)
        kw = dict(kwargs)
        if "dtype" in kw:
            kw["dtype"] = jnp.dtype(kw["dtype"])
        leaves.clear()
        model, got, _ = models.load(folder, mesh=mesh, **kw)
        ref_model, ref, _ = models.load(folder, **kw)  # the whole-model path, one device

        family = registry.family_of(model)
        want = nn.logical_to_mesh_sharding(
            family.logical_partition_specs(model), mesh, family.logical_axis_rules
        )
        want = {key(p): s for p, s in jax.tree_util.tree_leaves_with_path(want)}
        itemsize = np.dtype(jnp.dtype(ckpt_dtype)).itemsize
        arrays = jax.tree_util.tree_leaves_with_path(got)
        assert len(arrays) == len(leaves), (len(arrays), len(leaves))

        per_param, device_bytes, replicated_bytes, read_total = {}, {d.id: 0 for d in mesh.devices.flat}, 0, 0
        for (path, arr), (_, r), leaf in zip(arrays, jax.tree_util.tree_leaves_with_path(ref), leaves):
            r = np.asarray(r)
            a = np.asarray(arr)  # gathers the shards (one process holds all 8 devices)
            expect = r.astype(
                a.dtype
            )  # whole path: float32 from the checkpoint; a bf16 cast is exact to compare
            bit_equal = (
                a.dtype == expect.dtype and a.shape == expect.shape and a.tobytes() == expect.tobytes()
            )
            w = want[key(path)]
            shard_elems = int(np.prod(arr.sharding.shard_shape(arr.shape)))
            source_bytes = arr.size * itemsize
            # Bytes read for each device's block; a block shared by devices is read once, so it counts
            # fully for each of them (that is what each would read on its own host).
            indices = arr.sharding.devices_indices_map(arr.shape)
            for d, idx in indices.items():
                blk = tuple(s.indices(n)[:2] for s, n in zip(idx, arr.shape))
                device_bytes[d.id] += leaf["reads"][blk]
            read_total += sum(leaf["reads"].values())
            if arr.sharding.is_fully_replicated:
                replicated_bytes += source_bytes
            per_param[key(path)] = {
                "dtype": str(a.dtype),
                "ref_dtype": str(r.dtype),
                "bit_equal": bool(bit_equal),
                "spec": [x if x is None or isinstance(x, str) else list(x) for x in arr.sharding.spec],
                "sharding_as_rules": bool(
                    arr.sharding.is_equivalent_to(w, arr.ndim) and arr.sharding.mesh == mesh
                ),
                "read_per_device": sorted(
                    {
                        leaf["reads"][tuple(s.indices(n)[:2] for s, n in zip(i, arr.shape))]
                        for i in indices.values()
                    }
                ),
                "shard_source_bytes": shard_elems * itemsize,
                "source_bytes": source_bytes,
                "blocks_read": len(leaf["reads"]),
            }
        ckpt_bytes = sum(os.path.getsize(p) for p in folder.glob("*.safetensors"))
        ids = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]], jnp.int32)
        logits = jax.jit(model.apply)(got, ids)
        ref_logits = jax.jit(ref_model.apply)(ref, ids)
        results[name] = {
            "params": per_param,
            "device_bytes": device_bytes,
            "replicated_bytes": replicated_bytes,
            "read_total": read_total,
            "params_source_bytes": sum(p["source_bytes"] for p in per_param.values()),
            "checkpoint_file_bytes": ckpt_bytes,
            "param_dtype": str(jnp.dtype(model.config.param_dtype)),
            "max_logit_diff": float(jnp.max(jnp.abs(logits.astype(jnp.float32) - ref_logits))),
            "max_abs_logit": float(jnp.max(jnp.abs(ref_logits))),
        }
    print("RESULT " + json.dumps(results), flush=True)


def _process_worker(folder, process, port):
    """One of two JAX processes (4 CPU devices each, gloo): load sharded, count this process's reads."""
    from lora_jax.train import mesh as mesh_lib

    mesh_lib.init_distributed(f"127.0.0.1:{port}", 2, process)
    import jax

    from lora_jax import models
    from lora_jax.models import lazy

    read = [0]
    orig_slice = lazy._read_slice

    def read_slice(path, name, index):
        block = orig_slice(path, name, index)
        read[0] += block.nbytes
        return block

    lazy._read_slice = read_slice
    mesh = mesh_lib.make_mesh(MESH)
    _, got, _ = models.load(folder, mesh=mesh, scan_layers=True)
    lazy._read_slice = orig_slice
    _, ref, _ = models.load(folder, scan_layers=True)  # whole, on this process's first device
    expected, total, equal = 0, 0, True
    for arr, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        r = np.asarray(r).astype(arr.dtype)
        total += r.nbytes
        blocks = {
            tuple(s.indices(n)[:2] for s, n in zip(sh.index, arr.shape)) for sh in arr.addressable_shards
        }
        expected += sum(int(np.prod([b - a for a, b in blk])) * r.itemsize for blk in blocks)
        equal &= all(np.asarray(sh.data).tobytes() == r[sh.index].tobytes() for sh in arr.addressable_shards)
    print(
        "RESULT "
        + json.dumps(
            {
                "process": jax.process_index(),
                "local_devices": jax.local_device_count(),
                "devices": jax.device_count(),
                "read": read[0],
                "expected": expected,
                "total": total,
                "equal": bool(equal),
            }
        ),
        flush=True,
    )


def _assets_worker():
    """The pinned assets by name: SmolLM2's GGUF (read whole, then placed) and MiniLM's safetensors."""
    import jax

    from lora_jax import models
    from lora_jax.train import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(MESH)
    out = {}
    for name, kw in (("smollm2-135m", {"scan_layers": True}), ("minilm", {})):
        model, got, _ = models.load(name, mesh=mesh, **kw)
        _, ref, _ = models.load(name, **kw)
        want = jax.tree_util.tree_leaves(mesh_lib.param_shardings(model, got, mesh))
        pairs = list(zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)))
        out[name] = {
            "equal": all(np.asarray(a).tobytes() == np.asarray(r).tobytes() for a, r in pairs),
            "shardings": all(a.sharding == w for (a, _), w in zip(pairs, want)),
            "split": sum(not a.sharding.is_fully_replicated for a, _ in pairs),
            "leaves": len(pairs),
        }
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_load")
    [out] = run_processes([[sys.executable, __file__, str(tmp)]], devices=8)
    return result(out)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_sharded_load_equals_single_device_load_bit_for_bit(loaded, case):
    out = loaded[case]
    _, _, ckpt_dtype, _, kwargs = next(c for c in CASES if c[0] == case)
    want_dtype = kwargs.get("dtype", ckpt_dtype)  # a bf16 checkpoint stays bf16 unless a dtype is asked for
    assert out["param_dtype"] == want_dtype
    for path, p in out["params"].items():
        assert p["dtype"] == want_dtype, (path, p["dtype"])
        assert p["ref_dtype"] == "float32", path  # the whole-model path keeps its float32 parameters
        assert p["bit_equal"], path
    # Tolerance (relative to the largest logit): the same weights, summed over 8 shards in another order;
    # float32 compute, except where dtype=bfloat16 asked for bfloat16 compute too.
    rel = 3e-2 if kwargs.get("dtype") == "bfloat16" else 1e-5
    assert out["max_logit_diff"] <= rel * out["max_abs_logit"], (out["max_logit_diff"], out["max_abs_logit"])


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_every_array_has_the_sharding_of_its_rules(loaded, case):
    params = loaded[case]["params"]
    assert all(p["sharding_as_rules"] for p in params.values()), [
        k for k, p in params.items() if not p["sharding_as_rules"]
    ]


def test_sharding_specs_by_family(loaded):
    """Spot checks against each family's rules (embed -> fsdp, heads/kv_heads/mlp -> tensor)."""
    llama = loaded["llama_f32"]["params"]
    assert llama["params/layers_0/attn/query/kernel"]["spec"] == ["fsdp", "tensor"]  # (embed, heads)
    assert llama["params/layers_1/mlp/down/kernel"]["spec"] == ["tensor", "fsdp"]  # (mlp, embed)
    assert llama["params/embed/embedding"]["spec"] == ["tensor", "fsdp"]  # (vocab, embed)
    assert llama["params/lm_head/kernel"]["spec"] == ["fsdp", "tensor"]  # (embed, vocab)
    assert llama["params/final_norm/scale"]["spec"] == [None]  # (norm,): replicated
    scan = loaded["llama_bf16_index_scan_tied"]["params"]
    assert "params/lm_head/kernel" not in scan  # tied: no lm_head
    assert scan["params/layers/attn/key/kernel"]["spec"] == [
        None,
        "fsdp",
        "tensor",
    ]  # (layers, embed, kv_heads)
    gpt2 = loaded["gpt2_f32"]["params"]
    assert gpt2["params/layers_0/attn/value/kernel"]["spec"] == ["fsdp", "tensor"]  # from c_attn[:, 2D:3D]
    assert gpt2["params/wte/embedding"]["spec"] == [None, "fsdp"]  # vocab 61 is not split
    bert = loaded["bert_bf16_index"]["params"]
    assert bert["params/encoder/layers_0/mlp/up/bias"]["spec"] == ["tensor"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_each_device_reads_only_its_own_shard(loaded, case):
    """Per device (all 8 in this one process): the bytes its callbacks read are exactly its blocks'.

    A sharded parameter's device reads 1/8 (fsdp x tensor) or 1/4 or 1/2 of it; a replicated parameter
    (norm scales, GPT-2's position table's first axis...) counts fully for every device, as each host
    would read it. Devices holding the same block share one read, so the process reads each byte once.
    """
    out = loaded[case]
    for path, p in out["params"].items():
        assert p["read_per_device"] == [p["shard_source_bytes"]], (path, p)
    sharded_part = out["params_source_bytes"] - out["replicated_bytes"]
    for dev, got in out["device_bytes"].items():
        # Each device: at most 1/2 of the sharded part (dims split by only one of the two axes), plus
        # the replicated params, and for these models nowhere near the whole checkpoint.
        assert got <= sharded_part / 2 + out["replicated_bytes"], (dev, got)
        assert got < 0.3 * out["params_source_bytes"], (dev, got, out["params_source_bytes"])
    # The process as a whole read every parameter byte once: not 8 times, and never the whole file
    # beyond what the parameters use (tied / ignored tensors are not read at all).
    assert out["read_total"] == out["params_source_bytes"] <= out["checkpoint_file_bytes"]


def test_llama_device_reads_are_one_eighth(loaded):
    """Llama's parameters are all split over fsdp x tensor but the norm scales: 1/8 per device."""
    out = loaded["llama_f32"]
    want = (out["params_source_bytes"] - out["replicated_bytes"]) / 8 + out["replicated_bytes"]
    assert set(out["device_bytes"].values()) == {want}


def test_two_processes_each_read_only_their_half(tmp_path):
    """Two JAX processes on localhost (4 devices each) load one bf16 folder: each reads its own blocks.

    Every parameter of this Llama but the norm scales is split over fsdp (4, two per process), so each
    process reads about half the checkpoint; its shards equal the whole-model load bit for bit.
    """
    folder = write_folder(tmp_path / "m", {**LLAMA, "tie_word_embeddings": True}, "bfloat16", shards=2)
    port = free_port()
    argvs = [[sys.executable, __file__, "--process", str(folder), str(i), str(port)] for i in range(2)]
    outs = [result(out) for out in run_processes(argvs, devices=4)]
    assert sorted(o["process"] for o in outs) == [0, 1]
    for o in outs:
        assert o["local_devices"] == 4 and o["devices"] == 8
        assert o["equal"]
        assert o["read"] == o["expected"]  # exactly the distinct blocks of its own 4 devices
        assert 0.45 * o["total"] < o["read"] < 0.55 * o["total"], o  # about half, not the whole checkpoint


@pytest.mark.assets
def test_assets_by_name_load_sharded():
    """GGUF keeps working (dequantized whole, then placed with its shardings); MiniLM by name too."""
    [out] = map(result, run_processes([[sys.executable, __file__, "--assets"]], devices=8))
    for name, o in out.items():
        assert o["equal"] and o["shardings"], (name, o)
        assert o["split"] >= o["leaves"] // 2, (name, o)  # most parameters are split across devices


# --- bad input: both checked before any tensor is read, so an abstract mesh serves -------------------


@pytest.fixture
def no_reads(monkeypatch):
    from lora_jax.models import lazy

    def fail(path, name, index):
        raise AssertionError(f"read {name} from {path}")

    monkeypatch.setattr(lazy, "_read_slice", fail)


def _abstract_mesh(fsdp=4, tensor=2):
    import jax

    return jax.sharding.AbstractMesh((1, fsdp, tensor), ("data", "fsdp", "tensor"))


def test_missing_shard_names_the_file_and_a_tensor(tmp_path, no_reads):
    from lora_jax import models

    folder = write_folder(tmp_path / "m", LLAMA, "bfloat16", shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        ValueError,
        match=r"missing safetensors shards \['model-00002-of-00003.safetensors'\] "
        r"listed in model.safetensors.index.json \(model-00002-of-00003"
        r".safetensors holds \d+ tensors, e.g. 'model\.",
    ):
        models.load(folder, mesh=_abstract_mesh())
    with pytest.raises(
        ValueError, match=r"model-00002-of-00003.safetensors holds \d+ tensors, e.g. 'model\."
    ):
        models.load(folder)  # the whole-model path says the same


def test_mesh_axis_that_does_not_divide_names_parameter_axis_and_sizes(tmp_path, no_reads):
    from lora_jax import models

    folder = write_folder(tmp_path / "m", {**LLAMA, "intermediate_size": 66}, "float32")
    # mlp 66 over tensor=4 does not divide; hidden 32 over fsdp=2 does.
    with pytest.raises(
        ValueError,
        match=r"(?s)nothing was read.*params/layers_0/mlp/gate/kernel \(32, 66\): "
        r"dimension 1 \(logical axis 'mlp'\) has size 66, not divisible by "
        r"mesh axis 'tensor' of size 4.*params/layers_1/mlp/down/kernel",
    ):
        models.load(folder, mesh=_abstract_mesh(fsdp=2, tensor=4))
    with pytest.raises(
        ValueError,
        match=r"params/layers/mlp/up/kernel \(2, 32, 66\): dimension 2 "
        r"\(logical axis 'mlp'\) has size 66, not divisible by mesh axis 'tensor'",
    ):
        models.load(folder, mesh=_abstract_mesh(fsdp=2, tensor=4), scan_layers=True)


def test_rules_without_mesh_is_an_error(tmp_path):
    from lora_jax import models

    with pytest.raises(ValueError, match="rules= maps logical axes to a mesh: pass mesh= too"):
        models.load(write_folder(tmp_path / "m", LLAMA), rules=(("embed", None),))


def test_lazy_views_read_only_their_block():
    """Transpose, slice, cast and stack map a block back to the source block (no file needed)."""
    import ml_dtypes

    from lora_jax.models import lazy

    src = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    reads = []

    class Counting(lazy.ArrayTensor):
        def _read(self, bounds):
            reads.append(bounds)
            return super()._read(bounds)

    w = Counting(src)
    view = lazy.stack([lazy.to_param(lazy.as_source(w)[..., 2:8].T, ml_dtypes.bfloat16)] * 3)  # (3, 6, 6)
    assert view.shape == (3, 6, 6) and view.dtype == np.dtype(ml_dtypes.bfloat16)
    block = view.read((slice(1, 2), slice(0, 3), slice(4, 6)))
    np.testing.assert_array_equal(block, src[4:6, 2:5].T[None].astype(ml_dtypes.bfloat16))
    assert reads == [((4, 6), (2, 5))]  # one layer, 2 x 3 source elements
    with pytest.raises(TypeError, match="contiguous slices only"):
        w[::2]


if __name__ == "__main__":
    if sys.argv[1] == "--process":
        _process_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "--assets":
        _assets_worker()
    else:
        _worker(sys.argv[1])
