"""``lora-jax generate`` / ``eval`` with several adapters at once: one `AdapterBank`, one mixed batch.

    lora-jax generate --adapter pos=runs/a/adapter --adapter neg=runs/b/adapter --prompts prompts.jsonl
    lora-jax eval --adapter runs/a/adapter --adapter runs/b/adapter --eval-size 256

``generate --prompts FILE``: a JSONL file, one object per line, ``{"adapter": NAME, "prompt": TEXT}``
(``"adapter"`` null, missing or ``"base"``: the base model); all rows decode in one batch, each with its
own adapter; the output is one JSON line per row (adapter, prompt, completion). ``eval`` with several
``--adapter``: every batch of the split is scored under every adapter (and the base with ``--base``) in one
call, so the data is read and tokenized once. ``--adapter NAME=PATH`` names an adapter; a bare PATH is
named after its folder (or file stem).

The base model comes from the first adapter's stored settings (as for one adapter); every adapter must
have been trained on the same base (`lora_jax.serve.load_bank` compares the stored identities).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

__all__ = ["parse_adapters", "is_multi", "run"]


class MultiError(ValueError):
    """A bad multi-adapter command line or prompts file (the CLI prints it as one line)."""


def parse_adapters(values: list[str]) -> dict[str, str]:
    """``NAME=PATH`` / ``PATH`` values of ``--adapter`` -> {name: path}, in order; names must be unique.

    Example:
        >>> parse_adapters(["a=runs/x/adapter", "runs/y/adapter"])
        {'a': 'runs/x/adapter', 'y': 'runs/y/adapter'}
    """
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or "/" in name or not name:
            path = v
            p = pathlib.Path(v)
            name = p.stem if p.suffix == ".safetensors" else p.name
            if name == "adapter" and p.parent.name:  # runs/NAME/adapter
                name = p.parent.name
        if name in out:
            raise MultiError(
                f"--adapter: the name {name!r} is given twice ({out[name]} and {path}); name them NAME=PATH"
            )
        if name == "base":
            raise MultiError(f"--adapter: 'base' names the base model; give {path} another name (NAME=PATH)")
        out[name] = path
    return out


def is_multi(args) -> bool:
    """Several adapters, a name, or a prompts file: the bank path."""
    values = args.adapter if isinstance(args.adapter, list) else [args.adapter]
    return len(values) > 1 or bool(getattr(args, "prompts", None)) or any("=" in v for v in values)


def read_prompts(path: str, names: list[str]) -> list[tuple[str | None, str]]:
    """``[(adapter name or None, prompt)]`` from a JSONL file; every problem names its line."""
    rows, problems = [], []
    try:
        lines = pathlib.Path(path).read_text().splitlines()
    except OSError as e:
        raise MultiError(f"--prompts {path}: cannot be read ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {i}: not JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            problems.append(f'line {i}: expected {{"adapter": NAME, "prompt": TEXT}} with a non-empty prompt')
            continue
        name = row.get("adapter")
        name = None if name in (None, "base") else str(name)
        if name is not None and name not in names:
            problems.append(f"line {i}: adapter {name!r} is not one of --adapter {names} (or 'base')")
            continue
        rows.append((name, row["prompt"]))
    if not rows and not problems:
        problems.append("no prompts in the file")
    if problems:
        raise MultiError(f"--prompts {path}: " + "; ".join(problems[:5]))
    return rows


def _setup(paths: dict[str, str], model_override, quantize_override, attention="auto"):
    """(cfg, model, variables, tokenizer, bank) from the first adapter's settings."""

    import lora_jax as lj
    from lora_jax import checkpoint
    from lora_jax.serve import load_bank
    from lora_jax.train import config as config_lib
    from lora_jax.train import loop
    from lora_jax.train import mesh as mesh_lib

    first = next(iter(paths.values()))
    cfg = config_lib.from_adapter(
        checkpoint.adapter_info(first),
        first,
        model=model_override,
        quantize=quantize_override,
        attention=attention,
    )
    loop.check_model(cfg.model)
    for name, path in paths.items():  # one shared base: LoftQ past one round fits its own quantized residual
        init = checkpoint.adapter_info(path).get("spec", {}).get("init", "kaiming")
        if lj.residual.loftq_rounds(init) > 1:
            raise MultiError(
                f"adapter {name!r} ({path}) was trained with --init {init}: it applies to its own LoftQ "
                f"residual, which the other adapters do not share. Use it alone (one --adapter), or train "
                f"with --init loftq (one round: its base is the plain quantized base)."
            )
    model, variables, tok, _ = loop.load_model(cfg, mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1"))
    bank = load_bank(paths, variables)
    return cfg, model, variables, tok, bank


def run(args) -> int:
    """The multi-adapter ``generate`` / ``eval``; prints to stdout."""
    paths = parse_adapters(args.adapter if isinstance(args.adapter, list) else [args.adapter])
    if args.command == "generate":
        if not args.prompts:
            raise MultiError("generate with several adapters reads its prompts from --prompts FILE.jsonl")
        rows = read_prompts(args.prompts, list(paths))
    cfg, model, variables, tok, bank = _setup(paths, args.model, args.quantize, args.attention)
    if args.command == "generate":
        return _generate(args, cfg, model, variables, tok, bank, rows)
    return _eval(args, cfg, model, variables, tok, bank)


def _generate(args, cfg, model, variables, tok, bank, rows) -> int:
    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from lora_jax import serve
    from lora_jax.train import loop

    encoded = [tok.encode(p.replace("\\n", "\n")).ids for _, p in rows]
    if any(len(e) == 0 for e in encoded):
        raise MultiError("--prompts: a prompt gives no tokens")
    width = max(len(e) for e in encoded)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and width + args.max_new_tokens > limit:
        raise MultiError(
            f"--prompts: the longest prompt ({width} tokens) + --max-new-tokens {args.max_new_tokens} exceed "
            f"the model's {limit} positions."
        )
    ids = np.zeros((len(rows), width), np.int32)  # left-padded
    mask = np.zeros((len(rows), width), np.int32)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :], mask[i, width - len(e) :] = e, 1
    slots = jnp.asarray([-1 if n is None else bank.names.index(n) for n, _ in rows], jnp.int32)
    weights = lj.quantize(variables, loop.quant_spec(cfg)) if cfg.quantize else variables
    eos = tok.token_to_id("<|im_end|>")
    new = serve.generate(
        model.apply,
        weights,
        bank,
        slots,
        jnp.asarray(ids),
        args.max_new_tokens,
        key=jax.random.key(args.seed),
        temperature=args.temperature,
        eos_id=eos,
        attention_mask=jnp.asarray(mask),
    )
    for (name, prompt), toks in zip(rows, np.asarray(new).tolist(), strict=True):
        text = tok.decode([t for t in toks if t != eos])
        print(json.dumps({"adapter": name or "base", "prompt": prompt, "completion": text}))
    return 0


