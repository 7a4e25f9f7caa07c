"""The library's own arithmetic on arrays typed with ``Explicit`` mesh axes.

With ``jax.sharding.AxisType.Explicit`` axes (what ``jax.make_mesh`` gives by default), an array's
sharding is part of its type: ``f32[576, 1536@model]``. JAX then wants every op to agree on it: a select
between a sharded and a replicated operand, a reshape that merges a sharded axis, or a gather with
sharded indices is a ``ShardingTypeError`` unless the caller names the output's sharding. The
library's internal arithmetic (block quantization and decoding, folding a delta into W, LoRA's extra
terms in `wrap`) is not written in those types, so

- `auto` runs such a computation with the mesh's axes in Auto mode (``jax.sharding.auto_axes``: the
  compiler propagates the inputs' shardings, as it does on an Auto mesh) and types its outputs with
  the shardings the caller names: those of the values they stand for (codes like W, a merged W like W);
- `conform` reshards one value to the type the program expects where the library computed it another
  way (``x·W + s·(x·a)·b`` when the user's ``a`` and ``b`` are replicated: the sum is typed like ``x·W``).

On arrays without Explicit axes (Auto meshes, one device, NumPy) both do nothing.

Inside ``jax.shard_map`` a type also says which manual mesh axes a value varies over: `varying_axes`
reads them and `shape_dtype` builds a ``jax.ShapeDtypeStruct`` that keeps them (and an Explicit
sharding), so a trace of ``fn`` sees the types its inputs will have.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

__all__ = [
    "mesh_of",
    "spec_of",
    "auto",
    "conform",
    "sharding_on_mesh_of",
    "typed_like",
    "varying_axes",
    "shape_dtype",
]


def _has_explicit_axes(mesh) -> bool:
    return mesh is not None and not mesh.empty and AxisType.Explicit in tuple(mesh.axis_types)


def _explicit_mesh(x):
    try:
        sharding = jax.typeof(x).sharding
    except TypeError:  # not an array (None, a Python scalar)
        return None
    mesh = getattr(sharding, "mesh", None)
    return mesh if _has_explicit_axes(mesh) else None


def _padded(spec, ndim: int) -> PartitionSpec:
    return PartitionSpec(*tuple(spec), *(None,) * (ndim - len(tuple(spec))))


def mesh_of(*trees) -> Any:
    """The (abstract) mesh of the first array in `trees` typed with Explicit axes, else None."""
    for x in jax.tree_util.tree_leaves(trees):
        mesh = _explicit_mesh(x)
        if mesh is not None:
            return mesh
    return None


def spec_of(x) -> PartitionSpec:
    """`x`'s ``PartitionSpec`` in its type, one entry per axis (``P()`` entries of None when unsharded)."""
    return _padded(jax.typeof(x).sharding.spec, jax.typeof(x).ndim)


def auto(f: Callable, *args, out_specs: Any) -> Any:
    """``f(*args)``; when `args` hold arrays with Explicit mesh axes, computed with the axes in Auto mode.

    Args:
        f: a function of arrays (traceable).
        *args: its arguments (pytrees).
        out_specs: a ``PartitionSpec`` per output array of ``f`` (the same tree; None for a None output),
            the shardings the outputs are typed with. Used only with Explicit axes.
    """
    mesh = mesh_of(args)
    if mesh is None:
        return f(*args)
    # auto_axes takes flat lists here: None arguments and outputs (absent parts) are not arrays.
    in_leaves, in_tree = jax.tree_util.tree_flatten(args)
    out_tree = []

    def flat(*leaves):
        out_leaves, tree = jax.tree_util.tree_flatten(f(*jax.tree_util.tree_unflatten(in_tree, leaves)))
        out_tree.append(tree)
        return out_leaves

    specs = jax.tree_util.tree_leaves(out_specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    with contextlib.ExitStack() as stack:
        if jax.sharding.get_abstract_mesh().empty:  # arrays on a mesh, but no jax.set_mesh around the call
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
        axes = tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)
        out_leaves = jax.sharding.auto_axes(flat, axes=axes, out_sharding=specs)(*in_leaves)
    return jax.tree_util.tree_unflatten(out_tree[-1], out_leaves)


