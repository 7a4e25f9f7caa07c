"""The main job: SmolLM2-135M-Instruct + LoRA on movie-review sentiment, base vs fine-tuned accuracy.

Same as ``lora-jax finetune`` with no flags (any flag of that command can be added here too):

    python experiments/finetune.py                     # ~10 minutes on 2 CPU cores
    python experiments/finetune.py --steps 300 --eval-size 0 --out runs/finetune-long

Writes ``runs/finetune/``: ``results.json`` (base and LoRA accuracy on held-out test reviews, trainable
parameters, adapter size, wall time), ``metrics.jsonl``, ``loss.png``, ``adapter/adapter.safetensors``
and resumable ``checkpoints/`` (rerun the same command after an interruption to continue).
"""

import sys

from lora_jax.train.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
