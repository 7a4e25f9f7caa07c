"""QLoRA in the training engine: ``--quantize`` settings, and `loop.build` with a quantized base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.train import config as config_lib
from lora_jax.train import loop
from lora_jax.train import mesh as mesh_lib


def test_quantize_setting_is_checked():
    with pytest.raises(
        ValueError, match=r"--quantize must be nf4 or int8 \(or left out for a float base\), got 'fp4'"
    ):
        config_lib.TrainConfig(quantize="fp4")
    cfg = config_lib.TrainConfig(model="tiny-llama", quantize="nf4")
    assert loop.quant_spec(cfg) == lj.QuantSpec(format="nf4", targets=r".*/kernel", block_size=16)
    assert loop.quant_spec(config_lib.TrainConfig()) is None


@pytest.mark.standard_promotion  # optax.adam's bias correction (optax.tree.bias_correction) computes `float ** int32`
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_build_with_a_quantized_base_trains_and_scores(fmt):
    """The train step and the score step run on the quantized base; the base shrinks; scores match
    float LoRA on the dequantized base (1e-5)."""
    model, variables = loop.tiny_llama(64, scan_layers=True)
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
    ref = loop.build(model, lj.dequantize(jax.device_get(q.params)), spec, **kw)
    got = q.score_step(
        deltas,
        q.params,
        mesh_lib.global_batch({k: np.asarray(v) for k, v in ev.items()}, q.shardings["eval_batch"]),
    )
    want = ref.score_step(
        deltas,
        ref.params,
        mesh_lib.global_batch({k: np.asarray(v) for k, v in ev.items()}, ref.shardings["eval_batch"]),
    )
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], rtol=1e-5, atol=1e-5)