def conform(x, sharding) -> Any:
    """`x` resharded to `sharding` (a ``NamedSharding`` on a concrete mesh, or on the abstract mesh of a type,
    e.g. a jaxpr variable's) when that has Explicit axes and `x`'s type differs; `x` itself otherwise."""
    mesh = getattr(sharding, "mesh", None)
    if not _has_explicit_axes(mesh):
        return x
    if _explicit_mesh(x) is not None and spec_of(x) == _padded(sharding.spec, jax.typeof(x).ndim):
        return x
    if isinstance(mesh, jax.sharding.Mesh):  # a concrete target: placed directly, traced or not
        return jax.sharding.reshard(x, sharding)
    if not isinstance(x, jax.core.Tracer) and isinstance(x, jax.Array):
        # A concrete array is placed on devices: name a concrete mesh (the one in context, or x's own).
        concrete = jax.sharding.get_mesh()
        if concrete.empty and isinstance(x.sharding, NamedSharding) and not x.sharding.mesh.empty:
            concrete = x.sharding.mesh
        if concrete.empty or concrete.abstract_mesh != mesh:
            return x  # nowhere to put it; JAX's own error will name the mismatch
        return jax.sharding.reshard(x, NamedSharding(concrete, sharding.spec))
    return jax.sharding.reshard(x, sharding)


def sharding_on_mesh_of(ref, spec: PartitionSpec) -> NamedSharding:
    """``NamedSharding(mesh, spec)`` on `ref`'s mesh: its concrete mesh when `ref` is a placed array (so a
    concrete value can be moved there), else the abstract mesh of its type. `ref` has Explicit axes."""
    if isinstance(ref, jax.Array) and not isinstance(ref, jax.core.Tracer):
        return NamedSharding(ref.sharding.mesh, spec)
    return NamedSharding(jax.typeof(ref).sharding.mesh, spec)


def typed_like(x, ref) -> Any:
    """`x` with `ref`'s sharding when `ref` is typed with Explicit axes (see `conform`)."""
    if _explicit_mesh(ref) is None:
        return x
    return conform(x, sharding_on_mesh_of(ref, spec_of(ref)))


def varying_axes(x) -> frozenset:
    """The manual mesh axes `x` varies over inside ``jax.shard_map`` (empty outside, or for a non-array)."""
    try:
        t = jax.typeof(x)
    except TypeError:
        return frozenset()
    mat = getattr(t, "mat", None)  # JAX 0.10: ManualAxisType(varying=...); before: the aval's .vma
    return frozenset(getattr(mat, "varying", None) or getattr(t, "vma", None) or ())


_SDS_PARAMS = inspect.signature(jax.ShapeDtypeStruct.__init__).parameters


def shape_dtype(shape, dtype, typed=None) -> jax.ShapeDtypeStruct:
    """``ShapeDtypeStruct(shape, dtype)`` with `typed`'s sharding (when it has Explicit mesh axes) and the
    manual axes it varies over (inside ``jax.shard_map``), so a trace sees the type the value will have."""
    if typed is None or not isinstance(typed, jax.Array):
        return jax.ShapeDtypeStruct(shape, dtype)
    t, kw = jax.typeof(typed), {}
    if varying_axes(typed):
        if "manual_axis_type" in _SDS_PARAMS:
            kw = dict(manual_axis_type=t.mat, sharding=t.sharding)
        elif "vma" in _SDS_PARAMS:
            kw = dict(vma=t.vma, sharding=t.sharding)
    elif mesh_of(typed) is not None:
        kw = dict(sharding=t.sharding)
    return jax.ShapeDtypeStruct(shape, dtype, **kw)
