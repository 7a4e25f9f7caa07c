"""Adapter arithmetic (`combine`, `rerank`, TIES / DARE / magnitude-prune merges) against references
computed another way: float64 NumPy from the factors, NumPy's SVD of the dense ΔW, TIES/DARE written out
in NumPy here, and PEFT's own ``peft.utils.merge_utils`` on the same tensors.

The kernels cover a plain Dense (in, out), a DenseGeneral kernel with two input and two output axes, and
an (out, L, in) layout with a stacked axis in the middle of an (out, in) kernel, so every layout path
(and each stacked layer on its own) is exercised. Tolerances are relative to the
largest |ΔW| (float32 throughout).
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.spec import LoraAxes

# name: (W shape, axes). Every kernel has 8 inputs and 6 outputs per layer, so min(m, n) = 6 everywhere.
KERNELS = {
    "q": ((8, 6), LoraAxes()),
    "v": ((8, 6), LoraAxes()),
    "dg": ((2, 4, 2, 3), LoraAxes((), (0, 1), (2, 3))),
    "odd": ((6, 3, 8), LoraAxes((1,), (2,), (0,))),
}
FULL = 6


def _params():
    rng = np.random.default_rng(0)
    p = {name: jnp.asarray(rng.standard_normal(shape), jnp.float32) for name, (shape, _) in KERNELS.items()}
    p["bias"] = jnp.asarray(rng.standard_normal(6), jnp.float32)
    return p


def apply(p, x):
    """Uses every kernel: plain matmuls, layers picked from stacks, DenseGeneral einsums, a transpose."""
    bsz = x.shape[0]
    y = x @ p["q"] + x @ p["v"] + p["bias"]
    for layer in range(3):
        y = y + x @ p["odd"][:, layer, :].T
    return y + jnp.einsum("bjk,jkmn->bmn", x.reshape(bsz, 2, 4), p["dg"]).reshape(bsz, 6)


def _adapter(seed, ranks, scale=1.0, skip=()):
    """Random a and b (b nonzero, unlike lj.init) of rank ranks[name] at each kernel; None at `skip`."""
    out = {"bias": None}
    for i, (name, (shape, ax)) in enumerate(KERNELS.items()):
        if name in skip:
            out[name] = None
            continue
        r = ranks if isinstance(ranks, int) else ranks[name]
        pick = lambda axes: tuple(shape[j] for j in axes)  # noqa: E731, B023
        rng = np.random.default_rng([seed, i])
        a = jnp.asarray(0.5 * rng.standard_normal((*pick(ax.stack), *pick(ax.inputs), r)), jnp.float32)
        b = jnp.asarray(0.5 * rng.standard_normal((*pick(ax.stack), r, *pick(ax.outputs))), jnp.float32)
        out[name] = lj.LoraDelta(a, b, scale=scale, axes=ax)
    return out


def _np_dw(d):
    """s·a·b in W's layout, float64, from the factors (independently of lj.delta_weight)."""
    ax = d.axes
    ns = len(ax.stack)
    a, b = np.asarray(d.a, np.float64), np.asarray(d.b, np.float64)
    stack, ins, outs = a.shape[:ns], a.shape[ns:-1], b.shape[ns + 1 :]
    m, n = int(np.prod(ins)), int(np.prod(outs))
    prod = d.scale * (a.reshape(*stack, m, d.rank) @ b.reshape(*stack, d.rank, n))
    prod = prod.reshape(*stack, *ins, *outs)
    return np.transpose(prod, np.argsort(ax.stack + ax.inputs + ax.outputs))


def _canonical(dw, ax):
    """W-layout array -> (*stack, m, n)."""
    t = np.transpose(dw, ax.stack + ax.inputs + ax.outputs)
    ns, ni = len(ax.stack), len(ax.inputs)
    return t.reshape(*t.shape[:ns], int(np.prod(t.shape[ns : ns + ni])), -1)


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_combine_is_the_weighted_sum_exactly(jit):
    ads = [
        _adapter(1, 2, scale=2.0),
        _adapter(2, {"q": 3, "dg": 4, "odd": 1}, scale=0.5, skip=("v",)),
        _adapter(3, 4, scale=1.5),
    ]
    weights = [0.5, -1.0, 2.0]
    fn = jax.jit(lj.combine) if jit else lj.combine
    c = fn(ads, jnp.asarray(weights) if jit else weights)  # traced weights under jit
    assert c["bias"] is None
    for name in KERNELS:
        want = sum(w * _np_dw(ad[name]) for w, ad in zip(weights, ads, strict=True) if ad[name] is not None)
        got = c[name]
        assert got.scale == 1.0 and got.axes == KERNELS[name][1]
        assert got.rank == sum(ad[name].rank for ad in ads if ad[name] is not None)
        _close(_np_dw(got), want, 1e-6)


