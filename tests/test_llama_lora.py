"""`lj.wrap` on the Llama model: plain, `nn.scan` + `nn.remat` layers, bf16 compute, and KV-cache decoding.

Tolerance: relative to the largest reference magnitude, 2e-5 for float32 values, 1e-4 for gradients.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.models import llama

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=True,
)
TARGETS = r".*/(attn/(query|value)|mlp/(gate|down))/kernel"


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))


def setup(scan, remat, dtype=jnp.float32):
    model = llama.Llama(llama.LlamaConfig(**TINY, scan_layers=scan, remat=remat, dtype=dtype))
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, TINY["vocab_size"], jnp.int32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids))
    axes = {TARGETS: lj.LoraAxes((0,), (1,), (2,))} if scan else {}
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets=TARGETS, axes=axes)
    deltas = lj.init(jax.random.key(2), variables, spec)
    leaves, tree = jax.tree_util.tree_flatten(deltas)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    deltas = jax.tree_util.tree_unflatten(
        tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )
    return model, variables, deltas, ids


@pytest.mark.parametrize("scan,remat", [(False, False), (True, True)], ids=["plain", "scan+remat"])
def test_wrap_matches_merge_values_and_grads(scan, remat):
    model, variables, deltas, ids = setup(scan, remat)
    mask = jnp.ones_like(ids).at[0, :3].set(0)
    got_f = jax.jit(lambda d: lj.wrap(model.apply)(variables, d, ids, mask))
    want_f = jax.jit(lambda d: model.apply(lj.merge(variables, d), ids, mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)  # every use of an adapted kernel is factored
        got = got_f(deltas)
    assert rel_err(got, want_f(deltas)) < 2e-5
    loss = lambda f: lambda d: jnp.mean(jax.nn.log_softmax(f(d))[..., 0])
    for g, w in zip(
        jax.tree.leaves(jax.grad(loss(got_f))(deltas)), jax.tree.leaves(jax.grad(loss(want_f))(deltas))
    ):
        assert rel_err(g, w) < 1e-4


def test_scan_axes_are_inferred_from_the_model():
    model, variables, _, ids = setup(True, True)
    d = lj.init(
        jax.random.key(0), variables, lj.LoraSpec(rank=4, targets=TARGETS), fn=model.apply, args=(ids,)
    )
    q = d["params"]["layers"]["attn"]["query"]["kernel"]
    assert q.axes == lj.LoraAxes((0,), (1,), (2,)) and q.a.shape == (2, 32, 4) and q.b.shape == (2, 4, 32)


def test_bf16_compute():
    model, variables, deltas, ids = setup(False, False, jnp.bfloat16)
    got = jax.jit(lj.wrap(model.apply))(variables, deltas, ids)
    want = jax.jit(model.apply)(lj.merge(variables, deltas), ids)
    assert got.dtype == want.dtype == jnp.float32
    assert rel_err(got, want) < 3e-2


def test_generate_with_wrapped_apply_equals_merged_model():
    model, variables, deltas, ids = setup(False, False)
    wrapped = lj.wrap(model.apply)
    out = llama.generate(lambda v, *a, **k: wrapped(v, deltas, *a, **k), variables, ids[:, :4], 6)
    want = llama.generate(model.apply, lj.merge(variables, deltas), ids[:, :4], 6)
    np.testing.assert_array_equal(out, want)
