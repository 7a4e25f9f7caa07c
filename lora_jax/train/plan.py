"""Memory planner: per-device bytes of the real train step, compiled for a mesh that need not exist.

``plan`` builds every input of the train step as an abstract ``jax.ShapeDtypeStruct`` with its
``NamedSharding`` — base params from ``jax.eval_shape`` of the model's init and its logical-axis rules
(`lora_jax.train.mesh.param_shardings`), deltas from `lj.init` under ``eval_shape`` placed by
`lj.delta_shardings`, optimizer state from ``eval_shape`` of ``tx.init`` following them, the batch
split over ``("data", "fsdp")`` — then lowers and compiles the step the engine runs
(`lora_jax.train.step.make_train_step` for LoRA, `plan_steps.make_full_train_step` for full
fine-tuning) with ``jax.jit(...).lower(...).compile()``. No weight is loaded or allocated. The figures
are the compiler's own ``compiled.memory_analysis()``, per device:

- ``arguments`` (split per input tree from the shardings: ``params``, ``deltas``, ``opt_state``,
  ``batch``), ``temp`` (activations, gradients, collectives' buffers), ``output``, ``alias`` (outputs
  written into donated inputs: the deltas/params and optimizer state);
- ``total = arguments + temp + output - alias``, what the step holds at its peak.

Targets (`lora_jax.train.plan_targets`): ``cpu`` (N simulated host devices, a proxy), ``tpu:GEN:TOPO``
(the TPU compiler for a slice, ahead of time), ``gpu:KIND`` (XLA's GPU compiler, deviceless). Each
compile runs in a child process with its own environment. `lora_jax.train.plan_search` finds the
largest batch or sequence that fits.

Example (a few seconds)::

    >>> report = plan(PlanRequest("smollm2-135m", devices=8, mesh="fsdp=8", seq=64))
    >>> report["status"], report["batch"], report["per_device"]["params"] < report["per_device"]["total"] < 2**30
    ('ok', 8, True)
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType

import lora_jax as lj
from lora_jax.models.llama import Llama
from lora_jax.train import mesh as mesh_lib
from lora_jax.train import plan_configs, plan_targets

__all__ = ["PlanRequest", "check", "compile_plan", "parse_bytes", "plan"]

DEFAULT_TARGETS = r".*/(query|value)/kernel"
# ``--method qlora``: the base as `lora-jax finetune --quantize nf4` holds it (every kernel NF4, blocks of 64
# along the input axis, double quantization; the embedding and an untied lm_head stay in param_dtype).
QLORA_SPEC = lj.QuantSpec(
    format="nf4", block_size=64, double_quant=True, targets=r".*/kernel", exclude=r".*lm_head.*"
)


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """What to plan (the flags of ``lora-jax plan``).

    Attributes:
      model: a name of `plan_configs.PUBLIC_CONFIGS` or a folder with ``config.json``.
      devices: device count; None = what the target or the mesh fixes.
      mesh: ``"data=..,fsdp=..,tensor=.."`` (-1: the remaining devices).
      method: ``"lora"``, ``"qlora"`` (LoRA on an NF4 base, `QLORA_SPEC`) or ``"full"``.
      rank, targets: the LoRA spec (ignored for ``"full"``).
      batch: global sequences per step; None = one per data-parallel shard (``data·fsdp``).
      seq: tokens per sequence.
      loss_tokens: loss positions per sequence; None = ``seq - 1`` (language-model loss everywhere).
      loss_chunk: positions per chunk of the cross-entropy (`make_train_step`'s ``loss_chunk``); None =
        unchunked float32 logits for every loss position.
      dtype: compute dtype; param_dtype: dtype of the base weights (None = `dtype`).
      remat: ``"full"`` (each layer rematerialised in the backward pass) or ``"none"``.
      target: ``"cpu"``, ``"tpu:GEN:TOPOLOGY"`` or ``"gpu:KIND"``.
      device_memory: bytes per device to fit in (or text: ``"141GB"``, ``"95.74GiB"``); None = the
        target's (unknown for cpu).
    """

    model: str
    devices: int | None = None
    mesh: str = "fsdp=-1"
    method: str = "lora"
    rank: int = 16
    targets: str = DEFAULT_TARGETS
    batch: int | None = None
    seq: int = 2048
    loss_tokens: int | None = None
    loss_chunk: int | None = 512
    dtype: str = "bfloat16"
    param_dtype: str | None = None
    remat: str = "full"
    target: str = "cpu"
    device_memory: int | str | None = None


@dataclasses.dataclass
class Checked:
    """A validated request: everything `compile_plan` needs except devices."""

    request: PlanRequest
    target: plan_targets.Target
    spec: plan_configs.ModelSpec
    model: Any
    num_devices: int
    mesh_sizes: dict[str, int]
    batch: int
    loss_tokens: int
    params: Any  # abstract, ShapeDtypeStruct leaves
    device_memory: int | None


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int | None) -> int | None:
    """``"141GB"`` -> 141·10⁹, ``"95.74GiB"`` -> 95.74·2³⁰, ``"1024"`` -> 1024 (GB = 10⁹ B, GiB = 2³⁰ B)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"--device-memory {text!r}: expected a number with a unit such as 141GB or 95.74GiB."
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _mesh_sizes(text: str, devices: int | None, target: plan_targets.Target) -> tuple[int, dict[str, int]]:
    fixed = target.num_devices
    if fixed is not None and devices is not None and devices != fixed:
        raise ValueError(
            f"--devices {devices} does not match --target {target.platform}:{target.name}, "
            f"which has {fixed} chips; leave --devices out or give {fixed}."
        )
    devices = fixed if devices is None else devices
    sizes = {a: 1 for a in mesh_lib.AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
            raise ValueError(
                f"--mesh {text!r}: expected 'axis=size' entries with axis in {mesh_lib.AXES}, "
                f"e.g. data=1,fsdp=8,tensor=1."
            )
        sizes[name.strip()] = int(value)
    product = math.prod(s for s in sizes.values() if s != -1)
    if devices is None:
        if -1 in sizes.values():
            raise ValueError(f"--mesh {text!r} has a -1 axis: give --devices (or a tpu: target).")
        devices = product
    if -1 not in sizes.values() and product != devices:
        relation = "smaller than" if devices < product else "larger than"
        raise ValueError(
            f"--devices {devices} is {relation} the mesh {text!r} ({product} devices): the mesh "
            f"must use every device; give --devices {product}, or -1 for one mesh axis."
        )
    return devices, mesh_lib.parse_mesh(text, devices)


def _remat_overrides(policy: str) -> dict:
    if policy in ("none", "full"):
        return {"remat": policy == "full"}
    raise ValueError(f"--remat {policy!r}: the model's remat policies are 'none' and 'full'.")


def _shard_problems(tree: Any, shardings: Any, sizes: dict[str, int]) -> list[str]:
    problems = []
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), sh in zip(leaves, jax.tree_util.tree_leaves(shardings), strict=True):
        for dim, axes in enumerate(tuple(sh.spec)):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = math.prod(sizes[a] for a in names)
            if leaf.shape[dim] % size:
                problems.append(
                    f"parameter {lj.spec.path_str(path)} {tuple(leaf.shape)}: dimension {dim} "
                    f"({leaf.shape[dim]}) is not divisible by mesh axis {'×'.join(names)!r} "
                    f"(size {size})"
                )
    return problems


def check(request: PlanRequest) -> Checked:
    """Validates `request` without compiling (no devices needed) and builds the abstract model.

    Raises:
      ValueError: an unknown model, a device count that does not match the mesh or the target, a mesh
        axis that does not divide a parameter dimension (all such listed), a batch the data-parallel
        axes do not divide, or a bad method, dtype, remat policy or sequence length.
    """
    r = request
    target = plan_targets.parse_target(r.target)
    spec = plan_configs.resolve(r.model)
    if r.method not in ("lora", "qlora", "full"):
        raise ValueError(f"--method {r.method!r}: expected 'lora', 'qlora' or 'full'.")
    num_devices, sizes = _mesh_sizes(r.mesh, r.devices, target)
    dp = sizes["data"] * sizes["fsdp"]
    batch = dp if r.batch is None else r.batch
    if batch < 1 or batch % dp:
        raise ValueError(
            f"--batch {batch} is not a multiple of the data-parallel devices data·fsdp = {dp}; "
            f"give --batch {max(dp, batch // dp * dp)}."
        )
    loss_tokens = r.seq - 1 if r.loss_tokens is None else r.loss_tokens
    if r.seq < 2 or not 1 <= loss_tokens <= r.seq - 1:
        raise ValueError(
            f"--seq {r.seq} with {loss_tokens} loss positions: need seq >= 2 and 1 <= loss "
            f"positions <= seq - 1."
        )
    try:
        dtype, param_dtype = jnp.dtype(r.dtype), jnp.dtype(r.param_dtype or r.dtype)
    except TypeError as e:
        raise ValueError(f"--dtype {r.dtype!r} / --param-dtype {r.param_dtype!r}: {e}") from None
    cfg = plan_configs.llama_config(
        spec, scan_layers=True, dtype=dtype, param_dtype=param_dtype, **_remat_overrides(r.remat)
    )
    model = Llama(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    params = nn.meta.unbox(boxed)
    amesh = AbstractMesh(
        tuple(sizes[a] for a in mesh_lib.AXES),
        mesh_lib.AXES,
        axis_types=(AxisType.Auto,) * len(mesh_lib.AXES),
    )
    abstract_sh = mesh_lib.param_shardings(model, params, amesh)
    problems = _shard_problems(params, abstract_sh, sizes)
    if problems:
        raise ValueError(
            f"mesh {r.mesh!r} does not divide {len(problems)} parameter dimension(s) of "
            f"{spec.name}; pick axis sizes that divide them:\n  " + "\n  ".join(problems)
        )
    if r.method in ("lora", "qlora"):
        _lora_spec(r, params)  # targets that match no kernel: an error now, not after a compile
    if r.method == "qlora":  # a block crossing a shard boundary, a width the block does not divide
        lj.quant.tree.check_targets(_abstract(params, abstract_sh), QLORA_SPEC)
    memory = parse_bytes(r.device_memory) if r.device_memory is not None else target.device_memory
    return Checked(r, target, spec, model, num_devices, sizes, batch, loss_tokens, params, memory)


def _attention_kernel(target: plan_targets.Target, dtype: Any, head_dim: int) -> str:
    """The attention kernel the model's ``"auto"`` picks on the target's devices, named for the compile.

    The compiling process runs on the host (its default backend is the CPU), so ``"auto"`` would pick XLA
    there: for a GPU target the choice is made here. cuDNN's fused attention takes 16-bit inputs with a
    head dimension that is a multiple of 8 and at most 128 when it cannot see the card (256 on a real
    Hopper GPU, where ``"auto"`` would take it; such models are planned with XLA's attention here).
    """
    if target.platform != "gpu":
        return "auto"
    ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0
    return "cudnn" if ok and head_dim <= 128 else "xla"


def _bytes_per_device(tree: Any) -> int:
    def one(x):
        if x is None:
            return 0
        itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize
        return math.prod(x.sharding.shard_shape(x.shape)) * itemsize

    return sum(one(x) for x in jax.tree_util.tree_leaves(tree))


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _lora_spec(request: PlanRequest, params: Any) -> lj.LoraSpec:
    spec = lj.LoraSpec(rank=request.rank, alpha=2.0 * request.rank, targets=request.targets)
    axes = {
        re.escape(lj.spec.path_str(p)): lj.LoraAxes(stack=(0,), inputs=(1,), outputs=(2,))
        for p, w in jax.tree_util.tree_flatten_with_path(params)[0]
        if spec.matches(lj.spec.path_str(p)) and len(w.shape) == 3
    }
    if not axes:
        raise ValueError(
            f"--targets {request.targets!r} matches no stacked kernel of the model; paths look "
            f"like 'params/layers/attn/query/kernel'."
        )
    return dataclasses.replace(spec, axes=axes)


# The TPU compiler's refusals: temporaries alone, or everything ("Used X of Y hbm").
_OOM = {
    "temp": re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
    "total": re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
}


def _oom_figures(message: str) -> tuple[str, int, int] | None:
    """``(what, bytes needed, bytes available)`` from an out-of-memory compile error, or None."""
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    for what, pattern in _OOM.items():
        m = pattern.search(message)
        if m:
            return (
                what,
                int(float(m.group(1)) * scale[m.group(2)]),
                int(float(m.group(3)) * scale[m.group(4)]),
            )
    return None


def compile_plan(request: PlanRequest, devices: list | None = None) -> dict:
    """Compiles the train step for `request` in this process and returns the report (see `plan`).

    Args:
      devices: the devices to compile for; None = the target's (this process must have been started
        with `plan_targets.environment`; `plan` does that).
    """
    c = check(request)
    r = request
    if devices is None:
        devices = plan_targets.compile_devices(c.target, c.num_devices)
    mesh = mesh_lib.make_mesh(",".join(f"{a}={s}" for a, s in c.mesh_sizes.items()), devices)
    repl = mesh_lib.replicated(mesh)
    param_sh = mesh_lib.param_shardings(c.model, c.params, mesh)
    params = _abstract(c.params, param_sh)
    dense_sh = param_sh  # deltas follow the dense weights' shardings
    if r.method == "qlora":  # `jax.eval_shape(quantize)`: codes and scales sharded like each kernel
        params = lj.quant.tree.abstract_quantize(params, QLORA_SPEC)
        param_sh = jax.tree_util.tree_map(lambda x: x.sharding, params)
    from lora_jax.train import step as step_lib

    tx, _ = step_lib.make_optimizer(1e-4, 1000, 100)
    batch_sh = mesh_lib.batch_sharding(mesh, leading=1)
    ids = jax.ShapeDtypeStruct((1, c.batch, r.seq), jnp.int32, sharding=batch_sh)
    batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    key = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype, sharding=repl)
    if r.method in ("lora", "qlora"):
        spec = _lora_spec(r, c.params)
        delta_shapes = jax.eval_shape(lambda k: lj.init(k, c.params, spec), jax.random.key(0))
        delta_sh = lj.delta_shardings(delta_shapes, dense_sh)
        trained, trained_sh = _abstract(delta_shapes, delta_sh), delta_sh
    else:
        trained, trained_sh = params, param_sh
    opt_shapes = jax.eval_shape(tx.init, trained)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt_shapes, trained_sh, transform_non_params=lambda _: repl
    )
    opt = _abstract(opt_shapes, opt_sh)
    shardings = {"params": param_sh, "opt_state": opt_sh, "batch": batch_sh, "replicated": repl}
    t0 = time.perf_counter()
    loss = {"num_targets": None if c.loss_tokens == r.seq - 1 else c.loss_tokens, "loss_chunk": r.loss_chunk}
    cfg = c.model.config  # the step's model: the attention kernel of the target's devices (shapes unchanged)
    model = Llama(dataclasses.replace(cfg, attention=_attention_kernel(c.target, cfg.dtype, cfg.head_dim)))
    if r.method in ("lora", "qlora"):
        step = step_lib.make_train_step(model.apply, tx, shardings=dict(shardings, deltas=delta_sh), **loss)
        lowered = step.lower(trained, opt, params, batch, key)
    else:
        from lora_jax.train.plan_steps import make_full_train_step

        step = make_full_train_step(model.apply, tx, shardings=shardings, **loss)
        lowered = step.lower(params, opt, batch, key)
    t1 = time.perf_counter()
    per_device = {
        "params": _bytes_per_device(params),
        "deltas": _bytes_per_device(trained) if r.method != "full" else 0,
        "opt_state": _bytes_per_device(opt),
        "batch": _bytes_per_device(batch),
    }
    report = _header(c, devices, trained, params)
    report["attention"] = model.config.attention
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program larger than HBM
        figures = _oom_figures(str(e))
        if figures is None:
            raise
        what, needed, available = figures
        report.update(
            status="out_of_memory",
            error=str(e).splitlines()[0][:500],
            fits=False,
            lower_seconds=round(t1 - t0, 2),
            compile_seconds=round(time.perf_counter() - t1, 2),
        )
        if what == "temp":  # plus the arguments, counted from their shardings
            per_device.update(temp=needed, total=needed + sum(per_device.values()))
        else:
            per_device.update(total=needed)
        report["per_device"] = per_device
        report["device_memory"] = report["device_memory"] or available
        return report
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    per_device.update(
        arguments=m.argument_size_in_bytes,
        temp=m.temp_size_in_bytes,
        output=m.output_size_in_bytes,
        alias=m.alias_size_in_bytes,
        generated_code=m.generated_code_size_in_bytes,
    )
    per_device["total"] = (
        m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    )
    report.update(
        status="ok", per_device=per_device, lower_seconds=round(t1 - t0, 2), compile_seconds=round(t2 - t1, 2)
    )
    # cuDNN's fused attention (forward and backward) as custom calls of the compiled program: 0 = XLA's
    report["fused_attention_calls"] = len(
        re.findall(r'custom_call_target="__cudnn\$fmha', compiled.as_text())
    )
    memory = report["device_memory"]
    report["fits"] = None if memory is None else per_device["total"] <= memory
    return report


