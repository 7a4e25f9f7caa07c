"""Compile targets of the memory planner: simulated host devices, TPU slices and NVIDIA GPUs, deviceless.

A target string names what the train step is compiled for:

- ``"cpu"``: ``N`` host devices simulated with ``--xla_force_host_platform_device_count=N``. A proxy:
  the host compiler fuses and schedules differently from an accelerator's.
- ``"tpu:GEN:TOPOLOGY"`` (``tpu:v5e:2x2``, ``tpu:v5p:2x2x2``, ``tpu:v5p:8x8x4``, ``tpu:v6e:4x4``): the
  TPU compiler, ahead of time, for a slice that is not there
  (``jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name=...)``; needs only the
  ``libtpu`` wheel matched to jax, the ``tpu`` extra). One device per chip.
- ``"gpu:KIND"`` (``gpu:h200``, ``gpu:h100``, ``gpu:a100``) with ``N`` devices: XLA's GPU compiler with
  no GPU, from a ``GpuTargetConfig`` built from the card's facts (needs the CUDA plugin, the
  ``gpu-plan`` extra).

Every compile runs in a child process whose environment this module sets (:func:`environment`), so
the caller's JAX runtime is never touched: the host device count is fixed when JAX starts, libtpu reads
its settings when it loads, and the CUDA plugin must not be initialised against a machine without GPUs.

Example:
    >>> t = parse_target("tpu:v5p:2x2x2")
    >>> t.platform, t.name, t.num_devices, round(t.device_memory / 2**30, 2)
    ('tpu', 'v5p:2x2x2', 8, 95.74)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

__all__ = [
    "MissingExtra",
    "GPUS",
    "TPU_HBM",
    "Target",
    "compile_devices",
    "environment",
    "parse_target",
    "quiet_host",
    "run_worker",
]

# HBM per chip that the TPU compiler lets a program use (its own figure, in its out-of-memory errors).
TPU_HBM = {"v5e": int(15.75 * 2**30), "v5p": int(95.74 * 2**30), "v6e": int(31.25 * 2**30)}
_TPU_ACCELERATOR = {"v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}

# NVIDIA cards (SXM, largest memory): SMs, FP32 lanes per SM, shared memory per SM / per block (opt-in),
# L2, memory bandwidth (B/s), boost clock (GHz), device memory (bytes), compute capability.
GPUS = {
    "h200": dict(
        name="NVIDIA H200",
        sms=132,
        fpus=128,
        smem_sm=233472,
        smem_block=232448,
        l2=52428800,
        bandwidth=4_800_000_000_000,
        clock=1.98,
        memory=151_397_597_184,
        cc=(9, 0),
    ),
    "h100": dict(
        name="NVIDIA H100 80GB HBM3",
        sms=132,
        fpus=128,
        smem_sm=233472,
        smem_block=232448,
        l2=52428800,
        bandwidth=3_352_320_000_000,
        clock=1.98,
        memory=84_942_979_072,
        cc=(9, 0),
    ),
    "a100": dict(
        name="NVIDIA A100-SXM4-80GB",
        sms=108,
        fpus=64,
        smem_sm=167936,
        smem_block=166912,
        l2=41943040,
        bandwidth=2_039_040_000_000,
        clock=1.41,
        memory=85_100_068_864,
        cc=(8, 0),
    ),
}


class MissingExtra(RuntimeError):
    """The target's compiler is not installed (the ``tpu`` or ``gpu-plan`` extra)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed ``--target``.

    Attributes:
      platform: ``"cpu"``, ``"tpu"`` or ``"gpu"``.
      name: the TPU topology (``"v5p:2x2x2"``) or GPU kind (``"h200"``); ``""`` for cpu.
      num_devices: devices the target fixes (a TPU slice's chips), or None (from ``--devices``).
      device_memory: bytes a program may use per device, or None (unknown: the host).
    """

    platform: str
    name: str = ""
    num_devices: int | None = None
    device_memory: int | None = None


def parse_target(text: str) -> Target:
    """``"cpu"`` / ``"tpu:v5p:2x2x2"`` / ``"gpu:h200"`` -> :class:`Target`."""
    text = text.strip().lower()
    if text == "cpu":
        return Target("cpu")
    if text.startswith("tpu:"):
        m = re.fullmatch(r"tpu:(v5e|v5p|v6e):(\d+(?:x\d+){1,2})", text)
        if not m:
            raise ValueError(
                f"--target {text!r}: expected tpu:GEN:TOPOLOGY with GEN in {sorted(TPU_HBM)}, "
                f"e.g. tpu:v5e:2x2, tpu:v5p:2x2x2, tpu:v6e:4x4."
            )
        gen, topo = m.groups()
        chips = math.prod(int(d) for d in topo.split("x"))
        return Target("tpu", f"{gen}:{topo}", chips, TPU_HBM[gen])
    if text.startswith("gpu:"):
        kind = text[4:]
        if kind not in GPUS:
            raise ValueError(f"--target {text!r}: known GPUs are {['gpu:' + k for k in GPUS]}.")
        return Target("gpu", kind, None, GPUS[kind]["memory"])
    raise ValueError(
        f"--target {text!r}: expected cpu, tpu:GEN:TOPOLOGY (e.g. tpu:v5p:2x2x2) or gpu:KIND (e.g. gpu:h200)."
    )


def environment(target: Target, num_devices: int, base: dict | None = None) -> dict[str, str]:
    """The environment of the compiling process for `target` (from `base`, default ``os.environ``).

    The JAX runtime is always the host's (``JAX_PLATFORMS=cpu``); TPU and GPU devices are compile-only.
    """
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    gen = target.name.split(":")[0] if target.platform == "tpu" else "v5p"
    env.update(_quiet(f"{_TPU_ACCELERATOR[gen]}-{target.num_devices or 8}"), JAX_PLATFORMS="cpu")
    if target.platform == "cpu":
        flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    elif target.platform == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
        env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
        flags += ["--xla_gpu_enable_triton_gemm=false", "--xla_gpu_autotune_level=0"]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _quiet(accelerator: str = "v5p-8") -> dict[str, str]:
    return {
        # libtpu looks for TPU VM metadata when it loads and warns without it; these answer its questions.
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_WORKER_ID": "0",
        "TPU_ACCELERATOR_TYPE": accelerator,
        # Compile-only: other JAX processes on this host may hold libtpu's lock; no chip is used here.
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
        # An installed CUDA plugin checks the (absent) GPUs' driver as JAX starts.
        "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
    }


def quiet_host() -> None:
    """Sets, where unset, the environment that keeps an installed libtpu or CUDA plugin quiet as JAX starts
    in this process on a host without TPUs or GPUs (call before JAX's first use; for CLIs, not libraries).
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for k, v in _quiet().items():
        os.environ.setdefault(k, v)


def _gpu_target_config(kind: str) -> str:
    """A ``GpuTargetConfig`` text proto for `kind` (what XLA's GPU compiler reads from a device)."""
    g = GPUS[kind]
    try:
        from importlib.metadata import version

        dnn = [int(x) for x in version("nvidia-cudnn-cu12").split(".")[:3]]
    except Exception:  # cuDNN version unknown: the one jax 0.10 builds against.
        dnn = [9, 8, 0]
    return (
        "gpu_device_info {\n"
        "  threads_per_block_limit: 1024\n  threads_per_warp: 32\n  shared_memory_per_block: 49152\n"
        f"  shared_memory_per_core: {g['smem_sm']}\n  threads_per_core_limit: 2048\n"
        f"  core_count: {g['sms']}\n  fpus_per_core: {g['fpus']}\n"
        "  block_dim_limit_x: 2147483647\n  block_dim_limit_y: 65535\n  block_dim_limit_z: 65535\n"
        f"  memory_bandwidth: {g['bandwidth']}\n  l2_cache_size: {g['l2']}\n  clock_rate_ghz: {g['clock']}\n"
        f"  device_memory_size: {g['memory']}\n  shared_memory_per_block_optin: {g['smem_block']}\n"
        f"  cuda_compute_capability {{ major: {g['cc'][0]} minor: {g['cc'][1]} }}\n"
        "  registers_per_core_limit: 65536\n  registers_per_block_limit: 65536\n"
        "}\n"
        'platform_name: "CUDA"\n'
        f"dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}\n"
        f'device_description_str: "{g["name"]}"\n'
    )


def compile_devices(target: Target, num_devices: int) -> list:
    """The devices to compile for, inside the compiling process (see :func:`environment`)."""
    import jax

    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < num_devices:
            raise ValueError(
                f"this process has {len(devices)} CPU devices, {num_devices} asked: start it with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} (the planner's "
                f"plan() does this in a child process)."
            )
        return devices[:num_devices]
    from jax.experimental import topologies

    if target.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            raise MissingExtra(
                f"the tpu: target needs libtpu (matched to jax {jax.__version__}): "
                f"pip install 'lora_jax[tpu]'."
            )
        return list(topologies.get_topology_desc(platform="tpu", topology_name=target.name).devices)
    if _find("jax_plugins.xla_cuda12") is None:
        raise MissingExtra(
            f"the gpu: target needs the CUDA plugin (jax[cuda12]=={jax.__version__}): "
            f"pip install 'lora_jax[gpu-plan]'."
        )
    topo = topologies.get_topology_desc(
        platform="cuda", target_config=_gpu_target_config(target.name), topology=f"1x1x{num_devices}"
    )
    return list(topo.devices)


def _find(module: str):
    try:
        return importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None


_MARK = "LORA_JAX_PLAN_RESULT "


def run_worker(request: dict, target: Target, num_devices: int, timeout: float | None = None) -> dict:
    """Runs ``lora_jax.train.plan`` as a child process on `request` and returns its JSON answer.

    Raises:
      ValueError, TypeError, MissingExtra, RuntimeError: re-raised from the child with its message.
    """
    cmd = [sys.executable, "-m", "lora_jax.train.plan_worker", "--worker", json.dumps(request)]
    proc = subprocess.run(
        cmd, env=environment(target, num_devices), capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if not lines:
        raise RuntimeError(
            f"the planner's compile process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    answer = json.loads(lines[-1][len(_MARK) :])
    if "failure" in answer:
        kinds = {"ValueError": ValueError, "TypeError": TypeError, "MissingExtra": MissingExtra}
        kind = kinds.get(answer["failure"]["type"], RuntimeError)
        raise kind(answer["failure"]["message"])
    return answer
