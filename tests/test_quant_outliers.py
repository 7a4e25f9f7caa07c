"""`QuantSpec(outlier_rows=k)`: the k rows with the largest weights kept exactly, the rest NF4/int8.

Checked against a NumPy reference of the definition (rows ranked by their largest |w|, zeroed, NF4 of the
rest, rows written back), through `wrap` (Dense, scan-stacked, tied embedding), save/load and bad values.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Stack, nonzero
from test_quant import MLP, STACKED, TiedLM, check, nf4_numpy, rel_err

import lora_jax as lj
from lora_jax import quant
from lora_jax.train import config as config_lib
from lora_jax.train import loop


def _outliers_numpy(w, k, block):
    """Reference: per stacked layer, the k input rows with the largest |w| kept, the rest NF4 without them."""
    w = np.asarray(w, np.float64)
    rows = np.argsort(np.abs(w).max(axis=-1), axis=-1, kind="stable")[..., -k:]  # (L, k)
    rest = w.copy()
    for i, r in enumerate(rows):
        rest[i, r] = 0.0
    out = nf4_numpy(rest, block)
    for i, r in enumerate(rows):
        out[i, r] = w[i, r]
    return out, np.sort(rows, axis=-1)


def _super_weights(shape, seed=0):
    """Heavy-tailed weights with two planted rows per layer whose values are 30x the others'."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, size=shape).astype(np.float32) * 0.02
    for i in range(shape[0]):
        for r in rng.choice(shape[1], 2, replace=False):
            w[i, r] *= 30.0
    return w


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_outlier_rows_equal_a_numpy_reference(use_jit):
    """Kept rows bit for bit, indices equal the reference's, the rest as the NumPy NF4 (<= 1e-3 of codes
    may differ where a value is within float32 rounding of a midpoint)."""
    w = _super_weights((2, 256, 96))
    spec = lj.QuantSpec(double_quant=False, targets="w", outlier_rows=2)
    f = jax.jit(lambda p: lj.quantize(p, spec)) if use_jit else lambda p: lj.quantize(p, spec)
    q = f({"w": jnp.asarray(w)})["w"]
    want, rows = _outliers_numpy(w, 2, 64)
    np.testing.assert_array_equal(q.outlier_index, rows)
    got = np.asarray(q.dequantize())
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(got[i, r], w[i, r])
    close = np.isclose(got, want, rtol=0, atol=1e-6 * float(np.abs(w).max()))
    assert close.mean() > 1 - 1e-3, close.mean()
    # Plain NF4 on the same weights: its error is far larger (the planted rows set their blocks' scales).
    plain = np.asarray(lj.dequantize(lj.quantize({"w": jnp.asarray(w)}, spec.__class__(targets="w")))["w"])
    err = lambda a: float(np.sqrt(np.mean((a - w) ** 2)))  # noqa: E731
    assert err(got) < 0.5 * err(plain), (err(got), err(plain))
    assert q.outlier_rows == 2 and "outlier_rows=2" in repr(q)


def test_outlier_rows_bytes_and_double_quant():
    """nbytes adds k rows in W's dtype and k int32 indices per layer; double quant composes with it."""
    w = jnp.asarray(_super_weights((3, 128, 40)))
    plain = lj.quantize({"w": w}, lj.QuantSpec(targets="w"))["w"]
    q = lj.quantize({"w": w}, lj.QuantSpec(targets="w", outlier_rows=2))["w"]
    assert q.nbytes == plain.nbytes + 3 * 2 * 40 * 4 + 3 * 2 * 4
    assert q.outlier_values.shape == (3, 2, 40) and q.outlier_index.shape == (3, 2)
    want, _ = _outliers_numpy(w, 2, 64)
    # Double quantization moves each scale by < 1% of the largest: values within that of the reference.
    assert float(np.abs(np.asarray(q.dequantize()) - want).max()) < 0.01 * float(np.abs(want).max())
    shaped = quant.abstract_quantize(
        {"w": jax.ShapeDtypeStruct(w.shape, w.dtype)}, lj.QuantSpec(targets="w", outlier_rows=2)
    )
    assert shaped["w"].nbytes == q.nbytes


def test_wrap_scan_stacked_with_outlier_rows():
    """Values and delta gradients as fn(merge(dequantize(q), d)), no fallback, on nn.scan-stacked layers."""
    qspec = lj.QuantSpec(block_size=16, targets=".*/kernel", outlier_rows=3)
    m = Stack()
    xs = jax.random.normal(jax.random.key(1), (2, 5, 32))
    vs = m.init(jax.random.key(0), xs)
    lspec = lj.LoraSpec(rank=3, targets=".*/query/kernel", axes={".*/kernel": STACKED})
    q, _ = check(m.apply, vs, qspec, lspec, (xs,))
    assert q["params"]["layers"]["query"]["kernel"].outlier_index.shape == (3, 3)


def test_tied_embedding_with_outlier_rows():
    """An embedding lookup decodes only the gathered rows (block axis -1), the outlier parts gathered with
    them; the tied output head decodes the whole table: values as fn(merge(dequantize(q), d)) to 1e-5."""
    ids = jax.random.randint(jax.random.key(1), (3, 7), 0, 64)
    v = TiedLM().init(jax.random.key(0), ids)
    qspec = lj.QuantSpec(
        block_size=16, targets=".*/(embedding|kernel)", block_axis={".*/embedding": -1}, outlier_rows=2
    )
    q = lj.quantize(v, qspec)
    d = nonzero(lj.init(jax.random.key(0), q, lj.LoraSpec(rank=4, targets=".*/(embedding|kernel)")))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)
        got = jax.jit(lj.wrap(TiedLM().apply))(q, d, ids)
    want = TiedLM().apply(lj.merge(lj.dequantize(q), d), ids)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert q["params"]["embed"]["embedding"].outlier_index.shape == (64, 2)


