"""A few LoRA train steps of a tiny random Llama on a mesh: a smoke test of sharding and multi-host.

Run it on one host (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` gives 8 CPU devices) or on
each host of a cluster; every process feeds only its own rows of the global batch. Process 0 prints
one JSON line: the losses, a fingerprint of the final deltas, and the sharding of every delta next to
its base weight's::

    python -m lora_jax.train.selftest --mesh data=2,fsdp=2,tensor=2 --steps 3
    python -m lora_jax.train.selftest --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0

The same batches and initial deltas are used whatever the mesh or number of processes, so the losses
must agree (up to float rounding) across layouts.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

__all__ = ["run", "main"]


def make_batches(steps: int, grad_accum: int, micro: int, length: int, vocab: int, seed: int = 0):
    """Deterministic random prompt+completion batches ``(A, b, T)`` with 1-3 completion tokens per row."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        shape = (grad_accum, micro, length)
        ids = rng.integers(3, vocab, shape).astype(np.int32)
        n = rng.integers(length // 2, length + 1, shape[:2])
        attn = (np.arange(length) < n[..., None]).astype(np.int32)
        k = rng.integers(1, 4, shape[:2])
        loss = ((np.arange(length) >= (n - k)[..., None]) & (attn == 1)).astype(np.int32)
        out.append({"input_ids": ids, "attention_mask": attn, "loss_mask": loss})
    return out


def run(
    mesh_text: str = "data=-1,fsdp=1,tensor=1",
    *,
    steps: int = 3,
    grad_accum: int = 2,
    micro: int = 8,
    length: int = 16,
    devices=None,
    scan_layers: bool = True,
) -> dict:
    """Trains `steps` steps on `mesh_text`; returns losses, final deltas (numpy) and sharding specs."""
    import jax

    import lora_jax as lj
    from lora_jax.train import loop
    from lora_jax.train import mesh as mesh_lib

    vocab = 256
    model, variables = loop.tiny_llama(vocab, scan_layers=scan_layers, seed=0)
    spec = lj.LoraSpec(
        rank=4,
        alpha=8.0,
        targets=r".*/(attn/(query|value)|mlp/(up|down))/kernel",
        axes={r"params/layers/.*": lj.LoraAxes((0,), (1,), (2,))} if scan_layers else {},
    )
    mesh = mesh_lib.make_mesh(mesh_text, devices)
    setup = loop.build(model, variables, spec, mesh=mesh, lr=1e-2, steps=steps, warmup=1, num_targets=3)
    deltas, opt_state = setup.deltas, setup.opt_state
    # Make b nonzero first (b = 0 would make every a-gradient zero and the check weaker).
    host = jax.device_get(deltas)
    rng = np.random.default_rng(1)
    host = jax.tree_util.tree_map(lambda x: (rng.normal(size=x.shape) * 0.05).astype(x.dtype), host)
    deltas = mesh_lib.place(host, setup.shardings["deltas"])
    losses = []
    key = jax.random.key(0)
    for i, b in enumerate(make_batches(steps, grad_accum, micro, length, vocab)):
        gb = mesh_lib.global_batch(b, setup.shardings["batch"], axis=1)
        deltas, opt_state, m = setup.train_step(
            deltas, opt_state, setup.params, gb, jax.random.fold_in(key, i)
        )
        losses.append(float(m["loss"]))
    specs = {}
    is_node = lambda x: x is None or lj.is_delta(x)
    for (p, d), (_, w) in zip(
        jax.tree_util.tree_flatten_with_path(deltas, is_leaf=is_node)[0],
        jax.tree_util.tree_flatten_with_path(setup.params)[0],
        strict=True,
    ):
        if d is not None:
            specs[lj.spec.path_str(p)] = {
                "w": list(map(_s, w.sharding.spec)),
                "a": list(map(_s, d.a.sharding.spec)),
                "b": list(map(_s, d.b.sharding.spec)),
                "axes": list(d.axes.inputs),
            }
    final = loop._gather(deltas)
    flat = {lj.spec.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(final)[0]}
    return {
        "losses": losses,
        "deltas": flat,
        "specs": specs,
        "mesh": dict(mesh.shape),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }


def _s(x):
    return list(x) if isinstance(x, tuple) else x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_jax.train.selftest")
    p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--save", help="write the final deltas here (.npz)")
    args = p.parse_args(argv)
    from lora_jax.train import mesh as mesh_lib

    mesh_lib.init_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    out = run(args.mesh, steps=args.steps)
    if jax.process_index() == 0:
        if args.save:
            np.savez(args.save, **out["deltas"])
        fp = {k: float(np.abs(v).sum()) for k, v in out["deltas"].items()}
        print(json.dumps({k: v for k, v in out.items() if k != "deltas"} | {"fingerprint": fp}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
