"""`AdapterBank`: many adapters of one base model stacked into one pytree, to serve (or train) them at once.

Once fine-tuning is cheap there are many adapters over one base: one per customer, task or language.
A bank holds ``n`` of them, per targeted kernel

    a: (n, *stack, *in, r_max)      b: (n, *stack, r_max, *out)      scale: (n,)      rank: (n,)

with each adapter's factors zero-padded from its own rank to ``r_max`` (the padded columns of ``a`` and
rows of ``b`` are zero, so they add nothing to ``s·a·b``) and its own scale ``alpha / r`` as an array
entry. An adapter without a delta at some target has rank 0 and scale 0 there. Because ranks and scales
are array entries, adapters of different ranks and alphas share one compiled program:
``bank.replace(k, deltas)`` puts another adapter of rank ≤ ``r_max`` into slot ``k`` with the same shapes
and dtypes, and a jitted step that takes the bank does not trace again (S-LoRA, Sheng et al. 2023,
arXiv:2311.03285, serves its adapter pool the same way).

``lj.wrap(fn)(params, bank, *args, adapter_ids=ids)`` runs each example with its own adapter (``ids``:
int ``(batch,)``, −1 = base model only); see `lora_jax.transform.bank`.

What is static (part of the pytree structure, so a change traces a jitted function again): the targets'
paths, axes, kernel shapes and dropout rates, the params' tree structure, the slot names and the base
model's identity. What is an array: the factors, and per slot the scale and the rank (float32, whole
numbers; float so that ``jax.grad`` over a whole bank works — their gradients are zero, and
``lj.optimizer`` / ``lj.trainable_mask`` train only ``a`` and ``b``). Renaming a slot is a change of
structure: for retrace-free swaps keep the slot's name (``replace`` does by default) and keep your own
map from adapters to slots, as a server does.

Why a single `LoraDelta` keeps its scale static: the bank is the hot-swap path. A traced scale on every
delta would be one more leaf that optax, ``jax.grad`` and checkpoints see in every training tree (and that
an optimizer without a mask would decay or update), to save a retrace that only swapping adapters
causes — which is what the bank is for.

Base identity: deltas trees carry none (an adapter file does, in its header: ``adapter_info(path)
["base_model"]``). `stack_adapters` compares the identities when given (``base_models=``, or through
`lora_jax.serve.load_bank`, which reads them from the files) and always compares what the deltas themselves show: the
params' tree structure and, per target, the kernel shape and axes.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> params = {"w": jnp.ones((4, 3))}
    >>> d1 = lj.init(jax.random.key(1), params, lj.LoraSpec(rank=1, alpha=2.0, targets="w"))
    >>> d2 = lj.init(jax.random.key(2), params, lj.LoraSpec(rank=2, alpha=2.0, targets="w"))
    >>> bank = lj.stack_adapters({"x": d1, "y": d2})
    >>> bank.names, bank.a["w"].shape, bank.b["w"].shape, bank.scale["w"].tolist()
    (('x', 'y'), (2, 4, 2), (2, 2, 3), [2.0, 1.0])
    >>> back = lj.unstack_adapters(bank)
    >>> back["x"]["w"].rank, bool(jnp.array_equal(back["y"]["w"].a, d2["w"].a))
    (1, True)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._closest import closest
from lora_jax.delta import LoraDelta, is_delta
from lora_jax.spec import LoraAxes, path_str

__all__ = ["AdapterBank", "stack_adapters", "unstack_adapters", "is_bank", "check_bank_fits"]


def _flat_deltas(deltas: Any) -> tuple[Any, list[tuple[str, LoraDelta | None]]]:
    """``(treedef, [(path, delta or None)])`` of a deltas tree (None marks an untargeted leaf)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(deltas, is_leaf=lambda x: x is None or is_delta(x))
    return treedef, [(path_str(p), d) for p, d in leaves]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """``n`` adapters of one base, stacked per target; a registered pytree (leaves: a, b, scale, rank).

    Attributes:
        a: target path -> ``(n, *stack, *in, r_max)``; slot k's columns ``rank[k]:`` are zero.
        b: target path -> ``(n, *stack, r_max, *out)``; slot k's rows ``rank[k]:`` are zero.
        scale: target path -> ``(n,)`` float32, ``alpha / r`` of each adapter (0 where it has no delta).
        rank: target path -> ``(n,)`` float32 whole numbers, each adapter's rank (0: no delta there).
        names: the slot names (static).
        axes: target path -> `LoraAxes` of its kernel (static, as a tuple of pairs).
        shapes: target path -> the kernel's shape (static).
        dropout: target path -> LoRA dropout rate (static).
        treedef: tree structure of the params (and of each adapter's deltas tree) (static).
        base_model: the base model's identity as canonical JSON, or None if the adapters carried none.
    """

    a: dict
    b: dict
    scale: dict
    rank: dict
    names: tuple = dataclasses.field(metadata=dict(static=True), default=())
    axes: tuple = dataclasses.field(metadata=dict(static=True), default=())
    shapes: tuple = dataclasses.field(metadata=dict(static=True), default=())
    dropout: tuple = dataclasses.field(metadata=dict(static=True), default=())
    treedef: Any = dataclasses.field(metadata=dict(static=True), default=None)
    base_model: str | None = dataclasses.field(metadata=dict(static=True), default=None)

    @property
    def paths(self) -> tuple[str, ...]:
        """The targeted key paths, in the params' flattening order."""
        return tuple(p for p, _ in self.axes)

    @property
    def size(self) -> int:
        """Number of slots ``n``."""
        return len(self.names)

    @property
    def max_rank(self) -> int:
        """``r_max``, the padded rank every slot shares."""
        return next(iter(self.a.values())).shape[-1] if self.a else 0

    def ranks(self) -> dict[str, dict[str, int]]:
        """Slot name -> {target path: rank} (0 where the adapter has no delta); reads the arrays."""
        r = {p: np.asarray(v) for p, v in self.rank.items()}
        return {n: {p: int(r[p][k]) for p in self.paths} for k, n in enumerate(self.names)}

    def replace(self, k: int | str, deltas: Any, *, name: str | None = None) -> AdapterBank:
        """A bank with slot `k` (an index or a slot name) holding `deltas`; same shapes and dtypes.

        Args:
            k: the slot, ``0 <= k < n``, or its name.
            deltas: a deltas tree of this base (params' structure, `LoraDelta` or None at each leaf). A
                target of the bank it has no delta for is zero for this slot; each rank must be
                ``<= r_max``.
            name: the slot's new name; None keeps the old one. A new name changes the static structure,
                so a jitted function that takes the bank traces once more.

        Raises:
            ValueError: `k` is not a slot, or `deltas` do not fit the bank (another structure, a delta at a
                path that is not one of the bank's targets, a shape or axes that differ, rank > r_max).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> import lora_jax as lj
            >>> p = {"w": jnp.ones((4, 3))}
            >>> bank = lj.stack_adapters([lj.init(jax.random.key(i), p,
            ...                           lj.LoraSpec(rank=2, alpha=2.0, targets="w")) for i in range(3)])
            >>> new = lj.init(jax.random.key(9), p, lj.LoraSpec(rank=1, alpha=4.0, targets="w"))
            >>> b2 = bank.replace(1, new)
            >>> b2.a["w"].shape == bank.a["w"].shape, b2.scale["w"].tolist(), b2.ranks()["1"]
            (True, [1.0, 4.0, 1.0], {'w': 1})
        """
        slot = self._slot(k)
        r_max = self.max_rank
        got = _collect(deltas, f"bank.replace({k!r}, ...)")
        where = f"bank.replace({k!r}, ...)"
        _check_against_bank(self, got, where)
        too_big = {p: d.rank for p, d in got.items() if d is not None and d.rank > r_max}
        if too_big:
            raise ValueError(
                f"{where}: ranks {too_big} are above this bank's max_rank {r_max}. Build the bank with "
                f"lj.stack_adapters(..., max_rank=R) for R >= {max(too_big.values())}."
            )
        a, b, scale, rank = dict(self.a), dict(self.b), dict(self.scale), dict(self.rank)
        for p in self.paths:
            d = got.get(p)
            pa, pb, s, r = _padded(d, self.a[p].shape[1:], self.b[p].shape[1:], self._axes(p), r_max)
            a[p] = a[p].at[slot].set(pa.astype(a[p].dtype))
            b[p] = b[p].at[slot].set(pb.astype(b[p].dtype))
            scale[p] = scale[p].at[slot].set(s)
            rank[p] = rank[p].at[slot].set(r)
        names = self.names if name is None else (*self.names[:slot], str(name), *self.names[slot + 1 :])
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: name {name!r} is already the name of another slot: {list(names)}")
        return dataclasses.replace(self, a=a, b=b, scale=scale, rank=rank, names=names)

    def trainable_mask(self) -> AdapterBank:
        """This bank's structure with True at every ``a`` and ``b``, False at ``scale`` and ``rank``."""
        t = {p: True for p in self.a}
        f = {p: False for p in self.a}
        return dataclasses.replace(self, a=t, b=dict(t), scale=f, rank=dict(f))

    def _axes(self, p: str) -> LoraAxes:
        return dict(self.axes)[p]

    def _slot(self, k) -> int:
        if isinstance(k, str):
            if k not in self.names:
                raise ValueError(f"bank has no slot named {k!r}; its slots are {list(self.names)}")
            return self.names.index(k)
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.size:
            raise ValueError(
                f"slot {k!r} is not a slot of this bank: expected an int in [0, {self.size}) or "
                f"one of the names {list(self.names)}"
            )
        return int(k)


