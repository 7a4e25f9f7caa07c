"""The pure plan of a factored dot_general: roles of W's axes, which factor x meets first, the einsums.

Each case pins the plan of one common use, then executes it with numpy (float64) and compares with
``dot_general(x, Σ_r a·b)`` built by hand, so a wrong axis, side or label fails the test. Tolerance:
1e-10 relative (float64, different summation orders).
"""

import dataclasses

import numpy as np
import pytest

from lora_jax.transform.plan import DotPlan, LowRankPath, plan_dot_general

R = 3


def _dn(contract, batch=((), ())):
    return (tuple(map(tuple, contract)), tuple(map(tuple, batch)))


# name: (dimension_numbers, x shape, W shape, W on the rhs, a shape, b shape, expected plan)
CASES = {
    # nn.Dense: x (batch, in) @ W (in, out).
    "dense": (
        _dn([(1,), (0,)]),
        (5, 16),
        (16, 32),
        True,
        (16, 1, R),
        (1, 32, R),
        DotPlan(
            True,
            ("inputs", "outputs"),
            (5, 32),
            LowRankPath("a", (0,), (1,), "ab,bd->ad", "ad,cd->ac", (5, 32)),
        ),
    ),
    # nn.DenseGeneral projection: x (batch, seq, embed) @ W (embed, heads, head_dim).
    "dense_general": (
        _dn([(2,), (0,)]),
        (2, 6, 24),
        (24, 4, 8),
        True,
        (24, 1, 1, R),
        (1, 4, 8, R),
        DotPlan(
            True,
            ("inputs", "outputs", "outputs"),
            (2, 6, 4, 8),
            LowRankPath("a", (0,), (1, 2), "abc,cf->abf", "abf,def->abde", (2, 6, 4, 8)),
        ),
    ),
    # Attention output: x (batch, seq, heads, head_dim) @ W (heads, head_dim, embed), two contracted axes.
    "dense_general_out": (
        _dn([(2, 3), (0, 1)]),
        (2, 6, 4, 8),
        (4, 8, 24),
        True,
        (4, 8, 1, R),
        (1, 1, 24, R),
        DotPlan(
            True,
            ("inputs", "inputs", "outputs"),
            (2, 6, 24),
            LowRankPath("a", (0, 1), (2,), "abcd,cdf->abf", "abf,ef->abe", (2, 6, 24)),
        ),
    ),
    # Weight-tied attend: h (batch, seq, dim) contracted with the embedding (vocab, dim) on W's axis 1,
    # which is the delta's output axis: x meets b first, then a.
    "attend": (
        _dn([(2,), (1,)]),
        (3, 7, 16),
        (50, 16),
        True,
        (50, 1, R),
        (1, 16, R),
        DotPlan(
            True,
            ("outputs", "inputs"),
            (3, 7, 50),
            LowRankPath("b", (1,), (0,), "abc,ce->abe", "abe,de->abd", (3, 7, 50)),
        ),
    ),
    # Stacked layers with a batch dimension: x (layers, batch, in) and W (layers, in, out).
    "batch_dims": (
        _dn([(2,), (1,)], [(0,), (0,)]),
        (3, 5, 12),
        (3, 12, 16),
        True,
        (3, 12, 1, R),
        (3, 1, 16, R),
        DotPlan(
            True,
            ("stack", "inputs", "outputs"),
            (3, 5, 16),
            LowRankPath("a", (0, 1), (0, 2), "abc,ace->abe", "abe,ade->abd", (3, 5, 16)),
        ),
    ),
    # W on the left: einsum("io,ib->ob", W, x); W's free axis comes first in the output.
    "w_on_lhs": (
        _dn([(0,), (0,)]),
        (16, 5),
        (16, 8),
        False,
        (16, 1, R),
        (1, 8, R),
        DotPlan(
            False,
            ("inputs", "outputs"),
            (8, 5),
            LowRankPath("a", (0,), (1,), "ab,ad->bd", "bd,cd->cb", (8, 5)),
        ),
    ),
    # A view broadcast along a new middle axis: the low-rank path is constant along it (size 1).
    "broadcast_view": (
        _dn([(1,), (0,)]),
        (5, 16),
        (16, 4, 32),
        True,
        (16, 1, 1, R),
        (1, 1, 32, R),
        DotPlan(
            True,
            ("inputs", "outputs", "outputs"),
            (5, 4, 32),
            LowRankPath("a", (0,), (2,), "ab,be->ae", "ae,de->ad", (5, 1, 32)),
        ),
    ),
}


