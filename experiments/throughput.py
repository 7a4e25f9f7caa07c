"""Train-step speed and memory: full fine-tuning vs `lj.wrap` vs merge-on-the-fly vs hand-written LoRA.

All four train the same GPT-style decoder with Adam, side by side in one process (ratios are what
carry over between machines):

  full       gradients and Adam state for every weight
  wrap       ``lj.wrap(model.apply)(params, deltas, x)``, gradients w.r.t. the deltas only
  merge      ``model.apply(lj.merge(params, deltas), x)`` inside the step (builds W + s·a·b and its
             full W-shaped gradient, then projects it onto a and b)
  hand       a model with LoRA written into its layers (``x·W + s·(x·a)·b``): the reference limit

Reported per variant: median step time after compilation, tokens/s, and compiled memory
(``.memory_analysis()``: temporaries + arguments + outputs). Then two sweeps at one size, `wrap`
against `hand`: the number of adapted matrices, and the rank.

    python experiments/throughput.py                 # sizes d=128,256,512; writes experiments/results/throughput.json
    python experiments/throughput.py --small         # a quick CI-sized run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj

ALL_TARGETS = ("query", "key", "value", "out", "up", "down")


@dataclass(frozen=True)
class Cfg:
    vocab: int = 4096
    dim: int = 256
    layers: int = 4
    heads: int = 4
    seq: int = 128
    batch: int = 4
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("query", "value")
    dtype: str = "float32"


class Dense(nn.Module):
    """Dense without bias; with `rank > 0` it carries its own LoRA factors (the hand-written model)."""

    features: int
    rank: int = 0
    scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        y = x @ w.astype(self.dtype)
        if self.rank:
            a = self.param("lora_a", nn.initializers.lecun_normal(), (x.shape[-1], self.rank), jnp.float32)
            b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features), jnp.float32)
            y = y + ((x @ a.astype(self.dtype)) @ (b * self.scale).astype(self.dtype))
        return y


class GPT(nn.Module):
    cfg: Cfg
    hand_lora: bool = False

    @nn.compact
    def __call__(self, ids):
        c, dt = self.cfg, jnp.dtype(self.cfg.dtype)

        def dense(features, i, kind):  # flat names: params/h{i}_{kind}/kernel
            rank = c.rank if (self.hand_lora and kind in c.targets) else 0
            return Dense(features, rank, c.alpha / c.rank, dt, name=f"h{i}_{kind}")

        h = (
            nn.Embed(c.vocab, c.dim, name="wte")(ids)
            + self.param("wpe", nn.initializers.normal(0.02), (c.seq, c.dim))[: ids.shape[1]]
        )
        h = h.astype(dt)
        mask = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))
        hd = c.dim // c.heads
        split = lambda t: t.reshape(t.shape[:2] + (c.heads, hd))
        for i in range(c.layers):
            x = nn.LayerNorm(dtype=dt, name=f"ln1_{i}")(h)
            q, k, v = (split(dense(c.dim, i, kind)(x)) for kind in ("query", "key", "value"))
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.asarray(np.sqrt(hd), dt)
            att = jax.nn.softmax(jnp.where(mask, att, jnp.asarray(-1e9, dt)).astype(jnp.float32)).astype(dt)
            h = h + dense(c.dim, i, "out")(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(h.shape))
            x = nn.LayerNorm(dtype=dt, name=f"ln2_{i}")(h)
            h = h + dense(c.dim, i, "down")(jax.nn.gelu(dense(4 * c.dim, i, "up")(x)))
        h = nn.LayerNorm(dtype=dt, name="ln_f")(h)
        return Dense(c.vocab, dtype=dt, name="head")(h).astype(jnp.float32)


def xent(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def target_regex(targets):
    return rf"params/h\d+_({'|'.join(targets)})/kernel"


def make_steps(cfg: Cfg, key):
    """Jitted steps and their arguments for the four variants."""
    ids = jax.random.randint(key, (cfg.batch, cfg.seq), 0, cfg.vocab)
    model, hand = GPT(cfg), GPT(cfg, hand_lora=True)
    params = model.init(key, ids)
    spec = lj.LoraSpec(rank=cfg.rank, alpha=cfg.alpha, targets=target_regex(cfg.targets))
    deltas = lj.init(key, params, spec)
    tx = optax.adam(1e-4)
    steps = {}

    def lora_step(loss):
        def step(deltas, opt, params, ids):
            l, g = jax.value_and_grad(loss)(deltas, params, ids)
            u, opt = tx.update(g, opt, deltas)
            return optax.apply_updates(deltas, u), opt, l

        return jax.jit(step, donate_argnums=(0, 1))

    def full(params, opt, ids):
        l, g = jax.value_and_grad(lambda p: xent(model.apply(p, ids), ids))(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, l

    steps["full"] = (jax.jit(full, donate_argnums=(0, 1)), (params, tx.init(params), ids))
    wrapped = lj.wrap(model.apply)
    steps["wrap"] = (
        lora_step(lambda d, p, x: xent(wrapped(p, d, x), x)),
        (deltas, tx.init(deltas), params, ids),
    )
    steps["merge"] = (
        lora_step(lambda d, p, x: xent(model.apply(lj.merge(p, d), x), x)),
        (deltas, tx.init(deltas), params, ids),
    )
    hp = hand.init(key, ids)["params"]
    is_lora = lambda path: path[-1].key in ("lora_a", "lora_b")
    flat = jax.tree_util.tree_flatten_with_path(hp)[0]
    lora = {jax.tree_util.keystr(p): x for p, x in flat if is_lora(p)}
    base = {jax.tree_util.keystr(p): x for p, x in flat if not is_lora(p)}
    tree = jax.tree_util.tree_structure(hp)
    order = [jax.tree_util.keystr(p) for p, _ in flat]

    def hand_loss(lora, base, x):
        leaves = [lora[k] if k in lora else base[k] for k in order]
        return xent(hand.apply({"params": jax.tree_util.tree_unflatten(tree, leaves)}, x), x)

    steps["hand"] = (lora_step(hand_loss), (lora, tx.init(lora), base, ids))
    return steps, lj.count_params(deltas), sum(x.size for x in lora.values())


def copy_args(args):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), args)


def compile_variant(step, args):
    """(compiled step, memory in bytes: total and temporaries, fresh state, constant args)."""
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    total = (
        None
        if mem is None
        else int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    )
    temp = None if mem is None else int(mem.temp_size_in_bytes)
    args = copy_args(args)
    return compiled, total, temp, list(args[:2]), args[2:]


def run_config(cfg: Cfg, n_steps: int, variants) -> dict:
    """Steps of all variants interleaved one by one (A B C D A B C D ...), so that load changes on a
    shared machine hit every variant alike; the median of each variant's step times is reported."""
    steps, n_lora, n_hand = make_steps(cfg, jax.random.key(0))
    assert n_lora == n_hand, (n_lora, n_hand)
    row = {"config": cfg.__dict__ | {"targets": list(cfg.targets)}, "trainable": n_lora}
    live = {v: compile_variant(*steps[v]) for v in variants}
    times = {v: [] for v in variants}
    losses = {}
    for i in range(n_steps + 2):
        for v in variants:
            step, _, _, state, rest = live[v]
            t0 = time.perf_counter()
            *state, loss = step(*state, *rest)
            jax.block_until_ready(loss)
            if i >= 2:  # the first two calls warm up
                times[v].append(time.perf_counter() - t0)
            live[v] = live[v][:3] + (state, rest)
            losses[v] = float(loss)
    for v in variants:
        t = statistics.median(times[v])
        _, total, temp, _, _ = live[v]
        row[v] = {
            "ms": 1e3 * t,
            "tokens_per_s": cfg.batch * cfg.seq / t,
            "mem_mb": None if total is None else total / 2**20,
            "temp_mb": None if temp is None else temp / 2**20,
            "loss": losses[v],
        }
    return row


