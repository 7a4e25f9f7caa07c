"""delta_shardings / delta_partition_specs, and merge keeping each W's sharding on an 8-device CPU mesh.

pytest imports jax once for the whole session, with however many devices that gives; the multi-device
checks run in a fresh interpreter with ``--xla_force_host_platform_device_count=8`` set before jax loads.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from helpers import child_env
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax import LoraAxes, LoraDelta, LoraSpec

pytestmark = pytest.mark.strict_rank  # also no implicit rank promotion here


KEY = jax.random.key(0)
STACKED = LoraAxes(stack=(0,), inputs=(1,), outputs=(2,))
CONV = LoraAxes(inputs=(0, 1, 2), outputs=(3,))


def _params_and_deltas():
    params = {
        "dense": {"kernel": jnp.zeros((16, 8)), "bias": jnp.zeros(8)},
        "stack": {"kernel": jnp.zeros((4, 16, 8))},
        "conv": {"kernel": jnp.zeros((3, 3, 4, 8))},
        "qkv": {"kernel": jnp.zeros((16, 4, 2))},
        "out": {"kernel": jnp.zeros((8, 16))},
    }
    spec = LoraSpec(
        rank=2,
        targets=r".*/kernel",
        axes={
            "stack/kernel": STACKED,
            "conv/kernel": CONV,
            "qkv/kernel": LoraAxes(inputs=(0,), outputs=(1, 2)),
            "out/kernel": LoraAxes(inputs=(1,), outputs=(0,)),
        },
    )
    return params, lj.init(KEY, params, spec)


# W's PartitionSpec -> expected (a, b) specs: a takes W's stack + input entries, then None for the rank;
# b takes the stack entries, None for the rank, then W's output entries.
CASES = {
    "dense": (P("fsdp", "tp"), P("fsdp", None), P(None, "tp")),
    "stack": (P("pp", "fsdp", "tp"), P("pp", "fsdp", None), P("pp", None, "tp")),
    "conv": (P(None, None, "fsdp", "tp"), P(None, None, "fsdp", None), P(None, "tp")),
    "qkv": (P("fsdp", "tp", None), P("fsdp", None), P(None, "tp", None)),
    "out": (P("tp", "fsdp"), P("fsdp", None), P(None, "tp")),  # (out, in) layout
}


def test_delta_partition_specs():
    params, deltas = _params_and_deltas()
    specs = {k: {"kernel": w_spec} for k, (w_spec, _, _) in CASES.items()}
    specs["dense"]["bias"] = P("tp")
    out = lj.delta_partition_specs(deltas, specs)
    for k, (_, a, b) in CASES.items():
        d = out[k]["kernel"]
        assert isinstance(d, LoraDelta) and (d.a, d.b) == (a, b), k
        assert (d.scale, d.axes) == (deltas[k]["kernel"].scale, deltas[k]["kernel"].axes)
    assert out["dense"]["bias"] is None


def test_delta_partition_specs_short_spec_and_multi_axis_entries():
    d = {"w": LoraDelta(jnp.ones((4, 16, 2)), jnp.ones((4, 2, 8)), axes=STACKED)}
    # trailing axes left out of a PartitionSpec are replicated; tuple entries are kept whole
    out = lj.delta_partition_specs(d, {"w": P(None, ("data", "fsdp"))})["w"]
    assert (out.a, out.b) == (P(None, ("data", "fsdp"), None), P(None, None, None))


def test_delta_shardings_on_a_1x1_mesh():
    params, deltas = _params_and_deltas()
    mesh = jax.make_mesh((1, 1, 1), ("pp", "fsdp", "tp"), devices=jax.devices()[:1])
    shardings = {k: {"kernel": NamedSharding(mesh, w_spec)} for k, (w_spec, _, _) in CASES.items()}
    shardings["dense"]["bias"] = NamedSharding(mesh, P())
    out = lj.delta_shardings(deltas, shardings)
    for k, (_, a, b) in CASES.items():
        d = out[k]["kernel"]
        assert (d.a.spec, d.b.spec) == (a, b), k
        assert d.a.mesh == mesh and d.b.mesh == mesh
    assert out["dense"]["bias"] is None
    # placing the deltas with them works and keeps the values
    placed = jax.device_put(deltas, out)
    assert placed["stack"]["kernel"].a.sharding.spec == P("pp", "fsdp", None)


def test_delta_shardings_bad_input():
    _, deltas = _params_and_deltas()
    d = {"w": deltas["dense"]["kernel"]}
    with pytest.raises(
        TypeError,
        match=r"w: expected a jax.sharding.NamedSharding .*found P\('fsdp', None\).*"
        r"delta_partition_specs",
    ):
        lj.delta_shardings(d, {"w": P("fsdp", None)})
    with pytest.raises(TypeError, match=r"w: expected a PartitionSpec, found NamedSharding\(mesh="):
        mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
        lj.delta_partition_specs(d, {"w": NamedSharding(mesh, P())})
    with pytest.raises(
        ValueError,
        match=r"do not have the structure of params.*params paths missing from "
        r"deltas: \['v'\]",
    ):
        lj.delta_partition_specs(d, {"w": P(), "v": P()})


MULTI_DEVICE = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    import lora_jax as lj
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    assert len(jax.devices()) == 8, jax.devices()

    rng = np.random.default_rng(0)
    # default axis types (explicit in jax 0.10) in float32 and bfloat16, and auto axes in float32
    for axis_types, dtype in [(None, jnp.float32), (None, jnp.bfloat16), ((AxisType.Auto,) * 3, jnp.float32)]:
      mesh = jax.make_mesh((2, 2, 2), ("pp", "fsdp", "tp"), axis_types=axis_types)
      layout = {  # name: (W shape, W spec, axes, expected a spec, expected b spec)
          "dense": ((16, 8), P("fsdp", "tp"), lj.LoraAxes(), P("fsdp", None), P(None, "tp")),
          "stack": ((4, 16, 8), P("pp", "fsdp", "tp"), lj.LoraAxes((0,), (1,), (2,)),
                    P("pp", "fsdp", None), P("pp", None, "tp")),
          "conv": ((3, 3, 4, 8), P(None, None, "fsdp", "tp"), lj.LoraAxes((), (0, 1, 2), (3,)),
                   P(None, None, "fsdp", None), P(None, "tp")),
      }
      make = lambda dtype: {k: jax.device_put(jnp.asarray(rng.standard_normal(shape), dtype),
                                              NamedSharding(mesh, spec))
                            for k, (shape, spec, *_) in layout.items()}
      spec = lj.LoraSpec(rank=2, targets=list(layout), axes={k: v[2] for k, v in layout.items()})
      params = make(dtype)
      deltas = lj.init(jax.random.key(0), params, spec)
      dsh = lj.delta_shardings(deltas, jax.tree.map(lambda w: w.sharding, params))
      for k, (*_, a_spec, b_spec) in layout.items():
        assert (dsh[k].a.spec, dsh[k].b.spec) == (a_spec, b_spec), (k, dsh[k])
      deltas = jax.device_put(deltas, dsh)
      deltas = jax.tree.map(lambda x: x + jnp.ones((), x.dtype), deltas)   # nonzero b
      unsharded = jax.tree.map(lambda x: np.asarray(x), (params, deltas))
      ref = lj.merge(*jax.device_put(unsharded, jax.devices()[0]))
      for name, f in [("eager", lj.merge), ("jit", jax.jit(lj.merge)),
                      ("unmerge", lambda p, d: lj.unmerge(lj.merge(p, d), d))]:
        out = f(params, deltas)
        for k in layout:
          assert out[k].sharding.spec == params[k].sharding.spec, (name, k, out[k].sharding)
          assert out[k].sharding.is_equivalent_to(params[k].sharding, out[k].ndim), (name, k)
          want = params[k] if name == "unmerge" else ref[k]
          # merge: the same fp32 arithmetic rounded once, sharded or not (a few float32 ulps);
          # unmerge(merge): two roundings to W's dtype, u·(|W + ΔW| + |W|), u = 2^-24 or 2^-8.
          u = 2.0 ** -24 if dtype == jnp.float32 else 2.0 ** -8
          mag = lambda x: float(np.abs(np.asarray(x, np.float32)).max())
          tol = u * (mag(ref[k]) + mag(params[k])) + 1e-5
          np.testing.assert_allclose(np.asarray(out[k], np.float32), np.asarray(want, np.float32),
                                     atol=tol, err_msg=f"{name} {k}")
      # init → merge is bit-exact on the mesh too
      fresh = lj.init(jax.random.key(0), params, spec)
      same = lj.merge(params, jax.device_put(fresh, dsh))
      for k in layout:
        assert np.asarray(same[k]).tobytes() == np.asarray(params[k]).tobytes(), k
      # donation frees the sharded inputs and keeps the sharding
      merged = lj.merge(params, deltas, donate=True)
      for k in layout:
        assert params[k].is_deleted(), k
        assert merged[k].sharding.spec == layout[k][1], k
    print("OK")
""")


def test_multi_device_shardings_and_merge():
    env = child_env(8)
    proc = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr[-4000:]