def test_save_load_round_trip_with_outlier_rows(tmp_path):
    v = MLP().init(jax.random.key(0), jnp.ones((1, 32)))
    v = jax.tree.map(lambda t: t.astype(jnp.bfloat16), v)
    q = lj.quantize(v, lj.QuantSpec(block_size=16, outlier_rows=2))
    back = quant.load(quant.save(tmp_path / "base", q, model="mlp"), like=v)
    want = jax.tree_util.tree_flatten_with_path(q, is_leaf=quant.is_quantized)[0]
    got = jax.tree_util.tree_flatten_with_path(back, is_leaf=quant.is_quantized)[0]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert type(a) is type(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert back["params"]["query"]["kernel"].outlier_values.dtype == jnp.bfloat16


def test_file_with_outlier_rows_must_hold_them(tmp_path):
    """Every base is written as format version 3 (older readers refuse it); a file whose header records
    outlier rows (or double quantization) but lacks their tensors is refused, not decoded without them."""
    import json

    from safetensors.numpy import load_file, save_file

    v = MLP().init(jax.random.key(0), jnp.ones((1, 32)))
    plain = quant.save(tmp_path / "plain", lj.quantize(v, lj.QuantSpec(block_size=16)), model="mlp")
    assert quant.info(plain)["format"] == "lora_jax.quantized_base/3"
    file = quant.save(
        tmp_path / "base", lj.quantize(v, lj.QuantSpec(block_size=16, outlier_rows=2)), model="mlp"
    )
    header = quant.info(file)
    assert header["format"] == "lora_jax.quantized_base/3"
    from safetensors import safe_open

    with safe_open(str(file), "np") as f:
        meta = f.metadata()
    tensors = {k: x for k, x in load_file(str(file)).items() if "query/kernel::outlier" not in k}
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"query/kernel is recorded with .*outlier_rows=2.*damaged"):
        quant.load(tmp_path / "cut.safetensors")
    meta = {k: json.dumps({**json.loads(x), "format": "lora_jax.quantized_base/9"}) for k, x in meta.items()}
    save_file(load_file(str(file)), str(tmp_path / "new.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"unknown quantized base format 'lora_jax.quantized_base/9'"):
        quant.load(tmp_path / "new.safetensors")


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_bad_outlier_rows_rejected(bad):
    with pytest.raises(ValueError, match=r"QuantSpec.outlier_rows=.* must be an int >= 0"):
        lj.QuantSpec(outlier_rows=bad)


def test_outlier_rows_covering_the_block_axis_rejected():
    with pytest.raises(
        ValueError,
        match=r"w: QuantSpec.outlier_rows=64 keeps all 64 rows \(or more\) along its block axis 0",
    ):
        lj.quantize({"w": jnp.ones((64, 4))}, lj.QuantSpec(targets="w", outlier_rows=64))


def test_finetune_flag_quant_outlier_rows():
    cfg = config_lib.from_args(["--model", "tiny-llama", "--quantize", "nf4", "--quant-outlier-rows", "2"])
    assert loop.quant_spec(cfg).outlier_rows == 2
    with pytest.raises(
        ValueError, match=r"--quant-outlier-rows 2 keeps rows of a quantized base exactly: add --quantize"
    ):
        config_lib.TrainConfig(quant_outlier_rows=2)
    with pytest.raises(ValueError, match=r"--quant-outlier-rows must be an int >= 0, got -1"):
        config_lib.TrainConfig(quantize="nf4", quant_outlier_rows=-1)


def test_finetune_outlier_rows_default_follows_the_format(tmp_path):
    """``--quantize nf4`` keeps 2 outlier rows unless told otherwise; int8 and a float base keep none; an
    adapter trained on a float base and scored with ``--quantize nf4`` gets nf4's default, a stored nf4
    choice is kept; a checkpoint saved before the flag existed ran plain NF4, and resumes as such."""
    import dataclasses

    from lora_jax import checkpoint
    from lora_jax.train import resume

    assert config_lib.TrainConfig().quant_outlier_rows == 0
    assert config_lib.from_args(["--quantize", "nf4"]).quant_outlier_rows == 2
    assert config_lib.from_args(["--quantize", "int8"]).quant_outlier_rows == 0
    assert config_lib.from_args(["--quantize", "nf4", "--quant-outlier-rows", "0"]).quant_outlier_rows == 0
    stored = lambda **kw: {"extra": {"config": dataclasses.asdict(config_lib.TrainConfig(**kw))}}  # noqa: E731
    assert config_lib.from_adapter(stored(), "a", quantize="nf4").quant_outlier_rows == 2
    plain = stored(quantize="nf4", quant_outlier_rows=0)
    assert config_lib.from_adapter(plain, "a").quant_outlier_rows == 0
    assert config_lib.from_adapter(plain, "a", quantize="nf4").quant_outlier_rows == 0
    cfg = config_lib.TrainConfig(model="tiny-llama", quantize="nf4", quant_outlier_rows=0)
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "quant_outlier_rows"}
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", every=1)
    try:
        ckpt.save(2, {"w": jnp.zeros(3)}, {"config": old})
        ckpt.wait()
        assert resume.check_resume(ckpt, cfg) is True
        with pytest.raises(ValueError, match=r"\{'quant_outlier_rows': \(0, 2\)\}"):
            resume.check_resume(ckpt, dataclasses.replace(cfg, quant_outlier_rows=2))
    finally:
        ckpt.close()
