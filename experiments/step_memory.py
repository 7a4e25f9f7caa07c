"""Per-device memory of the project's LoRA train step, compiled ahead of time for a TPU slice or CPU devices.

Compiles ``lora_jax.train.step.make_train_step`` (Llama with ``nn.scan`` + remat, bfloat16 weights and
compute, LoRA on q and v, AdamW, full-sequence LM loss, fsdp over every device, a fixed number of
sequences per device) on ``jax.ShapeDtypeStruct`` inputs carrying their shardings: no weights are
allocated. The figures are the compiler's own ``compiled.memory_analysis()`` per device.

Targets:
  ``--topology v5p:4x4x4`` compiles for that TPU slice with ``jax.experimental.topologies`` (needs only
  the ``libtpu`` wheel matching jax, no TPU); ``--cpu-devices N`` compiles for N simulated host devices
  (it sets ``--xla_force_host_platform_device_count`` itself, before JAX starts).

Examples::

    python experiments/step_memory.py --model llama-3-70b --topology v5p:2x2x2
    python experiments/step_memory.py --model llama-3-70b --topology v5p:4x4x4 --json
    python experiments/step_memory.py --model llama-3.1-405b --topology v5p:8x8x4
    python experiments/step_memory.py --model tiny --cpu-devices 8 --loss-chunk 0   # materialised logits

``--loss-chunk 0`` materialises the logits of every position (the train step's ``loss_chunk=None``).

Measured (per chip, GiB = 2**30 bytes, one 2,048-token sequence per chip, rank 16 on q and v, the
commands above; "before" is the step without activation constraints and chunked loss):

=================  ===========  ======================  ===================================
model              slice        before                  now (arguments + temp = total)
=================  ===========  ======================  ===================================
Llama-3-70B        v5p:2x2x2    25.9                    16.6 + 7.8 = 24.3
Llama-3-70B        v5p:4x4x4    70.1 (68.0 temp)        2.2 + 10.5 = 12.7
Llama-3.1-405B     v5p:8x8x4    does not fit (issue)    3.4 + 27.5 = 30.9 (HBM 95)
=================  ===========  ======================  ===================================
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Public configs (shapes only, from each model's config.json).
MODELS = {
    "tiny": dict(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
    ),
    "llama-3-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
    ),
    "llama-3.1-405b": dict(
        vocab_size=128256,
        hidden_size=16384,
        intermediate_size=53248,
        num_layers=126,
        num_heads=128,
        num_kv_heads=8,
    ),
}
GIB = 2**30


def _environment(args) -> None:
    """Environment that must be set before JAX starts."""
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only a compile target
    # libtpu looks for TPU metadata it does not need for an ahead-of-time compile; naming the slice
    # and this host silences its warnings (the compiled figures are the same either way).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no TPU is claimed
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.topology:
        gen, _, dims = args.topology.partition(":")
        chips = 1
        for d in dims.split("x"):
            chips *= int(d)
        # Slice names count TensorCores: two per chip on v4 / v5p, one on v5e / v6e.
        name = {"v5e": f"v5litepod-{chips}"}.get(gen, f"{gen}-{chips * (2 if gen in ('v4', 'v5p') else 1)}")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def make_devices_mesh(args):
    """A ``("data", "fsdp", "tensor")`` mesh with every device on fsdp, and a description of the target."""
    import jax

    if args.topology:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
        n = len(topo.devices)
        return topologies.make_mesh(topo, (1, n, 1), ("data", "fsdp", "tensor")), f"tpu {args.topology}"
    from lora_jax.train import mesh as mesh_lib

    return mesh_lib.make_mesh("data=1,fsdp=-1,tensor=1"), f"cpu x{jax.device_count()}"


def compile_step(
    cfg_kw: dict,
    mesh,
    *,
    per_device_batch: int = 1,
    seq: int = 2048,
    rank: int = 16,
    targets: str = r".*/attn/(query|value)/kernel",
    loss_chunk: int | None = 512,
    dtype: str = "bfloat16",
):
    """Lowers and compiles the train step for `mesh` on abstract inputs; returns ``(compiled, seconds)``.

    Args:
      cfg_kw: :class:`~lora_jax.models.llama.LlamaConfig` fields (shapes).
      mesh: a ``("data", "fsdp", "tensor")`` mesh (real or from a topology).
      per_device_batch: sequences per device; the global batch is this times the data-parallel size.
      seq: tokens per sequence.
      loss_chunk: the train step's ``loss_chunk`` (None: materialise all logits).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from lora_jax.models.llama import Llama, LlamaConfig
    from lora_jax.train import mesh as mesh_lib
    from lora_jax.train import step as step_lib

    dt = jnp.dtype(dtype)
    cfg = LlamaConfig(
        **cfg_kw, max_position_embeddings=seq, scan_layers=True, remat=True, dtype=dt, param_dtype=dt
    )
    model = Llama(cfg)
    variables = jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    )
    param_sh = mesh_lib.param_shardings(model, variables, mesh)
    spec = lj.LoraSpec(
        rank=rank,
        alpha=2.0 * rank,
        targets=targets,
        axes={r"params/layers/.*": lj.LoraAxes((0,), (1,), (2,))},
    )
    delta_shapes = jax.eval_shape(lambda k: lj.init(k, variables, spec), jax.random.key(0))
    delta_sh = lj.delta_shardings(delta_shapes, param_sh)
    tx, _ = step_lib.make_optimizer(1e-4, 1000, 10)
    repl = mesh_lib.replicated(mesh)
    opt_shapes = jax.eval_shape(tx.init, delta_shapes)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt_shapes, delta_sh, transform_non_params=lambda _: repl
    )
    shardings = {
        "params": param_sh,
        "deltas": delta_sh,
        "opt_state": opt_sh,
        "replicated": repl,
        "batch": mesh_lib.batch_sharding(mesh, leading=1),
    }
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_shape = (1, per_device_batch * dp, seq)
    batch = {
        k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=shardings["batch"])
        for k in ("input_ids", "attention_mask", "loss_mask")
    }
    sds = lambda tree, sh: jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh
    )
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = step_lib.make_train_step(
        model.apply, tx, num_targets=None, shardings=shardings, loss_chunk=loss_chunk
    )
    t0 = time.perf_counter()
    compiled = step.lower(
        sds(delta_shapes, delta_sh),
        sds(opt_shapes, opt_sh),
        sds(variables, param_sh),
        batch,
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl),
    ).compile()
    return compiled, time.perf_counter() - t0


