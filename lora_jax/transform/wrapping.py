"""`wrap`: run any apply function with LoRA deltas as ``x·W + s·((x·a)·b)``, never building ``W + s·a·b``."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lora_jax.bank import is_bank
from lora_jax.dora import is_dora
from lora_jax.full import is_full
from lora_jax.pairing import paired_leaves
from lora_jax.quant.array import QuantLeaf, box_quantized
from lora_jax.transform.bank import call_with_bank
from lora_jax.transform.dora import DoraValue
from lora_jax.transform.interpreter import Ctx, eval_jaxpr, materialize, trace
from lora_jax.transform.quantized import QuantValue
from lora_jax.transform.table import rule_for
from lora_jax.transform.value import LoraValue

__all__ = ["wrap"]


def wrap(fn: Callable, *, strict: bool = False, in_axes=None, out_axes=None) -> Callable:
    """``g(params, deltas, *args, dropout_key=None, **kw) == fn(merge(params, deltas), *args, **kw)``.

    Computed as ``x·W + s·((x·a)·b)`` at every use of an adapted W: no ``W + s·a·b`` is built and, when
    you differentiate with respect to the deltas, no W-shaped gradient is computed.

    Args:
        fn: any function ``fn(params, *args, **kwargs)`` of a params pytree (e.g. a Linen ``model.apply``).
            Array arguments (leaves of args/kwargs that are jax or numpy arrays) are traced; any other leaf
            (bools, ints, strings) is treated as static.
        strict: raise instead of warning when an adapted weight meets an op with no factored rule.
        in_axes, out_axes: only with an `AdapterBank` in place of deltas: the example axis of each array
            argument and output; an int, or a function ``(path, shape) -> axis or None`` of a leaf's
            "/"-joined path (``"0"``: first positional argument, ``"cache/k"``: field ``k`` of keyword
            ``cache``; outputs: ``""`` for a single array, ``"0"``, ``"1/k"``, ...) and its shape (None:
            shared by every example). Default: axis 0, and shared for 0-d leaves.

    With an `AdapterBank` (`lora_jax.stack_adapters`) in place of deltas, ``g(params, bank, *args,
    adapter_ids=ids)`` runs example e with the adapter in slot ``ids[e]`` (−1: base model only), in one
    batch (`lora_jax.transform.bank`).

    Returns:
        The wrapped function. Its keyword ``dropout_key`` (a PRNG key) turns on LoRA dropout on the input
        of every low-rank path (rate from ``LoraSpec.dropout``); without it (inference) there is no
        dropout.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import lora_jax as lj
        >>> f = lambda p, x: x @ p["w"]
        >>> p = {"w": jnp.ones((4, 3))}
        >>> d = lj.init(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w"))
        >>> bool(jnp.allclose(lj.wrap(f)(p, d, jnp.ones((5, 4))), f(lj.merge(p, d), jnp.ones((5, 4)))))
        True
    """
    warned: set = set()  # one warning per (primitive, path) for the life of the wrapped function

    @functools.wraps(fn)
    def wrapped(params, deltas, *args, dropout_key=None, adapter_ids=None, **kwargs):
        if is_bank(deltas):
            return call_with_bank(
                wrapped, params, deltas, args, kwargs, adapter_ids, dropout_key, in_axes, out_axes
            )
        if adapter_ids is not None:
            raise TypeError(
                "lj.wrap: adapter_ids= selects adapters of an AdapterBank, but a plain deltas tree was "
                "given; stack the adapters with lj.stack_adapters(...) or drop adapter_ids"
            )
        # A QuantizedArray (QLoRA base) is one weight of its shape and dtype to fn; its codes and scales
        # enter the interpreter as a QuantValue, decoded at each use.
        treedef, pairs = paired_leaves(box_quantized(params), deltas)
        # fn is traced with the types of what it is given (a fully trained leaf: its own value's type)
        fed = [d.value.astype(w.dtype) if is_full(d) else w for _, w, d in pairs]
        closed, out_shape, dyn = trace(fn, fed, treedef, args, kwargs)
        invals = [
            f  # a fully trained leaf (LoraSpec.train_full) replaces W: a plain array
            if is_full(d)
            else QuantValue.of(w.q, d, path)
            if isinstance(w, QuantLeaf)
            else jnp.asarray(w)
            if d is None
            else DoraValue.of(w, d, path)
            if is_dora(d)
            else LoraValue.of(w, d, path)
            for (path, w, d), f in zip(pairs, fed, strict=True)
        ]
        ctx = Ctx(rule_for, strict=strict, warned=warned, key=dropout_key)
        outs = eval_jaxpr(ctx, closed.jaxpr, closed.consts, [*invals, *dyn])
        outs = [materialize(ctx, o, "output of fn") for o in outs]  # fn returned a weight: warns
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
