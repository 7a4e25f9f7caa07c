"""QLoRA on SmolLM2-135M: a float32, bfloat16, int8 and NF4 (± double quantization) frozen base.

For each base: bytes of the base and of its quantized kernels against float32, zero-shot accuracy on
the movie-review test split (label-word likelihood, the engine's score step with fresh deltas, i.e.
the base model itself), perplexity of the base on held text (the test reviews' own sentences), and
the LoRA train step (rank 8 on q and v, AdamW, batch 8 x 48 tokens, `nn.scan` layers): median step
time and the compiled step's memory (arguments / temporaries). Everything runs through the library:
`lj.quantize` for the base, the training engine's `loop.build` (``quantize=``) for the steps.

Two more modes look into the NF4 accuracy gap:

- ``--errors``: per kernel group (q, k, v, o, gate, up, down), the relative RMS error
  ``|W - deq(quant(W))| / |W|`` of `lj.quantize` (nf4, nf4 + double quant), of a NumPy NF4 written from
  the paper (float64, nearest of the printed levels, absmax per block of 64 along the input axis), of
  qwix's nf4 when qwix is importable, and of ours on N(0, 1) data of the same shape; and how many distinct
  values each block of 32 input rows holds (the GGUF asset is llama.cpp Q4_1: at most 16 per block).
- ``--load-memory``: the peak of live device arrays while the model loads onto a mesh, dense, and
  with each kernel quantized as soon as it is placed (`lora_jax.models.load(..., quantize=)`).
- ``--ablation``: zero-shot accuracy and perplexity with nf4 + double quant on every kernel but one
  group, that group kept float32 (no train step).
- ``--diagnose``: why the MLP down projection carries the loss. The inputs of every kernel are captured
  on ``--ppl-rows`` test reviews (``flax.linen.intercept_methods``); per layer and group: the largest
  input channel's RMS over the median channel's (massive activations), the kernel's largest |w| over its
  RMS and the rows holding the largest |w| (super weights), the relative error of the layer's output
  ``|X·(deq(q(W)) - W)| / |X·W|`` with plain nf4 and with ``outlier_rows=2``, and the share of the plain
  error that enters through the three largest input channels; then the perplexity with nf4 on one
  layer's down projection alone, for each layer (which layers matter), and with nf4 (no double quant)
  on every kernel with 0, 1, 2 and 4 outlier rows.

Usage::

    python experiments/qlora.py --eval-size 256 --ppl-rows 64 --steps 3 --out experiments/results/qlora.json
    python experiments/qlora.py --errors --out experiments/results/qlora_errors.json
    python experiments/qlora.py --load-memory --out experiments/results/qlora_load_memory.json
    python experiments/qlora.py --ablation --eval-size 256 --ppl-rows 64 --out experiments/results/qlora_ablation.json
    python experiments/qlora.py --diagnose --ppl-rows 32 --out experiments/results/qlora_diagnose.json
    python experiments/qlora.py --variants float32,nf4+dq,nf4+dq+outliers,nf4+dq+loftq,nf4+dq+outliers+loftq,\
nf4+dq/32,nf4+dq+outliers/32 --eval-size 0 --eval-only --out experiments/results/qlora_fullsplit.json

``+outliers`` is ``QuantSpec(outlier_rows=2)``, ``/32`` blocks of 32. A variant name ending in ``+loftq``
is that base with LoftQ adapters (`LoraSpec(init="loftq")` on the default targets) at step 0, before
any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax import data, models
from lora_jax.train import config as config_lib
from lora_jax.train import loop, sentiment
from lora_jax.train import mesh as mesh_lib

VARIANTS = {  # name -> (param dtype, QuantSpec or None)
    "float32": (jnp.float32, None),
    "bfloat16": (jnp.bfloat16, None),
    "int8": (jnp.float32, lj.QuantSpec(format="int8", double_quant=False)),
    "nf4": (jnp.float32, lj.QuantSpec(format="nf4", double_quant=False)),
    "nf4+dq": (jnp.float32, lj.QuantSpec(format="nf4", double_quant=True)),
    "nf4+dq+outliers": (jnp.float32, lj.QuantSpec(format="nf4", double_quant=True, outlier_rows=2)),
    "nf4+dq/32": (jnp.float32, lj.QuantSpec(format="nf4", double_quant=True, block_size=32)),
    "nf4+dq+outliers/32": (
        jnp.float32,
        lj.QuantSpec(format="nf4", double_quant=True, outlier_rows=2, block_size=32),
    ),
}


GROUPS = {  # kernel group -> regex of its (nn.scan-stacked) kernel
    "q": r".*/attn/query/kernel",
    "k": r".*/attn/key/kernel",
    "v": r".*/attn/value/kernel",
    "o": r".*/attn/out/kernel",
    "gate": r".*/mlp/gate/kernel",
    "up": r".*/mlp/up/kernel",
    "down": r".*/mlp/down/kernel",
}

# NF4 as printed in the QLoRA paper (Dettmers et al. 2023, Appendix E).
PAPER_NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0]
)  # fmt: skip


def nf4_reference(w: np.ndarray, block: int = 64) -> np.ndarray:
    """NF4 round trip of a ``(..., in, out)`` kernel in NumPy float64, from the paper's definition.

    Blocks of `block` consecutive input rows, each divided by its absolute maximum; every value becomes
    the nearest printed level (argmin of the distance), times the block's absmax.
    """
    w = np.asarray(w, np.float64)
    *lead, n, m = w.shape
    flat = w.reshape(-1, n // block, block, m)
    out = np.empty_like(flat)
    for i in range(flat.shape[0]):  # one layer at a time: the argmin holds 16 copies
        b = flat[i]
        absmax = np.abs(b).max(axis=1, keepdims=True)
        x = b / np.where(absmax == 0, 1.0, absmax)
        out[i] = PAPER_NF4[np.abs(x[..., None] - PAPER_NF4).argmin(-1)] * absmax
    return out.reshape(w.shape)


def qwix_nf4(w: np.ndarray, block: int = 64) -> np.ndarray | None:
    """qwix's nf4 round trip (absmax tiles of `block` along the input axis), or None without qwix."""
    try:
        import qwix
    except ImportError:
        return None
    nd = np.ndim(w)
    out = []
    for x in np.asarray(w, np.float32).reshape(-1, *np.shape(w)[-2:]):
        q = qwix.quantize(jnp.asarray(x), "nf4", channelwise_axes=(1,), tiled_axes={0: block})
        out.append(np.asarray(qwix.dequantize(q)))
    return np.stack(out).reshape(np.shape(w)) if nd > 2 else out[0]


