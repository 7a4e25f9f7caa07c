"""The memory planner: the real train step compiled on abstract inputs for simulated and TPU devices.

Each compile runs in a child process (the planner's own), on a tiny Llama written as a config.json.
"""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

from lora_jax.train import plan as plan_lib
from lora_jax.train import plan_configs, plan_search, plan_targets
from lora_jax.train.cli import main
from lora_jax.train.plan_cli import format_report

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

# A small Llama whose parameters (not activations) dominate memory: 4.3M parameters, 8 devices.
TINY = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps(TINY))
    return str(folder)


def _request(model, **kw):
    kw = {"devices": 8, "mesh": "fsdp=8", "batch": 8, "seq": 16, "rank": 4, **kw}
    return plan_lib.PlanRequest(model, **kw)


def _shard_bytes(shape, shards, itemsize=2):
    return math.prod(shape) // shards * itemsize


def test_cpu_lora_below_full(tiny, capsys):
    """CLI --json on 8 simulated devices; LoRA's total is well below full fine-tuning's."""
    argv = [
        "plan",
        "--model",
        tiny,
        "--devices",
        "8",
        "--mesh",
        "data=1,fsdp=8,tensor=1",
        "--method",
        "lora",
        "--rank",
        "4",
        "--batch",
        "8",
        "--seq",
        "16",
        "--dtype",
        "float32",
        "--device-memory",
        "1GiB",
        "--json",
    ]
    assert main(argv) == 0
    lora = json.loads(capsys.readouterr().out)
    # float32: the host compiler computes bfloat16 matmuls in float32, i.e. holds float32 copies of
    # bfloat16 weights, which would blur the comparison on this target.
    full = plan_lib.plan(_request(tiny, method="full", dtype="float32"))
    for r in (lora, full):
        pd = r["per_device"]
        assert r["status"] == "ok" and r["devices"] == 8 and r["device_kind"] == "cpu"
        assert pd["total"] == pd["arguments"] + pd["temp"] + pd["output"] - pd["alias"]
        # The per-tree split accounts for the compiler's argument bytes (no layout padding on the host;
        # the PRNG key is not an argument: unused without dropout).
        assert pd["params"] + pd["deltas"] + pd["opt_state"] + pd["batch"] == pd["arguments"]
    assert lora["method"] == "lora" and full["method"] == "full"
    # Base params: every kernel split 8 ways over fsdp (norm scales are replicated).
    d, f, L = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    kernels = 2 * 256 * d + L * (2 * d * d + 2 * d * 128 + 3 * d * f)
    norms = (2 * L + 1) * d * 4
    assert lora["per_device"]["params"] == _shard_bytes((kernels,), 8, itemsize=4) + norms
    assert lora["per_device"]["deltas"] > 0 and full["per_device"]["deltas"] == 0
    assert full["per_device"]["opt_state"] > 1.9 * full["per_device"]["params"]  # adam mu + nu
    assert lora["per_device"]["total"] < 0.6 * full["per_device"]["total"]
    assert lora["trainable_params"] < 0.01 * lora["model_params"] == 0.01 * full["trainable_params"]
    assert lora["fits"] is True and lora["device_memory"] == 2**30 and full["fits"] is None
    text = format_report(lora)
    assert "LoRA r=4" in text and "8 x cpu (cpu)" in text and "of 1.00 GiB: fits" in text