def _execute(plan: DotPlan, x, a, b):
    """The low-rank term of the plan, with numpy."""
    path = plan.low_rank
    first, second = (b, a) if path.first == "b" else (a, b)
    squeeze = lambda f, keep: f.reshape([f.shape[i] for i in keep] + [f.shape[-1]])  # noqa: E731
    t = np.einsum(path.first_spec, x, squeeze(first, path.first_axes))
    low = np.einsum(path.second_spec, t, squeeze(second, path.second_axes))
    return np.broadcast_to(low.reshape(path.low_shape), plan.out_shape)


def _dot_general(lhs, rhs, dimension_numbers):
    """Reference dot_general in numpy: batch axes, then lhs free axes, then rhs free axes."""
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    ll = [next(letters) for _ in range(lhs.ndim)]
    rl = [next(letters) for _ in range(rhs.ndim)]
    for i, j in zip(lc + lb, rc + rb, strict=True):
        rl[j] = ll[i]
    out = [ll[i] for i in lb] + [ll[i] for i in range(lhs.ndim) if i not in lc + lb]
    out += [rl[j] for j in range(rhs.ndim) if j not in rc + rb]
    return np.einsum(f"{''.join(ll)},{''.join(rl)}->{''.join(out)}", lhs, rhs)


@pytest.mark.parametrize("name", list(CASES))
def test_plan_of_common_uses(name):
    dn, x_shape, w_shape, w_is_rhs, a_shape, b_shape, want = CASES[name]
    got = plan_dot_general(dn, x_shape, w_shape, w_is_rhs, a_shape, b_shape)
    assert got == want


@pytest.mark.parametrize("name", list(CASES))
def test_plan_executes_to_the_dense_delta_product(name):
    dn, x_shape, w_shape, w_is_rhs, a_shape, b_shape, _ = CASES[name]
    plan = plan_dot_general(dn, x_shape, w_shape, w_is_rhs, a_shape, b_shape)
    rng = np.random.default_rng(0)
    x, a, b = (rng.standard_normal(s) for s in (x_shape, a_shape, b_shape))
    delta = np.broadcast_to(np.sum(a * b, axis=-1), w_shape)  # Σ_r a·b laid out like W
    want = _dot_general(x, delta, dn) if w_is_rhs else _dot_general(delta, x, dn)
    got = _execute(plan, x, a, b)
    assert got.shape == want.shape == plan.out_shape
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_plan_contracting_both_factors_is_dense():
    """``sum(x * W)`` over both axes of W touches a and b at once: no factored path."""
    plan = plan_dot_general(_dn([(0, 1), (0, 1)]), (8, 8), (8, 8), True, (8, 1, R), (1, 8, R))
    assert plan.dense and plan.low_rank is None
    assert plan.roles == ("inputs", "inputs") and plan.out_shape == ()


def test_plan_without_factors_only_has_roles():
    """Axis inference plans without factors: the roles, and no low-rank path."""
    plan = plan_dot_general(_dn([(2,), (1,)], [(0,), (0,)]), (3, 5, 12), (3, 12, 16), True)
    assert plan == DotPlan(True, ("stack", "inputs", "outputs"), (3, 5, 16))


def test_plan_is_frozen_and_hashable():
    plan = CASES["dense"][-1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.w_is_rhs = False
    assert hash(plan) == hash(dataclasses.replace(plan))
