"""Train-step speed and memory: full fine-tuning vs `lj.wrap` vs merge-on-the-fly vs hand-written LoRA.

All four train the same GPT-style decoder with AdamW, side by side in one process (ratios are what
carry over between machines):

  full       gradients and AdamW state for every weight
  wrap       ``lj.wrap(model.apply)(params, deltas, x)``, gradients w.r.t. the deltas only
  merge      ``model.apply(lj.merge(params, deltas), x)`` inside the step (builds W + s·a·b and its
             full W-shaped gradient, then projects it onto a and b)
  hand       a model with LoRA written into its layers (``x·W + s·(x·a)·b``): the reference limit

Memory levers, each a flag (``--levers`` takes them joined by ``+``; ``none`` is the unchanged step):

  chunked    the cross-entropy computed 256 positions at a time (``lora_jax.train.step.chunked_lm_loss``):
             never all ``(B, T, V)`` float32 logits
  xla        attention by ``jax.nn.dot_product_attention`` (XLA), instead of einsum-softmax-einsum
  cudnn      the same with cuDNN's flash attention (GPU targets only): no ``(B, H, T, T)`` scores stored
  dots       each layer under ``jax.checkpoint`` with ``dots_with_no_batch_dims_saveable``: projection
             outputs kept, attention and element-wise work recomputed in the backward pass
  full       each layer fully rematerialised (only its input kept)
  bf16base   the frozen base weights stored in bfloat16 (LoRA variants; deltas and AdamW stay float32)
  donate     the batch donated to the step as well as the trained leaves and optimizer state

Timed runs (the default) report the median step time after compilation, tokens/s and the compiled
memory (``.memory_analysis()``: temporaries + arguments + outputs); then two sweeps at one size,
`wrap` against `hand`: the number of adapted matrices, and the rank. ``--levers auto`` (the default)
is ``chunked+cudnn`` on a GPU backend and ``none`` elsewhere. ``--compare-levers`` times `wrap`
unchanged against `wrap` with ``--levers``, interleaved.

``--memory-only`` compiles each variant ahead of time from ``jax.ShapeDtypeStruct`` inputs (no
weights, no steps) and prints one JSON object per line: ``variant``, ``levers``, ``total_bytes``
(arguments + temporaries + outputs), ``peak_bytes`` (the same less donated buffers), ``flops``.
``--target gpu:h200`` compiles for an H200 with XLA's CUDA compiler and no GPU, in a child process
(``--python``: an interpreter with ``jax[cuda12]`` matched to jax, the ``gpu-plan`` extra). The
deviceless GPU executable reports no cost analysis, so its ``flops`` come from the same step compiled
for the host (``flops_source: "cpu"``; cuDNN attention counted as its XLA equivalent). XLA counts a
loop body once, so ``matmul_flops`` (every ``dot_general`` of the step's jaxpr, scan bodies times their
length) is the figure to compare levers by; ``--trace-only`` computes it alone, without compiling.

    python experiments/throughput.py                 # sizes d=128,256,512; writes experiments/results/throughput.json
    python experiments/throughput.py --small         # a quick CI-sized run
    python experiments/throughput.py --memory-only --target gpu:h200 --python GPU_VENV/bin/python \\
        --dims 1024 --layers 24 --vocab 50257 --batch 8 --seq 1024 --dtype bfloat16 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax.models.layers import attention as sdpa
from lora_jax.train.step import chunked_lm_loss

ALL_TARGETS = ("query", "key", "value", "out", "up", "down")
VARIANTS = ("full", "wrap", "merge", "hand")
LEVERS = ("chunked", "xla", "cudnn", "dots", "full", "bf16base", "donate")
GPU_LEVERS = "chunked+cudnn"  # the lever set the timed runs use on a GPU (README: the H200-target table)
REMAT = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "full": None}


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
    attention: str = "einsum"  # einsum | xla | cudnn
    loss: str = "plain"  # plain | chunked
    loss_chunk: int = 256
    remat: str = "none"  # none | dots | full
    base_dtype: str = "float32"  # storage of the frozen base weights (LoRA variants)
    donate_batch: bool = False


def with_levers(cfg: Cfg, levers: str) -> Cfg:
    """`cfg` with the levers named in ``"chunked+xla+dots"`` (``"none"`` or ``""``: unchanged)."""
    names = [x for x in levers.split("+") if x and x != "none"]
    unknown = [x for x in names if x not in LEVERS]
    if unknown:
        raise ValueError(
            f"--levers {levers!r}: unknown {unknown}; expected names from {LEVERS} joined by '+'."
        )
    kw = {}
    for x in names:
        if x == "chunked":
            kw["loss"] = "chunked"
        elif x in ("xla", "cudnn"):
            kw["attention"] = x
        elif x in ("dots", "full"):
            kw["remat"] = x
        elif x == "bf16base":
            kw["base_dtype"] = "bfloat16"
        elif x == "donate":
            kw["donate_batch"] = True
    return dataclasses.replace(cfg, **kw)


def lever_name(cfg: Cfg) -> str:
    out = ["chunked"] if cfg.loss == "chunked" else []
    out += [cfg.attention] if cfg.attention != "einsum" else []
    out += [cfg.remat] if cfg.remat != "none" else []
    out += ["bf16base"] if cfg.base_dtype != "float32" else []
    out += ["donate"] if cfg.donate_batch else []
    return "+".join(out) or "none"


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


class Block(nn.Module):
    """One pre-LN decoder layer: ``h + attn(LN(h))``, then ``h + mlp(LN(h))``."""

    cfg: Cfg
    hand_lora: bool = False

    @nn.compact
    def __call__(self, h):
        c, dt = self.cfg, jnp.dtype(self.cfg.dtype)

        def dense(features, kind):  # names: params/h{i}/{kind}/kernel
            rank = c.rank if (self.hand_lora and kind in c.targets) else 0
            return Dense(features, rank, c.alpha / c.rank, dt, name=kind)

        hd = c.dim // c.heads
        split = lambda t: t.reshape(t.shape[:2] + (c.heads, hd))
        x = nn.LayerNorm(dtype=dt, name="ln1")(h)
        q, k, v = (split(dense(c.dim, kind)(x)) for kind in ("query", "key", "value"))
        if c.attention == "einsum":
            mask = jnp.tril(jnp.ones((h.shape[1], h.shape[1]), bool))
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.asarray(np.sqrt(hd), dt)
            att = jax.nn.softmax(jnp.where(mask, att, jnp.asarray(-1e9, dt)).astype(jnp.float32)).astype(dt)
            o = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        else:
            o = sdpa(q, k, v, implementation=c.attention)
        h = h + dense(c.dim, "out")(o.reshape(h.shape))
        x = nn.LayerNorm(dtype=dt, name="ln2")(h)
        return h + dense(c.dim, "down")(jax.nn.gelu(dense(4 * c.dim, "up")(x)))


class GPT(nn.Module):
    cfg: Cfg
    hand_lora: bool = False

    @nn.compact
    def __call__(self, ids, attention_mask=None):
        c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        h = (
            nn.Embed(c.vocab, c.dim, name="wte")(ids)
            + self.param("wpe", nn.initializers.normal(0.02), (c.seq, c.dim))[: ids.shape[1]]
        )
        h = h.astype(dt)
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT[c.remat], prevent_cse=True)
        for i in range(c.layers):
            h = block(c, self.hand_lora, name=f"h{i}")(h)
        h = nn.LayerNorm(dtype=dt, name="ln_f")(h)
        return Dense(c.vocab, dtype=dt, name="lm_head")(h).astype(jnp.float32)


def target_regex(targets):
    return rf"params/h\d+/({'|'.join(targets)})/kernel"


def lm_loss(cfg: Cfg, apply_fn):
    """``loss(variables, ids) -> mean next-token cross-entropy`` for ``apply_fn(variables, ids, ...)``."""
    if cfg.loss == "plain":
        return lambda v, ids: optax.softmax_cross_entropy_with_integer_labels(
            apply_fn(v, ids)[:, :-1], ids[:, 1:]
        ).mean()
    chunked = chunked_lm_loss(apply_fn, chunk=cfg.loss_chunk)

    def loss(v, ids):
        tgt = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))  # the last position predicts nothing: weight 0
        w = jnp.pad(jnp.ones(tgt[:, 1:].shape, jnp.float32), ((0, 0), (0, 1)))
        total, n = chunked(v, ids, None, tgt, w)
        return total / n

    return loss


def build(kind: str, cfg: Cfg, key, abstract: bool = False):
    """``(step, donate_argnums, args)`` of one variant; with `abstract`, args are ``ShapeDtypeStruct``s."""
    ev = jax.eval_shape if abstract else (lambda f, *a: f(*a))
    ids = ev(lambda k: jax.random.randint(k, (cfg.batch, cfg.seq), 0, cfg.vocab), key)
    model = GPT(cfg, hand_lora=kind == "hand")
    tx = optax.adamw(1e-4)
    base_dt = jnp.dtype(cfg.base_dtype)
    frozen = lambda tree: jax.tree.map(lambda x: x.astype(base_dt), tree)
    donate_ids = (3,) if cfg.donate_batch else ()

    def lora_step(loss):
        def step(train, opt, base, ids):
            l, g = jax.value_and_grad(loss)(train, base, ids)
            u, opt = tx.update(g, opt, train)
            return optax.apply_updates(train, u), opt, l

        return step

    if kind == "full":
        params = ev(model.init, key, ids)
        loss = lm_loss(cfg, model.apply)

        def full(params, opt, ids):
            l, g = jax.value_and_grad(loss)(params, ids)
            u, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, u), opt, l

        return full, (0, 1) + ((2,) if cfg.donate_batch else ()), (params, ev(tx.init, params), ids)
    if kind in ("wrap", "merge"):
        params = ev(model.init, key, ids)
        spec = lj.LoraSpec(rank=cfg.rank, alpha=cfg.alpha, targets=target_regex(cfg.targets))
        deltas = ev(lambda k, p: lj.init(k, p, spec), key, params)
        loss = lm_loss(cfg, model.apply)
        if kind == "wrap":  # the whole loss is wrapped: a chunked loss intercepts the head inside it
            wrapped = lj.wrap(loss)
            fn = lambda d, p, x: wrapped(p, d, x)
        else:
            fn = lambda d, p, x: loss(lj.merge(p, d), x)
        return lora_step(fn), (0, 1) + donate_ids, (deltas, ev(tx.init, deltas), ev(frozen, params), ids)
    if kind == "hand":
        hp = ev(model.init, key, ids)["params"]
        flat, tree = jax.tree_util.tree_flatten_with_path(hp)
        is_lora = lambda path: path[-1].key in ("lora_a", "lora_b")
        lora = {jax.tree_util.keystr(p): x for p, x in flat if is_lora(p)}
        base = {jax.tree_util.keystr(p): x for p, x in flat if not is_lora(p)}
        order = [jax.tree_util.keystr(p) for p, _ in flat]
        loss = lm_loss(cfg, model.apply)

        def hand_loss(lora, base, x):
            leaves = [lora[k] if k in lora else base[k] for k in order]
            return loss({"params": jax.tree_util.tree_unflatten(tree, leaves)}, x)

        return lora_step(hand_loss), (0, 1) + donate_ids, (lora, ev(tx.init, lora), ev(frozen, base), ids)
    raise ValueError(f"unknown variant {kind!r}; expected one of {VARIANTS}.")


def trainable(kind: str, cfg: Cfg) -> int:
    _, _, args = build(kind, cfg, jax.random.key(0), abstract=True)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(args[0]))


# ----------------------------------------------------------------------------------------------------
# Timed runs


def copy_args(args):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), args)


def memory(compiled) -> dict:
    """Bytes of a compiled step from ``.memory_analysis()`` (None where the backend has none)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {"total_bytes": None, "temp_bytes": None}
    parts = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }
    total = parts["argument_bytes"] + parts["output_bytes"] + parts["temp_bytes"]
    return {"total_bytes": total, "peak_bytes": total - parts["alias_bytes"], **parts}


def flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per program
        ca = ca[0] if ca else None
    return None if not ca or "flops" not in ca else float(ca["flops"])


def matmul_flops(jaxpr) -> float:
    """FLOPs of every ``dot_general`` in a (closed) jaxpr, nested jaxprs included and a ``scan`` body
    counted ``length`` times (XLA's cost analysis counts a loop body once: chunked losses and scanned
    layers would be undercounted); a ``cond`` counts its costliest branch, a ``while`` body once."""
    from jax.extend import core as jex

    def subs(value):
        if isinstance(value, jex.ClosedJaxpr):
            return [value.jaxpr]
        if isinstance(value, jex.Jaxpr):
            return [value]
        if isinstance(value, (tuple, list)):
            return [j for v in value for j in subs(v)]
        return []

    def count(jx) -> float:
        total = 0.0
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
                total += 2.0 * float(np.prod(out.shape)) * float(np.prod([lhs.shape[d] for d in contract]))
                continue
            inner = [count(j) for v in eqn.params.values() for j in subs(v)]
            if not inner:
                continue
            if eqn.primitive.name == "cond":
                total += max(inner)
            else:
                total += (
                    eqn.params.get("length", 1) * sum(inner) if eqn.primitive.name == "scan" else sum(inner)
                )
        return total

    return count(jaxpr.jaxpr if isinstance(jaxpr, jex.ClosedJaxpr) else jaxpr)


