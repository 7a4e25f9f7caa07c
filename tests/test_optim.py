"""Training only the deltas: trainable_mask, optimizer, the grad-of-deltas pattern, and convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import LoraAxes, LoraDelta, LoraSpec

pytestmark = pytest.mark.strict_rank  # also no implicit rank promotion here


KEY = jax.random.key(0)


def _model():
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((64, 48)), jnp.float32), "bias": jnp.zeros(48)},
        "stack": {"kernel": jnp.asarray(rng.standard_normal((3, 48, 48)), jnp.float32)},
        "embed": {"embedding": jnp.asarray(rng.standard_normal((100, 64)), jnp.float32)},
        "step": jnp.asarray(0, jnp.int32),
    }
    spec = LoraSpec(rank=4, targets=r".*/kernel", axes={"stack/kernel": LoraAxes((0,), (1,), (2,))})
    return params, lj.init(KEY, params, spec)


def _optax():
    """optax's own arithmetic (adam's bias correction: float ** int32) is not strict-promotion clean;
    lora_jax's is, so only optax calls run under standard promotion."""
    return jax.numpy_dtype_promotion("standard")


def _state_size(opt_state):
    """Elements of every non-scalar array in an optimizer state (the scalar step counts excluded)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0)


def _bits(x):
    x = np.asarray(x)
    return x.dtype, x.shape, x.tobytes()


def test_trainable_mask():
    params, deltas = _model()
    mask = lj.trainable_mask({"params": params, "deltas": deltas})
    assert jax.tree.leaves(mask["params"]) == [False] * len(jax.tree.leaves(params))
    assert mask["deltas"]["dense"]["kernel"] == LoraDelta(True, True, scale=1.0 * 16 / 4, axes=LoraAxes())
    assert mask["deltas"]["stack"]["kernel"].a is True and mask["deltas"]["stack"]["kernel"].b is True
    assert mask["deltas"]["dense"]["bias"] is None  # None (untargeted) stays None, like in deltas
    # usable with optax directly
    tx = optax.masked(optax.sgd(1.0), mask)
    tree = {"params": params, "deltas": deltas}
    tx.init(tree)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "name, make, slots",
    [
        ("adam", lambda: optax.adam(1e-2), 2),
        ("adamw", lambda: optax.adamw(1e-2, weight_decay=0.1), 2),
        ("momentum", lambda: optax.sgd(1e-2, momentum=0.9), 1),
    ],
)
def test_optimizer_trains_deltas_only(name, make, slots, use_jit):
    params, deltas = _model()
    tree = {"params": params, "deltas": deltas}
    tx = lj.optimizer(make())
    opt_state = tx.init(tree)
    # Optimizer state holds arrays for the deltas only: count_params(deltas) per slot (mu, nu for adam).
    # (With state for the base too it would be ~12x larger.)
    assert _state_size(opt_state) == lj.count_params(deltas) * slots
    assert lj.count_params(deltas) < lj.count_params(params) / 10
    # Gradients everywhere, base leaves included: the base must still get exactly zero updates.
    grads = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), tree)

    def step(g, s, t):
        with _optax():
            return tx.update(g, s, t)

    updates, opt_state = (jax.jit(step) if use_jit else step)(grads, opt_state, tree)
    for u in jax.tree.leaves(updates["params"]):
        assert not np.any(np.asarray(u))
    for u in jax.tree.leaves(updates["deltas"]):
        assert np.all(np.asarray(u) != 0)
    with _optax():
        new = optax.apply_updates(tree, updates)
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(new["params"])):
        assert _bits(p) == _bits(q)
    assert _state_size(opt_state) == lj.count_params(deltas) * slots


def test_grad_of_deltas_with_plain_optax():
    """The recommended pattern: differentiate the deltas only and use any optax optimizer as is."""
    params, deltas = _model()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 64)), jnp.float32)

    def loss(deltas, params, x):
        p = lj.merge(params, deltas)
        h = x @ p["dense"]["kernel"] + p["dense"]["bias"][None, :]
        for l in range(3):
            h = jnp.tanh(h @ p["stack"]["kernel"][l])
        return jnp.mean(h**2)

    tx = optax.adam(1e-2)
    opt_state = tx.init(deltas)
    assert _state_size(opt_state) == 2 * lj.count_params(deltas)
    grads = jax.jit(jax.grad(loss))(deltas, params, x)
    is_leaf = lambda v: v is None or lj.is_delta(v)
    assert jax.tree.structure(grads, is_leaf=is_leaf) == jax.tree.structure(deltas, is_leaf=is_leaf)
    assert grads["stack"]["kernel"].axes == deltas["stack"]["kernel"].axes
    # b starts at zero, so only b has a gradient at init
    assert np.any(np.asarray(grads["dense"]["kernel"].b)) and np.any(np.asarray(grads["stack"]["kernel"].b))
    with _optax():
        updates, opt_state = tx.update(grads, opt_state, deltas)
        new = optax.apply_updates(deltas, updates)
    assert new["dense"]["bias"] is None
    assert np.any(np.asarray(new["dense"]["kernel"].b))


# --- convergence ---------------------------------------------------------------------------------


def _linear_problem():
    """Frozen y = x @ W0 (+ bias); target W0 + (a rank-2 matrix)."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((16, 8)).astype(np.float32)
    low_rank = (rng.standard_normal((16, 2)) @ rng.standard_normal((2, 8)) / 4).astype(np.float32)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    params = {"w": jnp.asarray(w0), "b": jnp.asarray(rng.standard_normal(8), jnp.float32)}
    y = jnp.asarray(x @ (w0 + low_rank)) + params["b"][None, :]
    return params, jnp.asarray(x), y, low_rank


