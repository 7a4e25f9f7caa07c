"""Peak host memory while loading a >= 2 GB bfloat16 Llama checkpoint onto 8 devices: sharded vs whole.

Writes a random bfloat16 Hugging Face Llama folder (hidden 4096, MLP 11008, 32 heads / 8 kv heads,
vocabulary 32000, enough layers for ``--gb``; one safetensors file per layer plus one for the
embeddings and an index, written one file at a time so generation never holds more than one layer),
then loads it in a fresh process per method on 8 simulated CPU devices (mesh ``fsdp=4, tensor=2``):

- ``sharded``: ``lora_jax.models.load(folder, mesh=mesh)``: each parameter created as a global array
  with its final sharding, every device's callback reading only its block (bfloat16 stays bfloat16);
- ``sharded, scan``: the same with ``scan_layers=True`` (layers stacked ``(L, ...)`` while reading);
- ``sharded, 2 proc``: the sharded load in two JAX processes on localhost with 4 devices each (the
  multi-host layout, gloo): figures per process, each holding and reading only its half;
- ``whole``: what the train loop did before: ``lora_jax.models.load(folder)`` (the whole checkpoint
  read into host memory, converted to float32), then ``lora_jax.train.mesh.place`` onto the mesh.

Each child reports its peak resident set (``VmHWM``, i.e. ``ru_maxrss``), its resident set before loading
(Python + JAX + the mesh) and the bytes of the device buffers it holds at the end. On a CPU-only host
the 8 "devices" are host memory, so the loaded arrays themselves (about the checkpoint size when every
parameter is split across the devices) are part of the resident set; the meaningful figure is the
*overhead*, ``peak - before - held``: what loading needs beyond its result. On an accelerator host the
arrays live in device memory and the host peak is ``before + overhead``.

Examples::

    python experiments/load_memory.py                 # ~2.3 GB checkpoint (a few minutes on 2 cores)
    python experiments/load_memory.py --small         # a few MB, for a quick check
    python experiments/load_memory.py --skip-whole    # sharded rows only (the whole path needs ~4.5x the checkpoint)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

BIG = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32000,
}
SMALL = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 4096,
}
MESH = "data=1,fsdp=4,tensor=2"
DEVICES = 8
GB = 1e9


def llama_shapes(config: dict, layer: int | None) -> dict[str, tuple[int, ...]]:
    """HF names -> shapes of one layer (``layer``) or of the embeddings, final norm and LM head (``None``)."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    if layer is None:
        return {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    p = f"model.layers.{layer}."
    return {
        p + "self_attn.q_proj.weight": (q, d),
        p + "self_attn.k_proj.weight": (kv, d),
        p + "self_attn.v_proj.weight": (kv, d),
        p + "self_attn.o_proj.weight": (d, q),
        p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
        p + "input_layernorm.weight": (d,),
        p + "post_attention_layernorm.weight": (d,),
    }


def _bytes(shapes: dict) -> int:
    return sum(2 * math.prod(s) for s in shapes.values())


def _random_bf16(rng: np.random.Generator, shape: tuple[int, ...]):
    """Random bfloat16 values of magnitude in [2**-7, 2**-6), made from random bits (fast, no float32 copy)."""
    import ml_dtypes

    if len(shape) == 1:  # norm scales
        return np.ones(shape, ml_dtypes.bfloat16)
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits &= 0x807F  # keep sign and mantissa
    bits |= 0x3C00  # exponent 2**-7
    return bits.view(ml_dtypes.bfloat16)


def write_checkpoint(folder: pathlib.Path, config: dict, target_bytes: float, seed: int = 0) -> dict:
    """A bfloat16 Llama folder of >= ``target_bytes``, one safetensors file per layer; returns the config."""
    from safetensors.numpy import save_file

    per_layer, top = _bytes(llama_shapes(config, 0)), _bytes(llama_shapes(config, None))
    layers = max(1, math.ceil((target_bytes - top) / per_layer))
    config = {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        **config,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(seed)
    files = layers + 1
    weight_map = {}
    for i, layer in enumerate([None, *range(layers)]):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        tensors = {n: _random_bf16(rng, s) for n, s in llama_shapes(config, layer).items()}
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    total = sum(
        2 * math.prod(s) for layer in [None, *range(layers)] for s in llama_shapes(config, layer).values()
    )
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return config


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(method: str, folder: str, process: int | None = None, port: int | None = None) -> dict:
    """Loads ``folder`` by ``method`` in this (fresh) process; returns its memory figures."""
    import jax

    from lora_jax import models
    from lora_jax.models import lazy
    from lora_jax.train import mesh as mesh_lib

    if process is not None:
        mesh_lib.init_distributed(f"127.0.0.1:{port}", 2, process)
    mesh = mesh_lib.make_mesh(MESH)
    read = [0]
    read_slice = lazy._read_slice

    def counting(path, name, index):  # the one function that reads tensor bytes from a file
        block = read_slice(path, name, index)
        read[0] += block.nbytes
        return block

    lazy._read_slice = counting
    jax.block_until_ready(jax.device_put(np.zeros(8), jax.local_devices()[0]))  # start the runtime
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if method == "whole":
        model, variables, _ = models.load(folder)
        params = mesh_lib.place(variables, mesh_lib.param_shardings(model, variables, mesh))
        del variables
    else:
        model, params, _ = models.load(folder, mesh=mesh, scan_layers=method == "sharded_scan")
    read_bytes = None if method == "whole" else read[0]  # whole: read_weights reads every byte (not counted)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    leaves = jax.tree_util.tree_leaves(params)
    held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "method": method,
        "peak_rss": max(peak, _status("VmHWM")),
        "rss_before": before,
        "rss_after": _status("VmRSS"),
        "held": held,
        "seconds": seconds,
        "read": read_bytes,
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "param_dtypes": sorted({str(x.dtype) for x in leaves}),
        "specs": sorted({str(tuple(x.sharding.spec)) for x in leaves}),
        "devices": jax.device_count(),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_child(method: str, folder: pathlib.Path) -> list[dict]:
    """One row per process: one fresh process, or two (4 devices each) for ``sharded_2proc``."""
    processes = 2 if method == "sharded_2proc" else 1
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // processes}",
        JAX_PLATFORMS="cpu",
    )
    cmd = [sys.executable, __file__, "--child", method, "--folder", str(folder)]
    if processes > 1:
        port = _free_port()
        cmds = [cmd + ["--process-id", str(i), "--port", str(port)] for i in range(processes)]
    else:
        cmds = [cmd]
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds
    ]
    rows = []
    try:
        for proc in procs:
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{method} load failed:\n{err[-4000:]}")
            line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
            rows.append(json.loads(line[len("RESULT ") :]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return rows


def _available() -> int:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.2, help="checkpoint size to generate, in GB (1e9 bytes)")
    ap.add_argument(
        "--small", action="store_true", help="a few-MB checkpoint with small layers (quick check)"
    )
    ap.add_argument(
        "--skip-whole", action="store_true", help="skip the whole-model load (needs ~4.5x the checkpoint)"
    )
    ap.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results"), help="folder for the JSON"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.folder, args.process_id, args.port)), flush=True)
        return {}

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="load_memory_"))
    try:
        t0 = time.perf_counter()
        target = 0.01 * GB if args.small else args.gb * GB
        config = write_checkpoint(tmp / "llama", SMALL if args.small else BIG, target)
        checkpoint = sum(p.stat().st_size for p in (tmp / "llama").glob("*.safetensors"))
        generation = {
            "seconds": time.perf_counter() - t0,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        print(
            f"checkpoint: {checkpoint / GB:.3f} GB bfloat16, {config['num_hidden_layers']} layers, "
            f"{config['num_hidden_layers'] + 1} files (generated in {generation['seconds']:.0f} s, "
            f"generator peak RSS {generation['peak_rss'] / GB:.2f} GB)",
            flush=True,
        )
        rows, skipped = [], None
        for method in ("sharded", "sharded_scan", "sharded_2proc", "whole"):
            if method == "whole":
                need = 4.5 * checkpoint + 2 * GB
                if args.skip_whole:
                    skipped = "--skip-whole"
                    continue
                if _available() < need:
                    skipped = f"{_available() / GB:.1f} GB available < {need / GB:.1f} GB needed"
                    continue
            rows += _run_child(method, tmp / "llama")
            print(f"  {method}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for r in rows:
        r["overhead"] = r["peak_rss"] - r["rss_before"] - r["held"]
        r["peak_over_checkpoint"] = r["peak_rss"] / checkpoint
        r["overhead_over_checkpoint"] = r["overhead"] / checkpoint
    head = (
        f"{'method':<18}{'peak RSS':>10}{'before':>9}{'held':>9}{'overhead':>10}{'overhead/ckpt':>15}"
        f"{'peak/ckpt':>11}{'read':>8}{'dtype':>10}{'time':>8}"
    )
    print(
        f"\nLoading a {checkpoint / GB:.2f} GB bfloat16 Llama checkpoint onto {DEVICES} simulated CPU devices "
        f"({MESH}); GB = 1e9 bytes"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        label = r["method"] + (f" #{r['process']}" if r["processes"] > 1 else "")
        read = "all" if r["read"] is None else f"{r['read'] / GB:.2f}"
        print(
            f"{label:<18}{r['peak_rss'] / GB:>10.2f}{r['rss_before'] / GB:>9.2f}{r['held'] / GB:>9.2f}"
            f"{r['overhead'] / GB:>10.2f}{r['overhead_over_checkpoint']:>15.1%}{r['peak_over_checkpoint']:>11.2f}"
            f"{read:>8}"
            f"{','.join(r['param_dtypes']):>10}{r['seconds']:>7.0f}s"
        )
    if skipped:
        print(f"whole: skipped ({skipped})")
    print(
        "\npeak RSS: the loading process's peak resident set; before: Python + JAX + mesh, before loading; "
        "held: bytes of the\ndevice buffers this process holds at the end (on a CPU-only host the devices are "
        "host memory, so they are part\nof the RSS); overhead = peak - before - held: the host memory loading "
        "needs beyond its result (on an\naccelerator host the arrays live in device memory and the host peak is "
        "before + overhead); read: tensor\nbytes this process read from the checkpoint files (whole: all of them)."
    )

    result = {
        "checkpoint_bytes": checkpoint,
        "config": config,
        "mesh": MESH,
        "devices": DEVICES,
        "generation": generation,
        "rows": rows,
        "whole_skipped": skipped,
        "note": "CPU-only host: device arrays are host memory; overhead = peak_rss - rss_before - held.",
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "load_memory_small.json" if args.small else "load_memory.json"
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / name}")
    return result


if __name__ == "__main__":
    main()
