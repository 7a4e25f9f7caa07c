"""Device mesh, shardings and multi-host setup for training.

Base params are sharded by the model's logical-axis rules (Flax ``nn.logical_to_mesh_sharding``), the
deltas follow their base weights (`lora_jax.delta_shardings`), the batch is split over the
``("data", "fsdp")`` mesh axes, and each process builds the global batch from its own rows only
(``jax.make_array_from_process_local_data``).

Example:
  >>> parse_mesh("data=-1,fsdp=2,tensor=1", num_devices=8)
  {'data': 4, 'fsdp': 2, 'tensor': 1}
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "AXES",
    "BATCH_AXES",
    "batch_sharding",
    "global_batch",
    "data_parallel_size",
    "init_distributed",
    "is_main",
    "log",
    "make_mesh",
    "param_shardings",
    "parse_mesh",
    "place",
    "replicated",
]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def is_main() -> bool:
    """Whether this is the first process (the one that prints and writes the run's files)."""
    return jax.process_index() == 0


def log(*args) -> None:
    """`print` on the first process only (every process runs the same script; one copy of each line)."""
    if is_main():
        print(*args, flush=True)


def data_parallel_size(mesh) -> int:
    """How many ways the batch is split: the product of the mesh's `BATCH_AXES`."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def parse_mesh(text: str, num_devices: int | None) -> dict[str, int]:
    """``"data=-1,fsdp=1,tensor=1"`` -> ``{"data": D, "fsdp": F, "tensor": T}`` with ``D·F·T == num_devices``.

    At most one size may be -1 (all remaining devices). Axes not named get size 1. With
    ``num_devices=None`` only the syntax is checked and a -1 stays -1 (no JAX backend is touched).

    Raises:
      ValueError: a malformed mesh, or one that does not fit `num_devices`; the message starts with
        ``mesh '<text>':``.
    """
    sizes = {a: 1 for a in AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not value.strip().lstrip("-").isdigit():
            raise ValueError(
                f"mesh {text!r}: expected comma-separated 'axis=size' with axis in {AXES} and an "
                f"integer size (-1 = the remaining devices), e.g. 'data=-1,fsdp=1,tensor=1'."
            )
        if name in seen:
            raise ValueError(f"mesh {text!r}: axis {name!r} given twice.")
        seen.add(name)
        sizes[name] = int(value)
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh {text!r}: sizes must be positive, with at most one -1.")
    if num_devices is None:
        return sizes
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {text!r}: {num_devices} devices are not a multiple of {fixed}.")
        sizes[free[0]] = num_devices // fixed
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise ValueError(
            f"mesh {text!r}: it has {int(np.prod(list(sizes.values())))} devices but "
            f"{num_devices} are available; use -1 for one axis to fill the rest."
        )
    return sizes


def make_mesh(text: str = "data=-1,fsdp=1,tensor=1", devices=None) -> jax.sharding.Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over `devices` (default: all, across processes)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh(text, len(devices))
    return jax.make_mesh(
        tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices
    )


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, leading: int = 0) -> NamedSharding:
    """Batch axis (after `leading` unsharded axes, e.g. the micro-batch axis) over ``("data", "fsdp")``."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def param_shardings(model, variables: Any, mesh, rules=None) -> Any:
    """A ``NamedSharding`` per leaf of `variables`, from the model's logical-axis annotations.

    A model of a registered family (`lora_jax.models.registry.family_of`) uses the family's logical
    ``PartitionSpec`` of every variable and, unless `rules` is given, the family's own rules
    (`lora_jax.models.sharded.param_shardings`, which the sharded loader uses too). A model outside the
    registry is read with ``nn.get_partition_spec`` of its abstract ``model.init`` on a ``(1, 1)`` token
    batch and mapped with the Llama rules; leaves without annotations are replicated.
    """
    import flax.linen as nn

    from lora_jax.models import layers, llama, registry, sharded

    if registry.family_of(model) is not None:
        return sharded.param_shardings(model, variables, mesh, rules)
    rules = llama.LOGICAL_AXIS_RULES_DEFAULT if rules is None else rules
    try:
        logical = layers.logical_partition_specs(model, np.zeros((1, 1), np.int32))
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # no annotations readable this way
        import warnings

        warnings.warn(
            f"no logical-axis annotations could be read from {type(model).__name__} ({e}); its "
            f"parameters are replicated on the mesh.",
            stacklevel=2,
        )
        logical = jax.tree_util.tree_map(lambda _: P(), variables)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
    # Keep only the variables we actually have (e.g. {"params": ...}), in their structure.
    return jax.tree_util.tree_map(lambda _, s: s, variables, sharded.restrict_to(shardings, variables))


def place(tree: Any, shardings: Any) -> Any:
    """Puts host or device arrays onto (possibly multi-process) shardings; every process passes the
    same values."""

    def put(x, s):
        x = np.asarray(jax.device_get(x)) if not isinstance(x, np.ndarray) else x
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree, shardings)


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int) -> slice:
    """The contiguous range of `axis` that this process's devices hold under `sharding`."""
    idx = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [i[axis].start or 0 for i in idx]
    stops = [global_shape[axis] if i[axis].stop is None else i[axis].stop for i in idx]
    lo, hi = min(starts), max(stops)
    return slice(lo, hi)


def global_batch(
    batch: dict[str, np.ndarray], sharding: NamedSharding, axis: int = 0
) -> dict[str, jax.Array]:
    """Global arrays from a host batch, each process reading only the rows its own devices hold.

    `batch` is the global batch (every process computes the same deterministic batch order, which is
    cheap); the rows along `axis` that this process's devices need are cut out and
    ``jax.make_array_from_process_local_data`` assembles the global array across processes.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        rows = local_rows(sharding, v.shape, axis)
        local = np.take(v, np.arange(rows.start, rows.stop), axis=axis)
        out[k] = jax.make_array_from_process_local_data(sharding, local, v.shape)
    return out


def init_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts JAX's multi-host runtime when asked by flags or by the environment; returns whether it did.

    Flags: ``coordinator="host:port"``, ``num_processes``, ``process_id``. Environment: JAX's own
    cluster auto-detection (``jax.distributed.initialize()`` with no arguments) is used when
    ``JAX_COORDINATOR_ADDRESS`` is set, or under SLURM / Open MPI with more than one task, or on a
    multi-host Cloud TPU. Must run before any other JAX call. On CPU, collectives use gloo.
    """
    env = os.environ
    auto = (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))
    )
    if coordinator is None and not auto:
        if num_processes not in (None, 1):
            raise ValueError(f"num_processes={num_processes} needs a coordinator address 'host:port'.")
        return False
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"coordinator {coordinator!r}: expected 'host:port' (process 0's address and a free port), "
                f"e.g. '10.0.0.1:8476'."
            )
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id too.")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes}).")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    return True
