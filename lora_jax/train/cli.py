"""``lora-jax``: ``finetune`` (the main job), ``eval`` and ``generate`` with a trained adapter.

    lora-jax finetune                       # SmolLM2-135M-Instruct + LoRA on movie-review sentiment
    lora-jax finetune --steps 300 --mesh data=-1,fsdp=1,tensor=1 --out runs/ft
    lora-jax eval --adapter runs/finetune/adapter
    lora-jax generate --adapter runs/finetune/adapter --prompt "Review: a dull mess.\\nSentiment:"

Multi-host: start one process per host with ``--coordinator HOST:PORT --num-processes N
--process-id I`` (or let JAX detect the cluster from its environment: SLURM, Open MPI, Cloud TPU).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lora_jax.train import config as config_lib

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="lora-jax", description="LoRA fine-tuning with JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  ft = sub.add_parser("finetune", help="fine-tune a LoRA adapter (defaults: the main job)")
  config_lib.add_arguments(ft)
  for name, helptext in (("eval", "accuracy of base + adapter on held-out reviews"),
                         ("generate", "generate text with base + adapter")):
    p = sub.add_parser(name, help=helptext)
    p.add_argument("--adapter", required=True, help="adapter folder or .safetensors file")
    p.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    if name == "eval":
      p.add_argument("--split", default="test", choices=("train", "validation", "test"))
      p.add_argument("--eval-size", type=int, default=0, help="examples to score (0: the whole split)")
      p.add_argument("--eval-batch", type=int, default=32)
      p.add_argument("--base", action="store_true", help="also score the base model alone")
    else:
      p.add_argument("--prompt", required=True, help="prompt text ('\\n' is read as a newline)")
      p.add_argument("--max-new-tokens", type=int, default=16)
      p.add_argument("--temperature", type=float, default=0.0)
      p.add_argument("--seed", type=int, default=0)
      p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "finetune":
    kw = {k: v for k, v in vars(args).items() if k != "command"}
    kw["prompt"] = kw["prompt"].replace("\\n", "\n")
    cfg = config_lib.TrainConfig(**kw)
    from lora_jax.train import mesh as mesh_lib
    mesh_lib.init_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
    from lora_jax.train import loop
    loop.finetune(cfg)
    return 0
  return _with_adapter(args)


def _with_adapter(args) -> int:
  import dataclasses

  import jax
  import jax.numpy as jnp

  import lora_jax as lj
  from lora_jax import checkpoint
  from lora_jax.train import loop
  from lora_jax.train import mesh as mesh_lib

  info = checkpoint.adapter_info(args.adapter)
  stored = dict(info.get("extra", {}).get("config", {}))
  fields = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
  cfg = config_lib.TrainConfig(**{k: v for k, v in stored.items() if k in fields})
  if args.model:
    cfg = dataclasses.replace(cfg, model=args.model)
  model, variables, tok, identity = loop.load_model(cfg)
  # The architecture must be the one the adapter was trained on (the name may differ with --model, e.g.
  # a local copy of the same checkpoint); shapes are checked leaf by leaf as well.
  deltas = checkpoint.load_adapter(args.adapter, variables, base_model={"config": identity["config"]})
  if args.command == "generate":
    from lora_jax.models import generate
    from lora_jax.models.tokenizers import apply_chat_template

    text = args.prompt.replace("\\n", "\n")
    if args.chat:
      text = apply_chat_template([{"role": "user", "content": text}])
    ids = jnp.asarray([tok.encode(text).ids], jnp.int32)
    eos = tok.token_to_id("<|im_end|>")
    new = generate(model.apply, lj.merge(variables, deltas), ids, args.max_new_tokens,
                   key=jax.random.key(args.seed), temperature=args.temperature, eos_id=eos)
    tokens = [t for t in new[0].tolist() if t != eos]
    print(text + tok.decode(tokens))
    return 0
  # eval
  from lora_jax import data

  mesh = mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1")
  spec = checkpoint.spec_from_json(info["spec"])
  setup = loop.build(model, variables, spec, mesh=mesh, candidate_ids=loop.candidate_token_ids(tok))
  deltas = mesh_lib.place(deltas, setup.shardings["deltas"])
  arrays = loop.encode_split(data.load_sentiment()[args.split], tok, cfg, args.eval_size)
  n = len(arrays["labels"])
  if args.base:
    print(f"base accuracy ({args.split}, {n} reviews): {loop.evaluate(setup, setup.deltas, arrays, args.eval_batch):.4f}")
  print(f"LoRA accuracy ({args.split}, {n} reviews): {loop.evaluate(setup, deltas, arrays, args.eval_batch):.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
