"""`infer_axes`: the stacked, input and output axes of kernels, from how a function uses them.

The function is run by the `wrap` interpreter in inference mode (tracked values without factors, traced
abstractly: no FLOPs, no memory), and every use rule records which of W's axes it contracts (inputs),
keeps as a batch or indexes away (stack) and leaves free (outputs). An op with no rule is looked through
when its result has W's shape (an element-wise mask), so the contraction behind it still counts.

The uses must agree, up to one freedom: a ``dot_general`` may use W transposed (a weight-tied
``Embed.attend`` contracts the table's feature axis, ``W @ x`` in an (out, in) layout contracts its last
axis), and the wrap rule factors it either way round. So a lookup (``gather``: the rows are inputs) or a
conv decides the orientation when there is one, else the first contraction does (contracted = inputs),
and each ``dot_general`` must agree as it is or transposed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax.spec import LoraAxes, path_str
from lora_jax.transform.interpreter import Ctx, eval_jaxpr, fallback, trace
from lora_jax.transform.table import rule_for
from lora_jax.transform.value import LoraValue, own_axes

__all__ = ["infer_axes"]

_CONTRACTING_USES = ("dot_general", "conv", "gather")
_FLIP = {"inputs": "outputs", "outputs": "inputs", "stack": "stack"}


def _look_through(ctx, eqn, invals):
    """Inference mode, an op with no rule: noted as a fallback; a result of W's shape stays tracked."""
    outs = fallback(ctx, eqn, invals)
    tracked = list({id(x): x for x in invals if isinstance(x, LoraValue)}.values())
    if len(outs) == 1 and len(tracked) == 1 and np.shape(outs[0]) == np.shape(tracked[0].w):
        return [tracked[0].replace(w=outs[0])]
    return outs


def _rules(name, invals):
    return rule_for(name, invals) or _look_through


def _agree(uses) -> tuple[dict, dict]:
    """The roles ``{axis: role}`` the uses agree on, and ``{axis: [roles]}`` where they cannot agree.

    Uses other than ``dot_general`` (lookups, convs, stack indexing) are taken as they are, first; then
    each ``dot_general`` as it is or transposed (inputs and outputs swapped), whichever agrees.
    """
    agreed: dict = {}
    bad: dict = {}
    for kind, roles in sorted(uses, key=lambda u: u[0] == "dot_general"):
        options = [roles, {ax: _FLIP[r] for ax, r in roles.items()}] if kind == "dot_general" else [roles]
        fits = [o for o in options if all(agreed.get(ax, r) == r for ax, r in o.items())]
        if not fits:
            for ax, r in roles.items():
                if agreed.get(ax, r) != r:
                    bad.setdefault(ax, {agreed[ax]}).add(r)
            continue
        agreed.update(fits[0])
    return agreed, {ax: sorted(rs) for ax, rs in bad.items()}


def infer_axes(
    fn: Callable, params: Any, paths, args: tuple = (), kwargs: dict | None = None, *, optional=()
) -> dict[str, LoraAxes]:
    """Stacked, input and output axes of each kernel in `paths`, from how ``fn(params, *args)`` uses it.

    Traced abstractly: no FLOPs, no memory. Contracted axes are inputs, free axes outputs, batch axes (and
    axes indexed away, e.g. by ``nn.scan``) stacked. Conflicting uses raise a ValueError.

    Args:
        fn: ``fn(params, *args, **kwargs)``, e.g. a Linen ``model.apply``.
        params: the params pytree (arrays or ``jax.ShapeDtypeStruct``-like leaves with shape and dtype).
        paths: the "/"-joined key paths of the kernels to infer.
        args, kwargs: example arguments of `fn`.
        optional: paths of `paths` that have a default layout (2-D kernels: ``(in, out)``): where their
            uses do not decide the axes they are left out of the result, and where the uses decide
            other axes than ``(in, out)`` (an ``(out, in)`` layout, as equinox and PyTorch store
            weights) a warning says so.

    Returns:
        ``{path: LoraAxes}`` for every path in `paths` (but the undecided optional ones).

    Example:
        >>> import jax.numpy as jnp
        >>> fn = lambda p, x: jnp.einsum("bi,ihd->bhd", x, p["w"])
        >>> infer_axes(fn, {"w": jnp.ones((8, 2, 4))}, {"w"}, (jnp.ones((3, 8)),))
        {'w': LoraAxes(stack=(), inputs=(0,), outputs=(1, 2))}
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_str(p) for p, _ in leaves]
    p_leaves = [w for _, w in leaves]
    record: dict = {}

    def run(p_leaves):
        closed, _, dyn = trace(fn, p_leaves, treedef, args, kwargs or {})
        invals = [
            LoraValue(w, None, None, own_axes(np.ndim(w)), n) if n in paths else w
            for n, w in zip(names, p_leaves, strict=True)
        ]
        ctx = Ctx(_rules, record=record)
        return eval_jaxpr(ctx, closed.jaxpr, closed.consts, [*invals, *dyn])

    jax.eval_shape(run, [jax.ShapeDtypeStruct(np.shape(w), w.dtype) for w in p_leaves])
    result = {}
    for n, w in zip(names, p_leaves, strict=True):
        if n not in paths:
            continue
        try:
            result[n] = _decide(n, np.shape(w), record.get(n, []))
        except ValueError:
            if n not in optional:
                raise
            continue
        if n in optional and result[n] != LoraAxes((), (0,), (1,)):
            warnings.warn(
                f"lora_jax.init: {n} (shape {tuple(np.shape(w))}) is used with axes {result[n]}, not as an "
                f"(in, out) kernel (an (out, in) layout, as equinox and PyTorch store weights?): `a` goes on "
                f"its input axes {result[n].inputs}. Pass LoraSpec(axes={{{n!r}: LoraAxes(...)}}) to choose.",
                stacklevel=3,
            )
    return result


def _decide(n: str, shape: tuple, uses: list) -> LoraAxes:
    """The `LoraAxes` of kernel `n` from its recorded `uses` (ValueError when they do not decide them)."""
    kinds = [kind for kind, _ in uses]
    where = f"{n} (shape {tuple(shape)})"
    if not any(k in _CONTRACTING_USES for k in kinds):
        raise ValueError(
            f"cannot infer LoRA axes for {where}: fn never contracts it (uses: {kinds or 'none'}). Give "
            f"them explicitly: LoraSpec(axes={{{n!r}: LoraAxes(stack=..., inputs=..., outputs=...)}})."
        )
    roles, bad = _agree(uses)
    if bad:
        raise ValueError(
            f"cannot infer LoRA axes for {where}: its uses ({kinds}) disagree about axes {bad}. Give "
            f"them explicitly: LoraSpec(axes={{{n!r}: LoraAxes(stack=..., inputs=..., outputs=...)}})."
        )
    missing = [ax for ax in range(len(shape)) if ax not in roles]
    if missing:
        raise ValueError(
            f"cannot infer LoRA axes for {where}: axes {missing} are never used by "
            f"{kinds}. Give them explicitly with LoraSpec(axes=...)."
        )
    axes = LoraAxes(
        *(
            tuple(ax for ax in range(len(shape)) if roles[ax] == role)
            for role in ("stack", "inputs", "outputs")
        )
    )
    return axes.check(len(shape), n)
