"""The fine-tuning job on your own data (``--data PATH``): shares, batches, held-out loss, accuracy, samples.

`FileTask` is what `lora_jax.train.loop.finetune` drives for data files, in place of the movie-review
`sentiment.Splits` (the same hooks: ``train_batches``, ``evaluate``, ``validate``, ``results``).

* **Shares.** The processes whose devices hold the same rows of the batch read the same share of the
  data: share ``i`` of ``n`` is every ``n``-th training row from row ``i``
  (:func:`lora_jax.data.files.share`). A process reads and tokenizes only its share (and its share of the
  validation rows), caches the tokens next to the run (``out/data_cache/``) and builds only its own
  rows of each global batch (``jax.make_array_from_process_local_data``).
* **Order.** Step ``k`` takes batch ``k`` of the seeded order of `lora_jax.data.batches` over the share's
  rows (all shares cut to the same count, so every process has the same steps per epoch): a function of
  the step alone, so a resumed run continues with the batch an uninterrupted one would take.
* **Loss.** Only completion / assistant tokens count (``--train-on-prompt``: all). The train step sums
  the loss over every micro-batch and process and divides by the number of loss tokens: a per-token mean
  over the whole batch, whatever ``--grad-accum`` and the number of processes. ``--pack`` packs examples
  into rows with segment ids (`lora_jax.data.packing`), the same loss with less padding.
* **Evaluation.** The held-out loss (the same per-token mean, on the validation rows) and its
  perplexity before training, every ``--eval-every`` steps and after; with a label set (detected, or
  ``--labels``), the accuracy of picking the most likely label (by its first token when the labels'
  first tokens differ, else by each label's whole log-likelihood); ``--samples N`` greedy generations for
  the first N validation prompts, before and after, in ``out/samples.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax.data import files as files_lib
from lora_jax.data import formats, packing, prepare
from lora_jax.data.files import DataError
from lora_jax.train import mesh as mesh_lib
from lora_jax.train import step as step_lib
from lora_jax.train.loss import token_loss

__all__ = ["FileTask", "batch_share", "make_choice_step", "make_loss_step"]

KEYS = ("input_ids", "attention_mask", "loss_mask")
CHUNK = 128  # eval: above this many loss positions per row, the cross-entropy is computed in chunks


def _across_processes(values: list[int]) -> np.ndarray:
    """``(processes, len(values))``: every process's `values` (a small collective with several)."""
    if jax.process_count() == 1:
        return np.asarray([values], np.int64)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))


def batch_share(mesh, batch: int, *, leading: int = 1) -> tuple[int, int]:
    """``(index, count)`` of this process's share of a batch of `batch` rows on `mesh`.

    The batch is sharded over the data-parallel axes (`mesh_lib.batch_sharding`); this process's
    devices hold one contiguous block of ``batch / count`` rows, block ``index``. Processes holding the
    same block (e.g. tensor-parallel across hosts) get the same share.
    """
    rows = mesh_lib.local_rows(mesh_lib.batch_sharding(mesh, leading), (1,) * leading + (batch, 1), leading)
    size = rows.stop - rows.start
    return rows.start // size, batch // size


# --- jitted evaluation steps ---------------------------------------------------------------------


