"""Tests for lora_jax.analysis on constructed cases with known answers (float32, tolerance 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import analysis

TOL = 1e-5


def _orthonormal(key, n, r):
    return analysis.random_orthonormal(key, n, r)


def test_identical_subspace_is_one():
    a = jax.random.normal(jax.random.key(0), (32, 6))
    for i, j in [(1, 1), (3, 3), (6, 6), (2, 6)]:
        assert abs(float(analysis.subspace_similarity(a, a, i, j)) - 1.0) < TOL


def test_orthogonal_subspaces_are_zero():
    q = _orthonormal(jax.random.key(1), 20, 8)
    a1 = q[:, :4] @ jnp.diag(jnp.array([4.0, 3.0, 2.0, 1.0]))
    a2 = q[:, 4:] @ jnp.diag(jnp.array([4.0, 3.0, 2.0, 1.0]))
    grid = analysis.subspace_similarity_grid(a1, a2)
    np.testing.assert_allclose(grid, 0.0, atol=TOL)


def test_known_partial_overlap():
    # a1 spans {e0, e1, e2}; a2 spans {e2, e3} with e2 strongest; φ(i=3, j=1) = 1, φ(3, 2) = 1/2.
    e = jnp.eye(10)
    a1 = e[:, :3] * jnp.array([3.0, 2.0, 1.0])
    a2 = e[:, 2:4] * jnp.array([2.0, 1.0])
    assert abs(float(analysis.subspace_similarity(a1, a2, 3, 1)) - 1.0) < TOL
    assert abs(float(analysis.subspace_similarity(a1, a2, 3, 2)) - 0.5) < TOL
    assert abs(float(analysis.subspace_similarity(a1, a2, 2, 2))) < TOL
    # A rotated overlap: u = (e0 + e5)/sqrt(2) against e0 gives cos² = 1/2.
    u = (e[:, 0] + e[:, 5])[:, None]
    assert abs(float(analysis.subspace_similarity(u, e[:, :1], 1, 1)) - 0.5) < TOL


def test_grid_matches_pointwise():
    k1, k2 = jax.random.split(jax.random.key(2))
    a1, a2 = jax.random.normal(k1, (16, 4)), jax.random.normal(k2, (16, 7))
    grid = analysis.subspace_similarity_grid(a1, a2)
    assert grid.shape == (4, 7)
    for i in range(1, 5):
        for j in range(1, 8):
            assert abs(float(grid[i - 1, j - 1]) - float(analysis.subspace_similarity(a1, a2, i, j))) < 1e-4
    assert float(grid.min()) >= -TOL and float(grid.max()) <= 1 + TOL


def test_invariant_to_rescaling_and_rotation_within_subspace():
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    a1, a2 = jax.random.normal(k1, (24, 5)), jax.random.normal(k2, (24, 5))
    rot = _orthonormal(k3, 5, 5)
    full = float(analysis.subspace_similarity(a1, a2, 5, 5))
    # Right-multiplying by an invertible matrix keeps the span (the full-rank φ is unchanged)...
    assert abs(float(analysis.subspace_similarity(7.0 * a1 @ rot, a2, 5, 5)) - full) < 1e-4
    # ...and an orthogonal one also keeps the singular values, so every top-i subspace is unchanged.
    np.testing.assert_allclose(
        analysis.subspace_similarity_grid(a1 @ rot, -3.0 * a2),
        analysis.subspace_similarity_grid(a1, a2),
        atol=1e-4,
    )
    # A rotation of the whole space (both inputs) changes nothing either.
    big = _orthonormal(jax.random.key(4), 24, 24)
    np.testing.assert_allclose(
        analysis.subspace_similarity_grid(big @ a1, big @ a2),
        analysis.subspace_similarity_grid(a1, a2),
        atol=1e-4,
    )


def test_known_amplification():
    # W = diag(10, 5, 1, 0.5); ΔW = 3 e3 e3ᵀ + 4 e2 e2ᵀ (rank 2, singular values 4, 3).
    w = jnp.diag(jnp.array([10.0, 5.0, 1.0, 0.5]))
    e = jnp.eye(4)
    dw = 3.0 * jnp.outer(e[3], e[3]) + 4.0 * jnp.outer(e[2], e[2])
    # Top-2 singular vectors of ΔW span {e2, e3}: ‖UᵀWV‖ = ‖diag(1, 0.5)‖ = sqrt(1.25); ‖ΔW‖ = 5.
    assert abs(float(analysis.amplification(dw, w, 2)) - 5.0 / np.sqrt(1.25)) < 1e-4
    # Rank 1 keeps only e2 (singular value 4): projection 1.
    assert abs(float(analysis.amplification(dw, w, 1)) - 5.0) < 1e-4
    rep = analysis.amplification_report(dw, w, 2, jax.random.key(0))
    assert abs(rep["proj_w"] - np.sqrt(125.0)) < 1e-3  # top-2 of W itself: diag(10, 5)
    assert abs(rep["w_norm"] - float(jnp.linalg.norm(w))) < 1e-4
    assert abs(rep["delta_w_norm"] - 5.0) < 1e-5
    assert 0 <= rep["proj_random"] <= rep["proj_w"] + 1e-5


def test_amplification_layout_independent_and_rectangular():
    # Flax (in, out) and PyTorch (out, in) layouts give the same numbers.
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    w = jax.random.normal(k1, (12, 20))
    dw = jax.random.normal(k2, (12, 3)) @ jax.random.normal(k3, (3, 20))
    assert abs(float(analysis.amplification(dw, w, 3)) - float(analysis.amplification(dw.T, w.T, 3))) < 1e-3
    # Invariant to rescaling ΔW's factors (s·a·b vs a·(s·b)) up to the ‖ΔW‖ factor.
    assert (
        abs(float(analysis.amplification(2 * dw, w, 3)) - 2 * float(analysis.amplification(dw, w, 3))) < 1e-3
    )


def test_projection_norm_and_random_orthonormal():
    q = analysis.random_orthonormal(jax.random.key(6), 30, 5)
    np.testing.assert_allclose(q.T @ q, jnp.eye(5), atol=1e-5)
    q2 = analysis.random_orthonormal(jax.random.key(6), 30, 5)
    np.testing.assert_array_equal(q, q2)  # explicit key: reproducible
    w = jax.random.normal(jax.random.key(7), (30, 30))
    full = analysis.projection_norm(w, jnp.eye(30), jnp.eye(30))
    assert abs(float(full) - float(jnp.linalg.norm(w))) < 1e-3
    u, v = analysis.top_singular_vectors(w, 3)
    s = jnp.linalg.svd(w, compute_uv=False)
    assert abs(float(analysis.projection_norm(w, u, v)) - float(jnp.linalg.norm(s[:3]))) < 1e-3


def test_with_lora_deltas():
    params = {"attn": {"query": {"kernel": jax.random.normal(jax.random.key(8), (16, 16))}}}
    d = lj.init(jax.random.key(9), params, lj.LoraSpec(rank=4, targets=".*/kernel"))["attn"]["query"][
        "kernel"
    ]
    d = lj.LoraDelta(d.a, jnp.ones_like(d.b), scale=d.scale, axes=d.axes)
    dw = lj.delta_weights({"k": d})["k"]
    # ΔW = s·a·b has rank 1 here (b's rows are equal); its input direction lies in span(a).
    u, _ = analysis.top_singular_vectors(dw, 1)
    assert abs(float(analysis.subspace_similarity(d.a, u, 4, 1)) - 1.0) < 1e-4
    assert float(analysis.amplification(dw, params["attn"]["query"]["kernel"], 1)) > 0


def test_jit():
    a1 = jax.random.normal(jax.random.key(10), (16, 4))
    out = jax.jit(analysis.subspace_similarity, static_argnums=(2, 3))(a1, a1, 2, 2)
    assert abs(float(out) - 1.0) < TOL
    assert jax.jit(analysis.subspace_similarity_grid)(a1, a1).shape == (4, 4)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: analysis.subspace_similarity(jnp.ones((4, 2)), jnp.ones((5, 2)), 1, 1),
            "same number of rows",
        ),
        (
            lambda: analysis.subspace_similarity(jnp.ones((4, 2)), jnp.ones((4, 2)), 3, 1),
            r"i=3 must be an int in \[1, 2\]",
        ),
        (lambda: analysis.subspace_similarity(jnp.ones((4, 2)), jnp.ones((4, 2)), 1, 0), r"j=0 must be"),
        (lambda: analysis.subspace_similarity_grid(jnp.ones((4, 2, 1)), jnp.ones((4, 2))), "2-D matrix"),
        (lambda: analysis.amplification(jnp.ones((4, 3)), jnp.ones((3, 4)), 1), "same shape"),
        (
            lambda: analysis.amplification(jnp.ones((4, 3)), jnp.ones((4, 3)), 4),
            r"r=4 must be an int in \[1, 3\]",
        ),
        (
            lambda: analysis.projection_norm(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((4, 2))),
            "projection_norm needs",
        ),
        (lambda: analysis.random_orthonormal(jax.random.key(0), 3, 4), r"r=4 must be an int in \[1, 3\]"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_as_matrix():
    assert analysis.as_matrix(jnp.ones((2, 3, 4)), 2).shape == (6, 4)
    assert analysis.as_matrix(jnp.ones((2, 3)), 1).dtype == jnp.float32
