"""bfloat16 compute: does accumulating the low-rank path in float32 cost speed, and what does it buy?

A stack of bfloat16 Dense layers (x·W per layer, W frozen, LoRA on every layer) is run three ways, each
as a jitted train step (loss and gradient w.r.t. the deltas) and as a forward pass:

- ``round``: the low-rank path rounded to bfloat16 between its products, then added in bfloat16
  (``wrap`` before float32 accumulation): ``x·W + bf16(bf16(x·a)·b)``;
- ``f32acc``: ``x·W`` and ``(x·a)·b`` accumulated in float32, added once, rounded once (what ``wrap``
  does now); also timed through ``lj.wrap`` itself;
- ``merge``: ``x·(W + s·a·b)`` with the merged weight rounded to bfloat16 (merge on the fly).

Error: max |y - y_f32| / max |y_f32 - y_base_f32| of the forward output against float32 merged weights
(the "LoRA effect"), over the whole stack. Prints a table and writes ``results/bf16_lowrank.json``.

Usage:
    python experiments/bf16_lowrank.py [--d 256] [--layers 4] [--batch 512] [--rank 8] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj

BF16, F32 = jnp.bfloat16, jnp.float32


def layer_round(x, w, a, b):
    t = (x @ a.astype(BF16)).astype(BF16)
    return x @ w + (t @ b.astype(BF16)).astype(BF16)


def layer_f32acc(x, w, a, b):
    base = jnp.matmul(x, w, preferred_element_type=F32)
    t = jnp.matmul(x, a.astype(BF16), preferred_element_type=F32)
    return (base + t @ b.astype(F32)).astype(BF16)


def layer_merge(x, w, a, b):
    return x @ (w.astype(F32) + a @ b).astype(BF16)


LAYERS = {"round": layer_round, "f32acc": layer_f32acc, "merge": layer_merge}


def stack(layer):
    def fn(ws, deltas, x):
        for w, d in zip(ws, deltas):
            x = jnp.tanh(layer(x, w, d.a, d.b * d.scale))
        return x

    return fn


def wrapped_stack(ws, deltas, x):
    model = lambda p, x: _plain(p, x)  # noqa: E731
    return lj.wrap(model)(ws, deltas, x)


def _plain(ws, x):
    for w in ws:
        x = jnp.tanh(x @ w)
    return x


def timeit(f, *args, reps):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=512, help="tokens per step")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bf16_lowrank.json"))
    args = p.parse_args(argv)

    keys = jax.random.split(jax.random.key(0), args.layers + 2)
    ws32 = [jax.random.normal(k, (args.d, args.d)) / np.sqrt(args.d) for k in keys[:-2]]
    spec = lj.LoraSpec(rank=args.rank, alpha=2.0 * args.rank, targets="w")
    deltas = [lj.init(k, {"w": w}, spec)["w"] for k, w in zip(keys[:-2], ws32)]
    # A trained-looking delta: b != 0 (a fresh one is exactly zero).
    leaves, tree = jax.tree_util.tree_flatten(deltas)
    leaves = [
        x if i % 2 == 0 else jax.random.normal(jax.random.fold_in(keys[-1], i), x.shape) * 0.05
        for i, x in enumerate(leaves)
    ]
    deltas = jax.tree_util.tree_unflatten(tree, leaves)
    x32 = jax.random.normal(keys[-2], (args.batch, args.d))
    ws16, x16 = [w.astype(BF16) for w in ws32], x32.astype(BF16)

    truth = stack(lambda x, w, a, b: x @ (w + a @ b))(ws32, deltas, x32)
    effect = float(jnp.max(jnp.abs(truth - _plain(ws32, x32))))

    rows = []
    variants = {**{k: stack(v) for k, v in LAYERS.items()}, "wrap (f32acc)": wrapped_stack}
    for name, fn in variants.items():
        fwd = jax.jit(fn)
        loss = lambda d, fn=fn: jnp.mean(jnp.square(fn(ws16, d, x16).astype(F32)))  # noqa: E731
        step = jax.jit(jax.value_and_grad(loss))
        err = float(jnp.max(jnp.abs(fwd(ws16, deltas, x16).astype(F32) - truth))) / effect
        rows.append(
            {
                "variant": name,
                "forward_ms": timeit(fwd, ws16, deltas, x16, reps=args.reps),
                "step_ms": timeit(step, deltas, reps=args.reps),
                "rel_err_of_lora_effect": err,
            }
        )

    print(
        f"bf16, d={args.d}, {args.layers} layers, {args.batch} tokens, rank {args.rank}, "
        f"{jax.devices()[0].platform}, median of {args.reps}"
    )
    print(f"{'variant':<16}{'forward ms':>12}{'step ms':>12}{'err / effect':>15}")
    for r in rows:
        print(
            f"{r['variant']:<16}{r['forward_ms']:>12.2f}{r['step_ms']:>12.2f}{r['rel_err_of_lora_effect']:>15.2e}"
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "config": {k: v for k, v in vars(args).items() if k != "out"}
                | {"platform": jax.devices()[0].platform, "jax": jax.__version__},
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
