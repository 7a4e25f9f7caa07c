"""Which weights to adapt, and at what rank (Hu et al. 2021, Tables 5 and 6), on real sentiment data.

Two settings, both on the movie-review sentences (the Rotten Tomatoes sentences SST-2 is built from):

* ``--model minilm``: all-MiniLM-L6-v2 + a linear head on the mean-pooled output, trained as a
  classifier (the paper's SST-2 setting with RoBERTa; the head is trained in every configuration, as a
  fully trained leaf of the deltas, ``LoraSpec(train_full="params/classifier/.*")``, at its own
  learning rate ``lr_head``);
* ``--model smollm2``: SmolLM2-135M-Instruct as prompt completion, ``"Review: ...\\nSentiment:"`` ->
  ``" positive"`` / ``" negative"``, trained with the LM loss on the completion; accuracy compares the
  likelihood of the two label words after the prompt.

Configurations: full fine-tuning; head only (MiniLM) or no training (SmolLM2); the fixed-budget
comparison of Table 5 (r=8 on one matrix type, r=4 on two, r=2 on four: the same number of trainable
parameters); and a rank sweep on chosen target sets (Table 6). Every configuration trains several
seeds at once with ``jax.vmap`` (:mod:`lora_jax.train.sweep`); accuracy is on the validation split.

Usage::

    python experiments/rank_ablation.py --model minilm            # full size (writes experiments/results/)
    python experiments/rank_ablation.py --model smollm2
    python experiments/rank_ablation.py --model minilm --small    # seconds; writes runs/experiments_small/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import time

import jax
import jax.numpy as jnp

import lora_jax as lj
from lora_jax.train import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
SMALL_OUT = REPO / "runs" / "experiments_small"

MATRICES = {"q": "query", "k": "key", "v": "value", "o": "out"}
PRETTY = {"q": "Wq", "k": "Wk", "v": "Wv", "o": "Wo"}

# Table 5 of the paper: the same budget spread over 1, 2 or 4 matrix types (r x #types = 8).
BUDGET = [("q", 8), ("k", 8), ("v", 8), ("o", 8), ("qk", 4), ("qv", 4), ("qkvo", 2)]

SETTINGS = {
    # Full sizes are chosen to fit ~15-20 min (MiniLM) and ~10 min (SmolLM2) on a shared 2-core CPU; on an
    # accelerator raise --steps / --train-examples / --eval-examples (see experiments/README.md).
    ("minilm", False): dict(
        train_examples=2000,
        eval_examples=256,
        steps=32,
        batch_size=16,
        max_len=32,
        seeds=(0, 1, 2),
        lr=2e-3,
        lr_full=1e-4,
        lr_head=5e-3,
        alpha=16.0,
        ranks=(1, 2, 4, 8, 16, 64),
        sweep_targets=("qv",),
        layers=None,
        eval_batch_size=128,
        budget_subset=("q", "k", "v", "o", "qv", "qkvo"),
    ),
    ("minilm", True): dict(
        train_examples=64,
        eval_examples=64,
        steps=3,
        batch_size=8,
        max_len=32,
        seeds=(0, 1),
        lr=2e-3,
        lr_full=1e-4,
        lr_head=5e-3,
        alpha=16.0,
        ranks=(2,),
        sweep_targets=("qv",),
        layers=None,
        eval_batch_size=64,
        budget=False,
    ),
    ("smollm2", False): dict(
        train_examples=512,
        eval_examples=128,
        steps=12,
        batch_size=8,
        max_len=40,
        seeds=(0, 1),
        lr=1e-3,
        lr_full=2e-5,
        lr_head=0.0,
        alpha=16.0,
        ranks=(8,),
        sweep_targets=("qv",),
        layers=None,
        eval_batch_size=32,
        budget_subset=("qkvo",),
    ),
    ("smollm2", True): dict(
        train_examples=32,
        eval_examples=32,
        steps=2,
        batch_size=4,
        max_len=40,
        seeds=(0, 1),
        lr=1e-3,
        lr_full=2e-5,
        lr_head=0.0,
        alpha=16.0,
        ranks=(2,),
        sweep_targets=("qv",),
        layers=2,
        eval_batch_size=32,
        budget=False,
    ),
}

PAPER = {
    "minilm": (
        "Paper (RoBERTa-base on SST-2, Table 2): LoRA on Wq,Wv r=8 95.1 ± 0.2 vs full fine-tuning 94.8. "
        "Table 5 (GPT-3, same 18M budget, WikiSQL/MNLI): {Wq} r=8 70.4/91.0, {Wk} 70.0/90.8, {Wv} 73.0/91.0, "
        "{Wo} 73.2/91.3, {Wq,Wk} r=4 71.4/91.3, {Wq,Wv} r=4 73.7/91.3, all four r=2 73.7/91.7: Wq or Wk "
        "alone is worst; spreading the budget beats a higher rank on one matrix."
    ),
    "smollm2": (
        "Paper: LoRA on Wq,Wv matches or beats full fine-tuning on GPT-2/GPT-3; Table 6: r=1-4 on "
        "{Wq,Wv} is already as good as r=64."
    ),
}


# --- configurations -----------------------------------------------------------------------------------


def target_regex(targets: str) -> str:
    """``"qv"`` -> a regex for the q and v attention kernels of every layer (BERT and Llama paths)."""
    unknown = sorted(set(targets) - set(MATRICES))
    if unknown or not targets:
        raise ValueError(f"targets {targets!r}: use letters from {sorted(MATRICES)}, e.g. 'qv'.")
    names = "|".join(MATRICES[t] for t in targets)
    return rf"params/(.*/)?layers_\d+/attn/({names})/kernel"


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the ablation: ``kind`` is "lora", "head" (head only), "zero-shot" or "full"."""

    kind: str
    targets: str = ""
    rank: int = 0
    group: str = ""

    @property
    def name(self) -> str:
        if self.kind == "full":
            return "full fine-tuning"
        if self.kind == "head":
            return "head only"
        if self.kind == "zero-shot":
            return "no training"
        return f"LoRA {{{','.join(PRETTY[t] for t in self.targets)}}} r={self.rank}"

    def config(self, s: dict) -> sweep.Config:
        """The sweep configuration of this row under settings `s` (learning rates, alpha)."""
        if self.kind == "full":
            return sweep.Config(self.name, full=True, lr=s["lr_full"], lr_head=s["lr_head"])
        spec = None
        if self.kind == "lora":
            spec = lj.LoraSpec(rank=self.rank, alpha=s["alpha"], targets=target_regex(self.targets))
        return sweep.Config(self.name, spec=spec, lr=s["lr"], lr_head=s["lr_head"])

    def run(self, task, variables, arrays, s: dict) -> tuple[dict, sweep.Result]:
        """Trains this row's configuration for every seed at once: ``(JSON row, sweep result)``."""
        result = sweep.train(
            task,
            self.config(s),
            variables,
            *arrays,
            seeds=s["seeds"],
            steps=s["steps"],
            batch_size=s["batch_size"],
            warmup=int(0.1 * s["steps"]),
            eval_batch_size=s["eval_batch_size"],
            log=lambda m: print(m, flush=True),
        )
        r = result.summary()
        row = {
            "name": self.name,
            "kind": self.kind,
            "targets": self.targets,
            "rank": self.rank,
            "group": self.group,
            "trainable_params": r["trainable_params"],
            "adapter_params": r["adapter_params"],
            "adapter_mb_fp32": r["adapter_params"] * 4 / 2**20,
            **{
                k: r[k]
                for k in ("acc", "acc_mean", "acc_std", "final_train_loss", "seeds", "train_s", "total_s")
            },
        }
        return row, result