def is_bank(x) -> bool:
    return isinstance(x, AdapterBank)


def _collect(deltas: Any, where: str) -> dict[str, LoraDelta | None]:
    """path -> delta (or None) of one adapter's deltas tree, with a type check."""
    if is_bank(deltas):
        raise TypeError(f"{where}: expected one adapter's deltas tree, found an AdapterBank")
    _, flat = _flat_deltas(deltas)
    out = {}
    for p, d in flat:
        if d is not None and not is_delta(d):
            raise TypeError(f"{where}: {p}: expected a LoraDelta or None, found {type(d).__name__}")
        if d is not None and type(d) is not LoraDelta:
            raise TypeError(
                f"{where}: {p}: a {type(d).__name__} cannot go into a bank (only plain LoraDelta: a DoRA "
                f"magnitude has no zero-padded form). Merge it (lj.merge) or use it through lj.wrap alone."
            )
        out[p] = d
    return out


def _padded(d: LoraDelta | None, a_shape, b_shape, axes: LoraAxes, r_max: int):
    """(a, b, scale, rank) of one slot: `d`'s factors zero-padded to `r_max` (zeros when `d` is None)."""
    if d is None:
        return jnp.zeros(a_shape), jnp.zeros(b_shape), jnp.float32(0.0), jnp.float32(0.0)
    ns, r = len(axes.stack), d.rank
    a = jnp.pad(d.a, [(0, 0)] * (d.a.ndim - 1) + [(0, r_max - r)])
    b = jnp.pad(d.b, [(0, 0)] * ns + [(0, r_max - r)] + [(0, 0)] * (d.b.ndim - ns - 1))
    return a, b, jnp.float32(d.scale), jnp.float32(r)


