"""The train step scales: compiled on 2 and 8 CPU devices, activations and logits stay sharded along the batch.

A tiny Llama (``nn.scan`` + remat, bfloat16) with a full-sequence LM loss, one sequence per device,
fsdp over every device. Checked in the compiled (SPMD-partitioned, per-device) HLO: no array of the
global batch's logits shape ``(B, T, V)`` and no unsharded chunk ``(B, c, V)``; and per-device
temporaries from ``memory_analysis()`` do not grow from 2 to 8 devices (tolerance 10%: the CPU compiler
schedules the two programs slightly differently).

Runs in a subprocess: the device count must be set (XLA_FLAGS) before JAX starts.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import child_env

WORKER = r"""
import functools, json, re, sys
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
import lora_jax as lj
from lora_jax.models.llama import Llama, LlamaConfig
from lora_jax.train import loop, mesh as mesh_lib, step as step_lib

V, T, CHUNK = 1000, 64, 16

@functools.cache
def model_and_variables(tied):  # initialised once per config (identical for every mesh below)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=T, tie_word_embeddings=tied,
                      scan_layers=True, remat=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = Llama(cfg)
    return model, nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))

@functools.cache
def setup_for(mesh_text, n_devices, tied):  # built once per mesh and model (two steps share one below)
    model, variables = model_and_variables(tied)
    spec = lj.LoraSpec(rank=4, targets=r".*/attn/(query|value)/kernel",
                       axes={r"params/layers/.*": lj.LoraAxes((0,), (1,), (2,))})
    mesh = mesh_lib.make_mesh(mesh_text, jax.devices()[:n_devices])
    return model, loop.build(model, variables, spec, mesh=mesh, num_targets=1)

def compiled_step(mesh_text, devices, tied, loss_chunk=CHUNK):
    model, setup = setup_for(mesh_text, len(devices), tied)
    step = step_lib.make_train_step(model.apply, setup.tx, num_targets=None, shardings=setup.shardings,
                                    loss_chunk=loss_chunk)
    b = len(devices)  # one sequence per device
    ids = np.ones((1, b, T), np.int32)
    batch = mesh_lib.global_batch({"input_ids": ids, "attention_mask": ids, "loss_mask": ids},
                                  setup.shardings["batch"], axis=1)
    c = step.lower(setup.deltas, setup.opt_state, setup.params, batch, jax.random.key(0)).compile()
    shapes = sorted(set(re.findall(r"\b(?:f32|bf16)\[[0-9,]*\]", c.as_text())))
    return {"temp": c.memory_analysis().temp_size_in_bytes, "shapes": shapes}

out = {}
for tied in (False, True):
    out[f"fsdp8_tied{tied}"] = compiled_step("data=1,fsdp=8,tensor=1", jax.devices(), tied)
out["fsdp2_tiedFalse"] = compiled_step("data=1,fsdp=2,tensor=1", jax.devices()[:2], False)
out["mixed"] = compiled_step("data=2,fsdp=2,tensor=2", jax.devices(), False)
out["fsdp8_materialised"] = compiled_step("data=1,fsdp=8,tensor=1", jax.devices(), False, loss_chunk=None)
print("RESULT " + json.dumps(out))
"""

V, T, CHUNK = 1000, 64, 16


@pytest.fixture(scope="module")
def compiled():
    env = child_env(8)
    proc = subprocess.run(
        [sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def logits_arrays(shapes, vocab=V, rows=8 * CHUNK):
    """Arrays ``[..., vocab]`` in the HLO with at least ``rows`` rows (the product of the other dims):
    logits of the global batch, whole (``(8, T - 1, V)``, ``(8·(T - 1), V)``) or a chunk (``(8, c, V)``)."""
    out = []
    for s in shapes:
        dims = [int(d) for d in s.split("[")[1].rstrip("]").split(",") if d]
        if len(dims) >= 2 and dims[-1] == vocab and int(np.prod(dims[:-1])) >= rows:
            out.append(s)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_no_global_batch_logits_in_compiled_step(compiled, tied):
    shapes = compiled[f"fsdp8_tied{tied}"]["shapes"]
    assert logits_arrays(shapes) == []
    assert f"f32[1,{CHUNK},{V}]" in shapes  # each device holds its own row's chunk of logits


def test_mixed_mesh_keeps_batch_and_vocab_sharded(compiled):
    shapes = compiled["mixed"]["shapes"]
    assert logits_arrays(shapes) == [] and logits_arrays(shapes, V // 2) == []
    assert f"f32[2,{CHUNK},{V // 2}]" in shapes  # batch over data x fsdp (4), vocab over tensor (2)


def test_materialised_logits_are_sharded_too(compiled):
    """Even without chunking (``loss_chunk=None``) the logits keep the batch sharding: (1, T - 1, V) each."""
    shapes = compiled["fsdp8_materialised"]["shapes"]
    assert logits_arrays(shapes, rows=8 * (T - 1)) == [] and f"f32[1,{T - 1},{V}]" in shapes


def test_per_device_temp_does_not_grow_with_devices(compiled):
    two, eight = compiled["fsdp2_tiedFalse"]["temp"], compiled["fsdp8_tiedFalse"]["temp"]
    assert eight <= 1.1 * two, (two, eight)