def compile_variant(kind, cfg, key):
    """(compiled step, memory dict, fresh trained state, constant args)."""
    step, donate, args = build(kind, cfg, key)
    compiled = jax.jit(step, donate_argnums=donate).lower(*args).compile()
    return compiled, memory(compiled), list(args[:2]), args[2:]


def run_config(cfg: Cfg, n_steps: int, variants, cfgs=None) -> dict:
    """Steps of all variants interleaved one by one (A B C D A B C D ...), so that load changes on a
    shared machine hit every variant alike; the median of each variant's step times is reported.

    `cfgs` (name -> (kind, Cfg)) overrides what each name in `variants` runs (default: kind = name).
    """
    cfgs = cfgs or {v: (v, cfg) for v in variants}
    key = jax.random.key(0)
    counts = {trainable(k, c) for v, (k, c) in cfgs.items() if k != "full"}
    assert len(counts) == 1, counts
    row = {"config": cfg.__dict__ | {"targets": list(cfg.targets)}, "trainable": counts.pop()}
    live = {v: compile_variant(*cfgs[v], key) for v in variants}
    times = {v: [] for v in variants}
    losses = {}
    for i in range(n_steps + 2):
        for v in variants:
            step, mem, state, rest = live[v]
            if cfgs[v][1].donate_batch:
                rest = rest[:-1] + (jnp.array(rest[-1], copy=True),)
            t0 = time.perf_counter()
            *state, loss = step(*state, *rest)
            jax.block_until_ready(loss)
            if i >= 2:  # the first two calls warm up
                times[v].append(time.perf_counter() - t0)
            live[v] = (step, mem, state, live[v][3])
            losses[v] = float(loss)
    for v in variants:
        t = statistics.median(times[v])
        mem = live[v][1]
        row[v] = {
            "ms": 1e3 * t,
            "tokens_per_s": cfg.batch * cfg.seq / t,
            "mem_mb": None if mem["total_bytes"] is None else mem["total_bytes"] / 2**20,
            "temp_mb": None if mem["temp_bytes"] is None else mem["temp_bytes"] / 2**20,
            "loss": losses[v],
            "levers": lever_name(cfgs[v][1]),
        }
    return row