def fmt_table(rows, variants, title):
    lines = [
        f"### {title}",
        "",
        "| config | trainable | "
        + " | ".join(f"{v} ms" for v in variants)
        + " | wrap/hand | "
        + " | ".join(f"{v} MB" for v in variants)
        + " |",
        "|" + "---|" * (3 + 2 * len(variants)),
    ]
    for r in rows:
        c = r["config"]
        name = f"d={c['dim']} L={c['layers']} r={c['rank']} {'+'.join(c['targets'])} {c['dtype']}"
        ms = " | ".join(f"{r[v]['ms']:.1f}" for v in variants)
        mb = " | ".join("-" if r[v]["mem_mb"] is None else f"{r[v]['mem_mb']:.0f}" for v in variants)
        ratio = r["wrap"]["ms"] / r["hand"]["ms"]
        lines.append(f"| {name} | {r['trainable']:,} | {ms} | {ratio:.3f} | {mb} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes and few steps (CI)")
    ap.add_argument("--dims", default="128,256,512")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-sweeps", action="store_true")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default: experiments/results/throughput.json, "
        "or runs/experiments_small/throughput.json with --small)",
    )
    args = ap.parse_args(argv)
    if args.small:
        args.dims, args.layers, args.batch, args.seq, args.steps = "64", 2, 2, 32, 2
    if args.out is None:
        args.out = (
            os.path.join("runs", "experiments_small", "throughput.json")
            if args.small
            else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "throughput.json")
        )
    variants = ("full", "wrap", "merge", "hand")
    base = Cfg(vocab=args.vocab, layers=args.layers, batch=args.batch, seq=args.seq, dtype=args.dtype)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}"
    print(f"jax {jax.__version__} on {jax.default_backend()} ({machine})")
    out = {
        "machine": machine,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "sizes": [],
        "targets_sweep": [],
        "rank_sweep": [],
    }
    for d in [int(x) for x in args.dims.split(",")]:
        cfg = Cfg(**{**base.__dict__, "dim": d, "heads": max(d // 64, 1)})
        out["sizes"].append(run_config(cfg, args.steps, variants))
        print(fmt_table(out["sizes"][-1:], variants, "size"), flush=True)
    if not args.no_sweeps:
        mid = Cfg(**{**base.__dict__, "dim": 64 if args.small else 256, "heads": 1 if args.small else 4})
        for targets in (("query",), ("query", "value"), ("query", "key", "value", "out"), ALL_TARGETS):
            out["targets_sweep"].append(
                run_config(Cfg(**{**mid.__dict__, "targets": targets}), args.steps, ("wrap", "hand"))
            )
        for rank in (4, 16) if args.small else (4, 16, 64, 128):
            out["rank_sweep"].append(
                run_config(Cfg(**{**mid.__dict__, "rank": rank}), args.steps, ("wrap", "hand"))
            )
    text = "\n\n".join(
        [fmt_table(out["sizes"], variants, f"Train step by model size ({machine})")]
        + (
            [
                fmt_table(out["targets_sweep"], ("wrap", "hand"), "Number of adapted matrices"),
                fmt_table(out["rank_sweep"], ("wrap", "hand"), "Rank"),
            ]
            if not args.no_sweeps
            else []
        )
    )
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
