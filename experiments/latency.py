"""Inference latency: base model vs merged LoRA vs unmerged LoRA (`lj.wrap`) vs serial adapter layers.

The shape of the LoRA paper's Table 1 (Hu et al. 2021, arXiv 2106.09685): a GPT-2-style decoder with a
KV cache, timed at several batch sizes and sequence lengths, four ways side by side in one process:

  base      the pretrained model alone
  merged    LoRA folded into the weights (``lj.merge``): the same program with other weights, so it
            should cost exactly what the base costs
  wrap      LoRA kept apart, ``lj.wrap(fn)(params, deltas, ...)``: ``x·W + s·((x·a)·b)`` at each
            adapted projection (two more thin matmuls each)
  adapter   a Houlsby-style bottleneck adapter (``y + relu(y·D)·U``) after each layer's attention and
            MLP, with as many parameters as the LoRA (bottleneck = rank: ``4·d·r`` per layer either way);
            serial layers that no merge can remove, the baseline the paper compares against

Per setting: prefill time (the whole prompt of ``T`` tokens at batch ``B``, filling the cache) and
per-token decode time (one new token per row against a cache of ``T`` tokens). Calls of the four
variants are interleaved (A B C D A B C D ...), so load changes on a shared machine hit all of them
alike; the minimum and the median of each are reported, with the ratios to the base (on a shared
machine the minimum is the steadier estimate: load only ever adds time).

    python experiments/latency.py                    # CPU-sized default (d=256, 4 layers)
    python experiments/latency.py --small            # CI
    python experiments/latency.py --dims 1024 --layers 24 --heads 16 --vocab 50257 --dtype bfloat16  # GPT-2 medium
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax.models.layers import attention as sdpa

VARIANTS = ("base", "merged", "wrap", "adapter")


@dataclasses.dataclass(frozen=True)
class Cfg:
    vocab: int = 4096
    dim: int = 256
    layers: int = 4
    heads: int = 4
    max_len: int = 1024
    rank: int = 8
    alpha: float = 16.0
    dtype: str = "float32"


def init_params(key, c: Cfg) -> dict:
    """Random GPT-2-style weights (no biases on projections): a plain pytree, ``(in, out)`` kernels."""
    keys = iter(jax.random.split(key, 8 * c.layers + 4))
    dense = lambda i, o: {"kernel": jax.random.normal(next(keys), (i, o)) * (1.0 / np.sqrt(i))}
    norm = lambda: {"scale": jnp.ones((c.dim,)), "bias": jnp.zeros((c.dim,))}
    layer = lambda: {
        "ln1": norm(),
        "query": dense(c.dim, c.dim),
        "key": dense(c.dim, c.dim),
        "value": dense(c.dim, c.dim),
        "out": dense(c.dim, c.dim),
        "ln2": norm(),
        "up": dense(c.dim, 4 * c.dim),
        "down": dense(4 * c.dim, c.dim),
    }
    return {
        "wte": jax.random.normal(next(keys), (c.vocab, c.dim)) * 0.02,
        "wpe": jax.random.normal(next(keys), (c.max_len, c.dim)) * 0.01,
        "layers": [layer() for _ in range(c.layers)],
        "ln_f": norm(),
    }


def init_adapters(key, c: Cfg) -> list:
    """Two bottleneck adapters per layer, ``down (d, r)`` and ``up (r, d)``: ``4·d·r`` per layer."""
    keys = iter(jax.random.split(key, 4 * c.layers))
    one = lambda: {
        "down": jax.random.normal(next(keys), (c.dim, c.rank)) / np.sqrt(c.dim),
        "up": jax.random.normal(next(keys), (c.rank, c.dim)) * 0.01,
    }
    return [{"attn": one(), "mlp": one()} for _ in range(c.layers)]


def layer_norm(x, p):
    x32 = x.astype(jnp.float32)
    mu = x32.mean(-1, keepdims=True)
    var = ((x32 - mu) ** 2).mean(-1, keepdims=True)
    return ((x32 - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]).astype(x.dtype)


def dense(x, p):
    return x @ p["kernel"].astype(x.dtype)


def adapter(y, p):
    return y + jax.nn.relu(y @ p["down"].astype(y.dtype)) @ p["up"].astype(y.dtype)


def forward(c: Cfg, params, ids, cache, start, adapters=None):
    """Runs ``ids (B, t)`` at positions ``start..start+t-1`` against ``cache`` (k, v: ``(L, B, S, H, hd)``).

    Returns ``(last-position logits (B, V) float32, updated cache)``. ``t > 1`` with ``start == 0`` is
    the prefill (causal attention over the prompt); ``t == 1`` is one decode step.
    """
    dt = jnp.dtype(c.dtype)
    b, t = ids.shape
    hd = c.dim // c.heads
    pos = start + jnp.arange(t)
    h = (params["wte"][ids] + params["wpe"][pos][None]).astype(dt)
    ks, vs = cache
    s = ks.shape[2]
    # query i (at position start+i) sees cache slots <= start+i
    allowed = (jnp.arange(s)[None, :] <= pos[:, None])[None, None]  # (1, 1, t, S)
    new_k, new_v = [], []
    for i, p in enumerate(params["layers"]):
        x = layer_norm(h, p["ln1"])
        split = lambda y: y.reshape(b, t, c.heads, hd)
        q, k, v = (split(dense(x, p[n])) for n in ("query", "key", "value"))
        k_all = jax.lax.dynamic_update_slice_in_dim(ks[i], k.astype(ks.dtype), start, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(vs[i], v.astype(vs.dtype), start, axis=1)
        new_k.append(k_all)
        new_v.append(v_all)
        if t > 1:  # prefill: attend within the prompt only
            o = sdpa(q, k, v, causal=True)
        else:
            o = sdpa(q, k_all, v_all, causal=False, mask=jnp.broadcast_to(allowed, (b, 1, t, s)))
        y = dense(o.reshape(b, t, c.dim), p["out"])
        if adapters is not None:
            y = adapter(y, adapters[i]["attn"])
        h = h + y
        y = dense(jax.nn.gelu(dense(layer_norm(h, p["ln2"]), p["up"])), p["down"])
        if adapters is not None:
            y = adapter(y, adapters[i]["mlp"])
        h = h + y
    h = layer_norm(h[:, -1], params["ln_f"])
    logits = (h @ params["wte"].T.astype(dt)).astype(jnp.float32)
    return logits, (jnp.stack(new_k), jnp.stack(new_v))


def empty_cache(c: Cfg, batch: int, length: int):
    shape = (c.layers, batch, length, c.heads, c.dim // c.heads)
    return jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype)


def variants(c: Cfg, key):
    """``{name: (prefill, decode)}`` jitted; each takes ``(ids, cache, start)`` and returns ``(logits, cache)``."""
    k1, k2, k3 = jax.random.split(key, 3)
    params = init_params(k1, c)
    spec = lj.LoraSpec(rank=c.rank, alpha=c.alpha, targets=r"layers/\d+/(query|value)/kernel")
    deltas = lj.init(k2, params, spec)
    # b = 0 after init: give the adapter a trained-looking b so that merging changes the weights.
    deltas = jax.tree.map(
        lambda d: (
            dataclasses.replace(d, b=0.01 * jax.random.normal(k3, d.b.shape)) if d is not None else None
        ),
        deltas,
        is_leaf=lambda x: isinstance(x, lj.LoraDelta) or x is None,
    )
    adapters = init_adapters(k3, c)
    n_lora = lj.count_params(deltas)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    assert n_lora == n_adapter, (n_lora, n_adapter)
    merged = jax.jit(lj.merge)(params, deltas)
    fwd = lambda p, ids, cache, start: forward(c, p, ids, cache, start)
    wrapped = lj.wrap(fwd)
    fns = {
        "base": lambda ids, cache, start: fwd(params, ids, cache, start),
        "merged": lambda ids, cache, start: fwd(merged, ids, cache, start),
        "wrap": lambda ids, cache, start: wrapped(params, deltas, ids, cache, start),
        "adapter": lambda ids, cache, start: forward(c, params, ids, cache, start, adapters),
    }
    # weights are closed over (constants of the program, as in a served model); the cache is donated
    jitted = {k: jax.jit(f, donate_argnums=(1,)) for k, f in fns.items()}
    return jitted, n_lora


def time_setting(fns, c: Cfg, batch: int, seq: int, reps: int, key) -> dict:
    """Median prefill and per-token decode times of each variant, calls interleaved."""
    ids = jax.random.randint(key, (batch, seq), 0, c.vocab)
    tok = ids[:, :1]
    start = jnp.asarray(seq, jnp.int32)
    zero = jnp.asarray(0, jnp.int32)
    prefill_t = {v: [] for v in fns}
    decode_t = {v: [] for v in fns}
    caches = {}
    logits = {}
    for i in range(reps + 2):
        for v, f in fns.items():
            cache = empty_cache(c, batch, seq + 1)
            t0 = time.perf_counter()
            out, cache = f(ids, cache, zero)
            jax.block_until_ready(out)
            if i >= 2:
                prefill_t[v].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out, cache = f(tok, cache, start)  # one new token against a cache of `seq` tokens
            jax.block_until_ready(out)
            if i >= 2:
                decode_t[v].append(time.perf_counter() - t0)
            caches[v], logits[v] = cache, out
    ms = lambda xs: 1e3 * statistics.median(xs)
    row = {"batch": batch, "seq": seq}
    for v in fns:
        row[v] = {
            "prefill_ms": ms(prefill_t[v]),
            "decode_ms": ms(decode_t[v]),
            "prefill_min_ms": 1e3 * min(prefill_t[v]),
            "decode_min_ms": 1e3 * min(decode_t[v]),
        }
    # merged and wrap compute the same function: their logits agree (float32 rounding; bf16 looser)
    row["merged_vs_wrap_max_abs"] = float(jnp.max(jnp.abs(logits["merged"] - logits["wrap"])))
    return row


def fmt(rows, c: Cfg, machine: str, stat: str = "min") -> str:
    """Markdown table of `stat` (``"min"`` or ``"median"``) times and their ratios to the base."""
    head = (
        f"### Inference latency, {stat} of the repeats ({machine}; d={c.dim}, L={c.layers}, H={c.heads}, "
        f"V={c.vocab}, {c.dtype}, LoRA r={c.rank} on q,v = adapter bottleneck {c.rank})"
    )
    suffix = "_min_ms" if stat == "min" else "_ms"
    lines = [
        head,
        "",
        "| batch | seq | phase | base ms | merged ms | wrap ms | adapter ms | merged/base | wrap/base | adapter/base |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for phase, key in (("prefill", "prefill" + suffix), ("decode/token", "decode" + suffix)):
            t = {v: r[v][key] for v in VARIANTS}
            lines.append(
                f"| {r['batch']} | {r['seq']} | {phase} | "
                + " | ".join(f"{t[v]:.2f}" for v in VARIANTS)
                + " | "
                + " | ".join(f"{t[v] / t['base']:.3f}" for v in ("merged", "wrap", "adapter"))
                + " |"
            )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes and few repeats (CI)")
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=None, help="default: dims // 64")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--seqs", default="128,512")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None, help="JSON path (default: experiments/results/latency.json)")
    args = ap.parse_args(argv)
    if args.small:
        args.dims, args.layers, args.vocab, args.batches, args.seqs, args.reps = 64, 2, 256, "1", "16", 3
    if args.out is None:
        here = os.path.dirname(os.path.abspath(__file__))
        args.out = (
            os.path.join("runs", "experiments_small", "latency.json")
            if args.small
            else os.path.join(here, "results", "latency.json")
        )
    batches = [int(x) for x in args.batches.split(",")]
    seqs = [int(x) for x in args.seqs.split(",")]
    c = Cfg(
        vocab=args.vocab,
        dim=args.dims,
        layers=args.layers,
        heads=args.heads or max(args.dims // 64, 1),
        max_len=max(seqs) + 1,
        rank=args.rank,
        dtype=args.dtype,
    )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}"
    print(f"jax {jax.__version__} on {jax.default_backend()} ({machine})", flush=True)
    fns, n = variants(c, jax.random.key(0))
    rows = []
    for seq in seqs:
        for batch in batches:
            rows.append(time_setting(fns, c, batch, seq, args.reps, jax.random.key(batch * 1000 + seq)))
            r = rows[-1]
            print(
                f"B={batch} T={seq}: prefill "
                + " ".join(f"{v} {r[v]['prefill_ms']:.2f}" for v in VARIANTS)
                + " ms; decode "
                + " ".join(f"{v} {r[v]['decode_ms']:.3f}" for v in VARIANTS)
                + " ms",
                flush=True,
            )
    text = fmt(rows, c, machine, "min") + "\n\n" + fmt(rows, c, machine, "median")
    print(text)
    out = {
        "machine": machine,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "config": dataclasses.asdict(c),
        "adapter_params": n,
        "reps": args.reps,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
