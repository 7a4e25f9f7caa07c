"""Many adapters at once: `stack_adapters`, per-example adapters in `wrap`, hot swap, mixed generate.

References: each row of a mixed batch against that example alone through plain `wrap` (float32, ≤ 1e-6
relative to the row's largest logit), rows with id −1 against the base model bit for bit, gradients
against per-adapter gradients, generated tokens against each row decoded alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import serve
from lora_jax.models import llama

CFG = llama.LlamaConfig(
    vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8
)
TARGETS = (
    r".*/(query|value|down)/kernel/value|.*/embedding/value",
    r".*/(query|up)/kernel/value",
    r".*/(query|value)/kernel/value",
)


def _noisy(deltas, seed):
    """Deltas with b made non-zero (a fresh b is zero, which would make every adapter the base model)."""
    rng = np.random.default_rng(seed)  # NumPy: no compile per shape
    return jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32)), deltas
    )


@pytest.fixture(scope="module")
def tiny():
    """(model, variables, prompt ids (5, 7), three adapters of ranks 4, 8, 2 with other targets/alphas)."""
    model = llama.Llama(CFG)
    ids = jax.random.randint(jax.random.key(0), (5, 7), 0, CFG.vocab_size)
    v = jax.jit(model.init)(jax.random.key(0), ids)
    ads = [
        _noisy(lj.init(jax.random.key(i + 1), v, lj.LoraSpec(rank=r, alpha=a, targets=t)), i)
        for i, (r, a, t) in enumerate(zip((4, 8, 2), (3.0, 4.0, 5.0), TARGETS, strict=True))
    ]
    return model, v, ids, ads


IDS = jnp.array([0, 2, -1, 1, 0], jnp.int32)


def _rel(x, ref):
    return float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))


def test_stack_unstack_roundtrip_and_padding(tiny):
    _, v, _, ads = tiny
    bank = lj.stack_adapters({"x": ads[0], "y": ads[1], "z": ads[2]}, max_rank=12)
    assert bank.names == ("x", "y", "z") and bank.max_rank == 12
    q = "params/layers_0/attn/query/kernel/value"
    up = "params/layers_0/mlp/up/kernel/value"
    assert bank.a[q].shape == (3, 16, 12) and bank.b[q].shape == (3, 12, 16)
    assert bank.ranks()["x"][up] == 0 and bank.ranks()["y"][up] == 8
    np.testing.assert_array_equal(bank.scale[q], np.float32([3.0 / 4, 4.0 / 8, 5.0 / 2]))
    np.testing.assert_array_equal(bank.scale[up], np.float32([0.0, 0.5, 0.0]))  # missing target: zero
    assert not np.any(bank.a[q][0, :, 4:]) and not np.any(bank.b[q][0, 4:])  # zero padding
    back = lj.unstack_adapters(bank)
    for name, d in zip("xyz", ads, strict=True):
        want = jax.tree.leaves(d, is_leaf=lambda x: x is None or lj.is_delta(x))
        got = jax.tree.leaves(back[name], is_leaf=lambda x: x is None or lj.is_delta(x))
        for w, g in zip(want, got, strict=True):
            assert (w is None) == (g is None)
            if w is not None:
                assert (g.rank, g.scale, g.axes) == (w.rank, w.scale, w.axes)
                np.testing.assert_array_equal(g.a, w.a)
                np.testing.assert_array_equal(g.b, w.b)


def test_mixed_batch_rows_equal_each_alone(tiny):
    """Under jit (the eager path is checked on a small function in test_in_axes_out_axes...)."""
    model, v, ids, ads = tiny
    bank = lj.stack_adapters(ads)
    mixed = lambda p, b, x, i: lj.wrap(model.apply)(p, b, x, adapter_ids=i)  # noqa: E731
    plain = jax.jit(lambda p, d, x: lj.wrap(model.apply)(p, d, x))
    out = jax.jit(mixed)(v, bank, ids, IDS)
    merged, merge = jax.jit(model.apply), jax.jit(lj.merge)
    base = merged(v, ids)
    assert jnp.array_equal(out[2], base[2])  # id -1: the base model, bit for bit
    for e, k in enumerate(IDS.tolist()):
        if k >= 0:
            alone = plain(v, ads[k], ids[e : e + 1])[0]
            assert _rel(out[e], alone) <= 1e-6, (e, k)
            assert _rel(out[e], merged(merge(v, ads[k]), ids)[e]) <= 1e-5


def test_all_base_rows_bit_equal_and_stacked_layers():
    cfg = llama.LlamaConfig(**{**CFG.__dict__, "scan_layers": True, "num_layers": 2})
    model = llama.Llama(cfg)
    ids = jax.random.randint(jax.random.key(1), (3, 5), 0, cfg.vocab_size)
    v = jax.jit(model.init)(jax.random.key(0), ids)
    spec = lj.LoraSpec(rank=2, targets=r".*/(query|down)/kernel/value")
    ads = [_noisy(lj.init(jax.random.key(i), v, spec, fn=model.apply, args=(ids,)), i) for i in range(2)]
    bank = lj.stack_adapters(ads)
    assert bank.a["params/layers/attn/query/kernel/value"].shape == (2, 2, 16, 2)  # (n, L, in, r)
    f = jax.jit(lambda b, i: lj.wrap(model.apply)(v, b, ids, adapter_ids=i))
    base = jax.jit(model.apply)(v, ids)
    assert jnp.array_equal(f(bank, jnp.full((3,), -1, jnp.int32)), base)
    out = f(bank, jnp.array([1, -1, 0], jnp.int32))
    assert jnp.array_equal(out[1], base[1])
    assert _rel(out[0], jax.jit(lj.wrap(model.apply))(v, ads[1], ids[:1])[0]) <= 1e-6


@pytest.mark.standard_promotion  # optax Adam's bias correction (code we do not own)
def test_mixed_gradients_are_sum_of_per_adapter(tiny):
    model, v, ids, ads = tiny
    bank = lj.stack_adapters(ads, max_rank=8)
    tgt = jnp.roll(ids, -1, axis=1)

    def loss(logits, tgt):  # summed over rows: each row's gradient goes to its own adapter
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1).sum()

    grads = jax.jit(jax.grad(lambda b: loss(lj.wrap(model.apply)(v, b, ids, adapter_ids=IDS), tgt)))(bank)
    g = jax.device_get(grads)  # NumPy from here: no compile per slice
    alone = jax.jit(jax.grad(lambda d, x, t: loss(lj.wrap(model.apply)(v, d, x), t)))
    for k, d in enumerate(ads):
        rows = np.flatnonzero(np.asarray(IDS) == k)
        want = jax.device_get(alone(d, ids[rows], tgt[rows]))
        flat = jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: x is None or lj.is_delta(x))[0]
        for kp, wd in flat:
            p = lj.spec.path_str(kp)
            if wd is None:
                if p in g.a:
                    assert not np.any(g.a[p][k]) and not np.any(g.b[p][k])
                continue
            r = wd.rank
            np.testing.assert_allclose(g.a[p][k][..., :r], wd.a, rtol=1e-4, atol=2e-5)
            np.testing.assert_allclose(g.b[p][k][:r], wd.b, rtol=1e-4, atol=2e-5)
            assert not np.any(g.a[p][k][..., r:]) and not np.any(g.b[p][k][r:])  # padding stays zero
    # One optimizer step over the whole bank trains a and b only (scale and rank are masked).
    tx = lj.optimizer(optax.adamw(1e-2, weight_decay=0.1))
    new = jax.jit(lambda b, g: optax.apply_updates(b, tx.update(g, tx.init(b), b)[0]))(bank, grads)
    assert all(jnp.array_equal(new.scale[p], bank.scale[p]) for p in bank.paths)
    assert all(jnp.array_equal(new.rank[p], bank.rank[p]) for p in bank.paths)
    assert not jnp.array_equal(new.b[bank.paths[0]], bank.b[bank.paths[0]])


def test_mixed_generate_each_row_as_alone(tiny):
    model, v, ids, ads = tiny
    bank = lj.stack_adapters(ads)
    got = serve.generate(model.apply, v, bank, IDS, ids, 5)
    # Reference: the whole batch decoded with each adapter merged in (one compile for all), row by row.
    merge = jax.jit(lj.merge)
    alone = {k: llama.generate(model.apply, v if k < 0 else merge(v, ads[k]), ids, 5) for k in (-1, 0, 1, 2)}
    for e, k in enumerate(IDS.tolist()):
        assert got[e].tolist() == alone[k][e].tolist(), e


def test_hot_swap_traces_once():
    params = {"w1": jnp.full((16, 24), 0.1), "w2": jnp.full((24, 16), 0.1)}
    fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    traces = []

    @jax.jit
    def step(b, x, i):
        traces.append(1)
        return lj.wrap(fn)(params, b, x, adapter_ids=i)

    rng = np.random.default_rng(0)  # NumPy factors: no compile per rank
    delta = lambda w, r, k: lj.LoraDelta(  # noqa: E731
        jnp.asarray(0.2 * rng.standard_normal((w.shape[0], r), np.float32)),
        jnp.asarray(0.2 * rng.standard_normal((r, w.shape[1]), np.float32)),
        scale=(2.0 + k) / r,
    )
    adapters = [{n: delta(w, r, k) for n, w in params.items()} for k, r in enumerate((4, 8, 16, 4, 8))]
    x = jax.random.normal(jax.random.key(0), (3, 16))
    bank = lj.stack_adapters(adapters[:2], max_rank=16)
    ids = jnp.array([1, 0, -1], jnp.int32)
    for d in adapters:
        bank = bank.replace(1, d)
        got = step(bank, x, ids)
        w = {k: np.asarray(params[k]) + np.asarray(lj.delta_weight(d[k])) for k in params}  # merged, NumPy
        want = np.tanh(np.asarray(x[0]) @ w["w1"]) @ w["w2"]
        assert _rel(got[0], want) <= 1e-5  # float32 against NumPy's float32 matmuls
    assert len(traces) == 1


def test_in_axes_out_axes_and_scalar_output():
    params = {"w": jnp.ones((4, 3))}
    bank = lj.stack_adapters(
        [_noisy(lj.init(jax.random.key(i), params, lj.LoraSpec(rank=2, targets="w")), i) for i in range(2)]
    )
    fn = lambda p, x: jnp.einsum("tbi,io->bto", x, p["w"])  # noqa: E731  example axis of x: 1
    x = jax.random.normal(jax.random.key(0), (5, 2, 4))
    ids = jnp.array([1, 0], jnp.int32)
    got = lj.wrap(fn, in_axes=lambda path, shape: 1)(params, bank, x, adapter_ids=ids)
    alone = lj.unstack_adapters(bank)
    for e in range(2):  # the eager path against plain wrap, example alone
        want = lj.wrap(fn)(params, alone[str(int(ids[e]))], x[:, e : e + 1])[0]
        assert _rel(got[e], want) <= 1e-6
    with pytest.raises(ValueError, match=r"argument 0 has shape \(5, 2, 4\); its example axis 0 has 5"):
        lj.wrap(fn)(params, bank, x, adapter_ids=ids)
    loss = lambda p, x: jnp.sum(x @ p["w"])  # noqa: E731
    with pytest.raises(ValueError, match="depends on the example"):
        lj.wrap(loss)(params, bank, x[0], adapter_ids=ids)


# ---------------------------------------------------------------------------------------------------
# Bad input


def _two(shape_a=(4, 3), shape_b=(4, 3), rank_b=2):
    da = lj.init(jax.random.key(0), {"w": jnp.ones(shape_a)}, lj.LoraSpec(rank=2, targets="w"))
    db = lj.init(jax.random.key(1), {"w": jnp.ones(shape_b)}, lj.LoraSpec(rank=rank_b, targets="w"))
    return da, db


def test_ids_out_of_range_and_wrong_kind():
    params = {"w": jnp.ones((4, 3))}
    bank = lj.stack_adapters(_two())
    f = lambda p, x: x @ p["w"]  # noqa: E731
    x = jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"adapter_ids \[-2, 2\] are out of range for a bank of 2"):
        lj.wrap(f)(params, bank, x, adapter_ids=jnp.array([0, 2, -2]))
    with pytest.raises(TypeError, match="needs adapter_ids="):
        lj.wrap(f)(params, bank, x)
    with pytest.raises(TypeError, match="adapter_ids must be a 1-D int array"):
        lj.wrap(f)(params, bank, x, adapter_ids=jnp.zeros((3,)))
    with pytest.raises(TypeError, match="but a plain deltas tree was given"):
        lj.wrap(f)(params, _two()[0], x, adapter_ids=jnp.zeros((3,), jnp.int32))
    # Under jit the ids cannot be checked: an out-of-range row comes out NaN, never another adapter's.
    out = jax.jit(lambda i: lj.wrap(f)(params, bank, x, adapter_ids=i))(jnp.array([0, 7, -1]))
    assert np.isnan(out[1]).all() and not np.isnan(out[0]).any() and not np.isnan(out[2]).any()


def test_adapter_shapes_do_not_fit():
    with pytest.raises(
        ValueError, match=r"w: adapter '0' is for a kernel of shape \(4, 3\).*'1' for shape \(4, 5\)"
    ):
        lj.stack_adapters(_two(shape_b=(4, 5)))
    bank = lj.stack_adapters(_two())
    with pytest.raises(
        ValueError, match=r"w: the bank's adapters are for a kernel of shape \(4, 3\), this model's "
    ):
        lj.wrap(lambda p, x: x @ p["w"])({"w": jnp.ones((4, 5))}, bank, jnp.ones((1, 4)), adapter_ids=[0])
    with pytest.raises(
        ValueError, match=r"w: the delta is for a kernel of shape \(4, 5\).*bank's kernel has shape \(4, 3\)"
    ):
        bank.replace(0, _two(shape_b=(4, 5))[1])


def test_rank_above_max_rank():
    with pytest.raises(ValueError, match=r"ranks above max_rank=2: \{'1:w': 3\}"):
        lj.stack_adapters(_two(rank_b=3), max_rank=2)
    bank = lj.stack_adapters(_two())
    with pytest.raises(ValueError, match=r"ranks \{'w': 3\} are above this bank's max_rank 2"):
        bank.replace(1, _two(rank_b=3)[1])


def test_different_base_models():
    da, db = _two()
    with pytest.raises(ValueError, match=r"made for different base models: '0' for \{\"name\": \"a\"\}"):
        lj.stack_adapters([da, db], base_models=[{"name": "a"}, {"name": "b"}])
    # Without identities: the trees are compared (another model has other paths).
    other = lj.init(jax.random.key(0), {"v": jnp.ones((4, 3))}, lj.LoraSpec(rank=2, targets="v"))
    with pytest.raises(
        ValueError, match=r"different base models: their trees differ \(paths only in '1': \['v'\]"
    ):
        lj.stack_adapters([da, other])
    bank = lj.stack_adapters([da, db], base_models=[{"name": "a"}] * 2)
    assert bank.base_model == '{"name": "a"}'
    with pytest.raises(ValueError, match="made for a different base model"):
        bank.replace(0, other)


# ---------------------------------------------------------------------------------------------------
# CLI: `lora-jax generate --adapter NAME=PATH ... --prompts FILE.jsonl`


def test_cli_parse_adapters_and_prompts_errors(tmp_path):
    from lora_jax.train import multi

    assert multi.parse_adapters(["a=x/adapter", "runs/b/adapter", "c.safetensors"]) == {
        "a": "x/adapter",
        "b": "runs/b/adapter",
        "c": "c.safetensors",
    }
    with pytest.raises(ValueError, match="the name 'b' is given twice"):
        multi.parse_adapters(["b=x", "runs/b/adapter"])
    f = tmp_path / "p.jsonl"
    f.write_text('{"adapter": "a", "prompt": "hi"}\n{"adapter": "zz", "prompt": "x"}\nnot json\n')
    with pytest.raises(
        ValueError, match=r"line 2: adapter 'zz' is not one of --adapter \['a'\].*line 3: not JSON"
    ):
        multi.read_prompts(str(f), ["a"])


@pytest.mark.slow
@pytest.mark.assets
def test_cli_generate_mixed_batch(tmp_path, capsys):
    """Two saved adapters + the base in one batch of prompts of different lengths (left-padded); each
    row's completion equals that prompt decoded alone with its adapter merged in."""
    import dataclasses
    import json

    from lora_jax import checkpoint
    from lora_jax.train import cli, config, loop

    cfg = config.TrainConfig(model="tiny-llama")
    model, v, tok, identity = loop.load_model(cfg)
    spec = loop.lora_spec(dataclasses.replace(cfg, rank=4, targets=r".*/(query|value)/kernel"), v)
    shipped = {k: dataclasses.asdict(cfg)[k] for k in config.TRAJECTORY_FIELDS}
    ads = {}
    for i, name in enumerate(("pos", "neg")):
        d = lj.init(jax.random.key(i), v, spec, fn=model.apply, args=(np.zeros((1, 4), np.int32),))
        ads[name] = _noisy(d, i)
        ads[name] = jax.tree.map(lambda x: x * 10.0, ads[name])  # large enough to change the tokens
        checkpoint.save_adapter(
            tmp_path / name, ads[name], spec, base_model=identity, extra={"config": shipped}, verbose=False
        )
    rows = [("pos", "Review: good"), (None, "Hi"), ("neg", "Review: a dull mess.\\nSentiment:")]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"adapter": a, "prompt": p}) for a, p in rows))
    argv = ["generate", "--adapter", f"pos={tmp_path / 'pos'}", "--adapter", f"neg={tmp_path / 'neg'}"]
    assert cli.main(argv + ["--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "3"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    eos = tok.token_to_id("<|im_end|>")
    merge = jax.jit(lj.merge)
    for (name, prompt), out in zip(rows, got, strict=True):
        ids = jnp.asarray([tok.encode(prompt.replace("\\n", "\n")).ids], jnp.int32)
        weights = v if name is None else merge(v, ads[name])
        want = llama.generate(model.apply, weights, ids, 3, eos_id=eos)[0].tolist()
        assert out == {
            "adapter": name or "base",
            "prompt": prompt,
            "completion": tok.decode([t for t in want if t != eos]),
        }

    # `eval --adapter A --adapter B --base`: one pass, the same accuracies as each adapter scored alone.
    def accuracies(argv):
        assert cli.main(["eval", *argv, "--eval-size", "12", "--base"]) == 0
        lines = [
            line for line in capsys.readouterr().out.splitlines() if "accuracy (test, 12 reviews)" in line
        ]
        return {line.split(" accuracy")[0]: float(line.rsplit(": ", 1)[1]) for line in lines}

    together = accuracies(argv[1:])  # the two --adapter NAME=PATH
    assert set(together) == {"base", "LoRA pos", "LoRA neg"}
    for name in ("pos", "neg"):
        alone = accuracies(["--adapter", str(tmp_path / name)])
        assert alone == {"base": together["base"], "LoRA": together[f"LoRA {name}"]}, (name, together)


def test_cli_eval_scores_every_adapter_in_one_call(tiny):
    """`lora-jax eval --adapter A --adapter B --base`'s scoring: each slot's correct count against the
    label-word log-probabilities of the merged model, in NumPy."""
    from lora_jax.train import multi

    model, v, ids, ads = tiny
    bank = lj.stack_adapters(ads)
    cand = [3, 5]
    batch = {
        "input_ids": ids,
        "attention_mask": jnp.ones_like(ids),
        "prompt_len": jnp.array([7, 5, 6, 7, 4], jnp.int32),
        "labels": jnp.array([0, 1, 1, 0, 1], jnp.int32),
        "valid": jnp.array([1, 1, 1, 1, 0], jnp.int32),
    }
    score = multi.make_bank_score(model.apply, cand, [-1, 0, 1, 2])
    out = jax.device_get(score(bank, v, batch))
    apply, merge = jax.jit(model.apply), jax.jit(lj.merge)
    for j, w in enumerate([v] + [merge(v, d) for d in ads]):
        logits = np.asarray(apply(w, ids))[np.arange(5), np.asarray(batch["prompt_len"]) - 1][:, cand]
        pred = logits.argmax(-1)
        want = float(((pred == np.asarray(batch["labels"])) * np.asarray(batch["valid"])).sum())
        assert out["correct"][j] == want, j
    assert out["count"] == 4.0