def test_cpu_qlora_base_bytes(tiny):
    """--method qlora: the base as NF4 codes and scales (abstract, sharded like each kernel); the step's
    arguments are at most 0.3x LoRA's base bytes on the same mesh; counts and bytes from the parts."""
    import jax
    import jax.numpy as jnp

    import lora_jax as lj

    kw = dict(devices=2, mesh="fsdp=2", batch=2, dtype="float32")
    lora = plan_lib.plan(_request(tiny, **kw))
    qlora = plan_lib.plan(_request(tiny, method="qlora", **kw))
    pd = qlora["per_device"]
    assert qlora["status"] == "ok" and qlora["method"] == "qlora"
    assert pd["params"] + pd["deltas"] + pd["opt_state"] + pd["batch"] == pd["arguments"]
    assert pd["arguments"] <= 0.3 * lora["per_device"]["params"], (pd["arguments"], lora["per_device"])
    assert (
        pd["deltas"] == lora["per_device"]["deltas"] and qlora["trainable_params"] == lora["trainable_params"]
    )
    # The same figures from the dense shapes, computed here: every kernel but lm_head quantized.
    d, f, L = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    kernels = L * (2 * d * d + 2 * d * 128 + 3 * d * f)
    assert qlora["quantized_params"] == kernels and qlora["model_params"] == lora["model_params"]
    shapes = [(L, d, d), (L, d, 128), (L, d, 128), (L, d, d), (L, d, f), (L, d, f), (L, f, d)]
    q = lj.quant.tree.abstract_quantize(
        {f"k{i}/kernel": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)},
        plan_lib.QLORA_SPEC,
    )
    assert qlora["quantized_bytes"] == lj.quant.base_bytes(q)
    nbits = 4 + 8 / 64 + 32 / 64 / 256  # codes, int8 scales, a float32 per 256 scales (+ 4 B per layer)
    assert qlora["quantized_bytes"] == pytest.approx(kernels * nbits / 8, rel=2e-3)
    assert qlora["base_bytes"] == qlora["quantized_bytes"] + lora["dense_base_bytes"] - 4 * kernels
    assert "QLoRA (nf4, blocks of 64, double quant" in format_report(qlora)


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (the tpu extra)")
def test_tpu_target_tiny(tiny):
    """The TPU compiler's own figures for a v5e 2x2 slice, with no TPU."""
    r = plan_lib.plan(_request(tiny, devices=None, mesh="fsdp=-1", batch=None, target="tpu:v5e:2x2"))
    assert r["status"] == "ok" and r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert "TPU v5" in r["device_kind"] and r["batch"] == 4
    assert r["device_memory"] == plan_targets.TPU_HBM["v5e"] and r["fits"] is True
    assert 0 < r["per_device"]["total"] < 2**30
    # Too much for 16 GB chips: the TPU compiler refuses the program; its figures are reported.
    r = plan_lib.plan(_request(tiny, devices=None, mesh="fsdp=-1", batch=256, seq=4096, target="tpu:v5e:2x2"))
    assert r["status"] == "out_of_memory" and r["fits"] is False and "RESOURCE_EXHAUSTED" in r["error"]
    assert r["per_device"]["temp"] > r["device_memory"] and r["per_device"]["total"] > r["per_device"]["temp"]


# ---------------------------------------------------------------------------------------------------
# Bad input: each error before any compile.


def test_devices_smaller_than_mesh():
    with pytest.raises(ValueError, match=r"--devices 4 is smaller than the mesh 'fsdp=8' \(8 devices\)"):
        plan_lib.check(plan_lib.PlanRequest("smollm2-135m", devices=4, mesh="fsdp=8"))
    with pytest.raises(
        ValueError, match=r"--devices 16 is larger than the mesh 'data=2,fsdp=4' \(8 devices\)"
    ):
        plan_lib.check(plan_lib.PlanRequest("smollm2-135m", devices=16, mesh="data=2,fsdp=4"))
    with pytest.raises(
        ValueError, match=r"--devices 8 does not match --target tpu:v5e:2x2, which has 4 chips"
    ):
        plan_lib.check(plan_lib.PlanRequest("smollm2-135m", devices=8, target="tpu:v5e:2x2"))


def test_mesh_axis_must_divide_parameters():
    # SmolLM2: d = 576 is not divisible by fsdp = 5.
    with pytest.raises(
        ValueError,
        match=r"params/embed/embedding \(49152, 576\): dimension 1 \(576\) is not "
        r"divisible by mesh axis 'fsdp' \(size 5\)",
    ):
        plan_lib.check(plan_lib.PlanRequest("smollm2-135m", devices=5, mesh="fsdp=5"))
    # 3 key/value heads of 64 = 192 columns over tensor = 5: every offending parameter is listed.
    with pytest.raises(
        ValueError,
        match=r"(?s)params/layers/attn/key/kernel \(30, 576, 192\): dimension 2 \(192\)"
        r" is not divisible by mesh axis 'tensor' \(size 5\).*mlp/down",
    ):
        plan_lib.check(plan_lib.PlanRequest("smollm2-135m", devices=5, mesh="tensor=5"))


