"""The built-in task of `lora-jax finetune`: movie-review sentiment as label-word likelihood.

Each review is a prompt whose completion is one label word (``" negative"`` / ``" positive"``, one token
each); training is next-token cross-entropy on the completion, evaluation scores both label words and
takes the likelier one. `load_data` gives the encoded `Splits`, which carry the hooks the engine calls
(`train_batches`, `evaluate`, `validate`, `results`); `lora_jax.train.filetask.FileTask` has the same
hooks for ``--data PATH``.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import jax
import numpy as np

from lora_jax.train import mesh as mesh_lib
from lora_jax.train.config import TrainConfig
from lora_jax.train.engine import Setup
from lora_jax.train.mesh import log

__all__ = [
    "Splits",
    "candidate_token_ids",
    "encode_split",
    "evaluate",
    "evaluate_test",
    "load_data",
    "load_task",
]


def candidate_token_ids(tokenizer, completions=None) -> list[int]:
    """The single token of each label word (``" negative"``, ``" positive"``); clear error otherwise."""
    from lora_jax import data

    completions = data.DEFAULT_COMPLETIONS if completions is None else completions
    ids = [tokenizer.encode(c, add_special_tokens=False).ids for c in completions]
    if any(len(i) != 1 for i in ids):
        raise ValueError(
            f"label words {list(completions)} must be one token each for likelihood scoring; "
            f"this tokenizer gives {ids}."
        )
    return [i[0] for i in ids]


def encode_split(examples, tokenizer, cfg: TrainConfig, limit: int = 0) -> dict[str, np.ndarray]:
    """`data.encode_lm` rows of `examples`; with `limit`, of a fixed random subset (`data.subset`, the same
    for every seed) of that many."""
    from lora_jax import data

    return data.encode_lm(data.subset(examples, limit), tokenizer, cfg.max_len, prompt=cfg.prompt)


@dataclasses.dataclass
class Splits:
    """The encoded data of a run (`data.encode_lm` arrays): all of train, the scored test subset, and the
    validation subset of the periodic evaluation (None without ``eval_every``)."""

    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    val: dict[str, np.ndarray] | None
    candidate_ids: list[int] | None = None  # the label words' tokens (`candidate_token_ids`)

    @property
    def num_targets(self) -> int:
        """The most completion tokens of any training row (the loss positions per row of the step)."""
        return int(self.train["loss_mask"].sum(1).max())

    # The hooks `finetune` calls (a `filetask.FileTask` has the same ones for --data PATH).

    @property
    def train_rows(self) -> int:
        return len(self.train["input_ids"])

    def train_apply(self, apply_fn):
        return apply_fn

    def train_batches(self, cfg: TrainConfig, setup: Setup, start: int):
        """Global batches ``(A, b, T)`` from step `start` (`data.batches`' seeded order, every process
        computing the same batch and feeding its own rows)."""
        from lora_jax import data

        batches = data.batches(
            {k: self.train[k] for k in ("input_ids", "attention_mask", "loss_mask")},
            cfg.batch,
            seed=cfg.seed,
            shuffle=True,
            start_step=start,
            num_epochs=None,
            drop_remainder=True,
        )
        for b in batches:
            b = {
                k: v.reshape(cfg.grad_accum, cfg.micro_batch, *v.shape[1:])
                for k, v in b.items()
                if k != "valid"
            }
            yield mesh_lib.global_batch(b, setup.shardings["batch"], axis=1)

    def evaluate(self, cfg: TrainConfig, setup: Setup, deltas, what: str) -> dict:
        return evaluate_test(setup, deltas, self.test, cfg, what)

    def validate(self, cfg: TrainConfig, setup: Setup, deltas) -> dict:
        return {"val_accuracy": evaluate(setup, deltas, self.val, cfg.eval_batch)}

    def results(self, base: dict, lora: dict) -> dict:
        return {
            "base_accuracy": base["accuracy"],
            "lora_accuracy": lora["accuracy"],
            "eval_examples": len(self.test["labels"]),
            "base": base,
            "lora": lora,
        }

    def eval_records(self, base: dict, lora: dict, steps: int) -> list[dict]:
        return []


def load_data(cfg: TrainConfig, tokenizer) -> Splits:
    """The movie-review splits encoded for `cfg` (``max_len``, ``prompt``, ``eval_size``, ``val_size``)."""
    from lora_jax import data

    splits = data.load_sentiment(seed=0)
    return Splits(
        train=encode_split(splits["train"], tokenizer, cfg),
        test=encode_split(splits["test"], tokenizer, cfg, cfg.eval_size),
        val=encode_split(splits["validation"], tokenizer, cfg, cfg.val_size) if cfg.eval_every else None,
        candidate_ids=candidate_token_ids(tokenizer),
    )


def load_task(cfg: TrainConfig, tokenizer, mesh, out: pathlib.Path):
    """The run's data: the movie-review `Splits`, or a `filetask.FileTask` for ``--data PATH`` (which reads
    and tokenizes only this process's share, cached under ``out/data_cache``)."""
    if cfg.data == "movie-reviews":
        return load_data(cfg, tokenizer)
    from lora_jax.train import filetask

    return filetask.FileTask(cfg, tokenizer, mesh, out)


