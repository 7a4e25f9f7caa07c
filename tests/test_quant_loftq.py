"""LoftQ (`LoraSpec(init="loftq")`, `init_with_residual(..., qspec=)`) against a NumPy reference of the
algorithm, in the training engine, and its bad input."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import child_env
from test_quant import nf4_numpy

import lora_jax as lj
from lora_jax.train import config as config_lib


def _loftq_numpy(w, rank, rounds):
    """LoftQ (Li et al. 2023, Algorithm 1) in NumPy float64: ``‖W - (Q + L·R)‖`` after each round."""
    w = np.asarray(w, np.float64)
    low, errs = np.zeros_like(w), []
    for _ in range(rounds):
        q = nf4_numpy(w - low)
        u, s, vt = np.linalg.svd(w - q, full_matrices=False)
        low = (u[:, :rank] * s[:rank]) @ vt[:rank]
        errs.append(float(np.linalg.norm(w - (q + low))))
    return errs


def _weights(shape, seed=0):
    return np.random.default_rng(seed).standard_t(3, size=shape).astype(np.float32) * 0.02


QSPEC = lj.QuantSpec(targets="w", double_quant=False)


def test_loftq_error_matches_a_numpy_reference_and_decreases():
    """‖W - (dequant(Q) + s·a·b)‖ equals the NumPy reference's after 1, 2 and 4 rounds (0.5% relative:
    codes within float32 rounding of a midpoint may differ), each strictly below plain NF4's
    ‖W - dequant(Q)‖ and decreasing with the rounds."""
    w = _weights((128, 64))
    plain = float(
        np.linalg.norm(np.asarray(lj.dequantize(lj.quantize({"w": jnp.asarray(w)}, QSPEC))["w"]) - w)
    )
    want = _loftq_numpy(w, rank=8, rounds=4)
    got = []
    for rounds in (1, 2, 4):
        init = "loftq" if rounds == 1 else f"loftq_iter_{rounds}"
        spec = lj.LoraSpec(rank=8, alpha=16.0, targets="w", init=init)
        q, d = lj.init_with_residual(jax.random.key(0), {"w": jnp.asarray(w)}, spec, qspec=QSPEC)
        assert isinstance(q["w"], lj.QuantizedArray)
        got.append(float(np.linalg.norm(np.asarray(lj.merge(q, d)["w"], np.float64) - w)))
    np.testing.assert_allclose(got, [want[0], want[1], want[3]], rtol=5e-3)
    assert got[0] < 0.95 * plain and got[2] < got[1] < got[0], (plain, got)


def test_loftq_on_stacked_kernels_and_untargeted_leaves():
    """A scan-stacked ``(layers, in, out)`` kernel gets LoftQ per layer (each layer's error below plain
    NF4's); a leaf the QuantSpec targets but LoRA does not is quantized as `lj.quantize` would."""
    params = {"a": jnp.asarray(_weights((2, 128, 32))), "b": jnp.asarray(_weights((64, 16), 1))}
    qspec = lj.QuantSpec(targets="a|b", double_quant=False)
    spec = lj.LoraSpec(rank=4, targets="a", init="loftq", axes={"a": lj.LoraAxes((0,), (1,), (2,))})
    q, d = lj.init_with_residual(jax.random.key(0), params, spec, qspec=qspec)
    plain = lj.quantize(params, qspec)
    assert d["b"] is None
    for x, y in zip(jax.tree.leaves(q["b"]), jax.tree.leaves(plain["b"]), strict=True):
        np.testing.assert_array_equal(x, y)
    merged, deq = lj.merge(q, d)["a"], lj.dequantize(plain)["a"]
    for i in range(2):
        assert jnp.linalg.norm(merged[i] - params["a"][i]) < 0.97 * jnp.linalg.norm(deq[i] - params["a"][i])


def test_loftq_bad_input():
    p = {"w": jnp.asarray(_weights((128, 32)))}
    with pytest.raises(
        ValueError, match=r"init='loftq'\) quantizes the base, so it needs the base's QuantSpec"
    ):
        lj.init_with_residual(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w", init="loftq"))
    with pytest.raises(ValueError, match=r"qspec= is for LoftQ .*not init='pissa'"):
        lj.init_with_residual(
            jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w", init="pissa"), qspec=QSPEC
        )
    p2 = {**p, "v": jnp.asarray(_weights((128, 32), 2))}
    with pytest.raises(
        ValueError, match=r"v: LoftQ initialises the adapters of quantized kernels, but the QuantSpec"
    ):
        lj.init_with_residual(
            jax.random.key(0), p2, lj.LoraSpec(rank=2, targets="w|v", init="loftq"), qspec=QSPEC
        )
    with pytest.raises(ValueError, match=r"LoraSpec.init='loftq_iter_0' is not one of"):
        lj.LoraSpec(init="loftq_iter_0")
    with pytest.raises(ValueError, match=r"--init loftq \(LoftQ\) fits the adapter .*add --quantize nf4"):
        config_lib.TrainConfig(init="loftq")


@pytest.mark.slow
def test_cli_finetune_quantize_nf4_init_loftq(tmp_path):
    """``lora-jax finetune --quantize nf4 --init loftq_iter_2`` runs end to end on the tiny model, and its
    adapter gives back the model it trained: with two rounds LoftQ's residual Q is not ``quantize(W)``,
    so the adapter is stored with its LoftQ spec and `adapter_base` recomputes Q from the original weights.
    Checked against the merged weights the run wrote (``--export-merged``: merge(Q, trained deltas)) and
    against the accuracy ``lora-jax eval`` scores with the file."""
    from safetensors.numpy import load_file

    from lora_jax import checkpoint
    from lora_jax.train import loop

    env = child_env()
    out = tmp_path / "r"
    args = [
        "finetune",
        "--model",
        "tiny-llama",
        "--quantize",
        "nf4",
        "--init",
        "loftq_iter_2",
        "--steps",
        "2",
    ]
    args += ["--batch", "2", "--max-len", "32", "--eval-size", "16", "--no-progress", "--export-merged"]
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "lora_jax.train.cli", *a], env=env, capture_output=True, text=True, timeout=600
    )
    proc = run(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base quantized to nf4" in proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["quantize"] == "nf4" and results["base_bytes_after"] < results["base_bytes_before"], (
        results
    )
    info = checkpoint.adapter_info(out / "adapter")
    assert info["spec"]["init"] == "loftq_iter_2" and info["spec"]["rank"] == 8  # rank r, not 2r
    cfg = config_lib.TrainConfig(model="tiny-llama", quantize="nf4", init="loftq_iter_2")
    _, variables, _, _ = loop.load_model(cfg)
    spec = checkpoint.spec_from_json(info["spec"])
    deltas = checkpoint.load_adapter(out / "adapter", variables)
    merged = lj.merge(loop.adapter_base(cfg, spec, variables), deltas)
    stored = load_file(str(out / "merged" / "merged.safetensors"))
    flat = {lj.spec.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(merged)[0]}
    assert set(flat) == set(stored)
    for k, x in flat.items():
        np.testing.assert_allclose(np.asarray(x), stored[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # Against the original weights the adapter would not be this model: Q != quantize(W) after two rounds.
    plain = lj.merge(lj.quantize(variables, loop.quant_spec(cfg)), deltas)
    assert any(
        not np.allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(merged), strict=True)
    )
    proc = run("eval", "--adapter", str(out / "adapter"), "--eval-size", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"LoRA accuracy (test, 16 reviews): {results['lora_accuracy']:.4f}" in proc.stdout, proc.stdout