def _check_against_bank(bank: AdapterBank, got: dict, where: str) -> None:
    """Every problem of one adapter against the bank's targets, raised at once."""
    problems = []
    leaf_paths = set(_treedef_paths(bank.treedef))
    if set(got) != leaf_paths:
        only_got, only_bank = sorted(set(got) - leaf_paths), sorted(leaf_paths - set(got))
        raise ValueError(
            f"{where}: the deltas do not have the structure of the bank's base model (made for a "
            f"different base model?): paths only in the deltas {only_got[:6]}, only in the bank's base "
            f"{only_bank[:6]}."
        )
    shapes, axes = dict(bank.shapes), dict(bank.axes)
    for p, d in got.items():
        if d is None:
            continue
        if p not in shapes:
            problems.append(
                f"{p}: not one of the bank's targets {list(bank.paths)[:6]}; stack the adapters again "
                f"with this target (lj.stack_adapters) to serve it"
            )
            continue
        if d.weight_shape() != shapes[p] or d.axes != axes[p]:
            problems.append(
                f"{p}: the delta is for a kernel of shape {d.weight_shape()} with {d.axes}, the bank's "
                f"kernel has shape {shapes[p]} with {axes[p]}"
            )
    if problems:
        raise ValueError(f"{where}: the adapter does not fit the bank:\n  " + "\n  ".join(problems))


def _treedef_paths(treedef) -> list[str]:
    """The "/"-joined leaf paths of a treedef (its leaves replaced by zeros)."""
    dummy = jax.tree_util.tree_unflatten(treedef, [0] * treedef.num_leaves)
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(dummy)[0]]


def _canonical(identity) -> str | None:
    if identity is None:
        return None
    try:
        return json.dumps(identity, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"stack_adapters: a base model identity must be JSON-able ({e})") from None