def evaluate(
    setup: Setup, deltas, arrays: dict[str, np.ndarray], batch_size: int, *, details: bool = False
) -> float | dict:
    """Accuracy of label-word likelihood scoring over `arrays` (from `encode_lm`).

    With ``details``: ``{"accuracy", "stderr" (binomial, sqrt(p(1-p)/n)), "accuracy_negative",
    "accuracy_positive" (per-class recall), "predicted_positive" (fraction), "examples"}``.
    """
    from lora_jax import data

    keys = ("input_ids", "attention_mask", "prompt_len", "labels")
    dp = mesh_lib.data_parallel_size(setup.mesh)
    batch_size = math.ceil(batch_size / dp) * dp
    correct = count = 0.0
    preds = []
    for b in data.batches({k: arrays[k] for k in keys}, batch_size):
        out = setup.score_step(deltas, setup.params, mesh_lib.global_batch(b, setup.shardings["eval_batch"]))
        logprobs = np.asarray(jax.device_get(out["logprobs"]))[b["valid"] == 1]
        bad = int((~np.isfinite(logprobs).all(axis=-1)).sum())
        if bad:  # argmax would score a NaN row as class 0: a silently wrong accuracy
            raise ValueError(
                f"evaluation: the model's log-probabilities of the label words are not finite (NaN or inf) "
                f"for {bad} of {len(logprobs)} examples of a batch; the adapter (or base model) holds "
                f"non-finite values or overflows in its dtype. Refusing to score them."
            )
        correct += float(out["correct"])
        count += float(out["count"])
        if details:
            preds.append(np.argmax(logprobs, axis=-1))
    acc = correct / max(count, 1.0)
    if not details:
        return acc
    pred, y = np.concatenate(preds), np.asarray(arrays["labels"])
    recall = lambda c: float((pred[y == c] == c).mean()) if (y == c).any() else None
    return {
        "accuracy": acc,
        "stderr": math.sqrt(acc * (1 - acc) / max(count, 1.0)),
        "accuracy_negative": recall(0),
        "accuracy_positive": recall(1),
        "predicted_positive": float(pred.mean()) if len(pred) else None,
        "examples": int(count),
    }


def _per_class(d: dict | None) -> str:
    if not d:
        return ""
    f = lambda x: "n/a" if x is None else f"{x:.4f}"
    return (
        f"standard error {d['stderr']:.4f}, per class: negative {f(d['accuracy_negative'])}, "
        f"positive {f(d['accuracy_positive'])}"
    )


def evaluate_test(setup: Setup, deltas, arrays: dict[str, np.ndarray], cfg: TrainConfig, what: str) -> dict:
    """`evaluate` with details on the test subset, logged as ``"{what} accuracy on N test reviews: ..."``."""
    t = time.time()
    detail = evaluate(setup, deltas, arrays, cfg.eval_batch, details=True)
    log(
        f"{what} accuracy on {len(arrays['labels'])} test reviews: {detail['accuracy']:.4f} ({time.time() - t:.1f}s); "
        f"{_per_class(detail)}"
    )
    return detail
