"""LoraSpec / LoraAxes: selection by full-path regex, per-leaf overrides, scaling, init, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import LoraAxes, LoraSpec

pytestmark = pytest.mark.strict_rank  # also no implicit rank promotion here


def _gpt_params():
    """A GPT-like Linen params tree: paths such as ``params/h_3/attn/query/kernel``."""

    def block(i):  # numpy leaves: init only needs shapes and dtypes, and this keeps the tests fast
        return {
            "attn": {
                n: {"kernel": np.full((32, 32), i, np.float32), "bias": np.zeros(32, np.float32)}
                for n in ("query", "key", "value")
            },
            "mlp": {"kernel": np.full((32, 64), i, np.float32), "bias": np.zeros(64, np.float32)},
        }

    return {"params": {f"h_{i}": block(i) for i in range(4)}}


KEY = jax.random.key(0)


# --- scale ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank, alpha, rslora, want",
    [
        (4, 8.0, False, 2.0),  # alpha / rank
        (4, 8.0, True, 4.0),  # alpha / sqrt(rank)
        (16, 16.0, False, 1.0),
        (16, 16.0, True, 4.0),
        (8, 1.0, True, 1 / math.sqrt(8)),
    ],
)
def test_scale(rank, alpha, rslora, want):
    spec = LoraSpec(rank=rank, alpha=alpha, rslora=rslora, targets=".*")
    assert spec.scale_for("anything") == pytest.approx(want, rel=1e-12)
    params = {"w": jnp.ones((32, 32))}
    assert lj.init(KEY, params, spec)["w"].scale == pytest.approx(want, rel=1e-12)


# --- targets / exclude ---------------------------------------------------------------------------


def _targeted(deltas):
    return sorted(
        lj.spec.path_str(p)
        for p, d in jax.tree_util.tree_flatten_with_path(deltas, is_leaf=lj.is_delta)[0]
        if lj.is_delta(d)
    )


def test_targets_single_regex_full_match():
    deltas = lj.init(KEY, _gpt_params(), LoraSpec(rank=2, targets=r".*/(query|value)/kernel"))
    assert _targeted(deltas) == sorted(
        f"params/h_{i}/attn/{n}/kernel" for i in range(4) for n in ("query", "value")
    )
    # Every non-target is None, including the biases next to targeted kernels.
    assert deltas["params"]["h_0"]["attn"]["query"]["bias"] is None
    assert deltas["params"]["h_0"]["attn"]["key"]["kernel"] is None


def test_targets_is_full_match_not_search():
    p = _gpt_params()
    # "query/kernel" is a substring of the paths but does not match them whole.
    with pytest.raises(ValueError, match="match no parameter"):
        lj.init(KEY, p, LoraSpec(rank=2, targets="query/kernel"))
    # A pattern matching a prefix only ("params/h_0/attn/query") does not select the kernel below it.
    with pytest.raises(ValueError, match="match no parameter"):
        lj.init(KEY, p, LoraSpec(rank=2, targets="params/h_0/attn/query"))
    assert _targeted(lj.init(KEY, p, LoraSpec(rank=2, targets="params/h_0/attn/query/kernel"))) == [
        "params/h_0/attn/query/kernel"
    ]


def test_targets_sequence_and_exclude():
    spec = LoraSpec(rank=2, targets=[r".*/query/kernel", r".*/mlp/kernel"], exclude=r"params/h_[01]/.*")
    assert spec.targets == (r".*/query/kernel", r".*/mlp/kernel")
    assert _targeted(lj.init(KEY, _gpt_params(), spec)) == [
        "params/h_2/attn/query/kernel",
        "params/h_2/mlp/kernel",
        "params/h_3/attn/query/kernel",
        "params/h_3/mlp/kernel",
    ]
    # exclude as a sequence
    spec = LoraSpec(rank=2, targets=".*/kernel", exclude=(".*/mlp/.*", ".*/key/.*", r"params/h_[123]/.*"))
    assert _targeted(lj.init(KEY, _gpt_params(), spec)) == [
        "params/h_0/attn/query/kernel",
        "params/h_0/attn/value/kernel",
    ]


def test_no_match_lists_closest_paths():
    with pytest.raises(
        ValueError, match=r"match no parameter.*Closest available paths: \['params/h_\d/attn/query/kernel'"
    ):
        lj.init(KEY, _gpt_params(), LoraSpec(rank=2, targets=r".*/qurey/kernel"))  # typo


def test_closest_ranks_by_similarity_and_keeps_ties_in_order():
    from lora_jax._closest import closest

    paths = [
        "params/h_0/mlp/kernel",
        "params/h_0/attn/key/kernel",
        "params/h_0/attn/query/kernel",
        "params/h_1/attn/query/kernel",
    ]
    # Best first; the equally close h_0 and h_1 query kernels keep their order in `paths`.
    assert closest("params/h_2/attn/query/kernel", paths, n=3) == [
        "params/h_0/attn/query/kernel",
        "params/h_1/attn/query/kernel",
        "params/h_0/attn/key/kernel",
    ]
    # Regex syntax is ignored when comparing a pattern; several queries: each path scores its best match.
    assert closest(r".*/qurey/kernel", paths, n=1, regex=True) == ["params/h_0/attn/query/kernel"]
    assert closest(["zzz", "params/h_0/mlp/kernel"], paths, n=1) == ["params/h_0/mlp/kernel"]
    assert closest("x", paths, n=0) == [] and closest("x", [], n=3) == []
    assert len(closest("x", paths)) == 4  # n larger than the candidates: all of them, none twice


def test_closest_is_the_top_n_of_difflib_ratio():
    import difflib
    import random

    from lora_jax._closest import closest

    rng = random.Random(0)
    word = lambda: "".join(rng.choice("ab/_0") for _ in range(rng.randint(0, 8)))
    for _ in range(300):
        queries, paths, n = (
            [word() for _ in range(rng.randint(1, 3))],
            [word() for _ in range(rng.randint(0, 9))],
            3,
        )

        def score(p, queries=queries):
            return max(difflib.SequenceMatcher(None, p, q, autojunk=False).ratio() for q in queries)

        assert closest(queries, paths, n) == sorted(paths, key=lambda p: -score(p))[:n], (queries, paths)


def test_exclude_removing_everything_is_an_error():
    with pytest.raises(ValueError, match=r"exclude \['.\*'\].*match no parameter"):
        lj.init(KEY, _gpt_params(), LoraSpec(rank=2, targets=".*/kernel", exclude=".*"))


# --- rank / alpha patterns -----------------------------------------------------------------------


def test_rank_and_alpha_pattern_overrides():
    spec = LoraSpec(
        rank=4,
        alpha=8.0,
        targets=r".*/(query|value|mlp)/kernel",
        rank_pattern={r".*/mlp/kernel": 8, r"params/h_0/.*": 2, r".*/value/kernel": 16},
        alpha_pattern={r".*/value/kernel": 4.0},
    )
    d = lj.init(KEY, _gpt_params(), spec)["params"]
    q1, v1, m0, m1 = (
        d["h_1"]["attn"]["query"]["kernel"],
        d["h_1"]["attn"]["value"]["kernel"],
        d["h_0"]["mlp"]["kernel"],
        d["h_1"]["mlp"]["kernel"],
    )
    assert (q1.rank, q1.scale) == (4, 2.0)  # defaults
    assert (v1.rank, v1.scale) == (16, 4.0 / 16)  # both overrides
    assert (m1.rank, m1.scale) == (8, 1.0)  # rank override, default alpha
    assert (m0.rank, m0.scale) == (8, 1.0)  # first full match wins (mlp before h_0)
    assert d["h_0"]["attn"]["query"]["kernel"].rank == 2
    assert m1.a.shape == (32, 8) and m1.b.shape == (8, 64)


def test_pattern_matching_no_targeted_leaf():
    p = _gpt_params()
    # matches a real parameter, but one that is not targeted
    with pytest.raises(ValueError, match=r"rank_pattern key '\.\*/key/kernel' matches no targeted parameter"):
        lj.init(KEY, p, LoraSpec(rank=2, targets=".*/query/kernel", rank_pattern={".*/key/kernel": 4}))
    with pytest.raises(ValueError, match=r"alpha_pattern key 'query' matches no targeted parameter"):
        lj.init(KEY, p, LoraSpec(rank=2, targets=".*/query/kernel", alpha_pattern={"query": 4.0}))
    with pytest.raises(ValueError, match=r"axes key .* matches no targeted parameter"):
        lj.init(KEY, p, LoraSpec(rank=2, targets=".*/query/kernel", axes={".*/mlp/kernel": LoraAxes()}))


# --- init distributions and dtype ----------------------------------------------------------------


def test_kaiming_uniform_bounds_and_zero_b():
    params = {"w": jnp.ones((256, 64)), "conv": jnp.ones((3, 3, 16, 8))}
    spec = LoraSpec(rank=8, targets=["w", "conv"], axes={"conv": LoraAxes(inputs=(0, 1, 2), outputs=(3,))})
    d = lj.init(KEY, params, spec)
    for name, fan_in in (("w", 256), ("conv", 3 * 3 * 16)):
        a, b = np.asarray(d[name].a), np.asarray(d[name].b)
        bound = 1 / math.sqrt(fan_in)
        assert a.dtype == np.float32 and np.abs(a).max() <= bound
        # U(-bound, bound): 1152+ samples, so the extremes come within 5% of the bound and the std is
        # bound/sqrt(3) within 10% (a wrong fan_in, e.g. 16 instead of 144, is off by 3x).
        assert np.abs(a).max() > 0.95 * bound
        assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert not np.any(b) and b.dtype == np.float32


def test_gaussian_init():
    d = lj.init(KEY, {"w": jnp.ones((512, 64))}, LoraSpec(rank=4, targets="w", init="gaussian"))["w"]
    a = np.asarray(d.a)
    # a ~ N(0, std 1/r) (PEFT): 2048 samples, std within 5%, mean within 4 standard errors.
    assert a.std() == pytest.approx(1 / 4, rel=0.05)
    assert abs(a.mean()) < 4 * (1 / 4) / math.sqrt(a.size)
    assert not np.any(np.asarray(d.b))


@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.bfloat16, "bfloat16", jnp.float16])
def test_delta_dtype(dtype):
    d = lj.init(KEY, {"w": jnp.ones((8, 4), jnp.bfloat16)}, LoraSpec(rank=2, targets="w", dtype=dtype))["w"]
    want = jnp.float32 if dtype is None else jnp.dtype(dtype)
    assert d.a.dtype == want and d.b.dtype == want


def test_explicit_axes_dense_general():
    # DenseGeneral (embed, heads, head_dim): inputs (embed,), outputs (heads, head_dim)
    params = {"qkv": {"kernel": jnp.ones((32, 4, 8))}}
    spec = LoraSpec(rank=4, targets=".*kernel", axes={".*kernel": LoraAxes(inputs=(0,), outputs=(1, 2))})
    d = lj.init(KEY, params, spec)["qkv"]["kernel"]
    assert d.a.shape == (32, 4) and d.b.shape == (4, 4, 8)
    # out projection (heads, head_dim, embed), axes given with negative indices
    params = {"out": {"kernel": jnp.ones((4, 8, 32))}}
    spec = LoraSpec(rank=4, targets=".*kernel", axes={".*kernel": LoraAxes(inputs=(0, 1), outputs=(-1,))})
    d = lj.init(KEY, params, spec)["out"]["kernel"]
    assert d.a.shape == (4, 8, 4) and d.b.shape == (4, 32) and d.axes == LoraAxes(inputs=(0, 1), outputs=(2,))


def test_spec_is_hashable_and_a_static_argument():
    s1 = LoraSpec(rank=4, targets=["w"], rank_pattern={"w": 2}, axes={"w": LoraAxes()})
    s2 = LoraSpec(rank=4, targets=("w",), rank_pattern={"w": 2}, axes={"w": LoraAxes()})
    assert s1 == s2 and hash(s1) == hash(s2)
    f = jax.jit(lambda p, spec: lj.init(KEY, p, spec)["w"].a, static_argnums=1)
    assert f({"w": jnp.ones((8, 4))}, s1).shape == (8, 2)


def test_numpy_integer_rank_is_accepted():
    assert LoraSpec(rank=np.int64(4), targets="w").rank == 4


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match=r"LoraSpec.rank=.*the rank must be a positive int"):
        LoraSpec(rank=rank)


def test_bad_rank_pattern_value():
    with pytest.raises(ValueError, match=r"rank_pattern\['w'\]=0: the rank must be a positive int"):
        LoraSpec(rank=2, targets="w", rank_pattern={"w": 0})


def test_rank_larger_than_kernel_allows():
    p = {"w": jnp.ones((16, 4)), "conv": jnp.ones((3, 3, 2, 8))}
    with pytest.raises(ValueError, match=r"w: rank 5 is larger than this kernel allows.*\(16, 4\).*<= 4"):
        lj.init(KEY, p, LoraSpec(rank=5, targets="w"))
    # conv: fan_in = 3*3*2 = 18, fan_out = 8
    with pytest.raises(ValueError, match=r"conv: rank 9 .*must be <= 8"):
        lj.init(
            KEY, p, LoraSpec(rank=9, targets="conv", axes={"conv": LoraAxes(inputs=(0, 1, 2), outputs=(3,))})
        )
    with pytest.raises(ValueError, match=r"rank 5 is larger"):  # through rank_pattern
        lj.init(KEY, p, LoraSpec(rank=2, targets="w", rank_pattern={"w": 5}))


def test_target_not_floating():
    p = {"w": jnp.ones((8, 8), jnp.int32), "v": jnp.ones((8, 8))}
    with pytest.raises(TypeError, match=r"w: LoRA targets must be floating-point arrays.*int32"):
        lj.init(KEY, p, LoraSpec(rank=2, targets="w|v"))


def test_target_with_fewer_than_two_dims():
    p = {"dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}}
    with pytest.raises(ValueError, match=r"dense/bias: LoRA targets need at least 2 dims.*\(8,\).*bias"):
        lj.init(KEY, p, LoraSpec(rank=2, targets="dense/.*"))


def test_kernel_above_2d_needs_axes():
    p = {"qkv": {"kernel": jnp.ones((32, 4, 8))}}
    with pytest.raises(
        ValueError,
        match=r"qkv/kernel: kernel of shape \(32, 4, 8\).*no axes were given.*"
        r"axes=.*fn=apply_fn",
    ):
        lj.init(KEY, p, LoraSpec(rank=2, targets=".*kernel"))


def test_axes_that_do_not_fit_the_kernel():
    p = {"k": jnp.ones((32, 4, 8))}
    for bad in (
        LoraAxes(inputs=(0,), outputs=(1,)),  # misses axis 2
        LoraAxes(inputs=(0, 1), outputs=(1, 2)),  # axis 1 twice
        LoraAxes(inputs=(0, 1, 2), outputs=()),
    ):  # no output axis
        with pytest.raises(ValueError, match=r"k: axes .* do not fit a 3-D kernel"):
            lj.init(KEY, p, LoraSpec(rank=2, targets="k", axes={"k": bad}))


@pytest.mark.parametrize("field", ["targets", "exclude", "rank_pattern", "alpha_pattern", "axes"])
def test_invalid_regex(field):
    kw = {"targets": "w", "exclude": (), "rank_pattern": {}, "alpha_pattern": {}, "axes": {}}
    kw[field] = {
        "targets": "(w",
        "exclude": ["ok", "[w"],
        "rank_pattern": {"w(": 2},
        "alpha_pattern": {"*w": 1.0},
        "axes": {"w)": LoraAxes()},
    }[field]
    with pytest.raises(ValueError, match=rf"LoraSpec.{field}: .* is not a valid regular expression"):
        LoraSpec(rank=2, **kw)


def test_bad_pattern_types():
    with pytest.raises(TypeError, match=r"LoraSpec.targets must be a regex string or a sequence"):
        LoraSpec(targets=[r".*", 3])
    with pytest.raises(TypeError, match=r"alpha_pattern\['w'\] must be a number"):
        LoraSpec(targets="w", alpha_pattern={"w": "16"})
    with pytest.raises(TypeError, match=r"LoraSpec.alpha must be a number"):
        LoraSpec(targets="w", alpha="16")
    with pytest.raises(TypeError, match=r"axes\['w'\] must be a LoraAxes"):
        LoraSpec(targets="w", axes={"w": (0, 1)})
    with pytest.raises(ValueError, match="targets is empty"):
        LoraSpec(targets=())


def test_bad_init_name():
    with pytest.raises(ValueError, match=r"LoraSpec.init='xavier' is not one of \('kaiming', 'gaussian'\)"):
        LoraSpec(init="xavier")


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.1"])
def test_dropout_out_of_range(rate):
    with pytest.raises(ValueError, match=r"LoraSpec.dropout=.* must be in \[0, 1\)"):
        LoraSpec(dropout=rate)


@pytest.mark.parametrize("dtype", [jnp.int32, "int8", bool, "not-a-dtype"])
def test_bad_delta_dtype(dtype):
    with pytest.raises(TypeError, match=r"LoraSpec.dtype=.* is not a floating-point dtype"):
        LoraSpec(dtype=dtype)
