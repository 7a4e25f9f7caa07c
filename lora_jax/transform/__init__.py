"""`wrap`: run any apply function with LoRA deltas as ``x·W + s·((x·a)·b)``, never building ``W + s·a·b``.

``wrap(fn)(params, deltas, *args, **kw) == fn(merge(params, deltas), *args, **kw)`` up to float rounding.

How: `fn` is traced to a jaxpr (`jax.make_jaxpr`) with the params as inputs, and the jaxpr is evaluated
by a small interpreter in which each targeted kernel W is a tracked value: W together with its LoRA
factors kept aligned to W's axes. View-like ops (casts, transposes, reshapes, broadcasts, slices,
scalar scaling) apply to W and to the factors alike; a per-channel scale (weight norm's g/‖V‖) is kept
pending and applied to the input or output of the use. Where the value meets ``dot_general``,
``conv_general_dilated`` or a row ``gather``, the use is rewritten into the base op plus the low-rank
path; higher-order primitives (``jit``, ``scan``, ``while``, ``cond``, ``checkpoint``, custom_jvp/vjp
calls) are re-entered through the public `jax.lax` / `jax.checkpoint` APIs with the interpreter inside.
Any other use materialises ``W + s·a·b`` for that use alone, with a warning naming the primitive and the
path (an error with ``strict=True``).

Since the base W only ever enters the same ops as in `fn`, differentiating with respect to the deltas
never computes a W-shaped gradient: that is the compute LoRA saves (Hu et al. 2021, section 4.2).

Where things live:
    value.py        the tracked values (`TrackedValue`, `LoraValue`) and their aligned factors
    interpreter.py  the jaxpr interpreter, its context, the fallback and `FallbackWarning`
    views.py        rules for view-like ops (cast, transpose, reshape, slice, split, pad, W ± c, ...)
    scaled.py       `ScaledValue`: W times a pending per-channel scale (weight norm), applied at the use
    plan.py         the pure plan of a factored dot_general (which axes contract, which factor first)
    uses.py         rules for uses: dot_general (executes the plan), conv, gather, sums and norms of W
    control.py      rules for jit, scan, while, cond, checkpoint, custom_jvp/vjp calls
    table.py        the rule table: primitive -> value kind -> rule (how to add either)
    wrapping.py     `wrap`
    bank.py         per-example adapters of an `AdapterBank` (``adapter_ids=``): plain wrap under jax.vmap
    axes.py         `infer_axes` (axis inference for >2-D kernels)
"""

from lora_jax.transform.axes import infer_axes
from lora_jax.transform.interpreter import FallbackWarning
from lora_jax.transform.wrapping import wrap

__all__ = ["wrap", "infer_axes", "FallbackWarning"]
