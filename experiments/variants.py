"""LoRA against its variants at the same rank: DoRA, PiSSA, OLoRA and LoRA+, on real sentiment data.

Two models on the movie-review sentences (the Rotten Tomatoes sentences SST is built from):

* ``--model minilm`` (default): all-MiniLM-L6-v2 (real weights) + a linear head on the mean-pooled
  output, trained as a classifier. LoRA on the query and value kernels of all 6 layers; the new head is
  trained in full with ``LoraSpec(train_full="params/classifier/.*")`` at its own learning rate.
* ``--model smollm2``: SmolLM2-135M-Instruct (real weights) as prompt completion, ``"Review:
  ...\nSentiment:"`` -> ``" positive"`` / ``" negative"``, trained with the engine's LM loss on the
  answer token (:func:`lora_jax.train.sweep.lm_task`); validation loss is the cross-entropy of the answer
  token scored as the next token, accuracy compares the likelihood of the two label words. LoRA on the
  query and value kernels of all 30 layers; nothing else trains.

Every configuration uses rank 8 (alpha 16) on those kernels; the configurations differ only in the
variant:

* **LoRA**: Kaiming-uniform a, zero b (Hu et al. 2021);
* **DoRA**: ``LoraSpec(dora=True)``, a trained magnitude per output feature (Liu et al. 2024);
* **PiSSA** / **OLoRA**: ``LoraSpec(init="pissa" | "olora")`` with `lj.init_with_residual`: the adapter
  starts from W's principal part (top-r SVD / QR) and trains on the residual base (Meng et al. 2024;
  Büyükakyüz 2024);
* **LoRA+**: `lj.loraplus` with ratio 16, b's learning rate 16x a's (Hayou et al. 2024).

Seeds run at once (``jax.vmap`` over a leading seed axis; the frozen base is shared). Each seed has its
own adapter init, head init and data order. Reported per configuration: validation accuracy and loss
after N steps (mean ± standard error over seeds), the validation loss every ``--eval-every`` steps, and
for LoRA+ the first evaluated step at which each seed reaches plain LoRA's final validation loss (same
seed). Then the CPU step time of DoRA against LoRA, timed interleaved (one step of each in turn).

Usage::

    python experiments/variants.py                   # MiniLM; writes experiments/results/variants.{json,md}
    python experiments/variants.py --model smollm2   # writes experiments/results/variants_smollm2.{json,md}
    python experiments/variants.py --small           # seconds (either model); writes runs/experiments_small/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
SMALL_OUT = REPO / "runs" / "experiments_small"

SETTINGS = {
    ("minilm", False): dict(
        train_examples=2000,
        eval_examples=256,
        steps=32,
        eval_every=8,
        batch_size=16,
        max_len=32,
        seeds=(0, 1, 2),
        rank=8,
        alpha=16.0,
        lr=2e-3,
        lr_head=5e-3,
        loraplus_ratio=16.0,
        timing_rounds=10,
        layers=None,
    ),
    ("minilm", True): dict(
        train_examples=64,
        eval_examples=32,
        steps=4,
        eval_every=2,
        batch_size=8,
        max_len=16,
        seeds=(0, 1),
        rank=4,
        alpha=8.0,
        lr=2e-3,
        lr_head=5e-3,
        loraplus_ratio=16.0,
        timing_rounds=2,
        layers=1,
    ),
    # Sized for ~25 min on 2 busy CPU cores (a SmolLM2 step of 3 seeds x 8 sequences costs ~10x MiniLM's).
    ("smollm2", False): dict(
        train_examples=512,
        eval_examples=128,
        steps=24,
        eval_every=8,
        batch_size=8,
        max_len=40,
        seeds=(0, 1, 2),
        rank=8,
        alpha=16.0,
        lr=1e-3,
        lr_head=None,
        loraplus_ratio=16.0,
        timing_rounds=3,
        layers=None,
    ),
    ("smollm2", True): dict(
        train_examples=32,
        eval_examples=16,
        steps=2,
        eval_every=2,
        batch_size=4,
        max_len=40,
        seeds=(0, 1),
        rank=2,
        alpha=4.0,
        lr=1e-3,
        lr_head=None,
        loraplus_ratio=16.0,
        timing_rounds=1,
        layers=1,
    ),
}

TARGETS = {
    "minilm": r"params/encoder/layers_\d+/attn/(query|value)/kernel",
    "smollm2": r"params/layers_\d+/attn/(query|value)/kernel",
}
HEAD = r"params/classifier/.*"
MODELS = ("minilm", "smollm2")

PAPERS = {
    "DoRA": "Liu et al. 2024 (arXiv:2402.09353), Table 1: LLaMA-7B/13B commonsense reasoning, DoRA over LoRA "
    "+3.7 / +1.0 points average accuracy (LLaMA2-7B +2.9, LLaMA3-8B +4.4); also gains on VL-BART "
    "image/video-text tasks.",
    "PiSSA": "Meng et al. 2024 (arXiv:2404.02948): same architecture as LoRA, faster convergence and better "
    "final results, e.g. Mistral-7B on GSM8K 72.86% vs 67.7% for LoRA; the training loss falls faster from "
    "the first steps.",
    "OLoRA": "Büyükakyüz 2024 (arXiv:2406.01775): orthonormal (QR) init; faster convergence and better "
    "results than LoRA on most of the tested LLM tasks.",
    "LoRA+": "Hayou et al. 2024 (arXiv:2402.12354): with lr_b = 16·lr_a (their recommended ratio), up to ~2x "
    "faster fine-tuning and 1-2% better accuracy (RoBERTa/GPT-2 on GLUE, LLaMA).",
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    dora: bool = False
    init: str = "kaiming"
    loraplus: bool = False


VARIANTS = (
    Variant("LoRA"),
    Variant("DoRA", dora=True),
    Variant("PiSSA", init="pissa"),
    Variant("OLoRA", init="olora"),
    Variant("LoRA+", loraplus=True),
)


@dataclasses.dataclass(frozen=True)
class Task:
    """One model on the sentiment data, as every variant trains and scores it.

    Attributes:
        model: ``"minilm"`` or ``"smollm2"``.
        apply: ``apply(variables, *inputs)``, the network (LoRA runs call ``lj.wrap(apply)``).
        base: the frozen base variables.
        train, evals: arrays with one row per example; ``evals`` is scored whole.
        loss: ``loss(model, batch) -> scalar`` of one seed, ``model(*inputs)`` being `apply` with its
            weights (base + deltas).
        evaluate: ``evaluate(model, batch) -> (loss, accuracy)`` of one seed on a whole split.
        targets: the LoRA target regex.
        head: whether a new classifier head (``params/classifier``) trains in full.
    """

    model: str
    apply: Callable
    base: Any
    train: dict
    evals: dict
    loss: Callable
    evaluate: Callable
    targets: str
    head: bool


def load_task(model: str, s: dict) -> Task:
    """The task of `model` under settings `s` (subsets of the train and validation splits)."""
    from lora_jax import data

    splits = data.load_sentiment()
    train = data.subset(splits["train"], s["train_examples"])
    evals = data.subset(splits["validation"], s["eval_examples"])
    return (_minilm_task if model == "minilm" else _smollm2_task)(s, train, evals)


def _minilm_task(s: dict, train, evals) -> Task:
    """MiniLM as a `BertClassifier` (a placeholder head; each seed's head lives in its deltas)."""
    from lora_jax import data
    from lora_jax.models import bert

    model, variables, tok = bert.load_minilm()
    if s["layers"]:
        cfg = bert.BertConfig(**{**model.config.__dict__, "num_layers": s["layers"]})
        p = variables["params"]
        keep = {f"layers_{i}": p["encoder"][f"layers_{i}"] for i in range(s["layers"])}
        model, variables = bert.BertModel(cfg), {"params": {**p, "encoder": keep}}
    clf, base = bert.classifier_from_encoder(jax.random.key(0), model, variables)
    enc = lambda ex: {k: jnp.asarray(v) for k, v in data.encode_classification(ex, tok, s["max_len"]).items()}

    def ce(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def loss(model, batch):
        return ce(model(batch["input_ids"], batch["attention_mask"]), batch["labels"]).mean()

    def evaluate(model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"])
        acc = jnp.mean((jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32))
        return ce(logits, batch["labels"]).mean(), acc

    return Task(
        "minilm",
        clf.apply,
        base,
        enc(train),
        enc(evals),
        loss,
        evaluate,
        TARGETS["minilm"],
        head=True,
    )


def _smollm2_task(s: dict, train, evals) -> Task:
    """SmolLM2-135M as prompt completion, trained with the engine's LM loss on the answer token
    (:func:`lora_jax.train.sweep.lm_task`); scored with one forward pass at the last prompt position:
    the answer token's cross-entropy over the whole vocabulary (the validation loss) and the argmax over
    the two label words (the accuracy)."""
    from lora_jax import data, models
    from lora_jax.train import sentiment, sweep

    model, variables, tok = models.load("smollm2-135m")
    if s["layers"]:  # the first blocks only (smoke runs)
        cfg = dataclasses.replace(model.config, num_layers=s["layers"])
        p = variables["params"]
        keep = {
            k: v for k, v in p.items() if not k.startswith("layers_") or int(k.split("_")[1]) < s["layers"]
        }
        model, variables = type(model)(cfg), {**variables, "params": keep}
    enc = lambda ex: {k: jnp.asarray(v) for k, v in data.encode_lm(ex, tok, s["max_len"]).items()}
    train_arrays, eval_arrays = enc(train), enc(evals)
    for name, arr in (("train", train_arrays), ("validation", eval_arrays)):
        n = np.asarray(arr["loss_mask"]).sum(1)
        if not (n == 1).all():
            raise ValueError(
                f"smollm2 task: every {name} row must end in exactly one answer token, found "
                f"{sorted(set(n.tolist()))} completion tokens; use single-token label words."
            )
    cand = jnp.asarray(sentiment.candidate_token_ids(tok), jnp.int32)
    lm = sweep.lm_task(model.apply, cand.tolist(), num_targets=1)

    def evaluate(model, batch):
        pos = (batch["prompt_len"] - 1)[:, None].astype(jnp.int32)
        logp = jax.nn.log_softmax(model(batch["input_ids"], batch["attention_mask"], pos)[:, 0], axis=-1)
        target = cand[batch["labels"]]
        loss = -jnp.take_along_axis(logp, target[:, None], axis=1).mean()
        acc = jnp.mean((jnp.argmax(logp[:, cand], -1) == batch["labels"]).astype(jnp.float32))
        return loss, acc

    return Task(
        "smollm2",
        lm.apply,
        variables,
        train_arrays,
        eval_arrays,
        lm.loss,
        evaluate,
        TARGETS["smollm2"],
        head=False,
    )


def init_seed(variant: Variant, task: Task, seed: int, s: dict):
    """``(base, deltas)`` of one seed: the variant's adapter from ``key(seed)``; with a head, a fresh head
    (trained in full) from ``fold_in(key(seed), 1)``. PiSSA / OLoRA return the residual base."""
    spec = lj.LoraSpec(
        rank=s["rank"],
        alpha=s["alpha"],
        targets=task.targets,
        dora=variant.dora,
        init=variant.init,
        train_full=HEAD if task.head else (),
    )
    key, base = jax.random.key(seed), task.base
    if lj.spec.residual_init(variant.init):
        base, deltas = lj.init_with_residual(key, base, spec)
    else:
        deltas = lj.init(key, base, spec)
    if task.head:
        kernel = base["params"]["classifier"]["kernel"]
        head = 0.02 * jax.random.normal(jax.random.fold_in(key, 1), kernel.shape, kernel.dtype)
        deltas["params"]["classifier"] = {
            "kernel": lj.FullLeaf(head),
            "bias": lj.FullLeaf(jnp.zeros_like(base["params"]["classifier"]["bias"])),
        }
    return base, deltas


def make_optimizer(variant: Variant, s: dict) -> optax.GradientTransformation:
    """The training engine's AdamW schedule (10% warm-up, cosine decay); LoRA+ scales b's updates; a
    fully trained head (when ``lr_head`` is set) gets its own learning rate."""
    warmup = int(0.1 * s["steps"])
    lora, _ = step_lib.make_optimizer(s["lr"], s["steps"], warmup)
    if variant.loraplus:
        lora = lj.loraplus(lora, s["loraplus_ratio"])
    if s["lr_head"] is None:
        return lora
    head, _ = step_lib.make_optimizer(s["lr_head"], s["steps"], warmup)
    labels = lambda tree: jax.tree_util.tree_map(
        lambda x: "head" if lj.is_full(x) else "lora", tree, is_leaf=lambda x: lj.is_full(x) or lj.is_delta(x)
    )
    return optax.multi_transform({"lora": lora, "head": head}, lambda t: _expand(labels(t), t))


def _expand(labels, tree):
    """A label per array leaf of `tree` from a label per delta / fully trained leaf."""
    return jax.tree_util.tree_map(
        lambda lab, sub: jax.tree_util.tree_map(lambda _: lab, sub),
        labels,
        tree,
        is_leaf=lambda x: isinstance(x, str),
    )


def run_variant(variant: Variant, task: Task, s: dict) -> dict:
    """Trains all seeds of one variant at once; returns the row (per-seed curves and final metrics)."""
    seeds = s["seeds"]
    inits = [init_seed(variant, task, k, s) for k in seeds]
    base_v = inits[0][0]  # the same for every seed (PiSSA / OLoRA are deterministic)
    deltas = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[d for _, d in inits])
    del inits
    tx = make_optimizer(variant, s)
    opt_state = jax.vmap(tx.init)(deltas)
    apply = lj.wrap(task.apply)

    def model(d, b):
        return lambda *inputs: apply(b, d, *inputs)

    def one_step(d, st, b, batch):
        loss, g = jax.value_and_grad(lambda d: task.loss(model(d, b), batch))(d)
        u, st = tx.update(g, st, d)
        return optax.apply_updates(d, u), st, loss

    step = jax.jit(jax.vmap(one_step, in_axes=(0, 0, None, 0)))
    evaluate = jax.jit(
        jax.vmap(lambda d, b, batch: task.evaluate(model(d, b), batch), in_axes=(0, None, None))
    )

    n, bs = task.train["labels"].shape[0], s["batch_size"]
    orders = [np.random.default_rng(k).permutation(n) for k in seeds]

    def batch(t):
        idx = np.stack([np.resize(o, (t + 1) * bs)[t * bs : (t + 1) * bs] for o in orders])
        return {k: v[idx] for k, v in task.train.items()}

    curve, t0, step_times = [], time.time(), []
    for t in range(s["steps"]):
        ts = time.perf_counter()
        deltas, opt_state, loss = step(deltas, opt_state, base_v, batch(t))
        loss.block_until_ready()
        step_times.append(time.perf_counter() - ts)
        if (t + 1) % s["eval_every"] == 0 or t + 1 == s["steps"]:
            vl, va = evaluate(deltas, base_v, task.evals)
            curve.append(
                {"step": t + 1, "val_loss": np.asarray(vl).tolist(), "val_acc": np.asarray(va).tolist()}
            )
            print(
                f"  {variant.name:6s} step {t + 1:4d}  train loss {float(loss.mean()):.4f}  "
                f"val loss {float(vl.mean()):.4f}  val acc {100 * float(va.mean()):.2f}%  ({time.time() - t0:.0f}s)",
                flush=True,
            )
    final = curve[-1]
    return {
        "name": variant.name,
        "variant": dataclasses.asdict(variant),
        "seeds": list(seeds),
        "curve": curve,
        "val_acc": final["val_acc"],
        "val_loss": final["val_loss"],
        "trainable_params": lj.count_params(jax.tree_util.tree_map(lambda x: x[0], deltas)),
        "train_s": time.time() - t0,
        "median_step_s": float(np.median(step_times[1:] or step_times)),
        "_step": (step, deltas, opt_state, base_v, batch(0)),
    }


def zero_shot(task: Task) -> dict:
    """Validation loss and accuracy of the base model (no adapter), for the table's first row."""
    vl, va = jax.jit(lambda b, batch: task.evaluate(lambda *x: task.apply(b, *x), batch))(
        task.base, task.evals
    )
    return {"val_loss": float(vl), "val_acc": float(va)}


def mean_se(xs) -> tuple[float, float]:
    xs = np.asarray(xs, np.float64)
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0


def steps_to_reach(curve: list[dict], targets: list[float]) -> list[int | None]:
    """Per seed, the first evaluated step whose validation loss is <= that seed's target (None: never)."""
    out = []
    for i, target in enumerate(targets):
        hit = [c["step"] for c in curve if c["val_loss"][i] <= target]
        out.append(hit[0] if hit else None)
    return out


def interleaved_ratio(a, b, rounds: int) -> dict:
    """Median step time of `b` over `a`, one step of each in turn (load on a shared machine hits both)."""
    times = {"a": [], "b": []}
    for _ in range(rounds):
        for k, (step, d, st, base, batch) in (("a", a), ("b", b)):
            t = time.perf_counter()
            jax.block_until_ready(step(d, st, base, batch))
            times[k].append(time.perf_counter() - t)
    ma, mb = float(np.median(times["a"])), float(np.median(times["b"]))
    return {"lora_ms": 1e3 * ma, "dora_ms": 1e3 * mb, "ratio": mb / ma, "rounds": rounds}


def table(rows: list[dict], reach: list, timing: dict, base: dict | None = None) -> str:
    lines = [
        "| variant | val. accuracy (%) | val. loss | trainable params | LoRA+ steps to LoRA's final loss |",
        "|---|---|---|---|---|",
    ]
    if base is not None:
        lines.append(
            f"| no training (base model) | {100 * base['val_acc']:.2f} | {base['val_loss']:.4f} | 0 | – |"
        )
    for r in rows:
        acc, acc_se = mean_se(r["val_acc"])
        loss, loss_se = mean_se(r["val_loss"])
        extra = "–"
        if r["name"] == "LoRA+":
            extra = ", ".join("never" if x is None else str(x) for x in reach) + " (per seed)"
        lines.append(
            f"| {r['name']} | {100 * acc:.2f} ± {100 * acc_se:.2f} | {loss:.4f} ± {loss_se:.4f} | "
            f"{r['trainable_params']:,} | {extra} |"
        )
    lines.append("")
    lines.append(
        f"DoRA / LoRA CPU step time (interleaved, median of {timing['rounds']}): "
        f"{timing['dora_ms']:.0f} ms / {timing['lora_ms']:.0f} ms = {timing['ratio']:.2f}x"
    )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="minilm")
    p.add_argument("--small", action="store_true", help="a few steps/examples (CI smoke run)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="output folder")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int, help="number of seeds (0..n-1)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--train-examples", type=int)
    p.add_argument("--eval-examples", type=int)
    p.add_argument("--max-len", type=int)
    p.add_argument("--tag", help="file stem of the outputs (default variants / variants_smollm2)")
    args = p.parse_args(argv)
    s = dict(SETTINGS[(args.model, args.small)])
    for k in ("steps", "eval_every", "train_examples", "eval_examples", "max_len"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    if args.seeds is not None:
        s["seeds"] = tuple(range(args.seeds))
    out = args.out or (SMALL_OUT if args.small else RESULTS)
    tag = args.tag or ("variants" if args.model == "minilm" else f"variants_{args.model}")

    t0 = time.time()
    task = load_task(args.model, s)
    print(
        f"{tag}: {args.model}, {task.train['labels'].shape[0]} train / {task.evals['labels'].shape[0]} "
        f"validation sentences, {s['steps']} steps of {s['batch_size']}, rank {s['rank']} on q,v, "
        f"seeds {list(s['seeds'])}",
        flush=True,
    )
    base = None if task.head else zero_shot(task)  # a new head starts at chance: nothing to report
    rows = [run_variant(v, task, s) for v in VARIANTS]
    by = {r["name"]: r for r in rows}
    reach = steps_to_reach(by["LoRA+"]["curve"], by["LoRA"]["val_loss"])
    timing = interleaved_ratio(by["LoRA"].pop("_step"), by["DoRA"].pop("_step"), s["timing_rounds"])
    for r in rows:
        r.pop("_step", None)
    result = {
        "experiment": "variants",
        "model": args.model,
        "small": args.small,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
        "platform": jax.devices()[0].platform,
        "base_model": base,
        "rows": rows,
        "loraplus_steps_to_lora_final_loss": reach,
        "dora_over_lora_step_time": timing,
        "papers": PAPERS,
        "wall_s": time.time() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(rows, reach, timing, base)
    (out / f"{tag}.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out / tag}.{{json,md}} in {time.time() - t0:.0f}s")
    return result


if __name__ == "__main__":
    main()