def configs(model: str, s: dict) -> list[Row]:
    out = [Row("head" if model == "minilm" else "zero-shot", group="baseline"), Row("full", group="baseline")]
    if s.get("budget", True):
        subset = s.get("budget_subset")
        out += [Row("lora", t, r, "budget") for t, r in BUDGET if subset is None or t in subset]
    have = {(c.targets, c.rank) for c in out}
    for t in s["sweep_targets"]:
        out += [Row("lora", t, r, "rank") for r in s["ranks"] if (t, r) not in have]
    return out


# --- tasks --------------------------------------------------------------------------------------------


def minilm_task(max_len: int, train, evals, layers=None):
    """MiniLM + a new linear head on mean-pooled tokens (``params/classifier``), cross-entropy on 2 labels."""
    from lora_jax import data
    from lora_jax.models import bert

    model, variables, tok = bert.load_minilm()
    clf = bert.BertClassifier(model.config, num_labels=2)
    d = model.config.hidden_size
    init_head = lambda k: {
        "kernel": model.config.initializer_range * jax.random.normal(k, (d, 2)),
        "bias": jnp.zeros((2,)),
    }
    task = sweep.classifier_task(clf.apply, head_key="classifier", init_head=init_head)
    return (
        task,
        variables,
        (data.encode_classification(train, tok, max_len), data.encode_classification(evals, tok, max_len)),
    )


