"""Analysis of learned low-rank updates (Hu et al. 2021, arXiv:2106.09685, section 7).

Two questions from the paper, as small pure functions on arrays:

**How similar are the subspaces two adapters learned?** (section 7.2, eq. 4, Figs. 3-4). For two
adapters' down-projections ``a1: (d, r1)`` and ``a2: (d, r2)`` take the top-i left singular vectors
``U1[:, :i]`` of ``a1`` and the top-j of ``a2``; then

    φ(a1, a2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)   ∈ [0, 1]

is 1 when one span contains the other and 0 when they are orthogonal. The paper writes ``A: (r, d)``
(PyTorch's ``(out, in)`` layout) and uses its *right* singular vectors; our ``a`` is Flax's
``(in, r)``, ``a = Aᵀ``, so the same vectors are the *left* singular vectors of ``a``.

**How does ΔW relate to W?** (section 7.3, Table 7). Take the top-r left and right singular vectors
``U: (m, r)``, ``V: (n, r)`` of ``ΔW: (m, n)`` and project W onto them, ``‖Uᵀ W V‖_F``. A small value
means ΔW amplifies directions that W barely uses; the amplification factor is

    amplification = ‖ΔW‖_F / ‖Uᵀ W V‖_F        (≈ 21.5 for r=4 and ≈ 2 for r=64 in the paper).

The paper writes ``Uᵀ W Vᵀ`` with V holding the right singular vectors as *rows* (``ΔW = U Σ V``);
here V holds them as *columns* (``ΔW = U Σ Vᵀ``, what `jnp.linalg.svd` returns after one transpose),
so the same quantity is ``Uᵀ W V``. W and ΔW must share a layout; Flax ``(in, out)`` or PyTorch
``(out, in)`` give the same numbers, because transposing both swaps U and V. The paper's baselines
replace U, V by the top-r singular vectors of W itself (`top_singular_vectors`) or by random
orthonormal matrices (`random_orthonormal`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> a = jax.random.normal(jax.random.key(0), (64, 8))
    >>> round(float(subspace_similarity(a, 3.0 * a, 4, 4)), 4)   # same span: 1
    1.0
    >>> subspace_similarity_grid(a, a[:, :2]).shape                # (r1, r2)
    (8, 2)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "subspace_similarity",
    "subspace_similarity_grid",
    "left_singular_vectors",
    "top_singular_vectors",
    "random_orthonormal",
    "projection_norm",
    "amplification",
    "amplification_report",
    "as_matrix",
]

_HI = jax.lax.Precision.HIGHEST


def _check_matrix(x, name: str):
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D matrix, found shape {tuple(x.shape)}. Flatten stacked or "
            f"multi-dim kernels first, e.g. with lora_jax.analysis.as_matrix."
        )
    return x.astype(jnp.float32)


def _check_count(k, limit: int, name: str, what: str):
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limit:
        raise ValueError(f"{name}={k!r} must be an int in [1, {limit}] ({what}).")


def as_matrix(x, n_inputs: int = 1) -> jax.Array:
    """Reshapes a kernel ``(*in_dims, *out_dims)`` to ``(prod(in_dims), prod(out_dims))``, float32.

    Example:
      >>> as_matrix(jnp.ones((4, 3, 2))).shape, as_matrix(jnp.ones((4, 3, 2)), 2).shape
      ((4, 6), (12, 2))
    """
    x = jnp.asarray(x, jnp.float32)
    rows = 1
    for s in x.shape[:n_inputs]:
        rows *= s
    return x.reshape(rows, -1)


def left_singular_vectors(a) -> jax.Array:
    """All left singular vectors of ``a: (d, r)``, by decreasing singular value: ``(d, min(d, r))``.

    Example:
      >>> left_singular_vectors(jnp.eye(4)[:, :2] * jnp.array([1.0, 5.0])).round(3).tolist()
      [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    """
    u, _, _ = jnp.linalg.svd(_check_matrix(a, "a"), full_matrices=False)
    return u  # each column's sign is arbitrary; φ and the projections do not depend on it


def subspace_similarity(a1, a2, i: int, j: int) -> jax.Array:
    """φ(a1, a2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j), paper eq. 4, with U = left singular vectors.

    Args:
      a1: ``(d, r1)``, e.g. the ``a`` factor of one adapter (Flax layout, the paper's ``A1ᵀ``).
      a2: ``(d, r2)``, same ``d``.
      i: how many top singular directions of ``a1`` to use, ``1 <= i <= min(d, r1)``.
      j: how many of ``a2``, ``1 <= j <= min(d, r2)``.

    Returns:
      A float32 scalar in [0, 1]: 1 if one top subspace contains the other, 0 if they are orthogonal.

    Example:
      >>> e = jnp.eye(6)
      >>> float(subspace_similarity(e[:, :2], e[:, 2:4], 2, 2))   # orthogonal
      0.0
      >>> float(subspace_similarity(e[:, :2], e[:, 1:3], 2, 2))   # share one of two directions
      0.5
    """
    a1, a2 = _check_matrix(a1, "a1"), _check_matrix(a2, "a2")
    if a1.shape[0] != a2.shape[0]:
        raise ValueError(
            f"a1 {tuple(a1.shape)} and a2 {tuple(a2.shape)} must have the same number of rows d "
            f"(both (d, r)); pass the `a` factors of the same kernel."
        )
    _check_count(i, min(a1.shape), "i", f"a1 has shape {tuple(a1.shape)}")
    _check_count(j, min(a2.shape), "j", f"a2 has shape {tuple(a2.shape)}")
    u1, u2 = left_singular_vectors(a1)[:, :i], left_singular_vectors(a2)[:, :j]
    m = jnp.matmul(u1.T, u2, precision=_HI)
    return jnp.sum(m * m) / min(i, j)


def subspace_similarity_grid(a1, a2) -> jax.Array:
    """φ(a1, a2, i, j) for every i, j: ``grid[i - 1, j - 1]``, shape ``(min(d, r1), min(d, r2))``.

    One SVD per input; the grid is the cumulative sum of the squared overlaps ``(U1ᵀ U2)²`` over both
    axes divided by ``min(i, j)`` (the paper's Figs. 3 and 4 plot parts of this grid).

    Example:
      >>> e = jnp.eye(5)
      >>> a1 = e[:, :2] * jnp.array([2.0, 1.0])    # directions e0 (strong), e1
      >>> a2 = e[:, 1:3] * jnp.array([2.0, 1.0])   # directions e1 (strong), e2
      >>> subspace_similarity_grid(a1, a2).round(3).tolist()   # top-1s differ; top-2s share e1
      [[0.0, 0.0], [1.0, 0.5]]
    """
    a1, a2 = _check_matrix(a1, "a1"), _check_matrix(a2, "a2")
    if a1.shape[0] != a2.shape[0]:
        raise ValueError(
            f"a1 {tuple(a1.shape)} and a2 {tuple(a2.shape)} must have the same number of rows d "
            f"(both (d, r)); pass the `a` factors of the same kernel."
        )
    u1, u2 = left_singular_vectors(a1), left_singular_vectors(a2)
    m = jnp.matmul(u1.T, u2, precision=_HI)
    cum = jnp.cumsum(jnp.cumsum(m * m, axis=0), axis=1)
    i = jnp.arange(1, u1.shape[1] + 1, dtype=cum.dtype)[:, None]
    j = jnp.arange(1, u2.shape[1] + 1, dtype=cum.dtype)[None, :]
    return cum / jnp.minimum(i, j)


def top_singular_vectors(m, r: int) -> tuple[jax.Array, jax.Array]:
    """Top-r left and right singular vectors of ``m: (p, q)`` as columns: ``u: (p, r)``, ``v: (q, r)``.

    ``m ≈ u @ diag(s) @ v.T`` (v is the transpose of the paper's V).

    Example:
      >>> u, v = top_singular_vectors(jnp.diag(jnp.array([1.0, 3.0, 2.0])), 1)
      >>> u.ravel().tolist(), jnp.abs(v).ravel().tolist()
      ([0.0, 1.0, 0.0], [0.0, 1.0, 0.0])
    """
    m = _check_matrix(m, "m")
    _check_count(r, min(m.shape), "r", f"the matrix has shape {tuple(m.shape)}")
    u, _, vt = jnp.linalg.svd(m, full_matrices=False)
    return u[:, :r], vt[:r].T


def random_orthonormal(key: jax.Array, n: int, r: int) -> jax.Array:
    """A random ``(n, r)`` matrix with orthonormal columns (QR of a Gaussian; Haar-distributed span).

    Example:
      >>> q = random_orthonormal(jax.random.key(0), 10, 3)
      >>> q.shape, bool(jnp.allclose(q.T @ q, jnp.eye(3), atol=1e-5))
      ((10, 3), True)
    """
    _check_count(r, n, "r", f"n={n}")
    q, rr = jnp.linalg.qr(jax.random.normal(key, (n, r), jnp.float32))
    return q * jnp.where(jnp.diag(rr) < 0, -1.0, 1.0)[None, :]


def projection_norm(w, u, v) -> jax.Array:
    """‖uᵀ w v‖_F: the size of ``w: (p, q)`` inside the subspaces spanned by ``u: (p, r)`` and ``v: (q, r)``.

    ``u`` and ``v`` have orthonormal columns. This is the paper's ‖Uᵀ W Vᵀ‖_F with its V transposed.

    Example:
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> e = jnp.eye(3)
      >>> float(projection_norm(w, e[:, :1], e[:, :1])), float(projection_norm(w, e[:, 1:], e[:, 1:]))
      (3.0, 2.2360680103302)
    """
    w = _check_matrix(w, "w")
    u, v = _check_matrix(u, "u"), _check_matrix(v, "v")
    if u.shape[0] != w.shape[0] or v.shape[0] != w.shape[1] or u.shape[1] != v.shape[1]:
        raise ValueError(
            f"projection_norm needs w (p, q), u (p, r), v (q, r); found w {tuple(w.shape)}, "
            f"u {tuple(u.shape)}, v {tuple(v.shape)}."
        )
    return jnp.linalg.norm(jnp.matmul(jnp.matmul(u.T, w, precision=_HI), v, precision=_HI))


def amplification(delta_w, w, r: int) -> jax.Array:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V the top-r left/right singular vectors of ΔW (paper section 7.3).

    Args:
      delta_w: ``(p, q)``, e.g. ``lj.delta_weights(deltas)`` at one kernel.
      w: ``(p, q)``, the pretrained kernel, in the same layout as ``delta_w``.
      r: how many singular directions of ΔW to project on (the paper uses the adapter's rank).

    Example:
      >>> w = jnp.diag(jnp.array([10.0, 1.0, 0.1]))
      >>> dw = 2.0 * jnp.outer(jnp.eye(3)[2], jnp.eye(3)[2])      # amplifies W's weakest direction
      >>> round(float(amplification(dw, w, 1)), 3)
      20.0
    """
    delta_w, w = _check_matrix(delta_w, "delta_w"), _check_matrix(w, "w")
    if delta_w.shape != w.shape:
        raise ValueError(
            f"delta_w {tuple(delta_w.shape)} and w {tuple(w.shape)} must have the same shape "
            f"(and the same layout: both (in, out) or both (out, in))."
        )
    u, v = top_singular_vectors(delta_w, r)
    return jnp.linalg.norm(delta_w) / projection_norm(w, u, v)


def amplification_report(delta_w, w, r: int, key: jax.Array) -> dict[str, Any]:
    """The columns of the paper's Table 7 for one kernel, as Python floats.

    Returns:
      ``{"proj_delta": ‖UᵀWV‖ with U, V from ΔW, "proj_w": with U, V the top-r of W itself,
      "proj_random": with random orthonormal U, V (from ``key``), "w_norm": ‖W‖_F,
      "delta_w_norm": ‖ΔW‖_F, "amplification": delta_w_norm / proj_delta}``.

    Example:
      >>> w = jnp.diag(jnp.array([10.0, 1.0, 0.1]))
      >>> e2 = jnp.eye(3)[2]
      >>> rep = amplification_report(2.0 * jnp.outer(e2, e2), w, 1, jax.random.key(0))
      >>> round(rep["amplification"], 3), round(rep["proj_w"], 3)
      (20.0, 10.0)
    """
    delta_w, w = _check_matrix(delta_w, "delta_w"), _check_matrix(w, "w")
    if delta_w.shape != w.shape:
        raise ValueError(f"delta_w {tuple(delta_w.shape)} and w {tuple(w.shape)} must have the same shape.")
    ud, vd = top_singular_vectors(delta_w, r)
    uw, vw = top_singular_vectors(w, r)
    ku, kv = jax.random.split(key)
    ur, vr = random_orthonormal(ku, w.shape[0], r), random_orthonormal(kv, w.shape[1], r)
    out = {
        "proj_delta": projection_norm(w, ud, vd),
        "proj_w": projection_norm(w, uw, vw),
        "proj_random": projection_norm(w, ur, vr),
        "w_norm": jnp.linalg.norm(w),
        "delta_w_norm": jnp.linalg.norm(delta_w),
    }
    out = {k: float(x) for k, x in out.items()}
    out["amplification"] = out["delta_w_norm"] / out["proj_delta"]
    return out
