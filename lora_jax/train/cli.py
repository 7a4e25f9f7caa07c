"""``lora-jax``: ``finetune`` (the main job), ``eval`` and ``generate`` with a trained adapter.

    lora-jax finetune                       # SmolLM2-135M-Instruct + LoRA on movie-review sentiment
    lora-jax finetune --steps 300 --mesh data=-1,fsdp=1,tensor=1 --out runs/ft
    lora-jax finetune --data chats.jsonl --pack --out runs/mine   # your data: prompt/completion, messages, text
    lora-jax eval --adapter runs/finetune/adapter
    lora-jax generate --adapter runs/finetune/adapter --prompt "Review: a dull mess.\\nSentiment:"
    lora-jax generate --adapter a=runs/a/adapter --adapter b=runs/b/adapter --prompts p.jsonl  # one mixed batch
    lora-jax eval --adapter runs/a/adapter --adapter runs/b/adapter --base   # several adapters, one pass
    lora-jax plan --model llama-3-8b --devices 8 --mesh fsdp=8 --method lora --json   # memory planner

Multi-host: start one process per host with ``--coordinator HOST:PORT --num-processes N
--process-id I`` (or let JAX detect the cluster from its environment: SLURM, Open MPI, Cloud TPU).

Errors: a bad command line, setting, model, adapter or output folder is one line on stderr,
``lora-jax: error: ...``, with exit code 2, found before any model is loaded where it can be; a run that
diverges exits 1; SIGINT / SIGTERM during training save the step in progress, print the command that
resumes, and exit 130 / 143. ``--debug`` (anywhere on the command line) also prints the traceback.
"""

from __future__ import annotations

import argparse
import math
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Sequence

from lora_jax.train import config as config_lib
from lora_jax.train import rundir

__all__ = ["CliError", "main"]