def make_loss_step(
    apply_fn: Callable, num_targets: int, *, shardings: dict | None = None, chunk: int = CHUNK
) -> Callable:
    """``loss(deltas, params, batch) -> {"loss", "tokens"}``: the summed cross-entropy over ``loss_mask``
    (position ``t`` predicting token ``t + 1`` where ``loss_mask[:, t + 1] == 1``) and the token count.

    Args:
        apply_fn: the model's apply, ``apply_fn(variables, ids, attention_mask=mask)``.
        num_targets: the most loss tokens of any row (a static bound).
        shardings: `engine.Setup.shardings` (``"deltas"``, ``"params"``, ``"eval_batch"``, ``"replicated"``).
        chunk: above this many loss positions per row the loss is computed in chunks of this many.

    The batch holds ``input_ids, attention_mask, loss_mask: (B, T)``.
    """
    picked = lj.wrap(step_lib.at_positions(apply_fn))
    chunked = lj.wrap(step_lib.chunked_lm_loss(apply_fn, chunk=chunk))
    mesh = None if shardings is None else shardings["replicated"].mesh

    def fn(deltas, params, b):
        ids, mask, lm = b["input_ids"], b["attention_mask"], b["loss_mask"]
        k = max(1, min(num_targets, ids.shape[1] - 1))
        pos, tgt, w = step_lib.completion_targets(ids, lm, k)
        with step_lib.activation_sharding(mesh):
            if k > chunk:
                loss, n = chunked(params, deltas, ids, mask, tgt, w, pos)
            else:
                loss, n = token_loss(picked(params, deltas, ids, mask, pos), tgt, w)
        return {"loss": loss, "tokens": n}

    if shardings is None:
        return jax.jit(fn)
    s = shardings
    return jax.jit(
        fn, in_shardings=(s["deltas"], s["params"], s["eval_batch"]), out_shardings=s["replicated"]
    )


def make_choice_step(
    apply_fn: Callable, num_targets: int, num_choices: int, *, shardings: dict | None = None
) -> Callable:
    """``score(deltas, params, batch) -> {"correct", "count"}``: pick the most likely of C answers.

    The batch holds ``C`` rows per example (example-major): ``input_ids, attention_mask, loss_mask:
    (E·C, T)`` with ``loss_mask`` on each candidate answer's tokens, and ``labels, valid: (E,)``. The
    prediction is the candidate with the least summed cross-entropy.
    """
    picked = lj.wrap(step_lib.at_positions(apply_fn))
    mesh = None if shardings is None else shardings["replicated"].mesh

    def fn(deltas, params, b):
        ids, mask, lm = b["input_ids"], b["attention_mask"], b["loss_mask"]
        k = max(1, min(num_targets, ids.shape[1] - 1))
        pos, tgt, w = step_lib.completion_targets(ids, lm, k)
        with step_lib.activation_sharding(mesh):
            logits = picked(params, deltas, ids, mask, pos)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.sum(jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0] * w, axis=1)
        pred = jnp.argmin(nll.reshape(-1, num_choices), axis=1)
        valid = b["valid"].astype(jnp.float32)
        return {"correct": jnp.sum(jnp.where(pred == b["labels"], valid, 0.0)), "count": jnp.sum(valid)}

    if shardings is None:
        return jax.jit(fn)
    s = shardings
    return jax.jit(
        fn, in_shardings=(s["deltas"], s["params"], s["eval_batch"]), out_shardings=s["replicated"]
    )


# --- the task ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Held:
    """One held-out subset of this process's share: rows for the loss, and for label accuracy."""

    n: int  # examples (all shares)
    rows: dict  # this share's loss rows (unpadded count = len(rows["input_ids"]))
    score: dict | None = None  # first-token scoring rows: + prompt_len, labels
    choice: dict | None = None  # whole-answer scoring rows: C rows per example, + labels (per example)