def test_unknown_model_lists_known():
    with pytest.raises(
        ValueError, match=r"unknown model 'llama-9b'.*'gemma-2-9b'.*'llama-3-8b'.*'smollm2-135m'"
    ):
        plan_lib.check(plan_lib.PlanRequest("llama-9b", devices=1, mesh="fsdp=1"))


@pytest.mark.skipif(
    plan_targets._find("jax_plugins.xla_cuda12") is not None, reason="the CUDA plugin is installed"
)
def test_gpu_target_needs_the_extra(tiny):
    with pytest.raises(RuntimeError, match=r"the gpu: target needs the CUDA plugin .*lora_jax\[gpu-plan\]"):
        plan_lib.plan(_request(tiny, devices=1, mesh="fsdp=1", batch=1, target="gpu:h200"))


def test_other_bad_input(tiny):
    with pytest.raises(ValueError, match=r"--batch 6 is not a multiple of the data-parallel devices"):
        plan_lib.check(_request(tiny, batch=6))
    with pytest.raises(ValueError, match=r"--target 'tpu:v9:2x2'"):
        plan_lib.check(_request(tiny, target="tpu:v9:2x2"))
    with pytest.raises(ValueError, match=r"--remat 'sometimes'"):
        plan_lib.check(_request(tiny, remat="sometimes"))
    with pytest.raises(ValueError, match=r"--device-memory '141 potatoes'"):
        plan_lib.parse_bytes("141 potatoes")
    with pytest.raises(ValueError, match=r"--mesh 'fsdp=-1' has a -1 axis: give --devices"):
        plan_lib.check(_request(tiny, devices=None, mesh="fsdp=-1"))
    with pytest.raises(ValueError, match=r"--method 'qlora4': expected 'lora', 'qlora' or 'full'"):
        plan_lib.check(_request(tiny, method="qlora4"))
    # fsdp=8 splits the 256-wide input axis into shards of 32: NF4 blocks of 64 would cross them.
    with pytest.raises(
        ValueError,
        match=r"params/layers/attn/\w+/kernel: its block axis 1 \(size 256\) is sharded over mesh axis "
        r"\('fsdp',\) \(8 shards of 32\), so blocks of 64 would cross a shard boundary",
    ):
        plan_lib.check(_request(tiny, method="qlora"))
    with pytest.raises(ValueError, match=r"--seq 16 with 16 loss positions"):
        plan_lib.check(_request(tiny, loss_tokens=16))
    with pytest.raises(ValueError, match=r"--dtype 'bfloat17'"):
        plan_lib.check(_request(tiny, dtype="bfloat17"))
    with pytest.raises(ValueError, match=r"--targets '.\*/attn/qkv/kernel' matches no stacked kernel"):
        plan_lib.check(_request(tiny, targets=r".*/attn/qkv/kernel"))
    with pytest.raises(ValueError, match=r"searching what fits needs --device-memory"):
        plan_search.search(_request(tiny))
    with pytest.raises(ValueError, match=r"search axis 'rank'"):
        plan_search.search(_request(tiny, device_memory="1GB"), "rank")
    with pytest.raises(ValueError, match=r"model_type 'mamba'"):
        plan_configs.resolve(_folder_with(tiny, {"model_type": "mamba"}))