def truncate_llama(model, variables, layers: int):
    """The first `layers` decoder blocks of a (non-scanned) Llama, for quick smoke runs."""
    cfg = dataclasses.replace(model.config, num_layers=layers)
    params = {
        k: v
        for k, v in variables["params"].items()
        if not k.startswith("layers_") or int(k.split("_")[1]) < layers
    }
    return type(model)(cfg), {**variables, "params": params}


def smollm2_task(max_len: int, train, evals, layers=None):
    """SmolLM2-135M prompt completion, as ``lora-jax finetune`` trains it: LM loss on the label word;
    scores = log p(label word | prompt)."""
    from lora_jax import data, models
    from lora_jax.train import sentiment

    model, variables, tok = models.load("smollm2-135m")
    if layers:
        model, variables = truncate_llama(model, variables, layers)
    train_arrays, eval_arrays = data.encode_lm(train, tok, max_len), data.encode_lm(evals, tok, max_len)
    task = sweep.lm_task(
        model.apply,
        sentiment.candidate_token_ids(tok),
        num_targets=int(train_arrays["loss_mask"].sum(1).max()),
    )
    return task, variables, (train_arrays, eval_arrays)


TASKS = {"minilm": minilm_task, "smollm2": smollm2_task}


# --- outputs ------------------------------------------------------------------------------------------