class FileTask:
    """The data of a ``--data PATH`` run and how it is trained and evaluated (see the module docstring).

    Args:
        cfg: the run's `TrainConfig`.
        tokenizer: the model's tokenizer.
        mesh: the run's mesh (decides each process's share).
        out: the run folder (tokenization cache in ``out/data_cache``, ``samples.jsonl``).

    Raises:
        DataError: bad data (one line naming file, line/row and field), or too few rows for a batch.
    """

    def __init__(self, cfg, tokenizer, mesh, out: pathlib.Path):
        self.cfg, self.tokenizer, self.out = cfg, tokenizer, pathlib.Path(out)
        cache = self.out / "data_cache"
        d = self.data = prepare.load_files(
            cfg.data,
            tokenizer,
            model=cfg.model,
            fmt=cfg.format,
            val_fraction=cfg.val_fraction,
            train_on_prompt=cfg.train_on_prompt,
            labels=cfg.labels,
            cache_dir=cache,
        )
        special = formats.special_tokens(cfg.model, tokenizer)
        self.pad_id, self.eos_id = int(special["pad_id"]), special["eos_id"]
        self.share, self.shares = batch_share(mesh, cfg.micro_batch)
        dp = mesh_lib.data_parallel_size(mesh)
        self.eval_batch = math.ceil(cfg.eval_batch / dp) * dp
        self._local_dp = dp // self.shares  # data-parallel devices of this process
        tag = f"{self.share}of{self.shares}"

        # Training rows: this share's examples, cut or dropped at --max-len, padded or packed.
        tok = d.tokenize("train", files_lib.share(d.train_rows, self.share, self.shares), cache, tag)
        train, stats = prepare.build_rows(
            tok, cfg.max_len, pad_id=self.pad_id, drop_long=cfg.drop_long, pack=cfg.pack
        )
        # Held-out subsets (positions in the validation split): the periodic one is a prefix of the same
        # fixed random draw as the final one, so it is one of its subsets.
        from lora_jax import data as data_lib

        n_val = len(d.val_rows)
        self.eval_pos = data_lib.subset(list(range(n_val)), cfg.eval_size)
        self.val_pos = data_lib.subset(list(range(n_val)), cfg.val_size) if cfg.eval_every else []
        mine = lambda pos: files_lib.share(pos, self.share, self.shares)
        needed = sorted(set(mine(self.eval_pos)) | set(mine(self.val_pos)))
        val_tok = d.tokenize("validation", d.val_rows[needed], cache, tag) if needed else None
        held = {
            name: self._held(val_tok, pos) for name, pos in (("eval", self.eval_pos), ("val", self.val_pos))
        }

        # Label scoring by first token when every label starts with its own token, checked on our rows.
        self.candidate_ids, consistent = None, True
        if d.labels is not None and n_val:
            self.candidate_ids = self._first_tokens()
            if self.candidate_ids is not None and val_tok is not None:
                nxt = [
                    int(val_tok.ids[val_tok.offsets[i] + p]) if p < val_tok.lengths()[i] else -1
                    for i, p in enumerate(val_tok.prompt_len)
                ]
                consistent = all(
                    lab >= 0 and self.candidate_ids[lab] == t for lab, t in zip(val_tok.label, nxt)
                )

        g = _across_processes(
            [
                len(train["input_ids"]),
                _loss_tokens(train),
                _loss_tokens(held["eval"].rows),
                _loss_tokens(held["val"].rows),
                len(held["eval"].rows["input_ids"]),
                len(held["val"].rows["input_ids"]),
                int(consistent),
                stats["examples"],
                stats["long"],
                stats["no_loss"],
                stats["tokens"],
                stats["rows"],
                int(round(stats["padding"] * stats["rows"] * cfg.max_len)),
                len(tok),
                self.share,
            ]
        )
        common = int(g[:, 0].min())
        self.num_targets = max(1, int(g[:, 1].max()))
        self._eval_targets = {"eval": max(1, int(g[:, 2].max())), "val": max(1, int(g[:, 3].max()))}
        self._eval_batches = {
            k: math.ceil(int(g[:, c].max()) / (self.eval_batch // self.shares))
            for k, c in (("eval", 4), ("val", 5))
        }
        fast = self.candidate_ids is not None and bool(g[:, 6].all())
        if d.labels is not None and not fast:
            self.candidate_ids = None
        self.train = {k: v[:common] for k, v in train.items()}
        self.train_rows = common * self.shares
        per_step = cfg.grad_accum * (cfg.micro_batch // self.shares)
        if common < per_step:
            raise DataError(
                f"--data {files_lib.public_name(cfg.data)!r}: {self.train_rows} training rows "
                f"{'(packed) ' if cfg.pack else ''}are fewer than one batch (--batch {cfg.batch}); add "
                f"data or lower --batch."
            )
        if d.labels is not None:
            for k in held:
                self._label_rows(held[k], k, val_tok)
        # Evaluation rows are cut to the longest row of any share (one compiled width per set, no padding
        # columns), and whole-answer scoring needs a global bound on answer tokens.
        sets = [(h, f) for h in held for f in ("rows", "score", "choice") if getattr(held[h], f) is not None]
        w = _across_processes(
            [_width(getattr(held[h], f)) for h, f in sets] + [_loss_tokens(held[h].choice) for h in held]
        )
        for (h, f), width in zip(sets, w[:, : len(sets)].max(0)):
            setattr(held[h], f, _trim(getattr(held[h], f), max(int(width), 2)))
        self._choice_targets = max(1, int(w[:, len(sets) :].max())) if len(held) else 1
        self.held = held
        self.fingerprint = d.fingerprint
        total = g[np.unique(g[:, 14], return_index=True)[1]].sum(0)  # each share once
        self.stats = {
            "format": d.format,
            "train_examples": int(total[13]),
            "validation_examples": n_val,
            "validation_carved": d.carved,
            "long": int(total[8]),
            "truncated": 0 if cfg.drop_long else int(total[8]),
            "dropped": int(total[8]) if cfg.drop_long else 0,
            "without_loss_tokens": int(total[9]),
            "train_rows": self.train_rows,
            "packed": cfg.pack,
            "padding": float(total[12]) / max(int(total[11]) * cfg.max_len, 1),
            "padding_unpacked": 1.0 - float(total[10]) / max(int(total[7]) * cfg.max_len, 1),
            "labels": list(d.labels.names) if d.labels else None,
            "label_scoring": None if d.labels is None else ("first token" if fast else "whole answer"),
            "processes_reading": self.shares,
            "ignored_columns": d.ignored,
        }
        self._log_stats()
        self._steps: dict[str, Callable] = {}

    # -- data -------------------------------------------------------------------------------------

    def _held(self, val_tok, positions) -> _Held:
        mine = files_lib.share(positions, self.share, self.shares)
        if not mine:
            return _Held(
                len(positions),
                prepare.build_rows(
                    prepare._assemble([], [], [], [], []), self.cfg.max_len, pad_id=self.pad_id
                )[0],
            )
        tok = val_tok.select(self.data.val_rows[mine])
        rows, _ = prepare.build_rows(tok, self.cfg.max_len, pad_id=self.pad_id, drop_long=self.cfg.drop_long)
        return _Held(len(positions), rows)

    def _first_tokens(self) -> list[int] | None:
        """Each label's first answer token on the first validation row; None unless all differ."""
        d = self.data
        row = d.rows_of("validation", d.val_rows[:1])[0]
        where = d.where("validation", d.val_rows[0])
        firsts = []
        for text in d.labels.texts:
            enc = d.encoder(d.encoder.with_answer(row, text), where)
            firsts.append(enc.ids[enc.prompt_len] if enc.answer_len else -1)
        return firsts if -1 not in firsts and len(set(firsts)) == len(firsts) else None

    def _label_rows(self, held: _Held, name: str, val_tok) -> None:
        """Scoring rows of `held`'s examples: prompts (first-token scoring) or C rows each (whole answers)."""
        positions = self.eval_pos if name == "eval" else self.val_pos
        mine = files_lib.share(positions, self.share, self.shares)
        t = self.cfg.max_len
        if not mine:
            empty = {k: np.zeros((0, t), np.int32) for k in KEYS}
            held.score = {**empty, "prompt_len": np.zeros(0, np.int32), "labels": np.zeros(0, np.int32)}
            held.choice = {**empty, "labels": np.zeros(0, np.int32)}
            return
        tok = val_tok.select(self.data.val_rows[mine])
        if self.candidate_ids is not None:
            ids = np.full((len(tok), t), self.pad_id, np.int32)
            mask, plen = np.zeros((len(tok), t), np.int32), np.zeros(len(tok), np.int32)
            for i in range(len(tok)):
                p = tok.example(i)[0][: tok.prompt_len[i]][-t:]  # the prompt's end is what matters
                ids[i, : len(p)], mask[i, : len(p)], plen[i] = p, 1, len(p)
            held.score = {
                "input_ids": ids,
                "attention_mask": mask,
                "loss_mask": mask * 0,
                "prompt_len": plen,
                "labels": tok.label.copy(),
            }
            return
        d, texts = self.data, self.data.labels.texts
        examples = []
        for r, row in zip(d.val_rows[mine], d.rows_of("validation", d.val_rows[mine])):
            where = d.where("validation", r)
            for text in texts:
                enc = d.encoder(d.encoder.with_answer(row, text), where)
                end = enc.prompt_len + enc.answer_len
                m = np.zeros(end, np.int32)
                m[enc.prompt_len : end] = 1
                examples.append((np.asarray(enc.ids[:end])[-t:], m[-t:]))
        rows = packing.pad_rows(examples, t, self.pad_id)
        held.choice = {**rows, "labels": tok.label.copy()}

    def _log_stats(self) -> None:
        s, d = self.stats, self.data
        names = {k: ", ".join(p.name for p in v) for k, v in d.files.items()}
        val = (
            f"validation {s['validation_examples']:,} (carved from the training rows, --val-fraction "
            f"{self.cfg.val_fraction:g}, fixed seed)"
            if d.carved
            else f"validation {s['validation_examples']:,} ({names['validation']})"
        )
        mesh_lib.log(
            f"data: {names['train']} ({s['format']}): train {s['train_examples']:,} examples, {val}"
            + (f"; ignored columns {s['ignored_columns']}" if s["ignored_columns"] else "")
        )
        if s["long"]:
            what = "dropped (--drop-long)" if self.cfg.drop_long else "truncated (or --drop-long)"
            mesh_lib.log(
                f"data: {s['long']:,} training examples longer than --max-len {self.cfg.max_len} were {what}"
                + (
                    f"; {s['without_loss_tokens']:,} have no loss token left"
                    if s["without_loss_tokens"]
                    else ""
                )
            )
        rows = f"{s['train_rows']:,} rows of {self.cfg.max_len} tokens"
        if self.cfg.pack:
            mesh_lib.log(
                f"data: packed into {rows}: padding {100 * s['padding']:.1f}% of positions, against "
                f"{100 * s['padding_unpacked']:.1f}% one example per row"
            )
        else:
            mesh_lib.log(
                f"data: {rows}, padding {100 * s['padding']:.1f}% of positions (--pack would save most of it)"
            )
        if s["labels"]:
            how = "detected" if d.labels.detected else "--labels"
            mesh_lib.log(f"data: label set ({how}): {s['labels']}; accuracy scored by {s['label_scoring']}")

    # -- the hooks loop.finetune calls --------------------------------------------------------------

    def train_apply(self, apply_fn: Callable) -> Callable:
        """The apply of the train step: packed rows carry segment ids in ``attention_mask``."""
        return packing.segment_apply(apply_fn) if self.cfg.pack else apply_fn

    def train_batches(self, cfg, setup, start: int):
        """Global batches ``(A, b, T)`` from step `start`, each process supplying its own rows."""
        from lora_jax import data as data_lib

        a, b, t = cfg.grad_accum, cfg.micro_batch, cfg.max_len
        local = b // self.shares
        seed = (
            cfg.seed
            if self.shares == 1
            else int(np.random.SeedSequence([cfg.seed, self.share, self.shares]).generate_state(1)[0])
        )
        sh = setup.shardings["batch"]
        for batch in data_lib.batches(
            self.train,
            a * local,
            seed=seed,
            shuffle=True,
            start_step=start,
            num_epochs=None,
            drop_remainder=True,
        ):
            yield {
                k: jax.make_array_from_process_local_data(sh, batch[k].reshape(a, local, t), (a, b, t))
                for k in KEYS
            }

    def evaluate(self, cfg, setup, deltas, what: str) -> dict:
        """The held-out loss, perplexity (and label accuracy) on the evaluation subset, and the samples.

        `what` is ``"base model"`` (before training) or ``"LoRA"`` (after).
        """
        out = self._score(setup, deltas, "eval")
        acc = f"; label accuracy {out['accuracy']:.4f} (± {out['stderr']:.4f})" if "accuracy" in out else ""
        mesh_lib.log(
            f"{what}: held-out loss {out['loss']:.4f}, perplexity {out['perplexity']:.3f} on "
            f"{out['examples']:,} validation examples ({out['tokens']:,} loss tokens){acc}"
        )
        if cfg.samples:
            self._samples(setup, deltas, "base" if what.startswith("base") else "lora")
        return out

    def validate(self, cfg, setup, deltas) -> dict:
        """The periodic validation record: ``val_loss``, ``val_perplexity`` (and ``val_accuracy``)."""
        out = self._score(setup, deltas, "val")
        rec = {"val_loss": out["loss"], "val_perplexity": out["perplexity"]}
        if "accuracy" in out:
            rec["val_accuracy"] = out["accuracy"]
        return rec

    def results(self, base: dict, lora: dict) -> dict:
        res = {
            "base_loss": base["loss"],
            "lora_loss": lora["loss"],
            "base_perplexity": base["perplexity"],
            "lora_perplexity": lora["perplexity"],
        }
        if "accuracy" in lora:
            res.update(base_accuracy=base.get("accuracy"), lora_accuracy=lora["accuracy"])
        return {**res, "eval_examples": lora["examples"], "base": base, "lora": lora, "data": self.stats}

    def eval_records(self, base: dict, lora: dict, steps: int) -> list[dict]:
        """The before/after held-out records for ``metrics.jsonl`` (steps 0 and `steps`)."""
        pick = lambda d: {f"val_{k}": d[k] for k in ("loss", "perplexity", "accuracy") if k in d}
        return [
            {"kind": "eval", "step": 0, "model": "base", **pick(base)},
            {"kind": "eval", "step": steps, "model": "lora", **pick(lora)},
        ]

    # -- evaluation -------------------------------------------------------------------------------

    def _step(self, setup, name: str) -> Callable:
        if name not in self._steps:
            apply = setup.model.apply
            if name.startswith("loss-"):
                fn = make_loss_step(apply, self._eval_targets[name[5:]], shardings=setup.shardings)
            else:
                fn = make_choice_step(
                    apply, self._choice_targets, len(self.data.labels.names), shardings=setup.shardings
                )
            self._steps[name] = fn
        return self._steps[name]

    def _batches(self, arrays: dict, per: int, count: int, rows_per_example: int = 1):
        """`count` local batches of `per` examples (zero rows after the end), with ``valid``."""
        first = next(iter(arrays.values()))
        n = len(first) // (rows_per_example if first.ndim == 2 else 1)  # examples
        for j in range(count):
            lo, hi = min(j * per, n), min((j + 1) * per, n)
            batch = {}
            for k, v in arrays.items():
                r = rows_per_example if v.ndim == 2 else 1
                part = np.zeros((per * r,) + v.shape[1:], v.dtype)
                part[: (hi - lo) * r] = v[lo * r : hi * r]
                batch[k] = part
            batch["valid"] = (np.arange(per) < hi - lo).astype(np.int32)
            yield batch

    def _global(self, setup, local: dict) -> dict:
        sh = setup.shardings["eval_batch"]
        return {
            k: jax.make_array_from_process_local_data(sh, v, (v.shape[0] * self.shares,) + v.shape[1:])
            for k, v in local.items()
        }

    def _score(self, setup, deltas, name: str) -> dict:
        held = self.held[name]
        per = self.eval_batch // self.shares
        loss = tokens = 0.0
        step = self._step(setup, f"loss-{name}")
        for b in self._batches(held.rows, per, self._eval_batches[name]):
            out = step(deltas, setup.params, self._global(setup, {k: b[k] for k in KEYS}))
            loss, tokens = loss + float(out["loss"]), tokens + float(out["tokens"])
        mean = loss / max(tokens, 1.0)
        res = {
            "loss": mean,
            "perplexity": math.exp(min(mean, 700.0)),
            "tokens": int(tokens),
            "examples": held.n,
        }
        if self.data.labels is None:
            return res
        correct = count = 0.0
        n_local = math.ceil(held.n / self.shares)
        if self.candidate_ids is not None:
            keys = ("input_ids", "attention_mask", "prompt_len", "labels")
            for b in self._batches({k: held.score[k] for k in keys}, per, math.ceil(n_local / per)):
                out = setup.score_step(deltas, setup.params, self._global(setup, b))
                correct, count = correct + float(out["correct"]), count + float(out["count"])
        else:
            c = len(self.data.labels.names)
            per_ex = max(self._local_dp, (per // c) // self._local_dp * self._local_dp)
            for b in self._batches(held.choice, per_ex, math.ceil(n_local / per_ex), rows_per_example=c):
                out = self._step(setup, "choice")(deltas, setup.params, self._global(setup, b))
                correct, count = correct + float(out["correct"]), count + float(out["count"])
        acc = correct / max(count, 1.0)
        res.update(accuracy=acc, stderr=math.sqrt(acc * (1 - acc) / max(count, 1.0)), scored=int(count))
        return res

    def _samples(self, setup, deltas, model: str) -> None:
        """Greedy generations for the first ``--samples`` validation prompts, into ``samples.jsonl``."""
        from lora_jax.models.llama import generate
        from lora_jax.train import rundir

        d, n = self.data, min(self.cfg.samples, len(self.data.val_rows))
        if not n:
            return
        rows = d.val_rows[:n]
        prompts, refs, answers = [], [], []
        for r, row in zip(rows, d.rows_of("validation", rows)):
            enc = d.encoder(row, d.where("validation", r))
            cut = enc.prompt_len if enc.answer_len else max(1, min(len(enc.ids) // 2, 32))  # text: its start
            prompts.append(enc.ids[:cut][-self.cfg.max_len :])
            refs.append(enc.ids[cut : cut + 128])
            answers.append(formats.answer_field(row, d.format)[1])
        width = max(len(p) for p in prompts)
        ids = np.full((n, width), self.pad_id, np.int32)
        mask = np.zeros((n, width), np.int32)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
        new = max(16, min(128, max(len(r) for r in refs) + 8))
        if not hasattr(self, "_generate_apply"):
            wrapped = lj.wrap(setup.model.apply)
            self._generate_apply = lambda v, *a, **k: wrapped(v[0], v[1], *a, **k)
        repl = setup.shardings["replicated"]
        tokens = generate(
            self._generate_apply,
            (setup.params, deltas),
            mesh_lib.place(ids, repl),
            new,
            eos_id=self.eos_id,
            attention_mask=mesh_lib.place(mask, repl),
        )
        tokens = _host(tokens)
        if jax.process_index() != 0:
            return
        decode = lambda t: self.tokenizer.decode([int(x) for x in t], skip_special_tokens=False)
        until_eos = lambda t: t[: t.index(self.eos_id)] if self.eos_id in t else t
        records = [
            {
                "model": model,
                "index": i,
                "prompt": decode(p),
                "reference": a if a is not None else decode(r),
                "generation": decode(until_eos(g)),
            }
            for i, (p, r, a, g) in enumerate(zip(prompts, refs, answers, tokens.tolist()))
        ]
        path = self.out / "samples.jsonl"
        kept = [r for r in rundir.read_metrics(path) if r.get("model") != model] if path.exists() else []
        rundir.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept + records))
        mesh_lib.log(f"{model} samples ({n}): {path}")


def _host(x) -> np.ndarray:
    if jax.process_count() > 1 and not getattr(x, "is_fully_addressable", True):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _width(rows: dict) -> int:
    """Columns up to the last non-padding position of any row (0 without rows)."""
    m = np.asarray(rows["attention_mask"])
    used = np.nonzero(m.any(0))[0]
    return int(used[-1]) + 1 if len(used) else 0


def _trim(rows: dict, width: int) -> dict:
    return {k: v[:, :width] if v.ndim == 2 else v for k, v in rows.items()}


def _loss_tokens(rows: dict | None) -> int:
    """The most loss positions of any row (``loss_mask[:, 1:]``), 0 without rows."""
    if rows is None or not len(rows["loss_mask"]):
        return 0
    return int(np.asarray(rows["loss_mask"])[:, 1:].sum(1).max())
