"""The chunked cross-entropy equals the plain one: values and gradients, with and without `lj.wrap`.

Tolerances (float32): relative to the largest reference magnitude, 1e-5 for losses and for gradients.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax.train import step as step_lib
from lora_jax.train.loss import chunked_token_loss, token_loss

VOCAB, DIM = 50, 16


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))


def maybe_jit(f, jit):
    return jax.jit(f) if jit else f


class TinyLM(nn.Module):
    """Embedding, one adapted body layer, and an output projection (``lm_head`` or tied ``attend``)."""

    tied: bool = False

    @nn.compact
    def __call__(self, ids, attention_mask=None):
        embed = nn.Embed(VOCAB, DIM, name="embed")
        x = jnp.tanh(nn.Dense(DIM, name="body")(embed(ids)))
        logits = embed.attend(x) if self.tied else nn.Dense(VOCAB, name="lm_head")(x)
        return logits.astype(jnp.float32)


def data(b=3, t=11, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (b, t, DIM))
    targets = jax.random.randint(k2, (b, t), 0, VOCAB)
    weights = (jax.random.uniform(k3, (b, t)) > 0.3).astype(jnp.float32)
    return hidden, targets, weights


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 11, 64])  # T = 11: padded, exact, one chunk, larger than T
def test_chunked_equals_plain_loss_and_gradients(jit, chunk):
    hidden, targets, weights = data()
    kernel = jax.random.normal(jax.random.key(9), (DIM, VOCAB)) * 0.5

    def plain(h, w):
        return token_loss(h @ w, targets, weights)

    def chunked(h, w):
        return chunked_token_loss(h, w, targets, weights, chunk=chunk)

    (l1, n1), (l2, n2) = maybe_jit(chunked, jit)(hidden, kernel), maybe_jit(plain, jit)(hidden, kernel)
    assert rel_err(l1, l2) < 1e-5 and float(n1) == float(n2) == float(weights.sum())
    g1 = maybe_jit(jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1)), jit)(hidden, kernel)
    g2 = maybe_jit(jax.grad(lambda h, w: plain(h, w)[0], argnums=(0, 1)), jit)(hidden, kernel)
    for a, b in zip(g1, g2):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5


def test_callable_head_equals_kernel_head():
    hidden, targets, weights = data()
    kernel = jax.random.normal(jax.random.key(9), (DIM, VOCAB))
    by_kernel = chunked_token_loss(hidden, kernel, targets, weights, chunk=4)
    by_fn = chunked_token_loss(hidden, lambda h: h @ kernel, targets, weights, chunk=4)
    np.testing.assert_allclose(by_fn, by_kernel, rtol=1e-6)


def lora_setup(tied):
    model = TinyLM(tied=tied)
    ids = jax.random.randint(jax.random.key(1), (2, 13), 0, VOCAB)
    variables = model.init(jax.random.key(0), ids)
    spec = lj.LoraSpec(rank=4, targets=r".*/(body/kernel|lm_head/kernel|embed/embedding)")
    deltas = lj.init(jax.random.key(2), variables, spec)
    # b != 0, so every a-gradient is nonzero too.
    deltas = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape), deltas)
    return model, variables, deltas, ids


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_wrapped_chunked_lm_loss_equals_full_logits(jit, tied):
    """Through `lj.wrap`, the LoRA on the head (``lm_head`` or the tied embedding) applies in every chunk."""
    model, variables, deltas, ids = lora_setup(tied)
    mask = jnp.ones_like(ids)
    targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
    weights = jnp.pad(jnp.ones((2, 12)), ((0, 0), (0, 1)))
    chunked = lj.wrap(step_lib.chunked_lm_loss(model.apply, chunk=5))
    full = lj.wrap(model.apply)

    def loss_chunked(d):
        return chunked(variables, d, ids, mask, targets, weights)[0]

    def loss_plain(d):
        return token_loss(full(variables, d, ids, attention_mask=mask), targets, weights)[0]

    assert rel_err(maybe_jit(loss_chunked, jit)(deltas), maybe_jit(loss_plain, jit)(deltas)) < 1e-5
    g1 = maybe_jit(jax.grad(loss_chunked), jit)(deltas)
    g2 = maybe_jit(jax.grad(loss_plain), jit)(deltas)
    leaves = jax.tree_util.tree_leaves_with_path(g2)
    assert len(leaves) == (4 if tied else 6)  # a and b of body, embedding (and lm_head)
    for (path, want), got in zip(leaves, jax.tree_util.tree_leaves(g1), strict=True):
        assert np.max(np.abs(want)) > 0, jax.tree_util.keystr(path)
        assert rel_err(got, want) < 1e-5, jax.tree_util.keystr(path)


def test_chunked_lm_loss_at_positions_equals_at_positions():
    model, variables, deltas, ids = lora_setup(tied=False)
    mask = jnp.ones_like(ids)
    pos, tgt, w = step_lib.completion_targets(
        ids, (jnp.arange(13) >= 4).astype(jnp.int32)[None].repeat(2, 0), 9
    )
    got = lj.wrap(step_lib.chunked_lm_loss(model.apply, chunk=2))(variables, deltas, ids, mask, tgt, w, pos)
    want = token_loss(lj.wrap(step_lib.at_positions(model.apply))(variables, deltas, ids, mask, pos), tgt, w)
    assert rel_err(got[0], want[0]) < 1e-5 and float(got[1]) == float(want[1]) == 18.0


def run_steps(model, variables, deltas, batch, **kw):
    tx = optax.sgd(0.5)
    step = step_lib.make_train_step(model.apply, tx, **kw)
    d, _, m = step(deltas, tx.init(deltas), variables, batch, jax.random.key(0))
    return d, m


@pytest.mark.parametrize("num_targets", [None, 8])
def test_train_step_chunked_path_equals_materialised(num_targets):
    """The step's chunked path (more loss positions than ``loss_chunk``) and its fast path agree."""
    model, variables, deltas, _ = lora_setup(tied=True)
    ids = jax.random.randint(jax.random.key(5), (2, 2, 13), 0, VOCAB)  # (A, b, T): 2 micro-batches
    loss_mask = jnp.broadcast_to((jnp.arange(13) >= 3).astype(jnp.int32), ids.shape)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": loss_mask}
    copy = lambda: jax.tree_util.tree_map(jnp.array, deltas)  # the step donates its deltas
    d1, m1 = run_steps(model, variables, copy(), batch, num_targets=num_targets, loss_chunk=3)
    d2, m2 = run_steps(model, variables, copy(), batch, num_targets=num_targets, loss_chunk=None)
    assert float(m1["loss_tokens"]) == float(m2["loss_tokens"]) == 2 * 2 * (8 if num_targets else 10)
    assert rel_err(m1["loss"], m2["loss"]) < 1e-5 and rel_err(m1["grad_norm"], m2["grad_norm"]) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(d1), jax.tree_util.tree_leaves(d2), strict=True):
        assert rel_err(a, b) < 1e-5