def save_json(obj, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def plot_sweep(rows, title: str, path: pathlib.Path) -> None:
    """Accuracy vs rank per target set (left) and every configuration as a bar (right), matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    by_targets: dict[str, list] = {}
    for r in rows:
        if r["kind"] == "lora":
            by_targets.setdefault(r["targets"], []).append(r)
    for t, rs in by_targets.items():
        rs = sorted({r["rank"]: r for r in rs}.values(), key=lambda r: r["rank"])
        ax1.errorbar(
            [r["rank"] for r in rs],
            [100 * r["acc_mean"] for r in rs],
            [100 * r["acc_std"] for r in rs],
            marker="o",
            capsize=3,
            label="{" + ",".join(PRETTY[c] for c in t) + "}",
        )
    baselines = [r for r in rows if r["kind"] != "lora"]
    for r, c in zip(baselines, ["k", "gray", "tab:red"]):
        ax1.axhline(100 * r["acc_mean"], ls="--", color=c, label=r["name"])
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("rank r")
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title("accuracy vs rank, per target set")
    ax1.legend(fontsize=7)
    colors = {"baseline": "gray", "budget": "tab:blue", "rank": "tab:orange"}
    names = [r["name"].replace("LoRA ", "").replace(" r=", "\nr=") for r in rows]
    ax2.bar(
        range(len(rows)),
        [100 * r["acc_mean"] for r in rows],
        yerr=[100 * r["acc_std"] for r in rows],
        capsize=3,
        color=[colors.get(r["group"], "tab:green") for r in rows],
    )
    ax2.set_xticks(range(len(rows)), names, fontsize=6, rotation=60)
    lo = min(100 * (r["acc_mean"] - r["acc_std"]) for r in rows)
    hi = max(100 * (r["acc_mean"] + r["acc_std"]) for r in rows)
    ax2.set_ylim(max(0, lo - 3), min(100, hi + 2))
    ax2.set_title("all configurations (blue: same budget, r × #matrices = 8)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(TASKS), default="minilm")
    p.add_argument("--small", action="store_true", help="a few steps/examples/configs (CI smoke run)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="output folder")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int, help="number of seeds (0..n-1)")
    p.add_argument("--train-examples", type=int)
    p.add_argument("--eval-examples", type=int)
    p.add_argument("--ranks", type=lambda x: tuple(int(r) for r in x.split(",")), help="e.g. 1,2,4,8,16,64")
    p.add_argument(
        "--sweep-targets",
        type=lambda x: tuple(x.split(",")),
        help="target sets for the rank sweep, letters from q,k,v,o, comma-separated, e.g. q,qv,qkvo",
    )
    p.add_argument("--layers", type=int, help="keep only the first N layers (SmolLM2 smoke runs)")
    p.add_argument("--tag", help="file stem of the outputs (default rank_ablation_<model>)")
    p.add_argument("--only", help="run only configurations whose name matches this regex, e.g. 'full|r=8'")
    args = p.parse_args(argv)

    s = dict(SETTINGS[(args.model, args.small)])
    for k in ("steps", "train_examples", "eval_examples", "ranks", "sweep_targets", "layers"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    if args.seeds is not None:
        s["seeds"] = tuple(range(args.seeds))
    out = args.out or (SMALL_OUT if args.small else RESULTS)
    tag = args.tag or f"rank_ablation_{args.model}"

    from lora_jax import data

    t0 = time.time()
    splits = data.load_sentiment()
    train = data.subset(splits["train"], s["train_examples"])
    evals = data.subset(splits["validation"], s["eval_examples"])
    task, variables, arrays = TASKS[args.model](s["max_len"], train, evals, s["layers"])
    print(
        f"{tag}: {len(train)} train / {len(evals)} validation examples, {s['steps']} steps of "
        f"{s['batch_size']}, seeds {list(s['seeds'])}, devices {jax.devices()}",
        flush=True,
    )

    chosen = [r for r in configs(args.model, s) if not args.only or re.search(args.only, r.name)]
    rows = [r.run(task, variables, arrays, s)[0] for r in chosen]

    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
    result = {
        "experiment": "rank_ablation",
        "model": args.model,
        "small": args.small,
        "settings": settings,
        "epochs": s["steps"] * s["batch_size"] / len(train),
        "platform": jax.devices()[0].platform,
        "wall_s": time.time() - t0,
        "rows": rows,
        "paper": PAPER[args.model],
    }
    save_json(result, out / f"{tag}.json")
    title = (
        f"{args.model}: {len(train)} train sentences, {s['steps']} steps × {s['batch_size']}, "
        f"{len(s['seeds'])} seeds, validation accuracy"
    )
    (out / f"{tag}.md").write_text(f"### {title}\n\n" + sweep.table(rows) + f"\n{PAPER[args.model]}\n")
    plot_sweep(rows, title, out / f"{tag}.png")
    print(sweep.table(rows))
    print(f"wrote {out / tag}.{{json,md,png}} in {time.time() - t0:.0f}s")
    return result


if __name__ == "__main__":
    main()