def stack_adapters(
    adapters: Sequence[Any] | Mapping[str, Any],
    max_rank: int | None = None,
    *,
    base_models: Sequence[Any] | Mapping[str, Any] | None = None,
) -> AdapterBank:
    """Stacks adapters of one base model into an `AdapterBank`.

    Args:
        adapters: deltas trees (as from ``lj.init`` / ``load_adapter``), as a sequence (slots named
            ``"0"``, ``"1"``, ...) or a name -> deltas mapping. Every tree has the params' structure. They
            may target different leaves (a target missing from one adapter is zero for it), and have
            different ranks (zero-padded to the largest, or to `max_rank`) and alphas.
        max_rank: the padded rank ``r_max``; room for larger adapters swapped in later. Default: the
            largest rank.
        base_models: the base model identity of each adapter (e.g. ``adapter_info(path)["base_model"]``),
            in the order (or with the names) of `adapters`; all must be equal. Deltas trees carry none,
            so without it only structure, kernel shapes and axes are compared.

    Returns:
        The bank; factors in each target's common dtype (``jnp.promote_types`` of the adapters').

    Raises:
        ValueError: no adapters; adapters of different base models (different identities, tree
            structures, kernel shapes or axes at a path — the path and both shapes are named); a rank above
            `max_rank`; duplicate names.
        TypeError: a leaf that is not a plain `LoraDelta` or None.
    """
    if isinstance(adapters, Mapping):
        names = tuple(str(n) for n in adapters)
        trees = list(adapters.values())
        if len(set(names)) != len(names):
            raise ValueError(f"stack_adapters: duplicate adapter names {list(names)}")
    else:
        trees = list(adapters)
        names = tuple(str(i) for i in range(len(trees)))
    if not trees:
        raise ValueError("stack_adapters: no adapters given; pass a sequence or a mapping of deltas trees")
    base = None
    if base_models is not None:
        ids = [base_models[n] for n in adapters] if isinstance(adapters, Mapping) else list(base_models)
        if len(ids) != len(trees):
            raise ValueError(
                f"stack_adapters: {len(ids)} base_models for {len(trees)} adapters; give one per adapter"
            )
        canon = [_canonical(x) for x in ids]
        if len(set(canon)) > 1:
            diff = [f"{names[i]!r}: {canon[i]}" for i in range(len(canon)) if canon[i] != canon[0]]
            raise ValueError(
                f"stack_adapters: the adapters were made for different base models: {names[0]!r} for "
                f"{canon[0]}, but " + "; ".join(diff) + ". A bank serves adapters of one base only."
            )
        base = canon[0]
    treedef, first = _flat_deltas(trees[0])
    flats = [dict(_collect(trees[0], f"stack_adapters: adapter {names[0]!r}"))]
    paths = [p for p, _ in first]
    for name, t in zip(names[1:], trees[1:], strict=True):
        got = _collect(t, f"stack_adapters: adapter {name!r}")
        if list(got) != paths:
            only_t, only_0 = sorted(set(got) - set(paths)), sorted(set(paths) - set(got))
            raise ValueError(
                f"stack_adapters: adapters {names[0]!r} and {name!r} were made for different base models: "
                f"their trees differ (paths only in {name!r}: {only_t[:6]}, only in {names[0]!r}: "
                f"{only_0[:6]}). Stack adapters of one base model."
            )
        flats.append(got)
    targets = [p for p in paths if any(f[p] is not None for f in flats)]
    if not targets:
        raise ValueError("stack_adapters: the adapters hold no LoraDelta at all")
    shapes, axes, drops = {}, {}, {}
    problems = []
    for p in targets:
        for name, f in zip(names, flats, strict=True):
            d = f[p]
            if d is None:
                continue
            if p not in shapes:
                shapes[p], axes[p], drops[p], first_name = d.weight_shape(), d.axes, d.dropout, name
            elif d.weight_shape() != shapes[p] or d.axes != axes[p]:
                problems.append(
                    f"{p}: adapter {first_name!r} is for a kernel of shape {shapes[p]} ({axes[p]}), "
                    f"adapter {name!r} for shape {d.weight_shape()} ({d.axes})"
                )
    if problems:
        raise ValueError(
            "stack_adapters: the adapters were made for different base models (or configs):\n  "
            + "\n  ".join(problems)
        )
    ranks = {p: [0 if f[p] is None else f[p].rank for f in flats] for p in targets}
    largest = max(max(r) for r in ranks.values())
    r_max = largest if max_rank is None else int(max_rank)
    if r_max < largest:
        over = {f"{names[i]}:{p}": r[i] for p, r in ranks.items() for i in range(len(r)) if r[i] > r_max}
        raise ValueError(
            f"stack_adapters: ranks above max_rank={r_max}: {over}. Raise max_rank to at least {largest} "
            f"(or leave it None for the largest rank)."
        )
    a, b, scale, rank = {}, {}, {}, {}
    for p in targets:
        ds = [f[p] for f in flats if f[p] is not None]
        dtype = ds[0].a.dtype
        for d in ds:
            dtype = jnp.promote_types(jnp.promote_types(dtype, d.a.dtype), d.b.dtype)
        ax = axes[p]
        stack = tuple(shapes[p][i] for i in ax.stack)
        a_shape = (*stack, *(shapes[p][i] for i in ax.inputs), r_max)
        b_shape = (*stack, r_max, *(shapes[p][i] for i in ax.outputs))
        slots = [_padded(f[p], a_shape, b_shape, ax, r_max) for f in flats]
        a[p] = jnp.stack([s[0].astype(dtype) for s in slots])
        b[p] = jnp.stack([s[1].astype(dtype) for s in slots])
        scale[p] = jnp.stack([s[2] for s in slots])
        rank[p] = jnp.stack([s[3] for s in slots])
    return AdapterBank(
        a=a,
        b=b,
        scale=scale,
        rank=rank,
        names=names,
        axes=tuple((p, axes[p]) for p in targets),
        shapes=tuple((p, shapes[p]) for p in targets),
        dropout=tuple((p, drops[p]) for p in targets),
        treedef=treedef,
        base_model=base,
    )


