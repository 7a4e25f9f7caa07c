"""Many adapters in one batch: prefill and decode throughput of a mixed-adapter batch, against one adapter.

One small Llama (random weights) built twice, in Flax (ours) and in PyTorch (``transformers``
``LlamaForCausalLM``, same sizes), rank-8 LoRA on the query and value projections, one batch of ``B``
prompts. Variants, timed interleaved in one process (A B C ... A B C ...) so load changes on a shared
machine hit all alike; the median of each is reported:

  merged      one adapter folded into the weights (``lj.merge``): the base model's cost
  unmerged    one adapter kept apart (``lj.wrap``): ``x·W + s·(x·a)·b``
  mixed-N     N distinct adapters in an `AdapterBank`, row e using adapter ``e mod N``
              (``lj.wrap(fn)(params, bank, x, adapter_ids=ids)``: one batched matmul with W, gathered
              factors, a batched low-rank contraction)
  peft-N      (N in --peft-counts, default 1 and 16) PEFT's mixed-batch inference (``adapter_names=``) with N adapters on the PyTorch model; PEFT
              runs the low-rank path once per adapter on that adapter's rows

Prefill: the whole prompt (``T`` tokens) through the model, tokens/s. Decode: ``lora_jax.models.llama
.generate`` (KV cache, one ``while_loop``) or ``transformers``' ``generate`` (greedy, KV cache) for
``new`` tokens after the prompt, new tokens/s. Memory: the base's parameter bytes and the adapters' bytes
(a bank holds N adapters padded to the largest rank).

    python experiments/multi_adapter.py              # CPU default (d=256, 4 layers, B=64, T=64, 16 new)
    python experiments/multi_adapter.py --small      # a quick check (tiny sizes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import lora_jax as lj
from lora_jax import serve
from lora_jax.models import llama

TARGETS = r".*/(query|value)/kernel/value"


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return out


def build_ours(cfg, batch, prompt, counts, rank, seed=0):
    model = llama.Llama(cfg)
    ids = jax.random.randint(jax.random.key(seed), (batch, prompt), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(seed), ids)
    rng = np.random.default_rng(seed)

    def adapter(k):
        d = lj.init(
            jax.random.key(100 + k), params, lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=TARGETS)
        )
        return jax.tree.map(lambda x: x + 0.02 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), d)

    adapters = [adapter(k) for k in range(max(counts))]
    return model, params, ids, adapters


def peft_model(cfg, n: int, rank: int):
    """A `transformers` Llama of `cfg`'s sizes with `n` PEFT LoRA adapters (q_proj, v_proj) and B ≠ 0."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings,
        )
    ).eval()
    conf = lambda: LoraConfig(  # noqa: E731
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    pm = get_peft_model(hf, conf(), adapter_name="a0")
    for k in range(1, n):
        pm.add_adapter(f"a{k}", conf())
    return pm.eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes for CI")
    ap.add_argument("--out", default="experiments/results/multi_adapter.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--peft-counts",
        default="1,16",
        help="adapter counts for PEFT's mixed batch (its per-adapter loop makes 64 slow on CPU)",
    )
    ap.add_argument("--no-peft", action="store_true", help="skip the PyTorch/PEFT peer")
    args = ap.parse_args(argv)
    if args.small:
        cfg = llama.LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            max_position_embeddings=64,
        )
        batch, prompt, new, counts, rank, reps = 8, 8, 4, (1, 4), 4, 2
    else:
        cfg = llama.LlamaConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=688,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            max_position_embeddings=256,
        )
        batch, prompt, new, counts, rank, reps = 64, 64, 16, (1, 4, 16, 64), 8, args.reps
    peft_counts = (1, 4) if args.small else tuple(int(c) for c in args.peft_counts.split(",") if c)
    model, params, ids, adapters = build_ours(cfg, batch, prompt, counts, rank)
    apply = jax.jit(model.apply)
    wrapped = jax.jit(lj.wrap(model.apply))
    mixed = jax.jit(lambda p, b, x, i: lj.wrap(model.apply)(p, b, x, adapter_ids=i))
    merged_params = jax.jit(lj.merge)(params, adapters[0])
    single_apply = lambda v, *a, **k: lj.wrap(model.apply)(v[0], v[1], *a, **k)  # noqa: E731
    banks = {n: lj.stack_adapters(adapters[:n]) for n in counts}
    row_ids = {n: jnp.asarray(np.arange(batch) % n, jnp.int32) for n in counts}

    prefill = {
        "merged": lambda: apply(merged_params, ids),
        "unmerged": lambda: wrapped(params, adapters[0], ids),
        **{f"mixed-{n}": (lambda n=n: mixed(params, banks[n], ids, row_ids[n])) for n in counts},
    }
    decode = {
        "merged": lambda: llama.generate(model.apply, merged_params, ids, new),
        "unmerged": lambda: llama.generate(single_apply, (params, adapters[0]), ids, new),
        **{
            f"mixed-{n}": (lambda n=n: serve.generate(model.apply, params, banks[n], row_ids[n], ids, new))
            for n in counts
        },
    }
    if not args.no_peft:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        pm = peft_model(cfg, max(peft_counts), rank)
        tids = torch.as_tensor(np.array(ids), dtype=torch.long)
        names = {n: [f"a{e % n}" for e in range(batch)] for n in peft_counts}

        def peft_prefill(n):
            with torch.inference_mode():
                return np.asarray(pm(input_ids=tids, adapter_names=names[n]).logits[:, -1, :1])

        def peft_decode(n):
            with torch.inference_mode():
                out = pm.generate(
                    input_ids=tids,
                    attention_mask=torch.ones_like(tids),
                    adapter_names=names[n],
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                )
                return np.asarray(out[:, -1:])

        for n in peft_counts:
            prefill[f"peft-{n}"] = lambda n=n: peft_prefill(n)
            decode[f"peft-{n}"] = lambda n=n: peft_decode(n)

    results = {}
    for kind, fns, tokens in (("prefill", prefill, batch * prompt), ("decode", decode, batch * new)):
        for k, fn in tqdm(fns.items(), desc=f"{kind}: compile and warm up", leave=False):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            print(f"  {kind} {k}: first call {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        times = {k: [] for k in fns}
        for _ in tqdm(range(reps), desc=f"{kind}: interleaved rounds", leave=False):
            for k, fn in fns.items():
                times[k] += timed(fn, 1)
        results[kind] = {
            k: {"median_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t), "times_s": t}
            for k, t in times.items()
        }
    base_bytes = nbytes(params)
    memory = {
        "base_bytes": base_bytes,
        "one_adapter_bytes": nbytes(adapters[0]),
        **{f"bank_{n}_bytes": nbytes((banks[n].a, banks[n].b, banks[n].scale)) for n in counts},
    }
    report = {
        "config": {
            "hidden": cfg.hidden_size,
            "layers": cfg.num_layers,
            "vocab": cfg.vocab_size,
            "batch": batch,
            "prompt": prompt,
            "new_tokens": new,
            "rank": rank,
            "targets": "q, v",
            "counts": list(counts),
            "peft_counts": list(peft_counts),
            "reps": reps,
        },
        "results": results,
        "memory": memory,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__},
    }
    if not args.no_peft:
        import peft
        import torch

        report["machine"].update(torch=torch.__version__, peft=peft.__version__)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)

    unm = {k: results[k]["unmerged"]["tokens_per_s"] for k in results}
    lines = [
        f"### Mixed-adapter batch, CPU ({os.cpu_count()} cores): Llama d={cfg.hidden_size}, "
        f"{cfg.num_layers} layers, batch {batch}, prompt {prompt}, {new} new tokens, rank {rank} on q, v",
        "",
        "| variant | prefill tokens/s | × unmerged | decode tokens/s | × unmerged | adapter bytes |",
        "|---|---|---|---|---|---|",
    ]
    for k in prefill:
        n = k.split("-")[-1]
        mem = (
            memory["one_adapter_bytes"] if k in ("merged", "unmerged") else memory.get(f"bank_{n}_bytes", "")
        )
        if k.startswith("peft"):
            mem = int(n) * memory["one_adapter_bytes"]
        p, d = results["prefill"][k]["tokens_per_s"], results["decode"][k]["tokens_per_s"]
        lines.append(
            f"| {k} | {p:,.0f} | {p / unm['prefill']:.2f} | {d:,.0f} | {d / unm['decode']:.2f} | {mem:,} |"
        )
    lines.append("")
    lines.append(f"Base parameters: {base_bytes:,} bytes (memory = base + adapter bytes).")
    if not args.no_peft:
        for n in peft_counts:
            lines.append(
                f"Ours mixed-{n} vs PEFT mixed-{n}: prefill "
                f"{results['prefill'][f'mixed-{n}']['tokens_per_s'] / results['prefill'][f'peft-{n}']['tokens_per_s']:.2f}×, "
                f"decode {results['decode'][f'mixed-{n}']['tokens_per_s'] / results['decode'][f'peft-{n}']['tokens_per_s']:.2f}×"
            )
    table = "\n".join(lines)
    print(table)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
