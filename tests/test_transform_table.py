"""The rule table: its keys are primitives of the installed JAX (or listed version aliases), what public
APIs stage has a rule, and rules dispatch on the kind of tracked value so that a new kind plugs in."""

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj
from lora_jax.transform import control, uses, views
from lora_jax.transform.interpreter import Ctx, eval_jaxpr, trace
from lora_jax.transform.table import JAX_VERSIONED, RULES, rule_for
from lora_jax.transform.value import LoraValue, TrackedValue, own_axes


@jax.custom_jvp
def _custom_jvp_sin(x):
    return jnp.sin(x)


_custom_jvp_sin.defjvp(lambda primals, tangents: (_custom_jvp_sin(*primals), tangents[0]))


@jax.custom_vjp
def _custom_vjp_sin(x):
    return jnp.sin(x)


_custom_vjp_sin.defvjp(lambda x: (_custom_vjp_sin(x), None), lambda res, g: (g,))


def _sharded(w):
    mesh = jax.make_mesh((1,), ("x",))
    return lax.with_sharding_constraint(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _resharded(w):
    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    return jax.sharding.reshard(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


# Public APIs whose staged primitive (the last equation of the jaxpr) the interpreter must follow.
STAGED = {
    "jax.jit": lambda w: jax.jit(jnp.sin)(w),
    "jax.checkpoint": lambda w: jax.checkpoint(jnp.sin)(w),
    "lax.scan": lambda w: lax.scan(lambda c, x: (c + x, x), jnp.zeros(3), w)[1],
    "lax.while_loop": lambda w: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1]), (0, w))[1],
    "lax.cond": lambda w: lax.cond(w[0, 0] > 0, jnp.sin, jnp.cos, w),
    "jax.custom_jvp": _custom_jvp_sin,
    "jax.custom_vjp": _custom_vjp_sin,
    "jax.device_put": lambda w: jax.device_put(w),
    "jnp.array(copy=True)": lambda w: jnp.array(w, copy=True),
    "with_sharding_constraint": _sharded,
    "jax.sharding.reshard": _resharded,
    "astype": lambda w: w.astype(jnp.bfloat16),
    "transpose": lambda w: w.T,
    "reshape": lambda w: w.reshape(9),
    "slice": lambda w: w[1:],
    "dynamic_slice": lambda w: lax.dynamic_slice_in_dim(w, jnp.int32(1), 2),
    "scalar multiple": lambda w: w * 2.0,
    "negation": lambda w: -w,
    "matmul": lambda w: jnp.ones((2, 3)) @ w,
    "embedding lookup": lambda w: w[jnp.array([0, 2])],
}


def _staged_names():
    w = jnp.ones((3, 3))
    return {api: jax.make_jaxpr(f)(w).jaxpr.eqns[-1].primitive.name for api, f in STAGED.items()}


def _live_primitive_names() -> set[str]:
    """Primitive names of the installed JAX: the public ``*_p`` objects, plus what public APIs stage."""
    names = set(_staged_names().values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated module attributes warn on access
        for mod in (jax.extend.core.primitives, lax):
            for attr in dir(mod):
                p = getattr(mod, attr, None) if attr.endswith("_p") else None
                if isinstance(p, jax.extend.core.Primitive):
                    names.add(p.name)
    return names


def test_every_rule_key_is_a_live_primitive_or_a_listed_version_alias():
    live = _live_primitive_names()
    stale = sorted(k for k in RULES if k not in live and k not in JAX_VERSIONED)
    assert not stale, (
        f"rule table keys that are no primitive of jax {jax.__version__} and are not in "
        f"JAX_VERSIONED (with the JAX versions they serve): {stale}"
    )


def test_version_aliases_are_rule_keys_with_a_version():
    assert set(JAX_VERSIONED) <= set(RULES), sorted(set(JAX_VERSIONED) - set(RULES))
    assert all("JAX" in label and any(ch.isdigit() for ch in label) for label in JAX_VERSIONED.values())


@pytest.mark.parametrize("api", list(STAGED))
def test_what_public_apis_stage_has_a_rule(api):
    name = _staged_names()[api]
    assert name in RULES, f"{api} stages primitive `{name}` in jax {jax.__version__}, which has no rule"


# ---- dispatch on the kind of tracked value ---------------------------------------------------------


@dataclasses.dataclass
class Scaled(TrackedValue):
    """A toy kind with the interface only and no rules of its own: stands for ``c * w``."""

    w: Any
    c: float
    path: str
    origin: tuple

    def dense(self):
        return self.w * jnp.asarray(self.c, self.w.dtype)

    def arrays(self):
        return (self.w,)

    def with_arrays(self, arrays, origin=None):
        return dataclasses.replace(self, w=arrays[0], origin=self.origin if origin is None else origin)

    def stacked_arrays(self, length):
        return (self.w,)


class SubLora(LoraValue):
    """A kind derived from LoraValue, e.g. one that overrides a few rules."""


def _lora(shape=(4, 3)):
    return LoraValue(jnp.ones(shape), None, None, own_axes(len(shape)), "w")


def test_rule_for_dispatches_on_the_value_kind():
    x, v = jnp.ones((2, 4)), _lora()
    assert rule_for("dot_general", [x, v]) is uses.dot_general
    assert rule_for("transpose", [v]) is views.transpose
    assert rule_for("sin", [v]) is None  # no rule: fallback
    sub = SubLora(v.w, None, None, v.origin, "w")
    assert rule_for("dot_general", [x, sub]) is uses.dot_general  # inherited along the MRO
    s = Scaled(v.w, 2.0, "w", v.origin)
    assert rule_for("dot_general", [x, s]) is None  # a kind without a use rule
    assert rule_for("transpose", [s]) is None
    assert rule_for("scan", [s]) is control.scan  # control flow: every kind
    assert rule_for("dot_general", [v, s]) is None  # mixed kinds: kind-agnostic only
    assert rule_for("cond", [jnp.int32(0), v, s]) is control.cond


def test_a_new_value_kind_runs_through_control_flow_with_the_interface_alone():
    """nested jit, checkpoint, scan over a stack and cond, for a kind that registered no rule."""

    def fn(p, x):
        h = jax.jit(lambda x: x @ p["w"][0])(x)
        h = jax.checkpoint(lambda h: jnp.tanh(h @ p["w"][1]))(h)
        h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["w"])
        return lax.cond(h[0, 0] > 0, lambda h: h @ p["w"][2], lambda h: -h, h)

    w = jax.random.normal(jax.random.key(0), (3, 4, 4)) / 2
    x = jax.random.normal(jax.random.key(1), (2, 4))
    p = {"w": w}
    closed, _, dyn = trace(fn, [w], jax.tree.structure(p), (x,), {})
    value = Scaled(w, 0.5, "w", own_axes(3))
    with pytest.warns(lj.FallbackWarning, match=r"w is used by primitive `(slice|squeeze|dot_general)`"):
        got = eval_jaxpr(Ctx(rule_for), closed.jaxpr, closed.consts, [value, *dyn])
    np.testing.assert_allclose(got[0], fn({"w": w * 0.5}, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"strict=True.*w is used by primitive"):
        eval_jaxpr(Ctx(rule_for, strict=True), closed.jaxpr, closed.consts, [value, *dyn])