def test_combine_takes_a_mapping_and_keeps_all_none_leaves():
    ads = {"x": _adapter(1, 2, skip=("q",)), "y": _adapter(2, 3, skip=("q",))}
    c = lj.combine(ads, {"y": 3.0, "x": 1.0})
    assert c["q"] is None
    _close(_np_dw(c["v"]), _np_dw(ads["x"]["v"]) + 3.0 * _np_dw(ads["y"]["v"]), 1e-6)


def test_combined_adapter_works_in_wrap_merge_and_files(tmp_path):
    params = _params()
    ads = [_adapter(1, 2, scale=2.0), _adapter(2, 3, scale=0.5, skip=("dg",))]
    c = lj.combine(ads, [1.0, -0.5])
    x = jnp.asarray(np.random.default_rng(9).standard_normal((4, 8)), jnp.float32)
    # The reference: params with Σ w ΔW added by hand in float64.
    by_hand = {
        k: v
        if k == "bias"
        else v + sum(w * _np_dw(a[k]) for w, a in zip([1.0, -0.5], ads) if a[k] is not None)
        for k, v in params.items()
    }
    want = apply(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), by_hand), x)
    _close(apply(lj.merge(params, c), x), want, 1e-5)
    _close(jax.jit(lj.wrap(apply))(params, c, x), want, 1e-5)
    spec = lj.LoraSpec(rank=5, targets="q|v|dg|odd", axes={k: ax for k, (_, ax) in KERNELS.items()})
    file = lj.adapter.save_adapter(tmp_path / "c", c, spec, verbose=False)
    back = lj.adapter.load_adapter(file, params)
    for name in KERNELS:
        np.testing.assert_array_equal(back[name].a, c[name].a)
        assert back[name].scale == c[name].scale


def test_dtypes_of_mixed_and_low_precision_adapters():
    d = _adapter(1, 2, scale=2.0)["q"]
    half = lj.LoraDelta(d.a.astype(jnp.bfloat16), d.b.astype(jnp.bfloat16), scale=2.0)
    mixed = lj.combine([{"q": half}, {"q": d}], [1.0, 1.0])["q"]  # the widest dtype, exact
    assert mixed.a.dtype == mixed.b.dtype == jnp.float32
    _close(_np_dw(mixed), _np_dw(half) + _np_dw(d), 1e-6)
    r = lj.rerank(half, 2)  # computed in float32, returned in the delta's dtype
    assert r.a.dtype == r.b.dtype == jnp.bfloat16
    _close(_np_dw(r), _np_dw(half), 1e-2)  # bfloat16 rounding of the factors


def test_results_export_to_peft():
    """PEFT's ΔW of the exported module, (alpha / r)·B·A, is our ΔW transposed (scale 1 -> alpha = r)."""
    from lora_jax import peft as lpeft

    def llama_tree(d):
        return {"params": {"layers_0": {"attn": {"query": {"kernel": d}}}}}

    ads = [llama_tree(_adapter(1, 2, scale=2.0)["q"]), llama_tree(_adapter(2, 3, scale=0.5)["q"])]
    c = lj.combine(ads, [1.0, -1.0])
    for d in (c, lj.rerank(c, 4)):
        cfg, tensors = lpeft.to_peft(d, "llama")
        ours = d["params"]["layers_0"]["attn"]["query"]["kernel"]
        module = "base_model.model.model.layers.0.self_attn.q_proj"
        r = cfg["rank_pattern"].get("model.layers.0.self_attn.q_proj", cfg["r"])
        alpha = cfg["alpha_pattern"].get("model.layers.0.self_attn.q_proj", cfg["lora_alpha"])
        dw = alpha / r * tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
        assert r == ours.rank
        _close(dw.T, _np_dw(ours), 1e-6)


