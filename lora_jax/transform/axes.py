"""`infer_axes`: the stacked, input and output axes of >2-D kernels, from how a function uses them.

The function is run by the `wrap` interpreter in inference mode (tracked values without factors, traced
abstractly: no FLOPs, no memory), and every use rule records which of W's axes it contracts (inputs),
keeps as a batch or indexes away (stack) and leaves free (outputs). The uses must agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax.spec import LoraAxes, path_str
from lora_jax.transform.interpreter import Ctx, eval_jaxpr, trace
from lora_jax.transform.table import rule_for
from lora_jax.transform.value import LoraValue, own_axes

__all__ = ["infer_axes"]

_CONTRACTING_USES = ("dot_general", "conv", "gather")


def infer_axes(fn: Callable, params: Any, paths, args: tuple = (), kwargs: dict | None = None
               ) -> dict[str, LoraAxes]:
    """Stacked, input and output axes of each kernel in `paths`, from how ``fn(params, *args)`` uses it.

    Traced abstractly: no FLOPs, no memory. Contracted axes are inputs, free axes outputs, batch axes (and
    axes indexed away, e.g. by ``nn.scan``) stacked. Conflicting uses raise a ValueError.

    Args:
        fn: ``fn(params, *args, **kwargs)``, e.g. a Linen ``model.apply``.
        params: the params pytree (arrays or ``jax.ShapeDtypeStruct``-like leaves with shape and dtype).
        paths: the "/"-joined key paths of the kernels to infer.
        args, kwargs: example arguments of `fn`.

    Returns:
        ``{path: LoraAxes}`` for every path in `paths`.

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
        invals = [LoraValue(w, None, None, own_axes(np.ndim(w)), n) if n in paths else w
                  for n, w in zip(names, p_leaves, strict=True)]
        ctx = Ctx(rule_for, record=record)
        return eval_jaxpr(ctx, closed.jaxpr, closed.consts, [*invals, *dyn])

    jax.eval_shape(run, [jax.ShapeDtypeStruct(np.shape(w), w.dtype) for w in p_leaves])
    result = {}
    for n, w in zip(names, p_leaves, strict=True):
        if n not in paths:
            continue
        uses = record.get(n, [])
        roles: dict[int, set] = {}
        kinds = []
        for kind, r in uses:
            kinds.append(kind)
            for ax, role in r.items():
                roles.setdefault(ax, set()).add(role)
        where = f"{n} (shape {tuple(np.shape(w))})"
        if not any(k in _CONTRACTING_USES for k in kinds):
            raise ValueError(
                f"cannot infer LoRA axes for {where}: fn never contracts it (uses: {kinds or 'none'}). Give "
                f"them explicitly: LoraSpec(axes={{{n!r}: LoraAxes(stack=..., inputs=..., outputs=...)}}).")
        bad = {ax: sorted(rs) for ax, rs in roles.items() if len(rs) > 1}
        if bad:
            raise ValueError(
                f"cannot infer LoRA axes for {where}: its uses ({kinds}) disagree about axes {bad}. Give "
                f"them explicitly: LoraSpec(axes={{{n!r}: LoraAxes(stack=..., inputs=..., outputs=...)}}).")
        missing = [ax for ax in range(np.ndim(w)) if ax not in roles]
        if missing:
            raise ValueError(f"cannot infer LoRA axes for {where}: axes {missing} are never used by "
                             f"{kinds}. Give them explicitly with LoraSpec(axes=...).")
        stack, inputs, outputs = (tuple(ax for ax in range(np.ndim(w)) if role in roles[ax])
                                  for role in ("stack", "inputs", "outputs"))
        result[n] = LoraAxes(stack, inputs, outputs)
    return result