def test_chunked_step_never_holds_full_logits():
    """Compiled (one device): no ``(b, T, V)`` float32 array, only chunk-sized logits."""
    model, variables, deltas, _ = lora_setup(tied=False)
    b, t, vocab = 2, 64, VOCAB
    ids = jnp.zeros((1, b, t), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
    tx = optax.sgd(0.1)
    hlo = {}
    for chunk in (8, None):
        step = step_lib.make_train_step(model.apply, tx, num_targets=None, loss_chunk=chunk)
        hlo[chunk] = (
            step.lower(deltas, tx.init(deltas), variables, batch, jax.random.key(0)).compile().as_text()
        )
    assert f"f32[{b},{t - 1},{vocab}]" in hlo[None]  # the check can see logits when they are there
    assert f"f32[{b},{t - 1},{vocab}]" not in hlo[8] and f"f32[{b},{t},{vocab}]" not in hlo[8]
    assert f"f32[{b},8,{vocab}]" in hlo[8]


def test_bad_arguments_are_named():
    hidden, targets, weights = data()
    with pytest.raises(ValueError, match=r"expected hidden \(B, T, d\).*targets \(3, 10\)"):
        chunked_token_loss(hidden, jnp.ones((DIM, VOCAB)), targets[:, :10], weights)
    with pytest.raises(ValueError, match="chunk must be >= 1, got 0"):
        chunked_token_loss(hidden, jnp.ones((DIM, VOCAB)), targets, weights, chunk=0)
    with pytest.raises(ValueError, match=r"kernel head must be \(d, V\) with d = 16, got \(8, 50\)"):
        chunked_token_loss(hidden, jnp.ones((8, VOCAB)), targets, weights)
    with pytest.raises(ValueError, match="loss_chunk must be a positive number of positions or None, got 0"):
        step_lib.make_train_step(lambda *a, **k: None, optax.sgd(0.1), loss_chunk=0)


class NoHead(nn.Module):
    @nn.compact
    def __call__(self, ids, attention_mask=None):
        return nn.Dense(VOCAB, name="proj")(nn.Embed(VOCAB, DIM, name="embed")(ids))


def test_model_without_a_known_head_is_an_error():
    model = NoHead()
    ids = jnp.zeros((1, 4), jnp.int32)
    variables = model.init(jax.random.key(0), ids)
    f = step_lib.chunked_lm_loss(model.apply, chunk=2)
    with pytest.raises(
        ValueError, match="neither a module named 'lm_head' nor an 'attend' call; pass loss_chunk=None"
    ):
        f(variables, ids, jnp.ones_like(ids), ids, jnp.ones((1, 4)))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_step_on_a_mesh_without_the_standard_axes(axis_type):
    """A mesh without ``data``/``fsdp``/``tensor``: the rules' missing axes are left to the compiler (or,
    with ``Explicit`` axes, to the shardings in the types)."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    model, variables, deltas, _ = lora_setup(tied=True)
    mesh = jax.make_mesh((1,), ("x",), axis_types=(getattr(AxisType, axis_type),), devices=jax.devices()[:1])
    repl = NamedSharding(mesh, P())
    tx = optax.sgd(0.1)
    shard = lambda tree: jax.tree_util.tree_map(lambda _: repl, tree)
    opt_state = tx.init(deltas)
    ids = jnp.ones((1, 2, 13), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    shardings = {
        "deltas": shard(deltas),
        "opt_state": shard(opt_state),
        "params": shard(variables),
        "batch": NamedSharding(mesh, P(None, "x")),
        "replicated": repl,
    }
    step = step_lib.make_train_step(model.apply, tx, shardings=shardings, loss_chunk=4)
    _, _, m = step(deltas, opt_state, variables, batch, jax.random.key(0))
    assert float(m["loss_tokens"]) == 24.0 and np.isfinite(float(m["loss"]))