def unstack_adapters(bank: AdapterBank) -> dict[str, Any]:
    """The inverse of `stack_adapters`: slot name -> deltas tree, each delta at its original rank.

    Factors come back in the bank's dtype and each scale as the float32 value the bank holds (which is the
    value every computation with the delta uses: ``s·b`` is computed in float32).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import lora_jax as lj
        >>> p = {"w": jnp.ones((4, 3)), "v": jnp.ones((3, 3))}
        >>> d = lj.init(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w"))
        >>> e = lj.init(jax.random.key(1), p, lj.LoraSpec(rank=1, targets="v"))
        >>> back = lj.unstack_adapters(lj.stack_adapters([d, e]))
        >>> back["0"]["v"] is None, back["1"]["v"].rank, back["1"]["w"] is None
        (True, 1, True)
    """
    if not is_bank(bank):
        raise TypeError(f"unstack_adapters: expected an AdapterBank, found {type(bank).__name__}")
    leaf_paths = _treedef_paths(bank.treedef)
    axes, drops = dict(bank.axes), dict(bank.dropout)
    ranks = {p: np.asarray(bank.rank[p]) for p in bank.paths}
    scales = {p: np.asarray(bank.scale[p]) for p in bank.paths}
    out = {}
    for k, name in enumerate(bank.names):
        leaves = []
        for p in leaf_paths:
            r = int(ranks[p][k]) if p in ranks else 0
            if r == 0:
                leaves.append(None)
                continue
            ns = len(axes[p].stack)
            a = bank.a[p][k][..., :r]
            b = jax.lax.slice_in_dim(bank.b[p][k], 0, r, axis=ns)
            leaves.append(LoraDelta(a, b, scale=float(scales[p][k]), axes=axes[p], dropout=drops[p]))
        out[name] = jax.tree_util.tree_unflatten(bank.treedef, leaves)
    return out


def check_bank_fits(bank: AdapterBank, params: Any) -> None:
    """Raises ValueError naming each bank target whose kernel in `params` is missing or of another shape."""
    from lora_jax.quant.array import box_quantized

    leaves = {path_str(p): w for p, w in jax.tree_util.tree_flatten_with_path(box_quantized(params))[0]}
    problems = []
    for p, shape in bank.shapes:
        if p not in leaves:
            problems.append(f"{p}: not a parameter of this model (closest: {closest(p, leaves, n=3)})")
            continue
        found = tuple(getattr(leaves[p], "shape", ()))
        if found != tuple(shape):
            problems.append(
                f"{p}: the bank's adapters are for a kernel of shape {tuple(shape)}, this model's has shape "
                f"{found}"
            )
    if problems:
        raise ValueError(
            "lj.wrap: the adapter bank does not fit these params (adapters of another base model or "
            "config?):\n  " + "\n  ".join(problems)
        )
