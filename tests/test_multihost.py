"""Two JAX processes on localhost (4 CPU devices each, gloo collectives) train like one process with 8.

Each process builds the global batch from its own rows only (make_array_from_process_local_data).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path, devices, port, pid):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path), str(port), pid],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else None


def test_two_processes_match_one_process(tmp_path):
    port = _free_port()
    procs = [_spawn(tmp_path, 4, port, str(i)) for i in range(2)]
    try:
        multi = [_result(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    single = _result(_spawn(tmp_path, 8, 0, "single"))
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