def _folder_with(tiny, config):
    folder = pathlib.Path(tiny).parent / "other"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_public_configs():
    assert {
        "gemma-2-9b",
        "llama-3-70b",
        "llama-3-8b",
        "llama-3.1-8b",
        "llama-3.1-70b",
        "llama-3.1-405b",
        "mistral-7b",
        "qwen2.5-7b",
        "qwen2.5-72b",
        "qwen3-8b",
        "qwen3-32b",
        "smollm2-135m",
    } <= set(plan_configs.known_models())
    counts = {}
    for name in plan_configs.known_models():
        spec = plan_configs.resolve(name)
        cfg = plan_configs.llama_config(spec)
        d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
        attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
        counts[name] = (
            L * (attn + 3 * d * f + 2 * d) + V * d * (1 if cfg.tie_word_embeddings else 2) + d
        ) / 1e9
    # Published sizes (billions): the shapes are those of the real models.
    assert counts["llama-3-8b"] == pytest.approx(8.03, abs=0.01)
    assert counts["llama-3-70b"] == pytest.approx(70.55, abs=0.01)
    assert counts["llama-3.1-405b"] == pytest.approx(405.85, abs=0.01)
    assert counts["qwen2.5-7b"] == pytest.approx(7.61, abs=0.01)  # q/k/v biases (0.0003B) not counted here
    assert counts["llama-3.1-8b"] == pytest.approx(8.03, abs=0.01)
    assert counts["llama-3.1-70b"] == pytest.approx(70.55, abs=0.01)
    assert counts["mistral-7b"] == pytest.approx(7.24, abs=0.01)
    assert counts["qwen2.5-72b"] == pytest.approx(72.71, abs=0.01)
    assert counts["qwen3-8b"] == pytest.approx(8.19, abs=0.01)
    assert counts["qwen3-32b"] == pytest.approx(32.76, abs=0.01)
    assert counts["gemma-2-9b"] == pytest.approx(9.24, abs=0.01)
    assert counts["smollm2-135m"] == pytest.approx(0.1345, abs=0.001)
    # The Llama-style families are planned exactly: Qwen's biases and q/k norms, Mistral's window, RoPE scaling.
    assert not any(plan_configs.resolve(n).notes for n in ("qwen2.5-7b", "llama-3-8b", "llama-3.1-405b"))
    exact = {n: plan_configs.llama_config(plan_configs.resolve(n)) for n in ("qwen2.5-7b", "qwen3-8b")}
    assert exact["qwen2.5-7b"].qkv_bias and exact["qwen3-8b"].qk_norm
    assert plan_configs.llama_config(plan_configs.resolve("mistral-7b")).sliding_window == 4096
    assert plan_configs.llama_config(plan_configs.resolve("llama-3.1-405b")).rope_scaling.factor == 8.0


def test_targets_and_environment():
    t = plan_targets.parse_target("tpu:v5p:8x8x4")
    assert (t.platform, t.num_devices) == ("tpu", 256)
    env = plan_targets.environment(
        plan_targets.parse_target("cpu"),
        8,
        base={"XLA_FLAGS": "--xla_foo --xla_force_host_platform_device_count=2"},
    )
    assert env["XLA_FLAGS"].split() == ["--xla_foo", "--xla_force_host_platform_device_count=8"]
    assert env["JAX_PLATFORMS"] == "cpu"
    env = plan_targets.environment(plan_targets.parse_target("gpu:h200"), 8, base={})
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and "--xla_gpu_autotune_level=0" in env["XLA_FLAGS"]
    assert plan_lib.parse_bytes("141GB") == 141 * 10**9 and plan_lib.parse_bytes("1.5GiB") == 3 * 2**29


@pytest.mark.slow
def test_search_largest_batch(tiny):
    r = plan_search.search(_request(tiny, seq=64, device_memory="24MiB"), "batch", max_compiles=5)
    values = [t["value"] for t in r["tried"]]
    assert values[:2] == [8, 16] and all(v % 8 == 0 for v in values)
    best = r["best"]
    assert best is not None and best["fits"] and best["per_device"]["total"] <= 24 * 2**20
    assert all(t["fits"] == (t["total"] <= 24 * 2**20) for t in r["tried"])
    assert not any(t["fits"] for t in r["tried"] if t["value"] > best["batch"])


@pytest.mark.slow
def test_scale_small(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "scale.py"), "--small", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "scale.json").read_text())
    rows = result["rows"]
    assert {r["method"] for r in rows} == {"lora", "full"}
    assert {r["target"] for r in rows} >= {"cpu"} | ({"tpu:v5e:2x2"} if HAS_LIBTPU else set())
    assert (tmp_path / "scale.md").read_text().startswith("|")
