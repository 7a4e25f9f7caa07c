"""`--remat none|dots|full`: the flag reaches the model, and each policy compiles the train step as intended.

On the engine's own step (`make_train_step` on a tiny scanned Llama, full-sequence LM loss, CPU):
``full`` keeps only each layer's input and recomputes the rest, so it has the fewest temporary bytes
and the most FLOPs; ``dots`` keeps the projection outputs and recomputes attention and element-wise
work, so it lies in between on both; every policy gives the same update (float32, ≤ 1e-6 relative).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.train import config as config_lib
from lora_jax.train import loop
from lora_jax.train import step as step_lib

pytestmark = pytest.mark.standard_promotion  # optax's AdamW bias correction computes float ** int32

V, B, T = 64, 4, 64


def compiled(remat):
    model, variables = loop.tiny_llama(V, scan_layers=True, remat=remat)
    spec = lj.LoraSpec(
        rank=4,
        targets=r".*/attn/(query|value)/kernel",
        axes={r"params/layers/.*": lj.LoraAxes((0,), (1,), (2,))},
    )
    deltas = lj.init(jax.random.key(1), variables, spec)
    deltas = jax.tree.map(lambda x: x + 0.01, deltas)  # b != 0: the adapted path carries gradient to a
    tx, _ = step_lib.make_optimizer(1e-2, 10, 0)
    step = step_lib.make_train_step(model.apply, tx, num_targets=None, loss_chunk=None)
    ids = jax.random.randint(jax.random.key(2), (1, B, T), 0, V)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
    args = (deltas, tx.init(deltas), variables, batch, jax.random.key(0))
    c = step.lower(*args).compile()
    ca = c.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    new, _, metrics = c(*jax.tree.map(lambda x: jnp.array(x, copy=True), args))
    return {
        "temp": c.memory_analysis().temp_size_in_bytes,
        "flops": ca["flops"],
        "deltas": new,
        "model_remat": model.config.remat,
        **metrics,
    }


@pytest.fixture(scope="module")
def steps():
    return {r: compiled(r) for r in ("none", "dots", "full")}


def test_policies_order_memory_and_flops(steps):
    none, dots, full = steps["none"], steps["dots"], steps["full"]
    assert full["temp"] < dots["temp"] < none["temp"], {k: v["temp"] for k, v in steps.items()}
    assert none["flops"] < dots["flops"] < full["flops"], {k: v["flops"] for k, v in steps.items()}


def test_policies_give_the_same_update(steps):
    want = jax.tree.leaves(steps["none"]["deltas"])
    for r in ("dots", "full"):
        np.testing.assert_allclose(float(steps[r]["loss"]), float(steps["none"]["loss"]), rtol=1e-6)
        for got, ref in zip(jax.tree.leaves(steps[r]["deltas"]), want):
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_flag_reaches_the_model(steps):
    cfg = config_lib.from_args(["--remat", "dots"])
    assert cfg.remat == "dots" and config_lib.TrainConfig().remat == "none"
    assert {r: s["model_remat"] for r, s in steps.items()} == {"none": "none", "dots": "dots", "full": "full"}
    assert config_lib.TrainConfig(remat=True).remat == "full"  # settings saved when the flag was a switch


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match=r"--remat must be one of none, dots, full, got 'sometimes'"):
        config_lib.from_args(["--remat", "sometimes"])
