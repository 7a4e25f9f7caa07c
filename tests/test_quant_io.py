"""Quantized-base files: checksums, part shapes and dtypes checked against the quantizer, `like=` checks,
old format versions refused, and placing a quantized tree on a mesh (`load(shardings=)`, `quant.shardings`).

Every check is exact (bytes, CRC32s, shapes, dtypes, sharding specs): no tolerances.
"""

import json
import struct
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_processes
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax import quant
from lora_jax._checksums import json_crc32
from lora_jax.quant import io as qio

_SPEC = lj.QuantSpec(block_size=16, outlier_rows=2, targets=".*/kernel")  # every kind of part


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(params, quantized params, file)``: a float32 kernel, a bfloat16 stacked kernel, a dense bias."""
    k = jax.random.split(jax.random.key(0), 2)
    params = {
        "a": {"kernel": jax.random.normal(k[0], (64, 8)), "bias": jnp.arange(8.0)},
        "s": {"kernel": jax.random.normal(k[1], (2, 32, 8), jnp.bfloat16)},
    }
    q = jax.jit(lambda p: lj.quantize(p, _SPEC))(params)  # one compilation for both kernels
    return params, q, quant.save(tmp_path_factory.mktemp("q") / "base", q, model="toy")


def _layout(raw: bytes) -> tuple[int, dict]:
    """(start of the data area, safetensors JSON header) of a file's bytes."""
    n = struct.unpack("<Q", raw[:8])[0]
    return 8 + n, json.loads(raw[8 : 8 + n])


def _with_header(raw: bytes, edit, *, fix_crc: bool = True) -> bytes:
    """The file's bytes with its quantized-base header edited by `edit(header)` (and its CRC recomputed)."""
    start, table = _layout(raw)
    header = json.loads(table["__metadata__"][qio._KEY])
    edit(header)
    if fix_crc:
        header[qio._HEADER_CRC] = json_crc32(header, qio._HEADER_CRC)
    table["__metadata__"] = {qio._KEY: json.dumps(header)}
    h = json.dumps(table).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + raw[start:]


def _same(x, y) -> bool:
    lx = jax.tree_util.tree_flatten_with_path(x, is_leaf=quant.is_quantized)[0]
    ly = jax.tree_util.tree_flatten_with_path(y, is_leaf=quant.is_quantized)[0]
    assert [p for p, _ in lx] == [p for p, _ in ly]
    for (_, a), (_, b) in zip(lx, ly, strict=True):
        assert type(a) is type(b) and getattr(a, "meta", None) == getattr(b, "meta", None)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert u.dtype == v.dtype and np.asarray(u).tobytes() == np.asarray(v).tobytes()
    return True


def test_header_records_a_crc32_of_every_tensor_and_of_itself(saved):
    params, q, file = saved
    header = quant.info(file)
    assert header["format"] == qio.QUANT_FORMAT == "lora_jax.quantized_base/3"
    crc = lambda a: zlib.crc32(np.ascontiguousarray(a).tobytes())  # noqa: E731
    k = q["s"]["kernel"]
    assert header["leaves"]["s/kernel"]["crc32"] == {
        p: crc(np.asarray(a).view(np.uint16) if a.dtype == jnp.bfloat16 else np.asarray(a))
        for p, a in zip(qio._PARTS, k.arrays, strict=True)
    }
    assert header["leaves"]["a/bias"]["crc32"] == crc(np.arange(8.0, dtype=np.float32))
    body = {k: v for k, v in header.items() if k != "header_crc32"}
    assert header["header_crc32"] == zlib.crc32(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    )
    assert _same(quant.load(file, like=params, model="toy", format="nf4"), q)