def fmt_table(rows, variants, title, ref=("wrap", "hand")):
    lines = [
        f"### {title}",
        "",
        "| config | trainable | "
        + " | ".join(f"{v} ms" for v in variants)
        + f" | {ref[0]}/{ref[1]} | "
        + " | ".join(f"{v} MB" for v in variants)
        + " |",
        "|" + "---|" * (3 + 2 * len(variants)),
    ]
    for r in rows:
        c = r["config"]
        name = f"d={c['dim']} L={c['layers']} r={c['rank']} {'+'.join(c['targets'])} {c['dtype']}"
        ms = " | ".join(f"{r[v]['ms']:.1f}" for v in variants)
        mb = " | ".join("-" if r[v]["mem_mb"] is None else f"{r[v]['mem_mb']:.0f}" for v in variants)
        ratio = r[ref[0]]["ms"] / r[ref[1]]["ms"]
        lines.append(f"| {name} | {r['trainable']:,} | {ms} | {ratio:.3f} | {mb} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time memory (no weights, no steps)

UNCHANGED_ROWS = [(v, "none") for v in VARIANTS]
LEVER_ROWS = [("wrap", x) for x in ("chunked", "xla", "cudnn", "dots", "full", "bf16base", "donate")]


def default_rows(target: str, chosen: str) -> list[tuple[str, str]]:
    rows = UNCHANGED_ROWS + LEVER_ROWS + [(v, chosen) for v in VARIANTS]
    if not target.startswith("gpu"):
        rows = [(v, x) for v, x in rows if "cudnn" not in x]
    return list(dict.fromkeys(rows))


def compile_memory(kind: str, cfg: Cfg, sharding, host_flops: bool, trace_only: bool = False) -> dict:
    """Compiles one variant for `sharding`'s device from ``ShapeDtypeStruct`` inputs: memory and FLOPs."""
    from jax.sharding import SingleDeviceSharding

    row = {"variant": kind, "levers": lever_name(cfg)}
    # cuDNN attention is one custom call in the jaxpr (and traces only where cuDNN is installed): count
    # its XLA equivalent's matmuls instead
    xla_cfg = dataclasses.replace(cfg, attention="xla") if cfg.attention == "cudnn" else cfg
    step, donate, args = build(kind, xla_cfg, jax.random.key(0), abstract=True)
    row["matmul_flops"] = matmul_flops(jax.make_jaxpr(step)(*args))
    if trace_only:
        return row
    step, donate, args = build(kind, cfg, jax.random.key(0), abstract=True)
    place = lambda s: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), args)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=donate).lower(*place(sharding)).compile()
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    row |= memory(compiled)
    row["flops"], row["flops_source"] = flops(compiled), next(iter(sharding.device_set)).platform
    if row["flops"] is None and host_flops:  # the deviceless GPU executable has no cost analysis
        step, donate, args = build(kind, xla_cfg, jax.random.key(0), abstract=True)
        cpu = SingleDeviceSharding(jax.devices("cpu")[0])
        host = jax.jit(step, donate_argnums=donate).lower(*place(cpu)).compile()
        row["flops"], row["flops_source"] = flops(host), "cpu"
        row["host_total_bytes"] = memory(host)["total_bytes"]
    row["total_gib"] = None if row["total_bytes"] is None else round(row["total_bytes"] / 2**30, 2)
    return row