# Errors that mean "the input cannot work": one line and exit code 2.
_INPUT_ERRORS = (
    ValueError,
    rundir.FolderInUse,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class CliError(Exception):
    """A bad command line: printed as one ``lora-jax: error: ...`` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as `CliError` (one line, no usage dump) instead of exiting."""

    def error(self, message):
        raise CliError(f"{message} (see '{self.prog} --help')")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--lr -1e-2`` -> ``--lr=-1e-2``: argparse reads a value like ``-1e-2`` or ``-inf`` as a flag."""
    out: list[str] = []
    for arg in argv:
        if (
            out
            and arg.startswith("-")
            and _is_number(arg)
            and out[-1].startswith("--")
            and "=" not in out[-1]
        ):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-jax", description="LoRA fine-tuning with JAX.")
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an error (anywhere on the line)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune a LoRA adapter (defaults: the main job)")
    config_lib.add_arguments(ft)
    for name, helptext in (
        ("eval", "accuracy of base + adapter on held-out reviews"),
        ("generate", "generate text with base + adapter"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--adapter",
            required=True,
            action="append",
            help="adapter folder or .safetensors file; repeat it (NAME=PATH) to serve several in one batch",
        )
        p.add_argument(
            "--model", default=None, help="base model (default: the one the adapter was trained on)"
        )
        p.add_argument(
            "--quantize",
            default=None,
            choices=("nf4", "int8"),
            help="QLoRA: quantize the base's kernels (default: the adapter's training setting)",
        )
        p.add_argument(
            "--attention",
            default="auto",
            choices=config_lib.ATTENTION,
            help="attention kernel: auto (cuDNN's fused attention on a GPU where it runs, else XLA's), xla, "
            "or cudnn (default: auto, whatever the adapter was trained with)",
        )
        if name == "eval":
            p.add_argument("--split", default="test", choices=("train", "validation", "test"))
            p.add_argument(
                "--eval-size", type=int, default=None, help="examples to score (default: the whole split)"
            )
            p.add_argument("--eval-batch", type=int, default=32)
            p.add_argument("--base", action="store_true", help="also score the base model alone")
        else:
            p.add_argument("--prompt", default=None, help="prompt text ('\\n' is read as a newline)")
            p.add_argument(
                "--prompts",
                default=None,
                help='JSONL, one {"adapter": NAME, "prompt": TEXT} per line: one mixed batch (several adapters)',
            )
            p.add_argument("--max-new-tokens", type=int, default=16)
            p.add_argument("--temperature", type=float, default=0.0)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    from lora_jax.train import plan_cli

    plan_cli.add_arguments(
        sub.add_parser("plan", help="per-device memory of a train step, compiled for a mesh")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``lora-jax``; returns the exit code (errors are one line on stderr, see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = _join_negative_values([a for a in argv if a != "--debug"])
    try:
        return _main(argv)
    except rundir.Interrupted as e:
        return _interrupted(e, argv)
    except KeyboardInterrupt:
        return _interrupted(rundir.Interrupted(signal.SIGINT), argv)
    except Exception as e:
        loop = sys.modules.get("lora_jax.train.loop")
        if isinstance(e, (CliError, *_INPUT_ERRORS)):
            code = 2
        elif (loop is not None and isinstance(e, loop.Diverged)) or isinstance(e, OSError):
            code = 1
        else:
            raise  # a bug: the traceback is the report
        if debug:
            traceback.print_exc()
        print(f"lora-jax: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr, flush=True)
        return code


def _interrupted(e: rundir.Interrupted, argv: list[str]) -> int:
    name = signal.Signals(e.signum).name
    if argv[:1] != ["finetune"]:
        print(f"lora-jax: interrupted by {name}.", file=sys.stderr, flush=True)
        return 128 + e.signum
    # --resume-from went back once; the run has saved newer steps since, so resuming is the plain command.
    again, skip = [], False
    for a in argv:
        if skip or a == "--resume-from" or a.startswith("--resume-from="):
            skip = a == "--resume-from"
            continue
        again.append(a)
    command = "lora-jax " + shlex.join(again)
    if e.step is None:
        print(
            f"lora-jax: interrupted by {name} before a new step was saved; rerun to resume from the last checkpoint "
            f"(if any): {command}",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(
            f"lora-jax: interrupted by {name} after step {e.step}, its checkpoint saved in {e.directory}; resume "
            f"with: {command}",
            file=sys.stderr,
            flush=True,
        )
    return 128 + e.signum


def _raise_interrupted(signum, frame):
    raise rundir.Interrupted(signum)


def _check_mesh(text: str, num_devices: int | None) -> None:
    from lora_jax.train import mesh as mesh_lib

    try:
        mesh_lib.parse_mesh(text, num_devices)
    except ValueError as e:
        msg = str(e)
        raise CliError("--" + msg if msg.startswith("mesh ") else f"--mesh {text!r}: {msg}") from None


def _init_distributed(cfg) -> None:
    """``--coordinator`` / ``--num-processes`` / ``--process-id`` checked with flag names, then JAX's runtime."""
    from lora_jax.train import mesh as mesh_lib

    if cfg.coordinator is None and cfg.num_processes not in (None, 1):
        raise CliError(
            f"--num-processes {cfg.num_processes} needs --coordinator host:port (process 0's address)."
        )
    if cfg.coordinator is not None and (cfg.num_processes is None or cfg.process_id is None):
        raise CliError("--coordinator needs --num-processes and --process-id too.")
    try:
        mesh_lib.init_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
    except ValueError as e:
        raise CliError(
            f"--coordinator {cfg.coordinator!r} --num-processes {cfg.num_processes} --process-id "
            f"{cfg.process_id}: {e}"
        ) from None


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "finetune":
        kw = {k: v for k, v in vars(args).items() if k not in ("command", "debug")}
        kw["prompt"] = kw["prompt"].replace("\\n", "\n")
        if (
            not any(a == "--warmup" or a.startswith("--warmup=") for a in argv)
            and kw["warmup"] >= kw["steps"]
        ):
            kw["warmup"] = (
                kw["steps"] // 10
            )  # the default warmup is for the default run; a short run warms up 10%
        cfg = config_lib.TrainConfig(**kw)
        # Everything checkable without a model or a device, before JAX starts.
        from lora_jax.train import loop

        loop.check_model(cfg.model)
        try:
            rundir.check_folder(cfg.out)
        except ValueError as e:
            raise CliError(f"--out: {e}") from None
        _check_mesh(cfg.mesh, None)
        main_thread = threading.current_thread() is threading.main_thread()
        # SIGTERM before or after the steps: a one-line exit (the train loop saves first during the steps).
        previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None
        try:
            _init_distributed(cfg)
            import jax

            _check_mesh(cfg.mesh, jax.device_count())
            loop.finetune(cfg)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
        return 0
    if args.command == "plan":
        from lora_jax.train import plan_cli

        return plan_cli.run(args)
    return _with_adapter(args)


def _check_adapter_args(args) -> None:
    """The numbers and text of ``eval`` / ``generate``, checked before anything is read."""
    problems = []
    if args.command == "eval":
        if args.eval_size is not None and args.eval_size < 1:
            problems.append(
                f"--eval-size must be >= 1 (leave it out to score the whole split), got {args.eval_size}"
            )
        if args.eval_batch < 1:
            problems.append(f"--eval-batch must be >= 1, got {args.eval_batch}")
    else:
        if not args.prompt and not args.prompts:
            problems.append("--prompt is empty: give the text to continue (or --prompts FILE.jsonl)")
        if args.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if not (math.isfinite(args.temperature) and args.temperature >= 0):
            problems.append(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
        if not 0 <= args.seed < 2**32:
            problems.append(f"--seed must be in [0, 2**32), got {args.seed}")
    if problems:
        raise CliError("; ".join(problems))


def _with_adapter(args) -> int:

    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from lora_jax import checkpoint
    from lora_jax.train import loop, sentiment
    from lora_jax.train import mesh as mesh_lib

    _check_adapter_args(args)
    from lora_jax.train import multi

    if multi.is_multi(args):  # several adapters: one AdapterBank, one mixed batch
        return multi.run(args)
    args.adapter = args.adapter[0]
    info = checkpoint.adapter_info(args.adapter)
    cfg = config_lib.from_adapter(
        info, args.adapter, model=args.model, quantize=args.quantize, attention=args.attention
    )
    try:
        loop.check_model(cfg.model)
    except ValueError as e:
        if args.model:
            raise
        raise ValueError(
            f"the adapter was trained on the model {cfg.model!r}, which cannot be used here: {e} Give the "
            f"base model with --model."
        ) from None
    # Loaded as in training (sharded onto this process's devices), so the stored identity matches.
    model, variables, tok, identity = loop.load_model(cfg, mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1"))
    # The architecture must be the one the adapter was trained on (the name may differ with --model, e.g.
    # a local copy of the same checkpoint); shapes are checked leaf by leaf as well.
    deltas = checkpoint.load_adapter(args.adapter, variables, base_model={"config": identity["config"]})
    if args.command == "generate":
        from lora_jax.models import generate
        from lora_jax.models.tokenizers import apply_chat_template, chat_template

        text = args.prompt.replace("\\n", "\n")
        if args.chat:
            # The model's own template; "tiny-llama" has SmolLM2's tokenizer and so its default template.
            template = None if cfg.model == "tiny-llama" else chat_template(cfg.model)
            if template is None and cfg.model != "tiny-llama":
                raise CliError(f"--chat: the model {cfg.model!r} has no chat template.")
            text = apply_chat_template([{"role": "user", "content": text}], template=template)
        ids = jnp.asarray([tok.encode(text).ids], jnp.int32)
        limit = getattr(model.config, "max_position_embeddings", None)
        if ids.shape[1] == 0:
            raise CliError(f"--prompt {args.prompt!r} gives no tokens: give the text to continue.")
        if limit and ids.shape[1] + args.max_new_tokens > limit:
            raise CliError(
                f"--prompt ({ids.shape[1]} tokens) + --max-new-tokens {args.max_new_tokens} exceed the "
                f"model's {limit} positions."
            )
        eos = tok.token_to_id("<|im_end|>")
        if (
            cfg.quantize
        ):  # QLoRA (or LoftQ's residual): the quantized base, decoded at each use, plus the adapter
            wrapped = lj.wrap(model.apply)
            apply_fn, weights = (
                (lambda v, *a, **k: wrapped(v, deltas, *a, **k)),
                loop.adapter_base(cfg, checkpoint.spec_from_json(info["spec"]), variables),
            )
        else:
            apply_fn, weights = model.apply, lj.merge(variables, deltas)
        new = generate(
            apply_fn,
            weights,
            ids,
            args.max_new_tokens,
            key=jax.random.key(args.seed),
            temperature=args.temperature,
            eos_id=eos,
        )
        tokens = [t for t in new[0].tolist() if t != eos]
        print(text + tok.decode(tokens))
        return 0
    # eval
    if cfg.data != "movie-reviews":
        raise CliError(
            f"{args.adapter}: the adapter was trained on data files ({cfg.data}); lora-jax eval scores the "
            f"movie-review set only. The run's results.json and metrics.jsonl hold its held-out loss, "
            f"perplexity (and label accuracy) before and after training."
        )
    from lora_jax import data

    mesh = mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1")
    spec = checkpoint.spec_from_json(info["spec"])
    setup = loop.build(
        model,
        variables,
        spec,
        mesh=mesh,
        candidate_ids=sentiment.candidate_token_ids(tok),
        quantize=loop.quant_spec(cfg),
    )
    deltas = mesh_lib.place(deltas, setup.shardings["deltas"])
    arrays = sentiment.encode_split(
        data.load_sentiment()[args.split], tok, cfg, args.eval_size or 0
    )  # None: all
    n = len(arrays["labels"])
    if args.base:
        print(
            f"base accuracy ({args.split}, {n} reviews): {sentiment.evaluate(setup, setup.deltas, arrays, args.eval_batch):.4f}"
        )
    print(
        f"LoRA accuracy ({args.split}, {n} reviews): {sentiment.evaluate(setup, deltas, arrays, args.eval_batch):.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
