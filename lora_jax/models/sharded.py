"""Sharded loading: every parameter created directly as a global ``jax.Array`` with its final sharding.

``lora_jax.models.load(folder, mesh=mesh)`` (and :func:`lora_jax.models.hf.load_hf`) read only the
safetensors headers (:func:`lora_jax.models.weights.open_weights`), let the family's ``from_hf`` turn
the lazy tensors into views of our parameters (:mod:`lora_jax.models.lazy`: transposes, GPT-2's
``c_attn`` split, layers stacked for ``nn.scan``; tied embeddings are simply never read), and hand each
view to a global array with the sharding the family's logical-axis rules give on ``mesh``
(:func:`param_shardings`, the shardings :func:`lora_jax.train.mesh.param_shardings` gives the train
step for a registered family). As with ``jax.make_array_from_callback``, only this process's devices
are visited and each reads just the block it holds, so each process reads about ``1/processes`` of
the checkpoint (replicated parameters, e.g. norm scales, in full); unlike it, the blocks are read and
put on their devices one at a time, so the host holds one block at a time, never the whole model nor a
whole parameter (devices holding the same block, replicated over a mesh axis, share one read).

Every dimension is checked against the mesh before anything is read: a mesh axis that does not divide
a dimension it shards is an error naming the parameter, the axis and both sizes.

Example (8 devices)::

    mesh = lora_jax.train.make_mesh("data=1,fsdp=4,tensor=2")
    model, variables, tok = lora_jax.models.load("path/to/Llama-3-8B", mesh=mesh, scan_layers=True)
    variables["params"]["layers"]["attn"]["query"]["kernel"].sharding.spec   # (None, 'fsdp', 'tensor')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lora_jax.models.lazy import ArrayTensor, Lazy

__all__ = ["check_divisible", "checkpoint_dtype", "materialize", "param_shardings"]


def checkpoint_dtype(tensors: Mapping[str, Any]) -> np.dtype | None:
    """The floating dtype holding most of a state dict's bytes (``bfloat16`` for a bf16 checkpoint), or ``None``.

    Example:
        >>> checkpoint_dtype({"w": np.zeros((4, 4), np.float16), "norm": np.zeros(4, np.float32)})
        dtype('float16')
    """
    sizes: dict[np.dtype, int] = {}
    for t in tensors.values():
        dtype = np.dtype(t.dtype)
        if dtype.kind == "f" or dtype.name == "bfloat16":  # ml_dtypes' bfloat16 has kind "V"
            sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize
    return max(sizes, key=sizes.get) if sizes else None


def _family(model):
    from lora_jax.models import registry

    family = registry.family_of(model)
    if family is None:
        raise TypeError(
            f"{type(model).__name__} is not a registered model family "
            f"(lora_jax.models.registry.FAMILIES); its shardings are unknown."
        )
    return family


def _rules_on(rules, mesh) -> tuple:
    """``rules`` with the mesh axes that ``mesh`` lacks dropped (those logical axes are replicated)."""
    out = []
    for logical, axes in rules:
        if axes is None:
            out.append((logical, None))
            continue
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)
        out.append((logical, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(out)


def param_shardings(model: Any, abstract: Any, mesh: jax.sharding.Mesh, rules=None) -> Any:
    """A ``NamedSharding`` per leaf of ``abstract`` (``{"params": ...}`` of shapes) from the family's rules.

    Args:
        model: a Flax module of a registered family.
        abstract: its variables (arrays, ``jax.ShapeDtypeStruct`` or lazy tensors).
        mesh: the device mesh; logical axes mapped to mesh axes it lacks are replicated.
        rules: logical-axis rules; default the family's ``logical_axis_rules``.
    """
    # Computed here rather than through lora_jax.train.mesh (models must not import train: an import cycle).
    import flax.linen as nn
    from jax.sharding import PartitionSpec

    family = _family(model)
    rules = family.logical_axis_rules if rules is None else rules
    try:
        logical = family.logical_partition_specs(model)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # no annotations readable this way
        import warnings

        warnings.warn(
            f"no logical-axis annotations could be read from {type(model).__name__} ({e}); its "
            f"parameters are replicated on the mesh.",
            stacklevel=2,
        )
        logical = jax.tree_util.tree_map(lambda _: PartitionSpec(), abstract)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, _rules_on(rules, mesh))
    # Keep only the variables we actually have (e.g. {"params": ...}), in their structure.
    return jax.tree_util.tree_map(lambda _, s: s, abstract, restrict_to(shardings, abstract))


def restrict_to(tree, like):
    """`tree` cut down to the dict keys of `like` (e.g. the shardings of ``{"params": ...}`` only)."""
    if isinstance(like, dict):
        return {k: restrict_to(tree[k], v) for k, v in like.items()}
    return tree


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def check_divisible(model: Any, abstract: Any, shardings: Any, mesh: jax.sharding.Mesh) -> None:
    """Raises once, listing every parameter dimension that its mesh axes do not divide.

    Raises:
        ValueError: names each parameter, its dimension and logical axis, the mesh axis and both sizes.
    """
    problems = []
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    for (path, x), s in zip(leaves, jax.tree_util.tree_leaves(shardings)):
        for dim, entry in enumerate(tuple(s.spec) + (None,) * (len(x.shape) - len(s.spec))):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            size = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
            if size > 1 and x.shape[dim] % size:
                problems.append((path, x.shape, dim, axes, size))
    if not problems:
        return
    logical = {}
    try:
        specs = _family(model).logical_partition_specs(model)
        logical = {
            _key(p): tuple(spec)
            for p, spec in jax.tree_util.tree_leaves_with_path(
                specs, is_leaf=lambda v: isinstance(v, jax.sharding.PartitionSpec)
            )
        }
    except (TypeError, ValueError):
        pass
    lines = []
    for path, shape, dim, axes, size in problems:
        name = _key(path)
        spec = logical.get(name, ())
        axis = f" (logical axis {spec[dim]!r})" if dim < len(spec) and spec[dim] is not None else ""
        mesh_axis = (
            f"mesh axis {axes[0]!r} of size {size}"
            if len(axes) == 1
            else f"mesh axes {axes} of size {size} ({' x '.join(str(mesh.shape[a]) for a in axes)})"
        )
        lines.append(
            f"{name} {tuple(shape)}: dimension {dim}{axis} has size {shape[dim]}, "
            f"not divisible by {mesh_axis}"
        )
    raise ValueError(
        "the mesh does not divide these parameters (nothing was read):\n  "
        + "\n  ".join(lines)
        + f"\nUse mesh sizes {dict(mesh.shape)} that divide them, or pass rules= mapping the logical "
        f"axis to None (replicated) or to another mesh axis."
    )


def _read_shard(view: Lazy, index: tuple[slice, ...]) -> np.ndarray:
    """One device's block of one parameter (a function of its own so that reads can be counted)."""
    return view.read(index)


