"""The library on arrays typed with ``Explicit`` mesh axes (``jax.make_mesh``'s default in recent JAX).

With Explicit axes a sharding is part of an array's type, and JAX refuses ops whose output sharding is
ambiguous. One child process with 8 CPU devices checks merge, unmerge, wrap (eager, jit, grad; LoRA,
DoRA, a scanned DenseGeneral model), QLoRA (quantize, dequantize, wrap on the quantized base) and an
adapter bank, each against a reference computed on the same values without a mesh (host arrays), and
that results keep the types the program expects (a merged W sharded like W, codes like W), and a W that
fn reshards itself before its use (FSDP-style gathering) stays factored. The same
process checks `wrap` inside ``jax.shard_map`` with JAX's check of varying manual axes on (LoRA and QLoRA,
values and gradients, no `FallbackWarning`).
"""

import sys
import textwrap

from helpers import run_processes

_SCRIPT = textwrap.dedent("""
    import warnings
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import lora_jax as lj

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    host = lambda t: jax.tree.map(np.asarray, t)

    def close(got, want, tol):  # relative to each array's largest entry
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            v = np.asarray(v)
            np.testing.assert_allclose(np.asarray(u), v, rtol=tol, atol=tol * max(1.0, float(np.abs(v).max())))

    class Block(nn.Module):  # an Explicit-mode model: it names the batch sharding of what it computes
        @nn.compact
        def __call__(self, x, _):
            h = nn.DenseGeneral((4, 32), use_bias=False, name="up")(x)  # kernel (64, 4, 32)
            h = jax.sharding.reshard(jax.nn.gelu(h), P("data", None, None))
            y = nn.DenseGeneral(64, axis=(-2, -1), use_bias=False, name="down")(h)  # kernel (4, 32, 64)
            return x + jax.sharding.reshard(y, P("data", None)), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return scan(name="layers")(jax.sharding.reshard(x, P("data", None)), None)[0]

    model = Model()
    x_host = np.asarray(jax.random.normal(jax.random.key(1), (8, 64)))
    with jax.set_mesh(mesh):
        p_host = host(model.init(jax.random.key(0), jnp.asarray(x_host)))
    w_specs = {"up": P(None, None, "model", None), "down": P(None, None, None, "model")}
    shard = {"params": {"layers": {k: {"kernel": NamedSharding(mesh, s)} for k, s in w_specs.items()}}}
    params = jax.device_put(p_host, shard)
    x = jax.device_put(x_host, NamedSharding(mesh, P("data", None)))
    kernel = lambda t, k: t["params"]["layers"][k]["kernel"]
    # References on host arrays (no sharding in their types): the merged model and its gradient.
    merged_out = jax.jit(lambda p, d: model.apply(lj.merge(p, d), x_host))
    merged_grad = jax.jit(jax.grad(lambda d, p: jnp.sum(model.apply(lj.merge(p, d), x_host) ** 2)))

    for dora in (False, True):
        spec = lj.LoraSpec(rank=4, targets=".*kernel", dora=dora)
        with jax.set_mesh(mesh):
            d = lj.init(jax.random.key(2), params, spec, fn=model.apply, args=(x,))
        d_host = jax.tree.map(lambda a: np.asarray(a) + 0.05, d)  # b != 0: the low-rank path counts
        for placed in ("delta_shardings",) if dora else ("one device", "delta_shardings"):
            dd = jax.tree.map(jnp.asarray, d_host)
            if placed == "delta_shardings":
                dd = jax.device_put(dd, lj.delta_shardings(dd, shard))
            with jax.set_mesh(mesh):
                want = merged_out(p_host, d_host)
                merged = lj.merge(params, dd)
                assert kernel(merged, "up").sharding.spec == w_specs["up"], kernel(merged, "up").sharding
                close(merged, lj.merge(p_host, d_host), 1e-6)
                if not dora:
                    close(lj.unmerge(merged, dd), p_host, 1e-5)
                f = lj.wrap(model.apply)
                eager = not dora and placed == "one device"
                for out in (f(params, dd, x),) * eager + (jax.jit(f)(params, dd, x),):
                    assert out.sharding.spec == P("data", None), out.sharding
                    close(out, want, 1e-5)
                loss = lambda dd, p, fn: jnp.sum(fn(p, dd, x) ** 2)
                g = jax.jit(jax.grad(loss), static_argnums=2)(dd, params, f)
                close(g, merged_grad(d_host, p_host), 1e-4)
    print("lora ok")

    with jax.set_mesh(mesh):
        d = lj.init(jax.random.key(2), p_host, lj.LoraSpec(rank=4, targets=".*kernel"), fn=model.apply, args=(x_host,))
    d = jax.tree.map(lambda a: jnp.asarray(a) + 0.05, d)
    axes = {".*up/kernel": 1, ".*down/kernel": 2}
    for fmt, dq, rows in (("nf4", True, 0), ("int8", False, 0), ("nf4", True, 2)):
        qspec = lj.QuantSpec(
            targets=".*kernel", format=fmt, block_size=32, double_quant=dq, outlier_rows=rows, block_axis=axes
        )
        q_host = lj.quantize(p_host, qspec)
        quantized = [lj.quantize(params, qspec)]  # eager; and under jit for the richest variant
        quantized += [jax.jit(lambda p: lj.quantize(p, qspec))(params)] if rows else []
        for q in quantized:
            for got, want in zip(jax.tree.leaves(q), jax.tree.leaves(q_host), strict=True):
                got, want = np.asarray(got), np.asarray(want)
                if np.issubdtype(want.dtype, np.integer):  # the same codes, bit for bit
                    np.testing.assert_array_equal(got, want)
                else:  # float scales: some XLA versions fuse the sharded absmax / scale division differently
                    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
            up = kernel(q, "up")
            assert up.codes.sharding.spec == w_specs["up"] and up.scales.sharding.spec == w_specs["up"], up
            dense = jax.jit(lj.dequantize)(q)
            assert kernel(dense, "up").sharding.spec == w_specs["up"], kernel(dense, "up").sharding
            close(dense, lj.dequantize(q_host), 1e-6)
        with jax.set_mesh(mesh):
            deq = host(lj.dequantize(q_host))
            want = merged_out(deq, d)
            f = lj.wrap(model.apply)
            for out in (f(q, d, x),) * (fmt == "int8") + (jax.jit(f)(q, d, x),):
                close(out, want, 1e-5)
            g = jax.jit(jax.grad(lambda d, q: jnp.sum(f(q, d, x) ** 2)))(d, q)
            close(g, merged_grad(d, deq), 1e-4)
    print("qlora ok")

    # FSDP-style: W stored split over both axes, gathered over "data" inside fn (jax.sharding.reshard); wrap
    # keeps W tracked through the reshard (no FallbackWarning): LoRA, DoRA, and LoRA on a quantized W.
    fsdp = lambda p, x: jnp.tanh(x @ jax.sharding.reshard(p["w"], P(None, "model")))
    w2, x2 = (jax.random.normal(jax.random.key(k), s) for k, s in ((5, (16, 32)), (6, (8, 16))))
    w2s = jax.device_put(w2, NamedSharding(mesh, P("data", "model")))
    x2s = jax.device_put(x2, NamedSharding(mesh, P("data", None)))
    qs2 = lj.QuantSpec(targets="w", block_size=8)
    for dora in (False, True):
        spec2 = lj.LoraSpec(rank=2, targets="w", dora=dora)
        d2 = jax.tree.map(lambda a: a + 0.1, lj.init(jax.random.key(7), {"w": w2}, spec2))
        bases = [({"w": w2s}, w2)]
        bases += [] if dora else [(lj.quantize({"w": w2s}, qs2), lj.dequantize(lj.quantize({"w": w2}, qs2))["w"])]
        for base, w_ref in bases:
            ref = lambda d: jnp.tanh(x2 @ lj.merge({"w": w_ref}, d)["w"])  # host arrays: nothing to reshard
            want, g_want = ref(d2), jax.grad(lambda d: jnp.sum(ref(d) ** 2))(d2)
            with warnings.catch_warnings(), jax.set_mesh(mesh):
                warnings.simplefilter("error", lj.FallbackWarning)
                out = jax.jit(lj.wrap(fsdp))(base, d2, x2s)
                g = jax.jit(jax.grad(lambda d, p: jnp.sum(lj.wrap(fsdp)(p, d, x2s) ** 2)))(d2, base)
            assert out.sharding.spec == P("data", "model"), out.sharding
            close(out, want, 1e-5)
            close(g, g_want, 1e-4)
    print("reshard ok")

    f = lambda p, x: jnp.tanh(x @ p["w"])  # a bank: one adapter per example, the batch sharded on "data"
    w = jax.random.normal(jax.random.key(3), (16, 32))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
    xb = jax.random.normal(jax.random.key(4), (8, 16))
    xs = jax.device_put(xb, NamedSharding(mesh, P("data", None)))
    ds = [jax.tree.map(lambda a: a + 0.1 * (i + 1), lj.init(jax.random.key(i), {"w": w}, lj.LoraSpec(
        rank=2, targets="w"))) for i in range(2)]
    bank, ids = lj.stack_adapters(ds), jnp.array([0, 1, 1, 0, 0, 1, 1, 0])
    want = np.stack([f(lj.merge({"w": w}, ds[int(i)]), xb[k : k + 1])[0] for k, i in enumerate(ids)])
    g = lambda p, b, x, i: lj.wrap(f)(p, b, x, adapter_ids=i)
    for out in (g({"w": ws}, bank, xs, ids), jax.jit(g)({"w": ws}, bank, xs, ids)):
        assert out.sharding.spec == P("data", "model"), out.sharding
        close(out, want, 1e-5)
    bank2 = lj.stack_adapters([jax.tree.map(np.asarray, d), jax.tree.map(lambda a: np.asarray(a) * 2, d)])
    try:  # this model shards its own batch axis: it cannot run on one example at a time
        with jax.set_mesh(mesh):
            jax.jit(lambda p, b, x: lj.wrap(model.apply)(p, b, x, adapter_ids=jnp.zeros(8, jnp.int32)))(
                params, bank2, x)
    except (TypeError, ValueError) as e:
        assert any("serve the bank on a mesh with Auto axes" in n for n in getattr(e, "__notes__", [])), e
    else:
        raise AssertionError("no error")
    print("bank ok")

    # Inside jax.shard_map (manual axes, check_vma on): fn's jnp code makes W varying like x (pvary);
    # wrap keeps W tracked through that cast: no dense W, no FallbackWarning.
    auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    qs = lj.QuantSpec(targets="w", block_size=16)
    for base, w_ref in (({"w": w}, w), (lj.quantize({"w": w}, qs), lj.dequantize(lj.quantize({"w": w}, qs))["w"])):
        d = ds[0]
        want = np.asarray(f(lj.merge({"w": w_ref}, d), xb))
        g_want = jax.grad(lambda d: jnp.sum(f(lj.merge({"w": w_ref}, d), xb) ** 2))(d)
        fwd = jax.shard_map(lj.wrap(f), mesh=auto, in_specs=(P(), P(), P("data")), out_specs=P("data"))
        loss = lambda d, p, x: jax.lax.psum(jnp.sum(lj.wrap(f)(p, d, x) ** 2), "data")
        grad = jax.shard_map(jax.grad(loss), mesh=auto, in_specs=(P(), P(), P("data")), out_specs=P())
        with warnings.catch_warnings():
            warnings.simplefilter("error", lj.FallbackWarning)
            close(jax.jit(fwd)(base, d, xb), want, 1e-5)
            close(jax.jit(grad)(d, base, xb), g_want, 1e-4)
    # One adapter per device (the factors vary over "data" where W does not): merged per example as reference.
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *(ds * 4))
    per_dev = lambda p, d, x: lj.wrap(f)(p, jax.tree.map(lambda a: a[0], d), x)
    sm = jax.shard_map(per_dev, mesh=auto, in_specs=(P(), P("data"), P("data")), out_specs=P("data"))
    want = np.concatenate([f(lj.merge({"w": w}, ds[i % 2]), xb[i : i + 1]) for i in range(8)])
    close(jax.jit(sm)({"w": w}, stacked, xb), want, 1e-5)
    print("shard_map ok")
""")


def test_explicit_mesh_axes():
    (out,) = run_processes([[sys.executable, "-c", _SCRIPT]], devices=8)
    assert all(f"{part} ok" in out for part in ("lora", "qlora", "reshard", "bank", "shard_map")), out
