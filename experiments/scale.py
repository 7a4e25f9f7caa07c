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
    python experiments/scale.py --only gpu           # one group (tpu, gpu, cpu, search); keeps the others' results
    python experiments/scale.py --report-only        # rewrite scale.md from scale.json, no compile
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
from lora_jax.train import plan_configs, plan_search, plan_targets

GIB = 2**30
SEQ = 2048
MODELS = ("llama-3-8b", "llama-3-70b", "llama-3.1-405b")
TPU_ROWS = (
    ("llama-3-8b", "tpu:v5e:2x2"),
    ("llama-3-8b", "tpu:v5p:2x2x2"),
    ("llama-3-70b", "tpu:v5p:2x2x2"),
    ("llama-3-70b", "tpu:v5p:4x4x4"),
    ("llama-3.1-405b", "tpu:v5p:8x8x4"),
)
GPU_ROWS = tuple((m, "gpu:h200", n) for m in MODELS for n in (1, 8))
CPU_ROWS = tuple((m, "cpu", 8) for m in MODELS)
SEARCH = (
    ("llama-3-8b", "tpu:v5e:2x2"),
    ("llama-3-70b", "tpu:v5p:2x2x2"),
    ("llama-3.1-405b", "tpu:v5p:8x8x4"),
)

# --small: a 4-layer Llama whose shapes divide 8 and 4 devices.
SMALL = {
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def run_row(model: str, target: str, devices: int | None, method: str, seq: int, rank: int) -> dict:
    request = plan_lib.PlanRequest(
        model, devices=devices, mesh="fsdp=-1", method=method, rank=rank, seq=seq, target=target
    )
    t0 = time.perf_counter()
    try:
        row = plan_lib.plan(request)
    except Exception as e:  # e.g. the gpu: target without the CUDA plugin: say so, no figure
        row = {
            "model": model,
            "target": target,
            "devices": devices,
            "method": method,
            "status": "error",
            "error": str(e).strip().splitlines()[-1][:300],
        }
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
    return (
        f"{head} {r['batch']}x{r['seq']}  total {pd['total'] / GIB:8.2f} GiB {memory} {fits:<12} "
        f"(temp {_gib(pd.get('temp'))}, compile {r['compile_seconds']:.0f} s)"
    )


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def hand_estimate(model: str, devices: int, seq: int, rank: int) -> dict:
    """Bytes per device of LoRA at one sequence per device, fsdp over all devices, counted by hand.

    Arguments: the bf16 weights / devices; the float32 deltas and their two Adam moments / devices.
    Temporaries with every layer rematerialised: each layer's bf16 input kept for the backward pass
    (``L·T·d``); the layer being recomputed: its bf16 weights all-gathered once, the float32
    attention scores and their bf16 probabilities (``H·T²``), the MLP's three ``T·F`` and the
    projections' four ``T·d``-sized bf16 activations; one 512-position chunk of float32 logits and
    their gradient. Not counted: the embedding and output head, which stay sharded (the head contracts
    over the fsdp-sharded ``d``: partial sums are reduced, nothing is gathered), and any second buffer
    the compiler keeps to overlap the next layer's all-gather with this layer's compute.
    """
    cfg = plan_configs.llama_config(plan_configs.resolve(model))
    d, f, L, V, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size, cfg.num_heads
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = 2 * d * q + 2 * d * kv + 3 * d * f
    params = L * layer + V * d * (1 if cfg.tie_word_embeddings else 2)
    lora = L * rank * (d + q + d + kv)
    est = {
        "params": 2 * params / devices,
        "deltas + Adam": 3 * 4 * lora / devices,
        "saved layer inputs": 2 * L * seq * d,
        "one layer's gathered weights": 2 * layer,
        "attention scores + probabilities": (4 + 2) * H * seq * seq,
        "MLP and projection activations": 2 * (3 * seq * f + 4 * seq * d),
        "logits chunk + gradient": 2 * 4 * 512 * V,
    }
    est["total"] = sum(est.values())
    return {k: int(v) for k, v in est.items()}


def _cell(r: dict | None, *keys: str) -> str:
    if r is None:
        return ""
    if r["status"] == "error":
        return "not compiled"
    pd = r["per_device"]
    text = " / ".join(_gib(sum(pd.get(k) or 0 for k in key.split("+"))) for key in keys)
    if r["status"] != "ok":
        return text + " (refused)"
    return text if r["fits"] in (None, True) else f"**{text}**"


def markdown(result: dict) -> str:
    """The tables of `result`: LoRA beside full fine-tuning per model and target, the batch searches,
    the hand estimate. Bold: does not fit; "refused": the TPU compiler's out-of-memory error (its figure)."""
    pairs: dict[tuple, dict] = {}
    for r in result["rows"]:
        pairs.setdefault((r["model"], r["target"], r.get("devices")), {})[r["method"]] = r
    out = [
        "| model | target | devices | batch × seq | params | LoRA: deltas + opt / temp / **total** | "
        "full: opt / temp / **total** | memory | compile s (LoRA, full) |",
        "|" + "---|" * 9,
    ]
    for (model, target, devices), by in pairs.items():
        lora, full = by.get("lora"), by.get("full")
        ok = next((r for r in (lora, full) if r and r["status"] != "error"), None)
        if ok is None:
            out.append(
                f"| {model} | {target} | {devices} | | | not compiled: {(lora or full)['error']} | | | |"
            )
            continue
        memory = "" if ok["device_memory"] is None else f"{ok['device_memory'] / GIB:.2f}"
        secs = ", ".join(f"{r['compile_seconds']:.0f}" for r in (lora, full) if r and r["status"] != "error")
        out.append(
            f"| {model} | {target} | {ok['devices']} | {ok['batch']} × {ok['seq']} | "
            f"{_gib(ok['per_device']['params'])} | {_cell(lora, 'deltas+opt_state', 'temp', 'total')} | "
            f"{_cell(full, 'opt_state', 'temp', 'total')} | {memory} | {secs} |"
        )
    if result.get("search"):
        out += [
            "",
            f"| model | target | largest LoRA batch found at seq {result['settings']['seq']} (per device) | "
            "total (GiB) | smallest batch tried that does not fit | tried (batch: GiB) |",
            "|" + "---|" * 6,
        ]
        for x in result["search"]:
            tried = ", ".join(
                f"{t['value']}: {_gib(t['total'])}{'' if t['fits'] else ' ✗'}" for t in x["tried"]
            )
            over = min((t["value"] for t in x["tried"] if not t["fits"]), default=None)
            out.append(
                f"| {x['model']} | {x['target']} | {x['largest_batch']} ({x['per_device_batch']}) | "
                f"{_gib(x['total'])} | {over or ''} | {tried} |"
            )
    est = result.get("hand_estimate")
    if est:
        out += [
            "",
            f"Hand estimate, {est['model']} LoRA on {est['target']} (GiB per chip): "
            + ", ".join(f"{k} {v / GIB:.2f}" for k, v in est["bytes"].items())
            + ".",
        ]
    return "\n".join(out) + "\n"


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("model", "target", "devices", "method"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a small Llama on cpu (and tpu:v5e:2x2): CI")
    ap.add_argument(
        "--only",
        choices=("tpu", "gpu", "cpu", "search"),
        action="append",
        default=None,
        help="run only these groups (repeatable), keeping the other groups' results already in "
        "scale.json; default: all",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="compile nothing: rewrite scale.md and the hand estimate from scale.json",
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--out",
        default=None,
        help="folder for scale.json and scale.md (default: experiments/results, "
        "or runs/experiments_small with --small)",
    )
    args = ap.parse_args(argv)
    plan_targets.quiet_host()
    out = pathlib.Path(
        args.out
        or (
            os.path.join("runs", "experiments_small")
            if args.small
            else pathlib.Path(__file__).resolve().parent / "results"
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    groups = set() if args.report_only else set(args.only or ("tpu", "gpu", "cpu", "search"))
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
    previous = {"rows": [], "search": []}
    if (args.only or args.report_only) and (out / "scale.json").exists():
        previous = json.loads((out / "scale.json").read_text())
    rows, searches = [], []

    def save():  # after every compile: a long run keeps what it has measured
        new = {_key(r) for r in rows}
        searched = {(x["model"], x["target"]) for x in searches}
        result = {
            "settings": {
                "seq": seq,
                "rank": args.rank,
                "mesh": "fsdp=-1",
                "dtype": "bfloat16",
                "remat": "full",
                "targets": plan_lib.DEFAULT_TARGETS,
                "batch": "one sequence per device",
                "command": "python experiments/scale.py" + (" --small" if args.small else ""),
            },
            # earlier results of the groups not run now are kept
            "rows": [r for r in previous["rows"] if _key(r) not in new] + rows,
            "search": [x for x in previous.get("search", []) if (x["model"], x["target"]) not in searched]
            + searches,
        }
        if not args.small:
            result["hand_estimate"] = {
                "model": "llama-3-8b",
                "target": "tpu:v5p:2x2x2",
                "method": "lora",
                "bytes": hand_estimate("llama-3-8b", 8, seq, args.rank),
            }
        (out / "scale.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "scale.md").write_text(markdown(result))
        return result

    print(f"{'model':<15} {'target':<14} {'dev':>4} method", flush=True)
    jobs = []
    for method in ("lora", "full"):
        if "tpu" in groups:
            jobs += [(m, t, None, method) for m, t in tpu_rows]
        if "gpu" in groups:
            jobs += [(m, t, n, method) for m, t, n in gpu_rows]
        if "cpu" in groups:
            jobs += [(m, t, n, method) for m, t, n in cpu_rows]
    for model, target, devices, method in jobs:
        rows.append(run_row(model, target, devices, method, seq, args.rank))
        save()
    if "search" in groups:
        for model, target in search:
            t0 = time.perf_counter()
            s = plan_search.search(
                plan_lib.PlanRequest(model, mesh="fsdp=-1", rank=args.rank, seq=seq, target=target),
                "batch",
                max_compiles=6,
            )
            best = s["best"]
            searches.append(
                {
                    "model": model,
                    "target": target,
                    "seq": seq,
                    "largest_batch": best and best["batch"],
                    "per_device_batch": best and best["batch"] // best["devices"],
                    "total": best and best["per_device"]["total"],
                    "tried": s["tried"],
                    "wall_seconds": round(time.perf_counter() - t0, 1),
                }
            )
            tried = [(t["value"], _gib(t["total"]), t["fits"]) for t in s["tried"]]
            print(
                f"largest LoRA batch at seq {seq} on {target} for {model}: {searches[-1]['largest_batch']} "
                f"(tried: batch, GiB, fits = {tried})",
                flush=True,
            )
            save()
    result = save()
    if "hand_estimate" in result:
        print(
            "hand estimate, llama-3-8b LoRA on 8 chips: "
            + ", ".join(f"{k} {v / GIB:.2f}" for k, v in result["hand_estimate"]["bytes"].items())
            + " GiB"
        )
    print(f"wrote {out / 'scale.json'} and {out / 'scale.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