def rel_rms(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.sqrt(np.sum((got - want) ** 2) / np.sum(want**2)))


def max_distinct_per_block(w: np.ndarray, block: int = 32) -> int:
    """The most distinct values any block of `block` consecutive input rows holds (16 for Q4_1 data)."""
    w = np.asarray(w)
    *lead, n, m = w.shape
    b = np.sort(w.reshape(-1, n // block, block, m), axis=2)
    return int((1 + np.count_nonzero(np.diff(b, axis=2), axis=2)).max())


def errors(variables) -> dict:
    """Relative RMS error per kernel group: ours, NumPy reference, qwix, ours on N(0, 1) of the same shape."""
    flat = {lj.spec.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
    out = {}
    for g, pat in GROUPS.items():
        (path,) = [p for p in flat if lj.QuantSpec(targets=pat).matches(p)]
        w = np.asarray(flat[path], np.float32)
        row = {"path": path, "shape": list(w.shape), "max_distinct_per_32": max_distinct_per_block(w)}
        for name, dq in (("ours_nf4", False), ("ours_nf4_dq", True)):
            q = lj.quantize({"w": jnp.asarray(w)}, lj.QuantSpec(format="nf4", double_quant=dq, targets="w"))
            row[name] = rel_rms(lj.dequantize(q)["w"], w)
        row["reference_nf4"] = rel_rms(nf4_reference(w), w)
        qw = qwix_nf4(w)
        row["qwix_nf4"] = None if qw is None else rel_rms(qw, w)
        z = np.asarray(jax.random.normal(jax.random.key(0), w.shape))
        qz = lj.quantize({"w": jnp.asarray(z)}, lj.QuantSpec(format="nf4", double_quant=False, targets="w"))
        row["ours_nf4_on_normal"] = rel_rms(lj.dequantize(qz)["w"], z)
        out[g] = row
        print(g, json.dumps(row), flush=True)
    return out


def load_peak(quantize) -> dict:
    """Peak bytes of live device arrays while `models.load` places SmolLM2 on a 1-device mesh, sampled
    every 5 ms (``jax.live_arrays``), with or without quantizing each kernel as it is placed."""
    import threading

    before = {id(x) for x in jax.live_arrays()}
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sum(x.nbytes for x in jax.live_arrays() if id(x) not in before))
            time.sleep(0.005)

    t = threading.Thread(target=sample)
    t.start()
    try:
        _, variables, _ = models.load(
            "smollm2-135m",
            scan_layers=True,
            mesh=mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1"),
            quantize=quantize,
        )
        jax.block_until_ready(variables)
    finally:
        done.set()
        t.join()
    return {"device_peak_bytes": peak[0], "loaded_bytes": lj.quant.base_bytes(variables)}


def _nf4_round_trip(w, outlier_rows: int = 0) -> np.ndarray:
    spec = lj.QuantSpec(targets="w", double_quant=False, outlier_rows=outlier_rows)
    return np.asarray(lj.dequantize(lj.quantize({"w": jnp.asarray(w)}, spec))["w"])


def diagnose(rows: int) -> dict:
    """Per layer and kernel group: massive activations, super weights, output error (see module doc)."""
    import flax.linen as nn

    model, variables, tok = models.load("smollm2-135m", scan_layers=False)
    variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), variables)
    sets = data.load_sentiment()
    text = data.encode_lm(data.subset(sets["test"], rows), tok, 48, prompt="{text}")
    ids, mask = jnp.asarray(text["input_ids"]), jnp.asarray(text["attention_mask"])
    real = np.asarray(mask).reshape(-1) > 0
    inputs = {}

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            x = np.asarray(args[0], np.float64)
            inputs["/".join(context.module.path)] = x.reshape(-1, x.shape[-1])[real]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        model.apply(variables, ids, mask)
    params = variables["params"]
    layers = {}
    for i in range(model.config.num_layers):
        row = {}
        for g, pat in GROUPS.items():
            sub = pat.split("/")[-3:-1]  # e.g. ["mlp", "down"]
            w = np.asarray(params[f"layers_{i}"][sub[0]][sub[1]]["kernel"], np.float64)
            x = inputs[f"layers_{i}/{sub[0]}/{sub[1]}"]
            y = np.linalg.norm(x @ w)
            dw = _nf4_round_trip(w) - w
            err = x @ dw
            chan = np.sqrt(np.mean(x**2, axis=0))
            top = np.argsort(chan)[-3:][::-1]
            row[g] = {
                "act_max_channel_rms_over_median": float(chan.max() / np.median(chan)),
                "act_top_channels": [int(c) for c in top],
                "act_max_abs": float(np.abs(x).max()),
                "w_max_abs_over_rms": float(np.abs(w).max() / np.sqrt(np.mean(w**2))),
                "w_top_rows_by_max_abs": [int(r) for r in np.argsort(np.abs(w).max(axis=1))[-3:][::-1]],
                "out_rel_error_nf4": float(np.linalg.norm(err) / y),
                "out_rel_error_nf4_outlier_rows2": float(np.linalg.norm(x @ (_nf4_round_trip(w, 2) - w)) / y),
                "error_share_top3_channels": float(np.linalg.norm(x[:, top] @ dw[top]) / np.linalg.norm(err)),
            }
        layers[i] = row
        d = row["down"]
        print(
            i, "down", {k: d[k] for k in ("act_max_channel_rms_over_median", "out_rel_error_nf4")}, flush=True
        )
    f = jax.jit(model.apply)

    def ppl(v):
        logp = jax.nn.log_softmax(f(v, ids, mask).astype(jnp.float32), axis=-1)
        tok_lp = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
        w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        return float(jnp.exp(-jnp.sum(tok_lp * w) / jnp.sum(w)))

    sensitivity = {"float32": ppl(variables)}
    for i in range(model.config.num_layers):
        v = jax.tree_util.tree_map(lambda x: x, variables)
        down = v["params"][f"layers_{i}"]["mlp"]["down"]
        down["kernel"] = jnp.asarray(_nf4_round_trip(down["kernel"]), jnp.float32)
        sensitivity[f"nf4 on layer {i}'s down only"] = ppl(v)
        print(i, sensitivity[f"nf4 on layer {i}'s down only"], flush=True)
    every = {}  # every kernel of every layer nf4, with 0, 1, 2, 4 outlier rows
    for k in (0, 1, 2, 4):
        v = jax.tree_util.tree_map(lambda x: x, variables)
        for i in range(model.config.num_layers):
            for pat in GROUPS.values():
                sub = v["params"][f"layers_{i}"][pat.split("/")[-3]][pat.split("/")[-2]]
                sub["kernel"] = jnp.asarray(_nf4_round_trip(sub["kernel"], k), jnp.float32)
        every[f"outlier_rows={k}"] = ppl(v)
        print("all kernels nf4,", k, "outlier rows:", every[f"outlier_rows={k}"], flush=True)
    return {
        "ppl_rows": rows,
        "layers": layers,
        "perplexity_one_down_layer_nf4": sensitivity,
        "perplexity_all_kernels_nf4": every,
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


def run(name: str, args, model, variables, tok, splits, *, restore: str | None = None) -> dict:
    """One variant's row; with `restore` (a `GROUPS` key) nf4 + double quant except that group, no step."""
    loftq = name.endswith("+loftq")  # the base variant with LoftQ adapters (step 0: no training yet)
    dtype, qspec = VARIANTS[name.removesuffix("+loftq")]
    if restore is not None:
        qspec = dataclasses.replace(qspec, exclude=(GROUPS[restore],))
    cfg = config_lib.TrainConfig(max_len=48)
    base = jax.tree_util.tree_map(lambda x: x.astype(dtype), variables)
    spec = loop.lora_spec(cfg, base)
    if loftq:
        spec = dataclasses.replace(spec, init="loftq")
    mesh = mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1")
    setup = loop.build(
        model,
        base,
        spec,
        mesh=mesh,
        steps=100,
        candidate_ids=sentiment.candidate_token_ids(tok),
        quantize=qspec,
    )
    out = {
        "base_bytes": lj.quant.base_bytes(setup.params),
        "kernel_ratio_vs_f32": kernel_ratio(variables, setup.params),
    }
    t = time.time()
    out["zero_shot_accuracy"] = sentiment.evaluate(setup, setup.deltas, splits["test"], 32)
    out["eval_seconds"] = time.time() - t
    out["perplexity"] = perplexity(model, setup.params, setup.deltas, splits["text"])
    if restore is not None or args.ablation or args.eval_only:
        print(name if restore is None else f"{name}, {restore} float32", json.dumps(out), flush=True)
        return out
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
    ap.add_argument("--variants", default="float32,bfloat16,int8,nf4,nf4+dq")
    ap.add_argument("--eval-size", type=int, default=256, help="test reviews scored (0: all 1,056)")
    ap.add_argument("--ppl-rows", type=int, default=64, help="test reviews whose text gives the perplexity")
    ap.add_argument("--steps", type=int, default=3, help="timed train steps (after one warm-up)")
    ap.add_argument("--errors", action="store_true", help="per-group quantization error only (no model run)")
    ap.add_argument("--ablation", action="store_true", help="nf4+dq with each kernel group kept float32")
    ap.add_argument("--load-memory", action="store_true", help="device peak while loading, dense vs nf4")
    ap.add_argument("--diagnose", action="store_true", help="activations, super weights, per-layer error")
    ap.add_argument("--eval-only", action="store_true", help="bytes, accuracy and perplexity; no train step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.diagnose:
        return _write(args, diagnose(args.ppl_rows))
    if args.load_memory:
        qspec = loop.quant_spec(config_lib.TrainConfig(quantize="nf4", quant_outlier_rows=0))
        return _write(args, {"dense": load_peak(None), "nf4+dq": load_peak(qspec)})
    model, variables, tok = models.load("smollm2-135m", scan_layers=True)
    variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), variables)
    if args.errors:
        return _write(args, {"errors": errors(variables)})
    cfg = config_lib.TrainConfig(max_len=48)
    sets = data.load_sentiment()
    splits = {
        "test": sentiment.encode_split(sets["test"], tok, cfg, args.eval_size),
        "train": sentiment.encode_split(sets["train"], tok, cfg, 64),
        "text": data.encode_lm(data.subset(sets["test"], args.ppl_rows), tok, cfg.max_len, prompt="{text}"),
    }
    results = {
        "eval_size": len(splits["test"]["labels"]),
        "ppl_rows": args.ppl_rows,
        "float32_base_bytes": lj.quant.base_bytes(variables),
        "devices": str(jax.devices()[0].platform),
        "variants": {},
    }
    if args.ablation:
        for name in ("float32", "nf4+dq"):
            results["variants"][name] = run(name, args, model, variables, tok, splits)
        for g in GROUPS:
            results["variants"][f"nf4+dq, {g} float32"] = run(
                "nf4+dq", args, model, variables, tok, splits, restore=g
            )
        return _write(args, results)
    for name in args.variants.split(","):
        results["variants"][name] = run(name, args, model, variables, tok, splits)
    _write(args, results)


def _write(args, results: dict) -> None:
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