@pytest.mark.parametrize(
    "tensor",
    [f"s/kernel::{p}" for p in qio._PARTS] + ["a/kernel::scale_offset", "a/bias"],
)
def test_a_flipped_byte_in_any_tensor_is_refused(saved, tmp_path, tensor):
    raw = saved[2].read_bytes()
    start, table = _layout(raw)
    lo, hi = table[tensor]["data_offsets"]
    bad = bytearray(raw)
    bad[start + (lo + hi) // 2] ^= 0x10
    (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
    with pytest.raises(
        ValueError, match=rf"nothing was loaded.*{tensor}: checksum mismatch.*quantize the float"
    ):
        quant.load(tmp_path / "bad.safetensors")


def test_an_edited_header_or_a_truncated_file_is_refused(saved, tmp_path):
    raw = saved[2].read_bytes()
    edited = _with_header(raw, lambda h: h["leaves"]["a/kernel"].update(block_size=32), fix_crc=False)
    (tmp_path / "edited.safetensors").write_bytes(edited)
    with pytest.raises(
        ValueError, match=r"header does not match its checksum header_crc32.*nothing was loaded"
    ):
        quant.load(tmp_path / "edited.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(raw[:-7])
    with pytest.raises(ValueError, match=r"cut.safetensors' is not a readable safetensors file \(truncated"):
        quant.load(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("version", [1, 2])
def test_files_of_format_versions_1_and_2_are_refused(saved, tmp_path, version):
    old = _with_header(saved[2].read_bytes(), lambda h: h.update(format=f"lora_jax.quantized_base/{version}"))
    (tmp_path / "old.safetensors").write_bytes(old)
    with pytest.raises(
        ValueError,
        match=rf"is a 'lora_jax.quantized_base/{version}' quantized base, written with the old coding of "
        r"double-quantized scales.*Re-run lj.quantize on the float weights and save them again",
    ):
        quant.load(tmp_path / "old.safetensors")


def test_parts_are_checked_against_the_shapes_the_quantizer_gives(saved, tmp_path):
    """Headers consistent with their checksum (a faulty writer) but not with the tensors: each part's shape
    and dtype are compared with `abstract_quantize` of the recorded leaf."""
    raw = saved[2].read_bytes()
    want = quant.abstract_quantize(
        {"w": jax.ShapeDtypeStruct((64, 8), jnp.float32)},
        lj.QuantSpec(block_size=32, outlier_rows=2, targets="w"),
    )["w"].scales
    cases = {  # edit -> what the error says
        "bs": (
            lambda h: h["leaves"]["a/kernel"].update(block_size=32),
            rf"a/kernel::scales: expected {want.dtype.name}\[{want.shape[0]}, 8\] \(from the leaf's recorded "
            rf"shape, dtype and quantization\), found {want.dtype.name}\[4, 8\]",
        ),
        "dtype": (
            lambda h: h["leaves"]["s/kernel"].update(dtype="float32"),
            r"s/kernel::outlier_values: expected float32\[2, 2, 8\] .*, found uint16\[2, 2, 8\]",
        ),
        "dense": (lambda h: h["leaves"]["a/bias"].update(shape=[4, 2]), r"a/bias: expected float32\[4, 2\]"),
        "record": (
            lambda h: h["leaves"]["a/kernel"].update(block_size=3),
            r"invalid leaf record.*a/kernel: its header record .* does not describe a valid leaf "
            r"\(QuantSpec.block_size=3 must be an even int",
        ),
        "dq": (
            lambda h: h["leaves"]["a/kernel"].update(double_quant=False),
            r"a/kernel is recorded with double_quant=False .* need the parts \['codes', 'outlier_index', "
            r"'outlier_values', 'scales'\].*damaged",
        ),
        "extra": (
            lambda h: h["leaves"].pop("a/bias"),
            r"a/bias: a tensor that belongs to no leaf of the header",
        ),
    }
    for edit, match in cases.values():
        (tmp_path / "x.safetensors").write_bytes(_with_header(raw, edit))
        with pytest.raises(ValueError, match=match + r".*quantize the float weights again"):
            quant.load(tmp_path / "x.safetensors")


def test_like_checks_quantization_and_dtype(saved):
    params, q, file = saved
    assert _same(quant.load(file, like=q), q)  # a template quantized the same way
    assert _same(
        quant.load(file, like=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)), q
    )
    q8 = quant.abstract_quantize(params, lj.QuantSpec(format="int8", block_size=32, targets=".*/kernel"))
    with pytest.raises(
        ValueError,
        match=r"does not fit this model.*a/kernel: quantized as \('nf4', 16, 0, True, 2\) in the file, "
        r"\('int8', 32, 0, True, 0\) in the model \(format, block_size, axis, double_quant, outlier_rows\)",
    ):
        quant.load(file, like=q8)
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    with pytest.raises(
        ValueError, match=r"s/kernel: dtype bfloat16 in the file, float32 in the model \(load with a template"
    ):
        quant.load(file, like=f32)
    qbias = {
        **q,
        "a": {
            **q["a"],
            "bias": quant.abstract_quantize(
                {"b": jnp.ones((16, 8))}, lj.QuantSpec(targets="b", block_size=16)
            )["b"],
        },
    }
    with pytest.raises(ValueError, match=r"a/bias: shape \(8,\) in the file, \(16, 8\) in the model"):
        quant.load(file, like=qbias)


def test_save_refuses_what_it_cannot_store(tmp_path, saved):
    q = saved[1]
    with pytest.raises(TypeError, match=r"temperature: lj.quant.save stores arrays, found a float \(0.5\)"):
        quant.save(tmp_path / "x", {"w": q["a"]["kernel"], "temperature": 0.5})
    with pytest.raises(ValueError, match=r"x::codes: key paths saved by lj.quant.save cannot contain '::'"):
        quant.save(tmp_path / "x", {"x::codes": jnp.ones(2), "x": q["a"]["kernel"]})


def test_shardings_tree_must_match(saved):
    params, q, _ = saved
    mesh = jax.make_mesh((1,), ("tp",))
    s = NamedSharding(mesh, P(None, "tp"))
    out = quant.shardings(q, {"a": {"kernel": s, "bias": None}, "s": {"kernel": NamedSharding(mesh, P())}})
    assert out["a"]["kernel"].codes == s and out["a"]["bias"] is None
    assert out["a"]["kernel"].outlier_values.spec == P(None, "tp")
    assert _same(jax.device_put(q, out), q)
    assert _same(
        quant.load(saved[2], shardings=NamedSharding(mesh, P())), quant.load(saved[2])
    )  # one for all
    with pytest.raises(ValueError, match=r"s/kernel: no sharding given \(closest: \['a/kernel'"):
        quant.shardings(q, {"a": {"kernel": s, "bias": None}})
    with pytest.raises(ValueError, match=r"a/kernel: its sharding P\(None, None, 'tp'\) has 3 entries"):
        quant.shardings(
            q, {"a": {"kernel": NamedSharding(mesh, P(None, None, "tp")), "bias": None}, "s": {"kernel": s}}
        )
    with pytest.raises(
        ValueError,
        match=r"base.safetensors': shardings= does not match the file's leaves.*s/kernel: no sharding given",
    ):
        quant.load(saved[2], like=params, shardings={"a": {"kernel": s, "bias": None}})
    with pytest.raises(ValueError, match=r"s/kernel: expected a jax.sharding.Sharding or None, found str"):
        quant.load(saved[2], shardings={"a": {"kernel": s, "bias": None}, "s": {"kernel": "tp"}})


_MESH_SCRIPT = textwrap.dedent("""
    import os, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import lora_jax as lj

    mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    params = {"stk": {"kernel": jax.random.normal(jax.random.key(0), (2, 128, 64), jnp.bfloat16)},
              "bias": jnp.arange(64.0)}
    q = lj.quantize(params, lj.QuantSpec(block_size=64, outlier_rows=2))
    f = lj.quant.save(os.path.join(tempfile.mkdtemp(), "base"), q, model="toy")
    w = NamedSharding(mesh, P(None, "fsdp", "tp"))
    dense = {"stk": {"kernel": w}, "bias": NamedSharding(mesh, P("tp"))}
    ref = lj.quant.load(f, like=params)
    assert ref["stk"]["kernel"].codes.sharding.device_set == {jax.devices()[0]}
    for back in (lj.quant.load(f, like=params, shardings=dense), jax.device_put(ref, lj.quant.shardings(ref, dense))):
        x = back["stk"]["kernel"]  # codes and scales sharded like W, outlier rows whole along the block axis
        assert x.codes.sharding.spec == w.spec and x.scales.sharding.spec == w.spec, x.codes.sharding
        assert x.outlier_values.sharding.spec == P(None, None, "tp"), x.outlier_values.sharding
        assert len(x.codes.sharding.device_set) == 8 and back["bias"].sharding.spec == P("tp")
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ref), strict=True):  # bit-identical values
            assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    bad = {**dense, "stk": {"kernel": NamedSharding(mesh, P(None, ("fsdp", "tp")))}}
    for call in (lambda: lj.quant.load(f, like=params, shardings=bad), lambda: lj.quant.shardings(ref, bad)):
        try:
            call()
        except ValueError as e:
            want = "stk/kernel: its block axis 1 (size 128) is sharded over mesh axis ('fsdp', 'tp') (8 shards of 16)"
            assert want in str(e), e
        else:
            raise AssertionError("no error")
    try:
        lj.quant.load(f, like=params, shardings={**dense, "bias": NamedSharding(mesh, P("tp", None))})
    except ValueError as e:
        assert "bias: cannot place an array of shape (64,) with the sharding" in str(e), e
    else:
        raise AssertionError("no error")
    print("OK")
""")


def test_load_onto_an_8_device_mesh():
    (out,) = run_processes([[sys.executable, "-c", _MESH_SCRIPT]], devices=8)
    assert "OK" in out