def _count(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _global_bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def _header(c: Checked, devices: list, trained: Any, params: Any) -> dict:
    r = c.request
    is_q = lj.quant.is_quantized
    quantized = [x for x in jax.tree_util.tree_leaves(params, is_leaf=is_q) if is_q(x)]
    return {
        "model": c.spec.name,
        "model_notes": list(c.spec.notes),
        "method": r.method,
        "target": r.target,
        "device_kind": devices[0].device_kind,
        "devices": c.num_devices,
        "mesh": c.mesh_sizes,
        "rank": r.rank if r.method != "full" else None,
        "targets": r.targets if r.method != "full" else None,
        "batch": c.batch,
        "seq": r.seq,
        "loss_tokens": c.loss_tokens,
        "loss_chunk": r.loss_chunk,
        "dtype": r.dtype,
        "param_dtype": r.param_dtype or r.dtype,
        "remat": r.remat,
        "model_params": _count(c.params),
        "trainable_params": _count(trained),
        # the base as the step holds it (global bytes; a quantized kernel counts its codes and scales)
        "base_bytes": _global_bytes(params),
        "dense_base_bytes": _global_bytes(c.params),
        "quantized_params": sum(math.prod(x.shape) for x in quantized),
        "quantized_bytes": sum(_global_bytes(x) for x in quantized),
        "quantize": None
        if not quantized
        else {
            "format": QLORA_SPEC.format,
            "block_size": QLORA_SPEC.block_size,
            "double_quant": QLORA_SPEC.double_quant,
        },
        "device_memory": c.device_memory,
        "jax": jax.__version__,
    }


def plan(request: PlanRequest, *, timeout: float | None = None) -> dict:
    """Per-device memory of the train step for `request`, compiled in a child process.

    Returns:
      a JSON-able dict: the request's settings (``model``, ``method``, ``target``, ``devices``, ``mesh``,
      ``batch``, ``seq``, ...), ``per_device`` bytes (``params``, ``deltas``, ``opt_state``, ``batch``,
      ``arguments``, ``temp``, ``output``, ``alias``, ``total``), ``device_memory``, ``fits``,
      ``status`` (``"ok"``, or ``"out_of_memory"`` when the TPU compiler refuses the program; then
      ``per_device`` holds the figures its error gives: ``temp`` and a ``total`` of those temporaries
      plus the arguments' shard bytes, or the ``total`` it reports), ``error``, ``lower_seconds``,
      ``compile_seconds``, ``attention`` (the model's attention kernel) and ``fused_attention_calls``
      (cuDNN fused-attention custom calls in the compiled program; 0 when attention is XLA's).

    Raises:
      ValueError: bad input (see `check`), before any compile.
    """
    c = check(request)  # fast errors in this process
    return plan_targets.run_worker({"request": dataclasses.asdict(request)}, c.target, c.num_devices, timeout)
