"""QLoRA in the training engine: ``--quantize`` settings, and `loop.build` with a quantized base."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.train import config as config_lib
from lora_jax.train import loop
from lora_jax.train import mesh as mesh_lib
from lora_jax.train import step as step_lib


def test_quantize_setting_is_checked():
    with pytest.raises(
        ValueError, match=r"--quantize must be nf4 or int8 \(or left out for a float base\), got 'fp4'"
    ):
        config_lib.TrainConfig(quantize="fp4")
    cfg = config_lib.TrainConfig(model="tiny-llama", quantize="nf4")
    assert loop.quant_spec(cfg) == lj.QuantSpec(
        format="nf4", targets=r".*/kernel", exclude=r".*lm_head.*", block_size=16, outlier_rows=2
    )
    assert loop.quant_spec(config_lib.TrainConfig()) is None


@pytest.fixture(scope="module")
def tiny_llama():
    """(model, variables) of the tiny scanned Llama, initialised once for the module (read only)."""
    return loop.tiny_llama(64, scan_layers=True)


@pytest.mark.standard_promotion  # optax.adam's bias correction (optax.tree.bias_correction) computes `float ** int32`
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_build_with_a_quantized_base_trains_and_scores(fmt, tiny_llama):
    """The train step and the score step run on the quantized base; the base shrinks; scores match
    float LoRA on the dequantized base (1e-5): the same score function, unsharded, on dense params."""
    model, variables = tiny_llama
    cfg = config_lib.TrainConfig(model="tiny-llama", quantize=fmt)
    spec = loop.lora_spec(cfg, variables)
    mesh = mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1")
    kw = dict(mesh=mesh, candidate_ids=[3, 5], steps=4)
    q = loop.build(model, variables, spec, quantize=loop.quant_spec(cfg), **kw)
    kernel = q.params["params"]["layers"]["attn"]["query"]["kernel"]
    assert isinstance(kernel, lj.QuantizedArray) and kernel.codes.sharding.mesh.shape == mesh.shape
    assert lj.quant.base_bytes(q.params) < 0.5 * lj.quant.base_bytes(variables)  # the embedding stays float32
    ids = jax.random.randint(jax.random.key(1), (1, 4, 12), 0, 64, jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
    gb = mesh_lib.global_batch({k: np.asarray(v) for k, v in batch.items()}, q.shardings["batch"], axis=1)
    deltas, _, m = q.train_step(q.deltas, q.opt_state, q.params, gb, jax.random.key(0))
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    ev = {
        "input_ids": ids[0],
        "attention_mask": jnp.ones_like(ids[0]),
        "labels": jnp.zeros(4, jnp.int32),
        "prompt_len": jnp.full(4, 12, jnp.int32),
        "valid": jnp.ones(4, jnp.int32),
    }
    got = q.score_step(
        deltas,
        q.params,
        mesh_lib.global_batch({k: np.asarray(v) for k, v in ev.items()}, q.shardings["eval_batch"]),
    )
    # The reference: float LoRA on the dequantized base (dequantized in one jitted program, not op by op),
    # scored by the same function without a second `build` (its placement, init and optimizer programs
    # are not what is compared).
    dense = jax.jit(lj.dequantize)(q.params)
    is_q = lj.quant.is_quantized
    assert not any(map(is_q, jax.tree_util.tree_leaves(dense, is_leaf=is_q)))
    want = step_lib.make_score_step(model.apply, kw["candidate_ids"])(deltas, dense, ev)
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], rtol=1e-5, atol=1e-5)


def _hf_folder(folder, *, scan_layers=False):
    """A small random Llama as a Hugging Face folder (config.json + model.safetensors); its kernels hold
    most of its bytes."""
    import json

    from safetensors.numpy import save_file

    from lora_jax.models import llama

    cfg = llama.LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
        tie_word_embeddings=True, scan_layers=scan_layers,
    )  # fmt: skip
    # (jitted: one program instead of op by op; any random values serve)
    variables = nn.meta.unbox(jax.jit(llama.Llama(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    config, tensors = llama.to_hf(cfg, variables)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_load_quantizes_each_kernel_as_it_is_placed(tmp_path, monkeypatch, scan_layers=True):
    """`models.load(..., mesh=, quantize=)`: the same codes as quantizing after a dense load, and the
    dense base is never whole on the device: new live device bytes, sampled after each parameter is
    placed, peak below the largest kernel plus the quantized base (a dense load peaks at the dense base)."""
    from lora_jax import models
    from lora_jax.models import sharded

    folder = _hf_folder(tmp_path / "llama", scan_layers=scan_layers)
    mesh = mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1")
    qspec = lj.QuantSpec(block_size=16)

    def peak_of(**kw):
        before = {id(x) for x in jax.live_arrays()}
        peak = [0]
        place = sharded._global_array

        def spy(view, sharding):
            out = place(view, sharding)
            live = sum(x.nbytes for x in jax.live_arrays() if id(x) not in before)
            peak[0] = max(peak[0], live)
            return out

        monkeypatch.setattr(sharded, "_global_array", spy)
        _, variables, _ = models.load(str(folder), mesh=mesh, scan_layers=scan_layers, **kw)
        monkeypatch.setattr(sharded, "_global_array", place)
        return variables, peak[0]

    dense, dense_peak = peak_of()
    q, q_peak = peak_of(quantize=qspec)
    want = lj.quantize(dense, qspec)
    got_leaves = jax.tree_util.tree_leaves(q)
    assert len(got_leaves) == len(jax.tree_util.tree_leaves(want))
    for a, b in zip(got_leaves, jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit, codes and scales
    kernel = q["params"]["layers" if scan_layers else "layers_0"]["mlp"]["up"]["kernel"]
    assert isinstance(kernel, lj.QuantizedArray) and kernel.codes.sharding.mesh.shape == mesh.shape
    dense_bytes = lj.quant.base_bytes(dense)
    largest = max(x.nbytes for x in jax.tree_util.tree_leaves(dense))
    assert lj.quant.base_bytes(q, dense=True) == dense_bytes
    assert dense_peak >= dense_bytes, (dense_peak, dense_bytes)
    assert q_peak <= lj.quant.base_bytes(q) + largest, (q_peak, lj.quant.base_bytes(q), largest)
    assert q_peak < 0.6 * dense_bytes, (q_peak, dense_bytes)


def test_load_with_quantize_checks_targets_before_reading(tmp_path, monkeypatch):
    from lora_jax import models
    from lora_jax.models import sharded

    folder = _hf_folder(tmp_path / "llama")
    mesh = mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1")

    def no_read(*a, **k):
        raise AssertionError("read a tensor before checking the QuantSpec")

    monkeypatch.setattr(sharded, "_read_shard", no_read)
    with pytest.raises(ValueError, match=r"QuantSpec.targets \['.*/nothing'\] .* match no parameter"):
        models.load(str(folder), mesh=mesh, quantize=lj.QuantSpec(targets=".*/nothing"))
    with pytest.raises(
        ValueError,
        match=r"params/layers_0/attn/\w+/kernel: its block axis 0 has size 64, not divisible by QuantSpec.block_size=128",
    ):
        models.load(str(folder), mesh=mesh, quantize=lj.QuantSpec(block_size=128))
