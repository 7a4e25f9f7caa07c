"""QLoRA on SmolLM2-135M: a float32, bfloat16, int8 and NF4 (± double quantization) frozen base.

For each base: bytes of the base and of its quantized kernels against float32, zero-shot accuracy on
the movie-review test split (label-word likelihood, the engine's score step with fresh deltas, i.e.
the base model itself), perplexity of the base on held text (the test reviews' own sentences), and
the LoRA train step (rank 8 on q and v, AdamW, batch 8 x 48 tokens, `nn.scan` layers): median step
time and the compiled step's memory (arguments / temporaries). Everything runs through the library:
`lj.quantize` for the base, the training engine's `loop.build` (``quantize=``) for the steps.

Usage::

    python experiments/qlora.py --eval-size 256 --ppl-rows 64 --steps 3 --out experiments/results/qlora.json
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
from lora_jax import data, models
from lora_jax.train import config as config_lib
from lora_jax.train import loop
from lora_jax.train import mesh as mesh_lib

VARIANTS = {  # name -> (param dtype, QuantSpec or None)
    "float32": (jnp.float32, None),
    "bfloat16": (jnp.bfloat16, None),
    "int8": (jnp.float32, lj.QuantSpec(format="int8", double_quant=False)),
    "nf4": (jnp.float32, lj.QuantSpec(format="nf4", double_quant=False)),
    "nf4+dq": (jnp.float32, lj.QuantSpec(format="nf4", double_quant=True)),
}


def kernel_ratio(dense, params) -> float:
    """Bytes of the quantized leaves over the same leaves' float32 bytes."""
    q = [
        x
        for x in jax.tree_util.tree_leaves(params, is_leaf=lj.quant.is_quantized)
        if lj.quant.is_quantized(x)
    ]
    return sum(x.nbytes for x in q) / sum(4 * int(np.prod(x.shape)) for x in q) if q else 1.0


def perplexity(model, params, deltas, rows: dict) -> float:
    """exp(mean next-token NLL) over the real tokens of `rows` (encode_lm arrays)."""
    f = jax.jit(lj.wrap(model.apply))
    nll, count = 0.0, 0.0
    for i in range(0, len(rows["input_ids"]), 16):
        ids = jnp.asarray(rows["input_ids"][i : i + 16])
        mask = jnp.asarray(rows["attention_mask"][i : i + 16])
        logp = jax.nn.log_softmax(f(params, deltas, ids, mask).astype(jnp.float32), axis=-1)
        tok = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
        w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        nll -= float(jnp.sum(tok * w))
        count += float(jnp.sum(w))
    return float(np.exp(nll / count))


def run(name: str, args, model, variables, tok, splits) -> dict:
    dtype, qspec = VARIANTS[name]
    cfg = config_lib.TrainConfig(max_len=48)
    base = jax.tree_util.tree_map(lambda x: x.astype(dtype), variables)
    spec = loop.lora_spec(cfg, base)
    mesh = mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1")
    setup = loop.build(
        model, base, spec, mesh=mesh, steps=100, candidate_ids=loop.candidate_token_ids(tok), quantize=qspec
    )
    out = {
        "base_bytes": lj.quant.base_bytes(setup.params),
        "kernel_ratio_vs_f32": kernel_ratio(variables, setup.params),
    }
    t = time.time()
    out["zero_shot_accuracy"] = loop.evaluate(setup, setup.deltas, splits["test"], 32)
    out["eval_seconds"] = time.time() - t
    out["perplexity"] = perplexity(model, setup.params, setup.deltas, splits["text"])
    tr = splits["train"]
    b = {k: tr[k][None, :8] for k in ("input_ids", "attention_mask", "loss_mask")}
    gb = mesh_lib.global_batch(b, setup.shardings["batch"], axis=1)
    compiled = setup.train_step.lower(
        setup.deltas, setup.opt_state, setup.params, gb, jax.random.key(0)
    ).compile()
    mem = compiled.memory_analysis()
    out["step_argument_bytes"] = int(mem.argument_size_in_bytes)
    out["step_temp_bytes"] = int(mem.temp_size_in_bytes)
    deltas, opt = setup.deltas, setup.opt_state
    times = []
    for i in range(args.steps + 1):
        t = time.time()
        deltas, opt, m = compiled(deltas, opt, setup.params, gb, jax.random.key(i))
        jax.block_until_ready(m["loss"])
        times.append(time.time() - t)
    out["step_seconds"] = float(np.median(times[1:]))
    out["first_loss"] = float(m["loss"])
    print(name, json.dumps(out), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--eval-size", type=int, default=256, help="test reviews scored (0: all 1,056)")
    ap.add_argument("--ppl-rows", type=int, default=64, help="test reviews whose text gives the perplexity")
    ap.add_argument("--steps", type=int, default=3, help="timed train steps (after one warm-up)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, variables, tok = models.load("smollm2-135m", scan_layers=True)
    variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), variables)
    cfg = config_lib.TrainConfig(max_len=48)
    sets = data.load_sentiment()
    splits = {
        "test": loop.encode_split(sets["test"], tok, cfg, args.eval_size),
        "train": loop.encode_split(sets["train"], tok, cfg, 64),
        "text": data.encode_lm(data.subset(sets["test"], args.ppl_rows), tok, cfg.max_len, prompt="{text}"),
    }
    results = {
        "eval_size": len(splits["test"]["labels"]),
        "ppl_rows": args.ppl_rows,
        "float32_base_bytes": lj.quant.base_bytes(variables),
        "devices": str(jax.devices()[0].platform),
        "variants": {},
    }
    for name in args.variants.split(","):
        results["variants"][name] = run(name, args, model, variables, tok, splits)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
