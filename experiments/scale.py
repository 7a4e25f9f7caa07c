"""Per-chip memory of LoRA vs full fine-tuning for Llama-3 8B / 70B / 405B, from the memory planner.

Every figure is a compiler's own: the project's train step (`lora_jax.train.step.make_train_step`, and
its full fine-tuning counterpart) is lowered on abstract inputs with their shardings and compiled for

- TPU slices, ahead of time with libtpu (``tpu:v5e:2x2``, ``tpu:v5p:2x2x2``, ``tpu:v5p:4x4x4``,
  ``tpu:v5p:8x8x4``): the headline numbers;
- H200 GPUs, deviceless (1 and 8 devices; needs the ``gpu-plan`` extra, else those rows say so);
- 8 simulated host devices (``cpu``), to show how far the host compiler is from the accelerators'.

Settings of every row: fsdp over all devices, one sequence of 2,048 tokens per device, loss on every
next token, bfloat16 weights and compute, each layer rematerialised, LoRA r=16 on q and v (float32
deltas), AdamW. For each model the planner also searches the largest batch that fits at 2,048 tokens
(LoRA), and one row is checked against a hand estimate.

    python experiments/scale.py                      # everything: writes experiments/results/scale.{json,md}
    python experiments/scale.py --only tpu           # one group of targets (tpu, gpu, cpu)
    python experiments/scale.py --small --out DIR    # CI: a small Llama on cpu (and tpu:v5e:2x2 with libtpu)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

from lora_jax.train import plan as plan_lib
from lora_jax.train import plan_configs, plan_targets

GIB = 2**30
SEQ = 2048
MODELS = ("llama-3-8b", "llama-3-70b", "llama-3.1-405b")
TPU_ROWS = (("llama-3-8b", "tpu:v5e:2x2"), ("llama-3-8b", "tpu:v5p:2x2x2"), ("llama-3-70b", "tpu:v5p:2x2x2"),
            ("llama-3-70b", "tpu:v5p:4x4x4"), ("llama-3.1-405b", "tpu:v5p:8x8x4"))
GPU_ROWS = tuple((m, "gpu:h200", n) for m in MODELS for n in (1, 8))
CPU_ROWS = tuple((m, "cpu", 8) for m in MODELS)
SEARCH = (("llama-3-8b", "tpu:v5e:2x2"), ("llama-3-70b", "tpu:v5p:2x2x2"), ("llama-3.1-405b", "tpu:v5p:8x8x4"))

# --small: a 4-layer Llama whose shapes divide 8 and 4 devices.
SMALL = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "max_position_embeddings": 1024, "tie_word_embeddings": False}


def run_row(model: str, target: str, devices: int | None, method: str, seq: int, rank: int) -> dict:
    request = plan_lib.PlanRequest(model, devices=devices, mesh="fsdp=-1", method=method, rank=rank, seq=seq,
                                   target=target)
    t0 = time.perf_counter()
    try:
        row = plan_lib.plan(request)
    except (RuntimeError, ValueError) as e:  # e.g. the gpu: target without the CUDA plugin: say so, no figure
        row = {"model": model, "target": target, "devices": devices, "method": method, "status": "error",
               "error": str(e).strip().splitlines()[-1][:300]}
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(_line(row), flush=True)
    return row


def _line(r: dict) -> str:
    head = f"{r['model']:<15} {r['target']:<14} {str(r.get('devices')):>4} {r['method']:<5}"
    if r["status"] == "error":
        return f"{head} not compiled: {r['error']}"
    pd = r["per_device"]
    fits = "" if r["fits"] is None else ("fits" if r["fits"] else "DOES NOT FIT")
    memory = "" if r["device_memory"] is None else f"/ {r['device_memory'] / GIB:6.2f}"
    return (f"{head} {r['batch']}x{r['seq']}  total {pd['total'] / GIB:8.2f} GiB {memory} {fits:<12} "
            f"(temp {_gib(pd.get('temp'))}, compile {r['compile_seconds']:.0f} s)")


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def hand_estimate(model: str, devices: int, seq: int, rank: int) -> dict:
    """Bytes per device of LoRA at one sequence per device, fsdp over all devices, counted by hand.

    Arguments: bf16 weights / devices, float32 deltas with their Adam moments / devices. Temporaries:
    the input of each layer kept for the backward pass (bf16, ``L·T·d``); one layer recomputed in the
    backward pass (its gathered bf16 weights twice, for the all-gather of the next layer overlapping
    this one; float32 attention scores and their bf16 probabilities ``H·T²``; the MLP's three ``T·F``
    activations; the q/k/v/out ``T·d``-sized activations); the gathered embedding and output head; one
    chunk of 512 positions of float32 logits and their gradient.
    """
    cfg = plan_configs.llama_config(plan_configs.resolve(model))
    d, f, L, V, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size, cfg.num_heads
    kv = cfg.num_kv_heads * cfg.head_dim
    layer = 2 * d * cfg.num_heads * cfg.head_dim + 2 * d * kv + 3 * d * f
    params = L * layer + V * d * (1 if cfg.tie_word_embeddings else 2)
    lora = L * (rank * (d + cfg.num_heads * cfg.head_dim) + rank * (d + kv))
    est = {
        "params": 2 * params / devices,
        "deltas+adam": 3 * 4 * lora / devices,
        "layer inputs": 2 * L * seq * d,
        "one layer's gathered weights (x2)": 2 * 2 * layer,
        "attention scores + probs": (4 + 2) * H * seq * seq,
        "layer activations": 2 * (3 * seq * f + 4 * seq * d),
        "embedding + head gathered": 2 * V * d * (1 if cfg.tie_word_embeddings else 2),
        "logits chunk + grad": 2 * 4 * 512 * V,
    }
    est["total"] = sum(est.values())
    return {k: int(v) for k, v in est.items()}


def markdown(rows: list[dict]) -> str:
    out = ["| model | target | devices | method | batch × seq | params | deltas + opt state | temporaries | "
           "total (GiB) | memory (GiB) | fits | compile (s) |", "|" + "---|" * 12]
    for r in rows:
        if r["status"] == "error":
            out.append(f"| {r['model']} | {r['target']} | {r.get('devices')} | {r['method']} | | | | | not compiled: "
                       f"{r['error']} | | | |")
            continue
        pd = r["per_device"]
        fits = "" if r["fits"] is None else ("yes" if r["fits"] else "**no**")
        memory = "" if r["device_memory"] is None else f"{r['device_memory'] / GIB:.2f}"
        total = _gib(pd["total"]) + ("" if r["status"] == "ok" else " (compiler's refusal)")
        out.append(f"| {r['model']} | {r['target']} | {r['devices']} | {r['method']} | {r['batch']} × {r['seq']} | "
                   f"{_gib(pd['params'])} | {_gib(pd['deltas'] + pd['opt_state'])} | {_gib(pd.get('temp'))} | "
                   f"{total} | {memory} | {fits} | {r['compile_seconds']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a small Llama on cpu (and tpu:v5e:2x2): CI")
    ap.add_argument("--only", choices=("tpu", "gpu", "cpu", "search"), action="append", default=None,
                    help="run only these groups (repeatable); default: all")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=None, help="folder for scale.json and scale.md (default: experiments/results, "
                    "or runs/experiments_small with --small)")
    args = ap.parse_args(argv)
    plan_targets.quiet_host()
    out = pathlib.Path(args.out or (os.path.join("runs", "experiments_small") if args.small else
                                    pathlib.Path(__file__).resolve().parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    groups = set(args.only or ("tpu", "gpu", "cpu", "search"))
    seq = SEQ
    tpu_rows, gpu_rows, cpu_rows, search = TPU_ROWS, GPU_ROWS, CPU_ROWS, SEARCH
    if args.small:
        folder = out / "small-llama"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(SMALL))
        seq, small = 128, str(folder)
        has_tpu = importlib.util.find_spec("libtpu") is not None
        tpu_rows = ((small, "tpu:v5e:2x2"),) if has_tpu else ()
        gpu_rows, cpu_rows, search = (), ((small, "cpu", 8),), ()
    rows = []
    print(f"{'model':<15} {'target':<14} {'dev':>4} method", flush=True)
    for method in ("lora", "full"):
        if "tpu" in groups:
            rows += [run_row(m, t, None, method, seq, args.rank) for m, t in tpu_rows]
        if "gpu" in groups:
            rows += [run_row(m, t, n, method, seq, args.rank) for m, t, n in gpu_rows]
        if "cpu" in groups:
            rows += [run_row(m, t, n, method, seq, args.rank) for m, t, n in cpu_rows]
    searches = []
    if "search" in groups:
        for model, target in search:
            t0 = time.perf_counter()
            s = plan_lib.search(plan_lib.PlanRequest(model, mesh="fsdp=-1", rank=args.rank, seq=seq, target=target),
                                "batch", max_compiles=6)
            best = s["best"]
            searches.append({"model": model, "target": target, "seq": seq, "largest_batch": best and best["batch"],
                             "per_device_batch": best and best["batch"] // best["devices"],
                             "total": best and best["per_device"]["total"], "tried": s["tried"],
                             "wall_seconds": round(time.perf_counter() - t0, 1)})
            tried = [(t["value"], _gib(t["total"]), t["fits"]) for t in s["tried"]]
            print(f"largest LoRA batch at seq {seq} on {target} for {model}: {searches[-1]['largest_batch']} "
                  f"(tried: batch, GiB, fits = {tried})", flush=True)
    result = {"settings": {"seq": seq, "rank": args.rank, "mesh": "fsdp=-1", "dtype": "bfloat16", "remat": "full",
                           "targets": plan_lib.DEFAULT_TARGETS, "batch": "one sequence per device",
                           "command": "python experiments/scale.py" + (" --small" if args.small else "")},
              "rows": rows, "search": searches}
    if not args.small:
        cfg_devices = 8
        result["hand_estimate"] = {"model": "llama-3-8b", "target": "tpu:v5p:2x2x2", "method": "lora",
                                   "bytes": hand_estimate("llama-3-8b", cfg_devices, seq, args.rank)}
        print("hand estimate, llama-3-8b LoRA on 8 chips: " + ", ".join(
            f"{k} {v / GIB:.2f}" for k, v in result["hand_estimate"]["bytes"].items()) + " GiB")
    (out / "scale.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "scale.md").write_text(markdown(rows))
    print(f"wrote {out / 'scale.json'} and {out / 'scale.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