# ---------------------------------------------------------------------------------------------------------
# rerank
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit,k", [(False, 2), (False, 6), (True, 3)])
def test_rerank_is_the_truncated_svd(jit, k):
    d = lj.combine([_adapter(1, 3, scale=2.0), _adapter(2, 4, scale=0.5)], [1.0, -1.0])  # rank 7 > 6
    fn = jax.jit(lj.rerank, static_argnums=1) if jit else lj.rerank
    r = fn(d, k)
    for name, (_, ax) in KERNELS.items():
        dense = _canonical(_np_dw(d[name]), ax)  # (*stack, 8, 6)
        u, s, vt = np.linalg.svd(dense, full_matrices=False)
        best = (u[..., :k] * s[..., None, :k]) @ vt[..., :k, :]
        got = _canonical(_np_dw(r[name]), ax)
        assert r[name].a.shape[-1] == k and r[name].scale == 1.0 and r[name].axes == ax
        # Frobenius error equal to the optimal one (Eckart-Young), per stacked layer.
        norm = np.linalg.norm(dense, axis=(-2, -1))
        err = np.linalg.norm(dense - got, axis=(-2, -1))
        optimal = np.sqrt((s[..., k:] ** 2).sum(-1))
        assert np.all(np.abs(err - optimal) <= 1e-5 * norm), (name, err, optimal)
        _close(got, best, 1e-5)  # the approximation itself (σ are distinct here)


def test_rerank_scale_convention_and_padding():
    d = _adapter(1, 2, scale=3.0)
    kept = lj.rerank(d, 2, scale=None)
    chosen = lj.rerank(d, 2, scale=0.25)
    for name in KERNELS:
        assert kept[name].scale == 3.0 and chosen[name].scale == 0.25
        for r in (kept, chosen):  # rank 2 -> 2: exact
            _close(_np_dw(r[name]), _np_dw(d[name]), 1e-5)
        # Singular values split evenly: the factors have the same Frobenius norm.
        a, b = chosen[name].a, chosen[name].b
        np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(b), rtol=1e-5)
    padded = lj.rerank(d["odd"], 5)  # one delta is a tree too; rank 2 -> 5: exact, the rest zero
    assert isinstance(padded, lj.LoraDelta) and padded.rank == 5 and padded.b.shape == (3, 5, 6)
    _close(_np_dw(padded), _np_dw(d["odd"]), 1e-5)
    assert not np.asarray(padded.a[..., 2:]).any() and not np.asarray(padded.b[:, 2:]).any()


# ---------------------------------------------------------------------------------------------------------
# TIES / DARE / magnitude prune: a NumPy reference written here
# ---------------------------------------------------------------------------------------------------------


def _np_trim(t, density, ax):
    """Keeps the int(density·N) largest |t| per stacked layer (np.argsort)."""
    if density >= 1:
        return t
    ns = len(ax.stack)
    rest = [i for i in range(t.ndim) if i not in ax.stack]
    moved = np.transpose(t, list(ax.stack) + rest)
    flat = moved.reshape(int(np.prod(moved.shape[:ns])), -1).copy()
    keep = int(density * flat.shape[1])
    for row in flat:
        row[np.argsort(-np.abs(row), kind="stable")[keep:]] = 0.0
    return np.transpose(flat.reshape(moved.shape), np.argsort(list(ax.stack) + rest))


def _np_disjoint(taus, weights, method):
    taus = np.stack(taus)
    sign = np.sign(taus)
    votes = taus.sum(0) if method == "total" else sign.sum(0)
    majority = np.where(votes >= 0, 1.0, -1.0)
    agree = sign == majority
    w = np.asarray(weights).reshape(-1, *[1] * (taus.ndim - 1))
    return (w * taus * agree).sum(0) / np.maximum(agree.sum(0), 1)


def _dare_masks(key, name, n, density, shape):
    """The masks as dare_merge documents them."""
    leaf = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return list(np.asarray(jax.random.bernoulli(leaf, density, (n, int(np.prod(shape))))).reshape(n, *shape))