def _global_array(view: Lazy, sharding: jax.sharding.Sharding) -> jax.Array:
    """One global array: each distinct block of this process's devices read once, put on its devices, dropped.

    Like ``jax.make_array_from_callback`` (same result, multi-process the same way), but one block at a
    time: ``make_array_from_callback`` first gathers every local block of the parameter in host memory,
    which for a stacked ``(L, ...)`` scan parameter on a single 8-device host is the whole tensor.
    """
    groups: dict[tuple, list] = {}  # block -> the local devices holding it (replication over a mesh axis)
    for device, index in sharding.addressable_devices_indices_map(view.shape).items():
        groups.setdefault(tuple(s.indices(n)[:2] for s, n in zip(index, view.shape)), []).append(device)
    shards = []
    for bounds, devices in groups.items():
        block = _read_shard(view, tuple(slice(a, b) for a, b in bounds))
        shards += [jax.device_put(block, d) for d in devices]
        jax.block_until_ready(shards[-len(devices) :])  # the host block can go before the next is read
        del block
    return jax.make_array_from_single_device_arrays(view.shape, sharding, shards)


def materialize(model: Any, views: Any, mesh: jax.sharding.Mesh, *, rules=None, quantize=None) -> Any:
    """Global ``jax.Array`` s from a tree of lazy tensors (or numpy arrays), each with its final sharding.

    Args:
        model: the Flax module (a registered family) the variables belong to.
        views: ``{"params": ...}`` whose leaves are :class:`~lora_jax.models.lazy.Lazy` tensors (as a
            family's ``from_hf`` returns for :func:`~lora_jax.models.weights.open_weights`) or arrays.
        mesh: the device mesh (all processes pass the same one).
        rules: logical-axis rules; default the family's.
        quantize: a `lora_jax.QuantSpec` (QLoRA): each parameter it targets is quantized as soon as it
            is on its devices, its dense array dropped before the next is read, so the dense model is
            never whole on the devices (its paths and shapes are checked before anything is read).

    Returns:
        The same tree of global arrays (`QuantizedArray` where `quantize` targets); each process has read
        only its own devices' blocks.

    Raises:
        ValueError: a mesh axis does not divide a dimension it shards (checked before any read).
    """
    views = jax.tree_util.tree_map(
        lambda v: v if isinstance(v, Lazy) else ArrayTensor(np.asarray(v)),
        views,
        is_leaf=lambda v: isinstance(v, Lazy),
    )
    abstract = jax.tree_util.tree_map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), views, is_leaf=lambda v: isinstance(v, Lazy)
    )
    shardings = param_shardings(model, abstract, mesh, rules)
    check_divisible(model, abstract, shardings, mesh)
    if quantize is None:
        return jax.tree_util.tree_map(_global_array, views, shardings, is_leaf=lambda v: isinstance(v, Lazy))
    from lora_jax.quant.tree import check_targets, quantize_leaf
    from lora_jax.spec import path_str

    placed = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    check_targets(placed, quantize)
    return jax.tree_util.tree_map_with_path(
        lambda p, v, s: quantize_leaf(path_str(p), _global_array(v, s), quantize),
        views,
        shardings,
        is_leaf=lambda v: isinstance(v, Lazy),
    )
