"""The rule table: the one place where a JAX primitive is mapped to the rule that handles a tracked weight.

``RULES[primitive_name][kind]`` is the rule for an equation of that primitive whose tracked inputs are
all of value kind ``kind`` (a `TrackedValue` subclass). `rule_for` looks the kind up along its MRO, so a
rule registered for `TrackedValue` serves every kind, and a subclass inherits its parent's rules unless
it registers its own. Equations with tracked inputs of different kinds only get a `TrackedValue` rule.
Whatever has no rule goes to the interpreter's fallback, which materialises the value (``dense()``) for
that use and warns.

A rule is ``rule(ctx, eqn, invals) -> outvals`` (one per ``eqn.outvars``; see
`lora_jax.transform.interpreter`). It may hand a use it cannot factor to ``interpreter.fallback``.

To add a primitive:
    write its rule in the module of its family (`views`: the value is still W + low rank after the op;
    `uses`: the op consumes W; `control`: it holds jaxprs to re-enter) and add one line below, under
    the kinds it supports. A primitive name that exists only in some JAX versions also goes into
    `JAX_VERSIONED` with the versions it serves (a test checks that every key is a primitive of the
    installed JAX or listed there).

To add a value kind (a quantized base, a DoRA magnitude, ...; a bank of adapters selected per example needs
none: `bank.py` maps the plain interpreter over the examples with ``jax.vmap``):
    subclass `TrackedValue` in its own module and implement its interface (``dense``, ``arrays``,
    ``with_arrays``, ``stacked_arrays``): that alone makes the control-flow rules and the fallback work
    for it. Then register the rules of the ops it can do better than materialising, in the entries
    below (``"dot_general": {LoraValue: uses.dot_general, QuantValue: quant.dot_general}``).
"""

from __future__ import annotations

from collections.abc import Sequence

from lora_jax.transform import control, dora, quantized, scaled, uses, views
from lora_jax.transform.dora import DoraValue
from lora_jax.transform.interpreter import Rule
from lora_jax.transform.quantized import QuantValue
from lora_jax.transform.scaled import ScaledValue
from lora_jax.transform.value import LoraValue, TrackedValue, own_axes  # noqa: F401 (own_axes: doctest)

__all__ = ["RULES", "JAX_VERSIONED", "rule_for"]

_ANY = TrackedValue  # a rule for every kind of tracked value

# Names that exist only in some JAX versions (this package supports jax >= 0.10), with the versions.
JAX_VERSIONED: dict[str, str] = {
    "closed_call": "JAX <= 0.11.0 (after 0.11.0, `closed_call_p` is `eval_jaxpr`)",
    "eval_jaxpr": "JAX > 0.11.0 (replaces the `call` and `closed_call` primitives)",
    "pvary": "JAX >= 0.6 (shard_map's varying manual axes; later JAX may name the cast differently)",
}

RULES: dict[str, dict[type, Rule]] = {
    # View-like ops: W and both factors go through the op, the result is still W' + low rank.
    "convert_element_type": {LoraValue: views.convert_element_type},
    "transpose": {LoraValue: views.transpose},
    "broadcast_in_dim": {LoraValue: views.broadcast_in_dim},
    "reshape": {LoraValue: views.reshape},
    "squeeze": {LoraValue: views.squeeze},
    "slice": {LoraValue: views.slice_},
    "dynamic_slice": {LoraValue: views.dynamic_slice},
    "sharding_constraint": {LoraValue: views.identity},
    "reshard": {LoraValue: views.identity},  # jax.sharding.reshard, auto_axes (Explicit mesh axes): W only
    "copy": {LoraValue: views.identity},
    "device_put": {LoraValue: views.device_put},
    "pvary": {_ANY: views.each_array},  # inside jax.shard_map: W made varying like the activations
    "mul": {LoraValue: scaled.scale},  # c·W, W/c: a pending per-channel scale (`scaled.ScaledValue`)
    "div": {LoraValue: scaled.scale},
    "stop_gradient": {LoraValue: views.stop_gradient},
    "rev": {LoraValue: views.rev},
    "split": {LoraValue: views.split},  # jnp.split (a fused qkv kernel)
    "tile": {LoraValue: views.tile},
    "pad": {LoraValue: views.pad},
    "concatenate": {LoraValue: views.concatenate},
    "neg": {LoraValue: views.neg},
    # Uses: base op plus the low-rank path.
    "dot_general": {LoraValue: uses.dot_general},
    "conv_general_dilated": {LoraValue: uses.conv_general_dilated},
    "gather": {LoraValue: uses.gather},
    "square": {LoraValue: uses.square},  # V·V, V**2: weight norm's |V|², summed below
    "integer_pow": {LoraValue: uses.square},
    "reduce_sum": {uses.SquareValue: uses.sum_of_squares, LoraValue: uses.reduce_sum},  # Σ V², Σ V
    "add": {LoraValue: views.add},  # W ± c: c per channel becomes one more rank, else it is added to W
    "sub": {LoraValue: views.add},
    # Control flow: re-entered with the interpreter inside, for any kind.
    "jit": {_ANY: control.inline},  # nested jax.jit
    "closed_call": {_ANY: control.inline},  # JAX <= 0.11.0
    "eval_jaxpr": {_ANY: control.inline},  # JAX > 0.11.0
    "custom_jvp_call": {_ANY: control.custom_call},
    "custom_vjp_call": {_ANY: control.custom_call},
    "remat2": {_ANY: control.checkpoint},  # jax.checkpoint / jax.remat
    "scan": {_ANY: control.scan},
    "while": {_ANY: control.while_loop},
    "cond": {_ANY: control.cond},
}