def _loss(deltas, params, x, y):
    p = lj.merge(params, deltas)
    return jnp.mean((x @ p["w"] + p["b"][None, :] - y) ** 2)


@pytest.mark.parametrize("pattern", ["grad_of_deltas", "combined_tree"])
def test_rank2_deltas_fit_a_rank2_update(pattern):
    params, x, y, low_rank = _linear_problem()
    before = jax.tree.map(_bits, params)
    deltas = lj.init(KEY, params, LoraSpec(rank=2, alpha=2.0, targets="w"))
    loss0 = float(_loss(deltas, params, x, y))
    assert loss0 > 0.5

    if pattern == "grad_of_deltas":
        tx = optax.adam(3e-2)
        state = (deltas, tx.init(deltas))

        @jax.jit
        def step(state):
            d, s = state
            g = jax.grad(_loss)(d, params, x, y)
            with _optax():
                u, s = tx.update(g, s, d)
                return optax.apply_updates(d, u), s
    else:
        tx = lj.optimizer(optax.adam(3e-2))
        tree = {"params": params, "deltas": deltas}
        state = (tree, tx.init(tree))

        @jax.jit
        def step(state):
            t, s = state
            g = jax.grad(lambda t: _loss(t["deltas"], t["params"], x, y))(t)  # grads for the base too
            with _optax():
                u, s = tx.update(g, s, t)
                return optax.apply_updates(t, u), s

    for _ in range(300):
        state = step(state)
    if pattern == "grad_of_deltas":
        deltas = state[0]
    else:
        deltas = state[0]["deltas"]
        assert jax.tree.map(_bits, state[0]["params"]) == before  # base leaves bit-identical
    assert jax.tree.map(_bits, params) == before  # and the caller's params too

    loss = float(_loss(deltas, params, x, y))
    # Exactly representable at rank 2: measured ~1e-13 after 300 adam steps (lr 3e-2); assert < 1e-6,
    # i.e. more than 5 orders of magnitude below the initial loss (~1.5).
    assert loss < 1e-6, (loss0, loss)
    # and the learned ΔW is the rank-2 target (1e-3 absolute; its entries are O(1))
    np.testing.assert_allclose(np.asarray(lj.delta_weights(deltas)["w"]), low_rank, atol=1e-3)


def test_wrap_gives_the_merge_loss():
    """`wrap` (factored execution) agrees with the merge-based loss used above (float32: rtol 1e-5)."""
    params, x, y, _ = _linear_problem()
    deltas = lj.init(KEY, params, LoraSpec(rank=2, alpha=2.0, targets="w"))
    rng = np.random.default_rng(3)
    d = deltas["w"]
    deltas = {
        "w": LoraDelta(d.a, jnp.asarray(rng.standard_normal(d.b.shape), jnp.float32), d.scale, d.axes),
        "b": None,
    }
    f = lj.wrap(lambda p, x: x @ p["w"] + p["b"][None, :])
    wrapped = float(jnp.mean((f(params, deltas, x) - y) ** 2))
    np.testing.assert_allclose(wrapped, float(_loss(deltas, params, x, y)), rtol=1e-5)