def _np_merge(ads, weights, method, density, key=None, sign="total"):
    out = {}
    for name, (shape, ax) in KERNELS.items():
        taus = [np.zeros(shape) if ad[name] is None else _np_dw(ad[name]) for ad in ads]
        if method in ("dare_linear", "dare_ties"):
            masks = _dare_masks(key, name, len(ads), density, shape)
            taus = [t * m / density for t, m in zip(taus, masks, strict=True)]
        else:
            taus = [_np_trim(t, density, ax) for t in taus]
        if method in ("ties", "dare_ties"):
            out[name] = _np_disjoint(taus, weights, sign)
        else:
            out[name] = sum(w * t for w, t in zip(weights, taus, strict=True))
    return out


def _merge(method, ads, weights, density, k, key=None, sign="total"):
    if method == "ties":
        return lj.ties_merge(ads, weights, density=density, k=k, majority_sign=sign)
    if method == "magnitude_prune":
        return lj.magnitude_prune_merge(ads, weights, density=density, k=k)
    return lj.dare_merge(
        key, ads, weights, density=density, k=k, ties=method == "dare_ties", majority_sign=sign
    )


THREE = (
    lambda: _adapter(1, 2, scale=2.0),
    lambda: _adapter(2, 3, scale=0.5, skip=("v",)),
    lambda: _adapter(3, {"q": 1, "v": 2, "dg": 3, "odd": 2}),
)


# The same cases for NumPy and PEFT, so that the second test reuses the first one's compiled merges.
CASES = [
    ("ties", "total", 0.3),
    ("magnitude_prune", "total", 0.25),
    ("dare_linear", "total", 0.4),
    ("dare_ties", "frequency", 0.6),  # also TIES's "frequency" sign election
]


@pytest.mark.parametrize("method,sign,density", CASES)
def test_dense_merges_match_numpy(method, sign, density):
    ads = [f() for f in THREE]
    weights = [1.0, -0.7, 0.4]
    key = jax.random.key(5)
    want = _np_merge(ads, weights, method, density, key, sign)
    full = _merge(method, ads, weights, density, FULL, key, sign)  # full rank: the merged ΔW itself
    for name in KERNELS:
        _close(_np_dw(full[name]), want[name], 1e-5)
    if (method, sign) != ("ties", "total"):
        return
    low = _merge(method, ads, weights, density, None, key, sign)  # default k: the largest input rank
    for name, (_, ax) in KERNELS.items():
        k = max(ad[name].rank for ad in ads if ad[name] is not None)
        assert low[name].rank == k and low[name].scale == 1.0
        u, s, vt = np.linalg.svd(_canonical(want[name], ax), full_matrices=False)
        _close(
            _canonical(_np_dw(low[name]), ax),
            (u[..., :k] * s[..., None, :k]) @ vt[..., :k, :],
            1e-5,
        )


def test_dare_is_a_function_of_the_key_and_jits():
    ads = [{"q": f()["q"], "bias": None} for f in THREE]  # one kernel: one compile under jit
    fn = functools.partial(lj.dare_merge, density=0.6, k=FULL, ties=True, majority_sign="frequency")
    one = fn(jax.random.key(1), ads, [1.0, 1.0, 1.0])
    again = jax.jit(fn)(jax.random.key(1), ads, jnp.ones(3))
    other = fn(jax.random.key(2), ads, [1.0, 1.0, 1.0])
    _close(_np_dw(again["q"]), _np_dw(one["q"]), 1e-5)
    assert np.abs(_np_dw(other["q"]) - _np_dw(one["q"])).max() > 1e-2


def test_merged_results_work_in_wrap():
    params = _params()
    ads = [f() for f in THREE]
    x = jnp.asarray(np.random.default_rng(9).standard_normal((4, 8)), jnp.float32)
    g = jax.jit(lj.wrap(apply))
    results = {  # all of rank 6, so g compiles once
        "rerank": lj.rerank(lj.combine(ads, [1.0, 0.5, -0.5]), FULL),
        "ties": _merge("ties", ads, [1.0, 0.5, -0.5], 0.3, FULL),
        "dare_ties": _merge("dare_ties", ads, [1.0, 0.5, -0.5], 0.6, FULL, jax.random.key(0), "frequency"),
    }
    for d in results.values():
        _close(g(params, d, x), apply(lj.merge(params, d), x), 1e-5)