_MARK = "THROUGHPUT_ROW "


def memory_worker(args) -> None:
    """In the compiling process: one JSON line (prefixed) per row."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from lora_jax.train import plan_targets

    target = plan_targets.parse_target(args.target)
    device = plan_targets.compile_devices(target, 1)[0]  # checks that the target's compiler is installed
    sharding = SingleDeviceSharding(device)
    if target.platform == "gpu":  # a one-GPU topology from the card's facts (GpuTargetConfig), no GPU
        topo = topologies.get_topology_desc(
            platform="cuda", target_config=plan_targets._gpu_target_config(target.name), topology="1x1x1"
        )
        sharding = NamedSharding(topologies.make_mesh(topo, (1,), ("d",)), PartitionSpec())
    cfg = base_cfg(args)
    for kind, levers in parse_rows(args.rows, args.target, args.chosen):
        try:
            row = compile_memory(
                kind, with_levers(cfg, levers), sharding, not args.no_host_flops, args.trace_only
            )
        except Exception as e:  # one row failing (e.g. cuDNN refusing a shape) must not lose the others
            row = {"variant": kind, "levers": levers, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        row |= {"target": args.target, "jax": jax.__version__}
        print(_MARK + json.dumps(row), flush=True)


def parse_rows(text: str | None, target: str, chosen: str) -> list[tuple[str, str]]:
    if not text:
        return default_rows(target, chosen)
    rows = []
    for item in text.split(","):
        kind, _, levers = item.partition(":")
        if kind not in VARIANTS:
            raise ValueError(f"--rows {item!r}: expected VARIANT[:LEVERS] with VARIANT in {VARIANTS}.")
        rows.append((kind, levers or "none"))
    return rows


def memory_only(args, argv) -> list[dict]:
    """Runs the compiles in a child process (the target's environment) and relays its rows."""
    from lora_jax.train import plan_targets

    target = plan_targets.parse_target(args.target)
    if target.platform == "tpu":
        raise ValueError("--memory-only --target: cpu or gpu:KIND (TPU: see experiments/step_memory.py).")
    env = plan_targets.environment(target, 1)
    cmd = [args.python, os.path.abspath(__file__), *argv, "--worker"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows = []
    for line in proc.stdout:
        if line.startswith(_MARK):
            rows.append(json.loads(line[len(_MARK) :]))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
            else:
                print(fmt_memory_row(rows[-1]), flush=True)
    err = proc.stderr.read()
    if proc.wait() != 0 or not rows:
        raise RuntimeError(f"the compiling process failed (exit {proc.returncode}):\n{err[-4000:]}")
    return rows


def fmt_memory_row(r: dict) -> str:
    if "error" in r:
        return f"{r['variant']:6s} {r['levers']:28s} error: {r['error']}"
    gib = "-" if r.get("total_bytes") is None else f"{r['total_bytes'] / 2**30:7.2f} GiB"
    return f"{r['variant']:6s} {r['levers']:28s} {gib}  matmuls {r['matmul_flops'] / 1e12:.2f} TFLOP"


def fmt_memory_table(rows: list[dict], title: str) -> str:
    """Markdown: GiB, and matmul FLOPs relative to the same variant's unchanged step."""
    base = {r["variant"]: r["matmul_flops"] for r in rows if r.get("levers") == "none" and "error" not in r}
    lines = [
        f"### {title}",
        "",
        "| variant | levers | total GiB | less donated GiB | temporaries GiB | XLA TFLOP | matmul TFLOP "
        "| matmul FLOPs / unchanged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['levers']} | error: {r['error'][:80]} | | | | | |")
            continue
        gib = lambda k, r=r: "-" if r.get(k) is None else f"{r[k] / 2**30:.2f}"
        tf = lambda k, r=r: "-" if r.get(k) is None else f"{r[k] / 1e12:.2f}"
        b = base.get(r["variant"])
        ratio = "-" if not b else f"{r['matmul_flops'] / b:.3f}"
        lines.append(
            f"| {r['variant']} | {r['levers']} | {gib('total_bytes')} | {gib('peak_bytes')} | "
            f"{gib('temp_bytes')} | {tf('flops')} | {tf('matmul_flops')} | {ratio} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------


def base_cfg(args) -> Cfg:
    d = int(args.dims.split(",")[0])
    return Cfg(
        vocab=args.vocab,
        dim=d,
        heads=max(d // 64, 1),
        layers=args.layers,
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
        loss_chunk=args.loss_chunk,
    )


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes and few steps (CI)")
    ap.add_argument("--dims", default="128,256,512")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--loss-chunk", type=int, default=256, help="positions per cross-entropy chunk")
    ap.add_argument(
        "--levers",
        default="auto",
        help=f"timed runs: levers joined by '+', from {LEVERS}; auto: {GPU_LEVERS} on a GPU backend (the "
        "H200-target compile's choice), none elsewhere (on the CPU they save memory but not time)",
    )
    ap.add_argument(
        "--compare-levers", action="store_true", help="time wrap unchanged against wrap with --levers"
    )
    ap.add_argument("--no-sweeps", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="compile ahead of time, report memory")
    ap.add_argument("--target", default="cpu", help="--memory-only: cpu or gpu:h200 (gpu:h100, gpu:a100)")
    ap.add_argument("--python", default=sys.executable, help="--memory-only: the compiling interpreter")
    ap.add_argument(
        "--rows",
        default=None,
        help="--memory-only: VARIANT[:LEVERS],... (default: every variant unchanged, each lever on "
        "wrap, every variant with --chosen)",
    )
    ap.add_argument("--chosen", default="chunked+xla+dots", help="--memory-only: the lever set applied")
    ap.add_argument("--no-host-flops", action="store_true", help="--memory-only: skip the host compile")
    ap.add_argument("--json", action="store_true", help="--memory-only: print JSON lines")
    ap.add_argument(
        "--trace-only", action="store_true", help="--memory-only: only the jaxpr's matmul FLOPs, no compile"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default: experiments/results/throughput.json or throughput_memory_TARGET.json, "
        "or under runs/experiments_small/ with --small)",
    )
    return ap.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.small:
        args.dims, args.layers, args.batch, args.seq, args.steps = "64", 2, 2, 32, 2
        args.vocab = min(args.vocab, 4096)
    if args.worker:
        return memory_worker(args)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if args.memory_only:
        name = f"throughput_memory_{args.target.replace(':', '_')}.json"
        out = args.out or os.path.join("runs/experiments_small" if args.small else results, name)
        rows = memory_only(args, argv)
        c = base_cfg(args)
        title = (
            f"Compiled train-step memory, target {args.target} (d={c.dim}, L={c.layers}, V={c.vocab}, "
            f"batch {c.batch}x{c.seq}, {c.dtype}, r={c.rank} on {'+'.join(c.targets)}, AdamW; jax {jax.__version__})"
        )
        text = fmt_memory_table(rows, title)
        if not args.json:
            print(text)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(
                {"target": args.target, "config": c.__dict__ | {"targets": list(c.targets)}, "rows": rows},
                f,
                indent=1,
            )
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(text + "\n")
        return rows
    if args.out is None:
        args.out = (
            os.path.join("runs", "experiments_small", "throughput.json")
            if args.small
            else os.path.join(results, "throughput.json")
        )
    if args.levers == "auto":
        args.levers = GPU_LEVERS if jax.default_backend() == "gpu" else "none"
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}"
    print(f"jax {jax.__version__} on {jax.default_backend()} ({machine})")
    out = {
        "machine": machine,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "levers": args.levers,
        "sizes": [],
        "targets_sweep": [],
        "rank_sweep": [],
        "lever_comparison": [],
    }
    base = with_levers(dataclasses.replace(base_cfg(args), dim=128, heads=2), args.levers)
    tables = []
    for d in [int(x) for x in args.dims.split(",")]:
        cfg = dataclasses.replace(base, dim=d, heads=max(d // 64, 1))
        if args.compare_levers:
            unchanged = with_levers(
                dataclasses.replace(
                    cfg,
                    attention="einsum",
                    loss="plain",
                    remat="none",
                    base_dtype="float32",
                    donate_batch=False,
                ),
                "none",
            )
            names = ("wrap", "wrap+levers")
            row = run_config(
                cfg, args.steps, names, {"wrap": ("wrap", unchanged), "wrap+levers": ("wrap", cfg)}
            )
            out["lever_comparison"].append(row)
            print(
                fmt_table([row], names, f"wrap unchanged vs wrap with {args.levers}", names[::-1]), flush=True
            )
            continue
        out["sizes"].append(run_config(cfg, args.steps, VARIANTS))
        print(fmt_table(out["sizes"][-1:], VARIANTS, "size"), flush=True)
    if out["lever_comparison"]:
        tables.append(
            fmt_table(
                out["lever_comparison"],
                ("wrap", "wrap+levers"),
                f"wrap unchanged vs with {args.levers} ({machine})",
                ("wrap+levers", "wrap"),
            )
        )
    if out["sizes"]:
        tables.append(
            fmt_table(out["sizes"], VARIANTS, f"Train step by model size ({machine}; levers {args.levers})")
        )
    if not args.no_sweeps and not args.compare_levers:
        mid = dataclasses.replace(base, dim=64 if args.small else 256, heads=1 if args.small else 4)
        for targets in (("query",), ("query", "value"), ("query", "key", "value", "out"), ALL_TARGETS):
            out["targets_sweep"].append(
                run_config(dataclasses.replace(mid, targets=targets), args.steps, ("wrap", "hand"))
            )
        for rank in (4, 16) if args.small else (4, 16, 64, 128):
            out["rank_sweep"].append(
                run_config(dataclasses.replace(mid, rank=rank), args.steps, ("wrap", "hand"))
            )
        tables += [
            fmt_table(out["targets_sweep"], ("wrap", "hand"), "Number of adapted matrices"),
            fmt_table(out["rank_sweep"], ("wrap", "hand"), "Rank"),
        ]
    text = "\n\n".join(tables)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
