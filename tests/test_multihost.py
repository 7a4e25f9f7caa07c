"""Two JAX processes on localhost (4 CPU devices each, gloo collectives) train like one process with 8.

Each process builds the global batch from its own rows only (make_array_from_process_local_data).
"""

import sys

import numpy as np
from helpers import free_port, result, run_processes

WORKER = r"""
import json, sys
out_dir, port, pid = sys.argv[1], sys.argv[2], sys.argv[3]
import jax
if pid != "single":
  from lora_jax.train import mesh as mesh_lib
  assert mesh_lib.init_distributed(f"127.0.0.1:{port}", 2, int(pid))
import numpy as np
from lora_jax.train import selftest
out = selftest.run("data=2,fsdp=2,tensor=2", steps=3)
if jax.process_index() == 0:
  np.savez(f"{out_dir}/{pid}.npz", **out.pop("deltas"))
  print("RESULT " + json.dumps(out), flush=True)
"""


def _worker(tmp_path, port, pid):
    return [sys.executable, "-c", WORKER, str(tmp_path), str(port), pid]


def test_two_processes_match_one_process(tmp_path):
    port = free_port()
    multi = [result(out) for out in run_processes([_worker(tmp_path, port, i) for i in "01"], devices=4)]
    [single] = map(result, run_processes([_worker(tmp_path, 0, "single")], devices=8))
    assert multi[1] is None  # only process 0 reports
    multi = multi[0]
    assert multi["processes"] == 2 and multi["devices"] == 8
    assert single["processes"] == 1 and single["devices"] == 8
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    a, b = np.load(tmp_path / "0.npz"), np.load(tmp_path / "single.npz")
    assert sorted(a.files) == sorted(b.files) and len(b.files) > 0
    for k in b.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert multi["specs"] == single["specs"]