# ---------------------------------------------------------------------------------------------------------
# Against PEFT's merge_utils on the same tensors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("method,sign,density", CASES)
def test_dense_merges_match_peft_merge_utils(method, sign, density, monkeypatch):
    torch = pytest.importorskip("torch")
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    ads = [f() for f in THREE]
    weights = [1.0, -0.7, 0.4]
    key = jax.random.key(5)
    ours = _merge(method, ads, weights, density, FULL, key, sign)
    # PEFT sees one (out, in) tensor per module: one per layer of a stacked kernel (odd is (out, L, in)),
    # and only the adapters that have the module (v is missing from the second adapter).
    for name in ("q", "v", "odd"):
        shape, ax = KERNELS[name]
        present = [i for i, ad in enumerate(ads) if ad[name] is not None]
        masks = _dare_masks(key, name, len(ads), density, shape)
        for layer in range(3 if ax.stack else 1):
            pick = (lambda t: t[:, layer, :]) if ax.stack else (lambda t: t.T)  # noqa: B023
            tensors = [torch.tensor(pick(_np_dw(ads[i][name]))) for i in present]
            queue = [torch.tensor(pick(masks[i]).astype(np.float64)) for i in present]
            monkeypatch.setattr(torch, "bernoulli", lambda _p: queue.pop(0))  # noqa: B023
            w = torch.tensor([weights[i] for i in present], dtype=torch.float64)
            if method in ("ties", "dare_ties"):
                got = getattr(merge_utils, method)(tensors, w, density, sign)
            else:
                got = getattr(merge_utils, method)(tensors, w, density)
            mine = pick(_np_dw(ours[name]))
            _close(mine, got.numpy(), 1e-5)


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecation notice
def test_matches_peft_add_weighted_adapter(monkeypatch):
    """End to end against PEFT: two adapters on a tiny Llama (ranks 2 and 3, different alphas, the second
    without v_proj) merged by ``add_weighted_adapter``; PEFT's delta weight of the new adapter equals our
    ΔW transposed for ``cat``, ``svd``, ``ties_svd``, ``dare_linear_svd`` (same masks) and
    ``magnitude_prune_svd``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
    )
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(cfg),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        adapter_name="x",
    )
    model.add_adapter("y", peft.LoraConfig(r=3, lora_alpha=1.5, target_modules=["q_proj"]))
    attn = model.base_model.model.model.layers[0].self_attn
    ours = [{}, {}]
    for i, name in enumerate(("x", "y")):
        for proj in ("q_proj", "v_proj"):
            layer = getattr(attn, proj)
            if name not in layer.lora_A:
                ours[i][proj] = None
                continue
            with torch.no_grad():
                layer.lora_A[name].weight.normal_()
                layer.lora_B[name].weight.normal_()
            a = layer.lora_A[name].weight.detach().numpy().T  # (in, r)
            b = layer.lora_B[name].weight.detach().numpy().T  # (r, out)
            ours[i][proj] = lj.LoraDelta(jnp.asarray(a), jnp.asarray(b), scale=layer.scaling[name])
    weights, key = [0.7, -0.4], jax.random.key(4)
    cases = {
        "cat": (lj.combine(ours, weights), {}),
        "svd": (lj.rerank(lj.combine(ours, weights), 3), dict(svd_rank=3)),
        "ties_svd": (lj.ties_merge(ours, weights, density=0.5, k=3), dict(svd_rank=3, density=0.5)),
        "dare_linear_svd": (
            lj.dare_merge(key, ours, weights, density=0.5, k=3),
            dict(svd_rank=3, density=0.5),
        ),
        "magnitude_prune_svd": (
            lj.magnitude_prune_merge(ours, weights, density=0.5, k=3),
            dict(svd_rank=3, density=0.5),
        ),
    }
    for combination, (mine, kw) in cases.items():
        # PEFT draws one mask per adapter that has the module, in order: feed it ours, as (out, in).
        queue = []
        for proj in ("q_proj", "v_proj"):
            masks = _dare_masks(key, proj, 2, 0.5, (8, 8))
            queue += [
                torch.tensor(masks[i].T.astype(np.float32)) for i in range(2) if ours[i][proj] is not None
            ]
        monkeypatch.setattr(torch, "bernoulli", lambda _p: queue.pop(0))  # noqa: B023
        model.add_weighted_adapter(["x", "y"], weights, combination, combination_type=combination, **kw)
        for proj in ("q_proj", "v_proj"):
            theirs = getattr(attn, proj).get_delta_weight(combination).detach().numpy()  # (out, in)
            _close(_np_dw(mine[proj]).T, theirs, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_bad_input_is_named():
    a, b = _adapter(1, 2), _adapter(2, 2)
    with pytest.raises(ValueError, match="adapters is empty"):
        lj.combine([], [])
    with pytest.raises(ValueError, match="got 2 adapters but 3 weights"):
        lj.combine([a, b], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights must name the same adapters"):
        lj.combine({"x": a, "y": b}, {"x": 1.0, "z": 1.0})
    with pytest.raises(TypeError, match=r"wrap it in a list: lj.combine\(\[deltas\]"):
        lj.combine(a, [1.0])
    with pytest.raises(TypeError, match="list of deltas trees"):
        lj.combine(a["q"], [1.0])
    with pytest.raises(ValueError, match="k must be a positive rank, found k=0"):
        lj.rerank(a, 0)
    with pytest.raises(
        ValueError, match=r"k=7 is above .* at 'dg': W has shape \(2, 4, 2, 3\).* must be <= 6"
    ):
        lj.rerank(a, 7)
    with pytest.raises(ValueError, match=r"ties_merge: k=9 is above .*'dg'.*\(2, 4, 2, 3\)"):
        lj.ties_merge([a, b], [1.0, 1.0], density=0.5, k=9)
    with pytest.raises(TypeError, match="k must be an int"):
        lj.rerank(a, 2.0)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        lj.rerank(a, 2, scale=0.0)
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            lj.ties_merge([a, b], [1.0, 1.0], density=density)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        lj.dare_merge(jax.random.key(0), [a, b], [1.0, 1.0], density=0.0)
    with pytest.raises(ValueError, match="majority_sign must be 'total' or 'frequency'"):
        lj.ties_merge([a, b], [1.0, 1.0], density=0.5, majority_sign="mean")
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        lj.dare_merge([a, b], [1.0, 1.0], [1.0], density=0.5)


def test_incompatible_adapters_are_named():
    a = _adapter(1, 2)
    wide = dict(a, dg=lj.LoraDelta(jnp.ones((2, 4, 2)), jnp.ones((2, 2, 4)), axes=KERNELS["dg"][1]))
    with pytest.raises(
        ValueError,
        match=r"at 'dg' adapters\[0\] and adapters\[1\] are deltas of different kernels: .*"
        r"\(W \(2, 4, 2, 3\)\).*\(W \(2, 4, 2, 4\)\)",
    ):
        lj.combine([a, wide], [1.0, 1.0])
    flipped = dict(a, q=lj.LoraDelta(jnp.ones((6, 2)), jnp.ones((2, 8)), axes=LoraAxes((), (1,), (0,))))
    with pytest.raises(ValueError, match=r"at 'q' adapters\[0\] has LoraAxes.* but adapters\[1\] has"):
        lj.ties_merge([a, flipped], [1.0, 1.0], density=0.5)
    fewer = {k: v for k, v in a.items() if k != "odd"}
    with pytest.raises(
        ValueError, match=r"adapters\[1\] does not have the tree structure.*only in adapters\[0\]: \['odd'\]"
    ):
        lj.combine([a, fewer], [1.0, 1.0])
    dora = dict(a, q=lj.DoraDelta(a["q"].a, a["q"].b, m=jnp.ones(6)))
    with pytest.raises(TypeError, match=r"adapters\[1\] at 'q' is a DoraDelta, not a plain LoraDelta"):
        lj.combine([a, dora], [1.0, 1.0])
    with pytest.raises(TypeError, match=r"deltas at 'q' is a DoraDelta"):
        lj.rerank(dora, 2)
    with pytest.raises(TypeError, match=r"at 'q' is a ndarray"):
        lj.rerank(dict(a, q=np.ones((8, 6))), 2)
