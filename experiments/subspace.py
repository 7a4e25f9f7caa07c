"""What the low-rank updates learn (Hu et al. 2021, section 7): subspace overlap and amplification.

Trains LoRA adapters on Wq and Wv of MiniLM (movie-review sentiment, as in ``rank_ablation.py``) and
analyses one layer with :mod:`lora_jax.analysis`:

* **Fig. 3**: φ(A_r=8, A_r=64, i, j) for ΔWq and ΔWv: do the top directions of a rank-8 adapter lie in
  the span of a rank-64 one? (the paper: the top direction overlaps > 0.5).
* **Fig. 4**: φ between two seeds of r=64, next to two random Gaussian matrices of the same shape.
* **Table 7**: amplification ‖ΔW‖_F / ‖UᵀWV‖_F at r=4 and r=64, with the paper's baselines (U, V from
  W itself, or random).

Our ``a: (d_in, r)`` is the paper's ``Aᵀ``, so its left singular vectors are the paper's right singular
vectors of A. Because our adapters train for far fewer steps than the paper's, ``a`` is still close to
its random initialisation; each φ is therefore also reported *at initialisation* (same keys, before
training), and for the input-side top singular vectors of ΔW itself, which only contain learned
directions.

Usage::

    python experiments/subspace.py            # full size: writes experiments/results/subspace_minilm.*
    python experiments/subspace.py --small    # seconds; writes runs/experiments_small/
"""

from __future__ import annotations

import argparse
import operator
import pathlib
import time

import jax
import numpy as np
import rank_ablation  # the sibling script: MiniLM task, configurations, outputs

import lora_jax as lj
from lora_jax import analysis
from lora_jax.train import sweep

SETTINGS = {
    False: dict(
        train_examples=2000,
        eval_examples=256,
        steps=64,
        batch_size=16,
        max_len=32,
        lr=2e-3,
        lr_head=5e-3,
        alpha=16.0,
        small_rank=8,
        big_rank=64,
        amp_ranks=(4, 64),
        layer=3,
    ),
    True: dict(
        train_examples=32,
        eval_examples=32,
        steps=2,
        batch_size=8,
        max_len=32,
        lr=2e-3,
        lr_head=5e-3,
        alpha=16.0,
        small_rank=2,
        big_rank=8,
        amp_ranks=(2, 8),
        layer=1,
    ),
}
MATS = {"q": "query", "v": "value"}
PAPER = {
    "fig3": "GPT-3, layer 48: φ(A_r=8, A_r=64, 1, 1) > 0.5 for ΔWq and ΔWv; the overlap falls off for i > 1.",
    "fig4": "GPT-3: two seeds of r=64 share a few top directions (φ well above the random baseline for small i, j).",
    "table7": "GPT-3, layer 48, ΔWq: r=4 ‖UᵀWqVᵀ‖ 0.32 (ΔWq), 21.67 (Wq), 0.02 (random); ‖Wq‖ 61.95, "
    "‖ΔWq‖ 6.91 → amplification 21.5. r=64: 1.90 / 37.71 / 0.33; ‖ΔWq‖ 3.57 → 1.9.",
}


def kernel_path(layer: int, mat: str) -> tuple[str, ...]:
    return ("params", "encoder", f"layers_{layer}", "attn", MATS[mat], "kernel")


def get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def train(rank: int, seeds, task, variables, arrays, s):
    """LoRA on Wq, Wv at `rank`, every seed at once: ``(JSON row, trained deltas per seed, initial deltas per seed)``."""
    row = rank_ablation.Row("lora", "qv", rank, "subspace")
    settings = {**s, "seeds": tuple(seeds), "lr_full": s["lr"], "eval_batch_size": 128}
    summary, result = row.run(task, variables, arrays, settings)
    init = sweep.init(task, row.config(settings), variables, seeds)
    runs = range(len(seeds))
    return (
        summary,
        [result.run(i)["deltas"] for i in runs],
        [jax.tree_util.tree_map(operator.itemgetter(i), init["deltas"]) for i in runs],
    )


