"""``lora-jax plan``: flags, the text report and the JSON report of the memory planner.

    lora-jax plan --model llama-3-8b --devices 8 --mesh fsdp=8 --method lora --json
    lora-jax plan --model llama-3-70b --mesh fsdp=-1 --method full --target tpu:v5p:4x4x4
    lora-jax plan --model llama-3-8b --mesh fsdp=-1 --target tpu:v5e:2x2 --search batch

The flags are read without importing JAX, so ``lora-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

__all__ = ["add_arguments", "format_report", "run"]

GIB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``plan`` flags to `p`."""
    p.add_argument(
        "--model",
        required=True,
        help="llama-3-8b, llama-3-70b, llama-3.1-405b, qwen2.5-7b, gemma-2-9b, smollm2-135m, or a "
        "folder with config.json",
    )
    p.add_argument(
        "--devices", type=int, default=None, help="device count (default: the target's or the mesh's)"
    )
    p.add_argument("--mesh", default="fsdp=-1", help="data=..,fsdp=..,tensor=.. (-1: the remaining devices)")
    p.add_argument("--method", choices=("lora", "qlora", "full"), default="lora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default=r".*/(query|value)/kernel", help="LoRA targets regex")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="global sequences per step (default: one per data-parallel device)",
    )
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument(
        "--loss-tokens",
        type=int,
        default=None,
        help="loss positions per sequence (default: seq - 1, every next token)",
    )
    p.add_argument(
        "--loss-chunk",
        type=int,
        default=512,
        help="positions per chunk of the cross-entropy (0: unchunked float32 logits)",
    )
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default=None, help="base weight dtype (default: --dtype)")
    p.add_argument("--remat", default="full", help="layer rematerialisation: full or none")
    p.add_argument(
        "--device-memory",
        default=None,
        help="memory per device to fit in, e.g. 141GB or 95.74GiB (default: the target's)",
    )
    p.add_argument(
        "--target", default="cpu", help="cpu, tpu:GEN:TOPOLOGY (tpu:v5p:2x2x2) or gpu:h200|h100|a100"
    )
    p.add_argument(
        "--search",
        choices=("batch", "seq"),
        default=None,
        help="find the largest global batch (at --seq) or sequence (at --batch) that fits",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:9.3f}"


def format_report(r: dict) -> str:
    """The human-readable report of one plan (``per_device`` figures in GiB)."""
    what = f"LoRA r={r['rank']} on {r['targets']}" if r["method"] != "full" else "full fine-tuning"
    if r.get("quantize"):  # --method qlora
        q = r["quantize"]
        what = (
            f"QLoRA ({q['format']}, blocks of {q['block_size']}{', double quant' if q['double_quant'] else ''}: "
            f"base {r['base_bytes'] / GIB:.2f} GiB, dense {r['dense_base_bytes'] / GIB:.2f}) + {what}"
        )
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"{r['model']}: {what}, {r['devices']} x {r['device_kind']} ({r['target']}), mesh {mesh}",
        f"batch {r['batch']} x seq {r['seq']} (loss on {r['loss_tokens']} positions), {r['dtype']} "
        f"compute, {r['param_dtype']} weights, remat {r['remat']}, attention {r.get('attention', 'auto')}; "
        f"{r['trainable_params']:,} of "
        f"{r['model_params']:,} parameters trained",
        "  per device          GiB",
    ]
    pd = r["per_device"]
    for key, label in (
        ("params", "base params"),
        ("deltas", "deltas"),
        ("opt_state", "optimizer state"),
        ("batch", "batch"),
        ("arguments", "arguments"),
        ("temp", "temporaries"),
        ("output", "output"),
        ("alias", "aliased (donated)"),
    ):
        if key in pd:
            lines.append(f"  {label:<18}{_gib(pd[key])}")
    memory = r.get("device_memory")
    verdict = (
        ""
        if memory is None
        else (f"  of {memory / GIB:.2f} GiB: " + ("fits" if r["fits"] else "DOES NOT FIT"))
    )
    lines.append(f"  {'total':<18}{_gib(pd['total'])}{verdict}")
    if r["status"] != "ok":
        lines.append(f"  the compiler refused the program: {r['error']}")
    lines.append(f"lowered in {r['lower_seconds']:.1f} s, compiled in {r['compile_seconds']:.1f} s")
    lines += [f"note: {n}" for n in r.get("model_notes", [])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Runs ``lora-jax plan`` with parsed `args`; prints the report. Returns the exit code."""
    from lora_jax.train import plan_targets

    # This process only validates (on the host); the compiles run in child processes.
    plan_targets.quiet_host()
    from lora_jax.train import plan, plan_search

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(plan.PlanRequest)}
    request = plan.PlanRequest(**dict(fields, loss_chunk=args.loss_chunk or None))
    try:
        if args.search:
            _print_search(plan_search.search(request, args.search), args)
        else:
            report = plan.plan(request)
            print(json.dumps(report) if args.json else format_report(report))
    except plan_targets.MissingExtra as e:  # an install step, not a bug: one line
        print(f"lora-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


def _print_search(out: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(out))
        return
    for t in out["tried"]:
        print(
            f"{args.search} {t['value']:>6}: {t['total'] / GIB:8.2f} GiB  "
            f"{'fits' if t['fits'] else 'does not fit'}  ({t['compile_seconds']:.0f} s)"
        )
    best = out["best"]
    print(f"largest {args.search} that fits: {best[args.search] if best else 'none'}")
    if best:
        print(format_report(best))