def make_bank_score(apply_fn, candidate_ids, slots):
    """``score(bank, params, batch) -> {"correct": (len(slots),), "count"}``: every batch row under every
    slot (−1: the base model) in one mixed call; jitted."""
    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from lora_jax.train.step import at_positions

    f = lj.wrap(at_positions(apply_fn))
    cand = jnp.asarray(candidate_ids, jnp.int32)
    slot_ids = jnp.asarray(slots, jnp.int32)

    @jax.jit
    def score(bank, params, batch):
        b = batch["input_ids"].shape[0]
        k = slot_ids.shape[0]
        rep = lambda x: jnp.tile(x, (k,) + (1,) * (x.ndim - 1))  # noqa: E731
        pos = (batch["prompt_len"] - 1)[:, None].astype(jnp.int32)
        ids = jnp.repeat(slot_ids, b)
        logits = f(
            params, bank, rep(batch["input_ids"]), rep(batch["attention_mask"]), rep(pos), adapter_ids=ids
        )
        logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)[:, cand]
        pred = jnp.argmax(logp, axis=-1).reshape(k, b)
        valid = batch["valid"].astype(jnp.float32)
        hit = (pred == batch["labels"][None, :]).astype(jnp.float32) * valid[None, :]
        return {"correct": hit.sum(axis=1), "count": valid.sum(), "finite": jnp.isfinite(logp).all()}

    return score


def _eval(args, cfg, model, variables, tok, bank) -> int:
    import jax

    from lora_jax import data
    from lora_jax.train import sentiment

    if cfg.data != "movie-reviews":
        raise MultiError(
            f"the adapters were trained on data files ({cfg.data}); lora-jax eval scores the movie-review set "
            f"only."
        )
    slots = ([-1] if args.base else []) + list(range(bank.size))
    labels = (["base"] if args.base else []) + list(bank.names)
    score = make_bank_score(model.apply, sentiment.candidate_token_ids(tok), slots)
    arrays = sentiment.encode_split(data.load_sentiment()[args.split], tok, cfg, args.eval_size or 0)
    keys = ("input_ids", "attention_mask", "prompt_len", "labels")
    correct, count = np.zeros(len(slots)), 0.0
    for b in data.batches({k: arrays[k] for k in keys}, args.eval_batch):
        out = jax.device_get(score(bank, variables, b))
        if not out["finite"]:
            raise MultiError("evaluation: non-finite log-probabilities (NaN or inf); refusing to score them")
        correct += out["correct"]
        count += float(out["count"])
    n = len(arrays["labels"])
    for name, c in zip(labels, correct, strict=True):
        what = "base" if name == "base" else f"LoRA {name}"
        print(f"{what} accuracy ({args.split}, {n} reviews): {c / max(count, 1.0):.4f}")
    return 0
