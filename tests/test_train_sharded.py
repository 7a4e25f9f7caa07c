"""Sharded LoRA training on 8 CPU devices (data=2, fsdp=2, tensor=2) against one device.

Runs in a subprocess: the device count must be set (XLA_FLAGS) before JAX starts, and this pytest
process has already started it.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import child_env

WORKER = r"""
import json, sys
import jax, numpy as np
from lora_jax.train import selftest
sharded = selftest.run("data=2,fsdp=2,tensor=2", steps=3)
single = selftest.run("data=1,fsdp=1,tensor=1", steps=3, devices=jax.devices()[:1])
np.savez(sys.argv[1] + "/sharded.npz", **sharded.pop("deltas"))
np.savez(sys.argv[1] + "/single.npz", **single.pop("deltas"))
print("RESULT " + json.dumps({"sharded": sharded, "single": single}))
"""


def run_worker(code, tmp_path, devices=8, extra_env=None, args=()):
    env = child_env(devices, extra_env)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def sharded_vs_single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    out = run_worker(WORKER, tmp)
    return out, np.load(tmp / "sharded.npz"), np.load(tmp / "single.npz")


def test_sharded_losses_and_deltas_match_one_device(sharded_vs_single):
    out, sharded, single = sharded_vs_single
    assert out["sharded"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert out["single"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    # Tolerance: float32 reductions in a different order on 8 shards; 3 adam steps at lr 1e-2.
    np.testing.assert_allclose(out["sharded"]["losses"], out["single"]["losses"], rtol=1e-5, atol=1e-6)
    assert sorted(sharded.files) == sorted(single.files) and len(single.files) == 8
    for k in single.files:
        np.testing.assert_allclose(sharded[k], single[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert any(not np.allclose(single[k], 0) for k in single.files if k.endswith("/b"))


def test_delta_sharding_follows_base_weight(sharded_vs_single):
    specs = sharded_vs_single[0]["sharded"]["specs"]
    assert set(specs) == {
        f"params/layers/{m}/kernel" for m in ("attn/query", "attn/value", "mlp/up", "mlp/down")
    }
    for path, s in specs.items():
        w = s["w"] + [None] * (3 - len(s["w"]))  # (layers, in, out)
        assert s["a"] == [w[0], w[1], None], (
            path
        )  # a: (layers, in, r): W's input axis sharding, rank replicated
        assert s["b"] == [w[0], None, w[2]], path  # b: (layers, r, out): W's output axis sharding
    # The model's logical-axis rules really shard these weights (embed -> fsdp, heads/mlp -> tensor).
    assert specs["params/layers/attn/query/kernel"]["w"][1:] == ["fsdp", "tensor"]
    assert specs["params/layers/mlp/down/kernel"]["w"][1:] == ["tensor", "fsdp"]