def summary(compiled) -> dict:
    """Per-device bytes from ``memory_analysis()``: arguments, outputs, aliased (donated), temp, total."""
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["output"] - out["alias"] + out["temp"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-70b", choices=sorted(MODELS))
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="TPU slice, e.g. v5p:2x2x2 (needs libtpu)")
    target.add_argument("--cpu-devices", type=int, help="number of simulated host devices")
    p.add_argument("--layers", type=int, help="override the number of layers (faster compile)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--per-device-batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--loss-chunk", type=int, default=512, help="0: materialise the logits of every position")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    _environment(args)

    mesh, target_name = make_devices_mesh(args)
    cfg_kw = dict(MODELS[args.model])
    if args.layers:
        cfg_kw["num_layers"] = args.layers
    compiled, seconds = compile_step(
        cfg_kw,
        mesh,
        per_device_batch=args.per_device_batch,
        seq=args.seq,
        rank=args.rank,
        loss_chunk=args.loss_chunk or None,
    )
    per = summary(compiled)
    row = {
        "model": args.model,
        "layers": cfg_kw["num_layers"],
        "target": target_name,
        "devices": mesh.devices.size,
        "mesh": dict(mesh.shape),
        "seq": args.seq,
        "per_device_batch": args.per_device_batch,
        "rank": args.rank,
        "loss_chunk": args.loss_chunk or None,
        "compile_s": round(seconds, 1),
        "per_device": per,
    }
    if args.json:
        print(json.dumps(row))
    else:
        gib = {k: f"{v / GIB:.3f}" for k, v in per.items()}
        print(
            f"{args.model} ({row['layers']} layers) on {target_name}, {args.per_device_batch}x{args.seq} tokens "
            f"per device, loss_chunk={row['loss_chunk']}: per device GiB {gib} (compiled in {seconds:.0f} s)"
        )


if __name__ == "__main__":
    sys.exit(main())