# A quantized base (QLoRA, `quantized.QuantValue`): every view-like op LoraValue has a rule for is recorded
# and replayed on the decoded weight at its use (the factors go through that LoraValue rule); its uses
# decode W right at the op.
for _name, _by_kind in RULES.items():
    if getattr(_by_kind.get(LoraValue), "__module__", None) == views.__name__:
        _by_kind[QuantValue] = quantized.view
RULES["dot_general"][QuantValue] = quantized.dot_general
RULES["mul"][QuantValue] = RULES["div"][QuantValue] = scaled.folded(quantized.view)  # c folded into W
RULES["conv_general_dilated"][QuantValue] = quantized.conv_general_dilated
RULES["gather"][QuantValue] = quantized.gather
RULES["pvary"][QuantValue] = quantized.each_array  # also casts the operands of its recorded view ops

# A DoRA kernel (`dora.DoraValue`, g ⊙ (W + s·a·b)): views go through the LoraValue rules (for V and for g
# alike), dot_general multiplies the factored product by g; conv kernels and embedding tables raise.
for _name in (*dora.VIEWS, "convert_element_type"):
    RULES[_name][DoraValue] = dora.view
RULES["dot_general"][DoraValue] = dora.dot_general
RULES["conv_general_dilated"][DoraValue] = dora.unsupported
RULES["gather"][DoraValue] = dora.unsupported

# A kernel times a pending per-channel or scalar scale (`scaled.ScaledValue`: weight norm, spectral norm):
# views go to the kernel and to the scales alike; uses apply the scales to their input or output.
for _name in (*views.FACTORS, "convert_element_type"):
    RULES[_name][ScaledValue] = scaled.view
RULES["mul"][ScaledValue] = RULES["div"][ScaledValue] = scaled.scale
RULES["neg"][ScaledValue] = scaled.neg
RULES["dot_general"][ScaledValue] = scaled.dot_general
RULES["conv_general_dilated"][ScaledValue] = scaled.conv_general_dilated
RULES["gather"][ScaledValue] = scaled.gather


def rule_for(name: str, invals: Sequence) -> Rule | None:
    """The rule for primitive `name` applied to `invals` (which hold at least one tracked value), or None.

    Example:
        >>> import jax.numpy as jnp
        >>> v = LoraValue(jnp.ones((2, 3)), None, None, own_axes(2), "w")
        >>> rule_for("dot_general", [jnp.ones((4, 2)), v]) is uses.dot_general
        True
        >>> rule_for("sin", [v]) is None     # no rule: the interpreter falls back
        True
    """
    by_kind = RULES.get(name)
    if not by_kind:
        return None
    kinds = {type(x) for x in invals if isinstance(x, TrackedValue)}
    if len(kinds) != 1:
        return by_kind.get(_ANY)
    for k in next(iter(kinds)).__mro__:
        if k in by_kind:
            return by_kind[k]
    return None