def input_directions(delta: lj.LoraDelta) -> np.ndarray:
    """Left singular vectors of ΔW = s·a·b (d_in, r): the input directions the update actually uses."""
    return np.asarray(analysis.top_singular_vectors(lj.delta_weight(delta), delta.rank)[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--steps", type=int)
    p.add_argument("--layer", type=int)
    args = p.parse_args(argv)
    s = dict(SETTINGS[args.small])
    for k in ("steps", "layer"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    out = args.out or (rank_ablation.SMALL_OUT if args.small else rank_ablation.RESULTS)
    t0 = time.time()

    from lora_jax import data

    splits = data.load_sentiment()
    train_ex = data.subset(splits["train"], s["train_examples"])
    eval_ex = data.subset(splits["validation"], s["eval_examples"])
    task, variables, arrays = rank_ablation.minilm_task(s["max_len"], train_ex, eval_ex)

    r_small, r_big, layer = s["small_rank"], s["big_rank"], s["layer"]
    # Seeds per rank: the small rank and the large rank never share a seed (no common init), and the large
    # rank has two seeds for Fig. 4. Table 7 uses the first seed of each of its ranks.
    plan = {r_small: (0,), r_big: (1, 2)}
    for r in s["amp_ranks"]:
        plan.setdefault(r, (0,))
    runs = {}  # (rank, seed) -> (trained delta tree, init delta tree)
    rows = []
    for rank, seeds in sorted(plan.items()):
        row, trained, init = train(rank, seeds, task, variables, arrays, s)
        rows.append(row)
        for sd, tr, ini in zip(seeds, trained, init):
            runs[(rank, sd)] = (tr, ini)

    result = {
        "experiment": "subspace",
        "model": "minilm",
        "small": args.small,
        "settings": s,
        "layer": layer,
        "training": rows,
        "paper": PAPER,
        "fig3": {},
        "fig4": {},
        "table7": {},
    }
    key = jax.random.key(1234)
    for mat in MATS:
        path = kernel_path(layer, mat)
        d_small, i_small = (get(t, path) for t in runs[(r_small, 0)])
        d_b1, i_b1 = (get(t, path) for t in runs[(r_big, 1)])
        d_b2, i_b2 = (get(t, path) for t in runs[(r_big, 2)])
        g3 = np.asarray(analysis.subspace_similarity_grid(d_small.a, d_b1.a))
        g3_init = np.asarray(analysis.subspace_similarity_grid(i_small.a, i_b1.a))
        g3_dw = np.asarray(
            analysis.subspace_similarity_grid(input_directions(d_small), input_directions(d_b1))
        )
        g4 = np.asarray(analysis.subspace_similarity_grid(d_b1.a, d_b2.a))
        g4_init = np.asarray(analysis.subspace_similarity_grid(i_b1.a, i_b2.a))
        g4_dw = np.asarray(analysis.subspace_similarity_grid(input_directions(d_b1), input_directions(d_b2)))
        k1, k2, key = jax.random.split(key, 3)
        shape = d_b1.a.shape
        g4_rand = np.asarray(
            analysis.subspace_similarity_grid(jax.random.normal(k1, shape), jax.random.normal(k2, shape))
        )
        result["fig3"][mat] = {
            "a": g3.tolist(),
            "a_at_init": g3_init.tolist(),
            "delta_w": g3_dw.tolist(),
            "phi_11": float(g3[0, 0]),
            "phi_11_at_init": float(g3_init[0, 0]),
            "phi_11_delta_w": float(g3_dw[0, 0]),
        }
        result["fig4"][mat] = {
            "a": g4.tolist(),
            "a_at_init": g4_init.tolist(),
            "delta_w": g4_dw.tolist(),
            "random": g4_rand.tolist(),
        }
        w = get(variables, path)
        for r in s["amp_ranks"]:
            delta = get(runs[(r, plan[r][0])][0], path)
            k, key = jax.random.split(key)
            result["table7"][f"{mat}_r{r}"] = analysis.amplification_report(lj.delta_weight(delta), w, r, k)

    rank_ablation.save_json(result, out / "subspace_minilm.json")
    plot(result, out)
    md = report_markdown(result)
    (out / "subspace_minilm.md").write_text(md)
    print(md)
    print(f"wrote {out}/subspace_minilm.{{json,md}} and figures in {time.time() - t0:.0f}s")
    return result


def report_markdown(result) -> str:
    s, layer = result["settings"], result["layer"]
    lines = [
        f"### Subspace analysis, MiniLM layer {layer}, ΔWq and ΔWv ({s['steps']} steps × {s['batch_size']})",
        "",
        "Training (validation accuracy): "
        + "; ".join(f"{r['name']} {100 * r['acc_mean']:.1f}%" for r in result["training"]),
        "",
        f"| | φ(A_r={s['small_rank']}, A_r={s['big_rank']}, 1, 1) | same, at initialisation | "
        f"same, on ΔW's input directions |",
        "|---|---|---|---|",
    ]
    for mat, f in result["fig3"].items():
        lines.append(
            f"| ΔW{mat} | {f['phi_11']:.3f} | {f['phi_11_at_init']:.3f} | {f['phi_11_delta_w']:.3f} |"
        )
    lines += [
        "",
        f"Paper: {result['paper']['fig3']}",
        "",
        "| | r | ‖UᵀWV‖ (U,V of ΔW) | ‖UᵀWV‖ (U,V of W) | ‖UᵀWV‖ (random) | ‖W‖_F | ‖ΔW‖_F | amplification |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in result["table7"].items():
        mat, r = name.split("_r")
        lines.append(
            f"| ΔW{mat} | {r} | {t['proj_delta']:.3f} | {t['proj_w']:.2f} | {t['proj_random']:.3f} | "
            f"{t['w_norm']:.2f} | {t['delta_w_norm']:.3f} | {t['amplification']:.1f} |"
        )
    lines += ["", f"Paper: {result['paper']['table7']}"]
    return "\n".join(lines) + "\n"


def plot(result, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), squeeze=False, layout="constrained")
    for row, (mat, f) in enumerate(result["fig3"].items()):
        for col, (kind, title) in enumerate(
            [("a", "learned a"), ("a_at_init", "a at initialisation"), ("delta_w", "input directions of ΔW")]
        ):
            ax = axes[row, col]
            im = ax.imshow(
                np.asarray(f[kind]),
                vmin=0,
                vmax=1,
                cmap="viridis",
                aspect="auto",
                origin="lower",
                extent=(0.5, len(f[kind][0]) + 0.5, 0.5, len(f[kind]) + 0.5),
            )
            ax.set_title(f"ΔW{mat}: {title}", fontsize=9)
            if row == 1:
                ax.set_xlabel(f"j (top-j directions of r={s['big_rank']})")
            if col == 0:
                ax.set_ylabel(f"i (top-i of r={s['small_rank']})")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="φ")
    fig.suptitle(
        f"Fig. 3 style: φ(A_r={s['small_rank']}, A_r={s['big_rank']}, i, j), layer {result['layer']}"
    )
    fig.savefig(out / "subspace_fig3.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), squeeze=False, layout="constrained")
    for row, (mat, f) in enumerate(result["fig4"].items()):
        for col, (kind, title) in enumerate(
            [
                ("a", "learned a, seed 1 vs 2"),
                ("delta_w", "ΔW input directions"),
                ("random", "random Gaussian"),
            ]
        ):
            ax = axes[row, col]
            im = ax.imshow(
                np.asarray(f[kind]),
                vmin=0,
                vmax=1,
                cmap="viridis",
                origin="lower",
                extent=(0.5, len(f[kind][0]) + 0.5, 0.5, len(f[kind]) + 0.5),
            )
            ax.set_title(f"ΔW{mat}: {title}", fontsize=9)
            if row == 1:
                ax.set_xlabel("j")
            if col == 0:
                ax.set_ylabel("i")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="φ")
    fig.suptitle(f"Fig. 4 style: φ between two seeds of r={s['big_rank']}, layer {result['layer']}")
    fig.savefig(out / "subspace_fig4.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
