"""Sweeps (`lora_jax.train.sweep`): several seeds trained at once give what separate runs give.

The reference for LoRA on a causal LM is the training engine itself (`make_train_step`,
`make_score_step`, the data order of `lora-jax finetune --seed k`); for heads and full fine-tuning it
is the same sweep run one seed at a time. Tolerances: float32, the same math with the loss divided
before (sweep) or after (engine) the gradient and reductions in a different order under vmap; a few
Adam steps keep the differences near float epsilon.
"""

import dataclasses
import operator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import data
from lora_jax.train import loop, sweep
from lora_jax.train import step as step_lib

VOCAB, T, N = 64, 12, 24
CANDIDATES = (5, 9)
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
TREE_RTOL, TREE_ATOL = 1e-4, 1e-6


def lm_arrays(n=N, seed=0):
    """Random prompts, each followed by one label word (a candidate token); like `data.encode_lm`."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, VOCAB, (n, T)).astype(np.int32)
    prompt_len = rng.integers(4, T - 1, n).astype(np.int32)
    labels = rng.integers(0, 2, n).astype(np.int32)
    ids[np.arange(n), prompt_len] = np.asarray(CANDIDATES)[labels]
    positions = np.arange(T)[None]
    return {
        "input_ids": ids,
        "attention_mask": (positions <= prompt_len[:, None]).astype(np.int32),
        "loss_mask": (positions == prompt_len[:, None]).astype(np.int32),
        "prompt_len": prompt_len,
        "labels": labels,
    }


@pytest.fixture(scope="module")
def llama():
    model, variables = loop.tiny_llama(VOCAB, scan_layers=False, seed=0)
    return model, variables


def qv_spec(rank=4, targets="query|value"):
    return lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=rf"params/layers_\d+/attn/({targets})/kernel")


def assert_trees_close(x, y, rtol=TREE_RTOL, atol=TREE_ATOL):
    fx, tx = jax.tree_util.tree_flatten_with_path(x)
    fy, ty = jax.tree_util.tree_flatten_with_path(y)
    assert tx == ty
    for (path, a), (_, b) in zip(fx, fy, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


def engine_run(model, variables, spec, arrays, *, seed, steps, batch_size, lr, warmup):
    """`lora-jax finetune --seed seed` in miniature: the engine's init, optimizer, data order and step."""
    deltas = lj.init(jax.random.key(seed), variables, spec)
    tx, _ = step_lib.make_optimizer(lr, steps, warmup)
    opt_state = tx.init(deltas)
    train_step = step_lib.make_train_step(model.apply, tx, num_targets=1)
    keys = ("input_ids", "attention_mask", "loss_mask")
    batches = data.batches(
        {k: arrays[k] for k in keys},
        batch_size,
        seed=seed,
        shuffle=True,
        num_epochs=None,
        drop_remainder=True,
    )
    losses = []
    for i in range(steps):
        b = {k: v[None] for k, v in next(batches).items() if k != "valid"}  # one micro-batch: (1, B, T)
        deltas, opt_state, m = train_step(deltas, opt_state, variables, b, jax.random.key(i))
        losses.append(float(m["loss"]))
    return deltas, np.asarray(losses)


def engine_accuracy(score, variables, deltas, arrays):
    keys = ("input_ids", "attention_mask", "prompt_len", "labels")
    correct = count = 0.0
    for b in data.batches({k: arrays[k] for k in keys}, 8):
        out = score(deltas, variables, b)
        correct, count = correct + float(out["correct"]), count + float(out["count"])
    return correct / count


@pytest.mark.standard_promotion  # optax.adam's bias correction (optax.tree.bias_correction) computes `float ** int32`
def test_lora_lm_sweep_matches_engine_runs(llama):
    model, variables = llama
    arrays, spec, seeds = lm_arrays(), qv_spec(), (0, 3)
    task = sweep.lm_task(model.apply, CANDIDATES)
    cfg = sweep.Config("LoRA qv r=4", spec=spec, lr=1e-2)
    result = sweep.train(
        task, cfg, variables, arrays, arrays, seeds=seeds, steps=3, batch_size=4, warmup=1, eval_batch_size=8
    )
    assert result.losses.shape == (3, 2) and result.accuracy.shape == (2,)
    assert result.trainable["deltas"]["params"]["layers_0"]["attn"]["query"]["kernel"].a.shape == (2, 32, 4)
    assert set(result.trainable) == {"deltas"}  # no head: only the LoRA factors train
    assert (
        result.adapter_params
        == result.trainable_params
        == lj.count_params(lj.init(jax.random.key(0), variables, spec))
    )
    score = step_lib.make_score_step(model.apply, CANDIDATES)
    for i, seed in enumerate(seeds):
        ref_deltas, ref_losses = engine_run(
            model, variables, spec, arrays, seed=seed, steps=3, batch_size=4, lr=1e-2, warmup=1
        )
        np.testing.assert_allclose(result.losses[:, i], ref_losses, rtol=LOSS_RTOL, atol=LOSS_ATOL)
        assert_trees_close(result.run(i)["deltas"], ref_deltas)
        assert result.accuracy[i] == engine_accuracy(score, variables, result.run(i)["deltas"], arrays)
    # The runs differ (own init, own data order) and really trained (b moved away from 0).
    b = result.trainable["deltas"]["params"]["layers_1"]["attn"]["value"]["kernel"].b
    assert np.abs(np.asarray(b)).max() > 0 and not np.allclose(b[0], b[1])
    assert not np.allclose(result.losses[:, 0], result.losses[:, 1])


def test_init_is_the_engines_init(llama):
    _, variables = llama
    spec, seeds = qv_spec(rank=2), (1, 7)
    task = sweep.lm_task(lambda *a, **k: None, CANDIDATES)
    stacked = sweep.init(task, sweep.Config("r2", spec=spec), variables, seeds)
    for i, seed in enumerate(seeds):
        run_i = jax.tree_util.tree_map(operator.itemgetter(i), stacked["deltas"])
        assert_trees_close(run_i, lj.init(jax.random.key(seed), variables, spec), rtol=0, atol=0)


def test_no_training_scores_the_base_model(llama):
    model, variables = llama
    arrays = lm_arrays()
    result = sweep.train(
        sweep.lm_task(model.apply, CANDIDATES),
        sweep.Config("no training"),
        variables,
        arrays,
        arrays,
        seeds=(0, 1),
        steps=5,
        batch_size=4,
        eval_batch_size=8,
    )
    assert result.losses.shape == (0, 2) and result.trainable_params == result.adapter_params == 0
    assert result.step is None  # nothing trained, nothing compiled
    score = step_lib.make_score_step(model.apply, CANDIDATES)
    base = engine_accuracy(
        score, variables, lj.init(jax.random.key(0), variables, qv_spec()), arrays
    )  # b = 0
    np.testing.assert_array_equal(result.accuracy, [base, base])
    s = result.summary()
    assert s["final_train_loss"] is None and s["acc"] == [base, base] and s["seeds"] == [0, 1]


@pytest.mark.standard_promotion  # optax.adam's bias correction (optax.tree.bias_correction) computes `float ** int32`
def test_ranks_and_targets_in_one_sweep(llama):
    model, variables = llama
    arrays = lm_arrays()
    task = sweep.lm_task(model.apply, CANDIDATES)
    configs = [
        sweep.Config("q r=1", spec=qv_spec(1, "query"), lr=1e-2),
        sweep.Config("qv r=4", spec=qv_spec(4), lr=5e-3),
    ]
    kw = {"seeds": (0, 1), "steps": 2, "batch_size": 4, "warmup": 1}
    results = sweep.run(task, configs, variables, arrays, **kw)
    assert [r.config.name for r in results] == ["q r=1", "qv r=4"]
    q1, qv4 = (r.trainable["deltas"]["params"]["layers_0"]["attn"] for r in results)
    assert q1["query"]["kernel"].a.shape == (2, 32, 1) and q1["value"]["kernel"] is None
    assert qv4["query"]["kernel"].a.shape == (2, 32, 4) and qv4["value"]["kernel"].b.shape == (2, 4, 16)
    # Each configuration trains as it would alone (nothing carries over from the one before).
    alone = sweep.train(task, configs[1], variables, arrays, **kw)
    assert_trees_close(results[1].trainable, alone.trainable, rtol=0, atol=0)
    np.testing.assert_array_equal(results[1].losses, alone.losses)
    with pytest.raises(ValueError, match=r"configuration names repeat: \['a', 'a'\]"):
        sweep.run(
            task, [sweep.Config("a"), sweep.Config("a")], variables, arrays, seeds=(0,), steps=1, batch_size=4
        )


class Classifier(nn.Module):
    """Embedding -> mean over valid tokens -> dense -> tanh -> a new 2-way head ("classifier")."""

    @nn.compact
    def __call__(self, ids, mask):
        x = nn.Embed(VOCAB, 16, name="embed")(ids)
        m = mask[..., None].astype(x.dtype)
        x = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        x = jnp.tanh(nn.Dense(16, name="dense")(x))
        return nn.Dense(2, name="classifier")(x)


@pytest.fixture(scope="module")
def classifier():
    model = Classifier()
    ids = jnp.zeros((1, T), jnp.int32)
    variables = model.init(jax.random.key(0), ids, jnp.ones((1, T), jnp.int32))
    variables = {"params": {k: v for k, v in variables["params"].items() if k != "classifier"}}  # a new head
    init_head = lambda k: {"kernel": 0.1 * jax.random.normal(k, (16, 2)), "bias": jnp.zeros((2,))}
    task = sweep.classifier_task(model.apply, head_key="classifier", init_head=init_head)
    arrays = lm_arrays(32, seed=1)
    arrays["input_ids"] = np.where(
        arrays["labels"][:, None] == 1, arrays["input_ids"] % 32, arrays["input_ids"]
    )
    return task, variables, arrays


CLASSIFIER_CONFIGS = {
    "head": sweep.Config("head only", lr=0.05),
    "lora": sweep.Config(
        "LoRA dense r=2",
        spec=lj.LoraSpec(rank=2, alpha=4.0, targets="params/dense/kernel"),
        lr=0.05,
        lr_head=0.1,
    ),
    "full": sweep.Config("full", full=True, lr=0.01, lr_head=0.1),
}


@pytest.mark.standard_promotion  # optax.adam's bias correction (optax.tree.bias_correction) computes `float ** int32`
@pytest.mark.parametrize("kind", sorted(CLASSIFIER_CONFIGS))
def test_vmapped_seeds_match_single_seed_runs(classifier, kind):
    task, variables, arrays = classifier
    cfg = CLASSIFIER_CONFIGS[kind]
    kw = {"steps": 3, "batch_size": 8, "warmup": 1, "eval_batch_size": 16}
    both = sweep.train(task, cfg, variables, arrays, arrays, seeds=(0, 1), **kw)
    for i, seed in enumerate((0, 1)):
        alone = sweep.train(task, cfg, variables, arrays, arrays, seeds=(seed,), **kw)
        np.testing.assert_allclose(both.losses[:, i], alone.losses[:, 0], rtol=LOSS_RTOL, atol=LOSS_ATOL)
        assert_trees_close(both.run(i), alone.run(0))
    if kind == "full":
        head = both.trainable["params"]["params"]["classifier"]
    else:  # the head is a fully trained leaf of the deltas
        head = {k: f.value for k, f in both.trainable["deltas"]["params"]["classifier"].items()}
    assert head["kernel"].shape == (2, 16, 2)
    n_head = 16 * 2 + 2
    if kind == "full":
        assert both.trainable_params == n_head + VOCAB * 16 + 16 * 16 + 16 and both.adapter_params == 0
    elif kind == "lora":
        assert (
            both.adapter_params == 16 * 2 + 2 * 16 and both.trainable_params == both.adapter_params + n_head
        )
    else:
        paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(both.trainable)]
        assert all(p.startswith("['deltas']['params']['classifier']") for p in paths), paths  # the head alone
        assert both.trainable_params == n_head and both.adapter_params == 0
    assert np.all((0 <= both.accuracy) & (both.accuracy <= 1))


@pytest.mark.standard_promotion  # optax.adam's bias correction (optax.tree.bias_correction) computes `float ** int32`
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_head_learning_rate_applies_to_the_head_only(classifier, kind):
    task, variables, arrays = classifier
    cfg = sweep.Config(
        "x",
        spec=CLASSIFIER_CONFIGS["lora"].spec if kind == "lora" else None,
        full=kind == "full",
        lr=0.0,
        lr_head=0.1,
    )
    start = sweep.init(task, cfg, variables, (0,))
    end = sweep.train(task, cfg, variables, arrays, seeds=(0,), steps=2, batch_size=8).trainable
    start = start["params" if kind == "full" else "deltas"]["params"]
    end = end["params" if kind == "full" else "deltas"]["params"]
    start_head, end_head = start.pop("classifier"), end.pop("classifier")
    assert_trees_close(end, start, rtol=0, atol=0)  # lr = 0: the body does not move
    if kind == "lora":
        assert lj.is_full(end_head["kernel"]) and lj.is_full(end_head["bias"])
        start_head, end_head = ({k: f.value for k, f in h.items()} for h in (start_head, end_head))
    assert not np.allclose(end_head["kernel"], start_head["kernel"])


@pytest.mark.standard_promotion  # optax.adam's bias correction (optax.tree.bias_correction) computes `float ** int32`
def test_head_trains_as_a_full_leaf_of_the_deltas(classifier):
    """The task's new head is `LoraSpec(train_full=...)` of the deltas: `FullLeaf`s counted by
    `count_params`, folded in by `merge`, and trained exactly as two explicit trees (LoRA factors at
    `lr`, head at `lr_head`) trained by hand with `lj.wrap` would be."""
    task, variables, arrays = classifier
    cfg, seed, steps = CLASSIFIER_CONFIGS["lora"], 3, 3
    assert sweep.head_spec(task, cfg.spec).train_full == ("params/classifier/.*",)
    result = sweep.train(
        task,
        cfg,
        variables,
        arrays,
        arrays,
        seeds=(seed,),
        steps=steps,
        batch_size=8,
        warmup=1,
        eval_batch_size=16,
        eval_every=2,
    )
    assert [c["step"] for c in result.curve] == [2, 3]  # every 2 steps and after the last
    deltas = result.run(0)["deltas"]
    head = deltas["params"]["classifier"]
    assert set(result.trainable) == {"deltas"} and lj.is_full(head["kernel"]) and lj.is_full(head["bias"])
    assert lj.count_params(deltas) == result.trainable_params == result.adapter_params + 16 * 2 + 2
    # merge folds the trained head in; the merged model scores what the sweep's evaluation scored.
    placeholder = {
        "params": {**variables["params"], "classifier": {"kernel": jnp.zeros((16, 2)), "bias": jnp.zeros(2)}}
    }
    merged = lj.merge(placeholder, deltas)
    np.testing.assert_array_equal(merged["params"]["classifier"]["kernel"], head["kernel"].value)
    pred = np.asarray(task.apply(merged, arrays["input_ids"], arrays["attention_mask"])).argmax(-1)
    assert result.accuracy[0] == np.mean(pred == arrays["labels"])

    # Reference: the LoRA factors and the head as two separate trees, each with its own optimizer.
    key = jax.random.key(seed)
    lora, head_ref = lj.init(key, placeholder, cfg.spec), task.init_head(jax.random.fold_in(key, 1))
    tx_lora, _ = step_lib.make_optimizer(cfg.lr, steps, 1)
    tx_head, _ = step_lib.make_optimizer(cfg.lr_head, steps, 1)
    st_lora, st_head = tx_lora.init(lora), tx_head.init(head_ref)
    wrapped = lj.wrap(task.apply)

    def loss(lora, head, batch):
        v = {"params": {**variables["params"], "classifier": head}}
        return task.loss(lambda *x: wrapped(v, lora, *x), batch)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    batches = sweep.seed_batches(arrays, 8, (seed,))
    for _ in range(steps):
        batch = {k: v[0] for k, v in next(batches).items()}
        g_lora, g_head = grad(lora, head_ref, batch)
        u, st_lora = tx_lora.update(g_lora, st_lora, lora)
        lora = optax.apply_updates(lora, u)
        u, st_head = tx_head.update(g_head, st_head, head_ref)
        head_ref = optax.apply_updates(head_ref, u)
    assert_trees_close({k: f.value for k, f in head.items()}, head_ref)
    assert_trees_close({**deltas["params"], "classifier": None}, {**lora["params"], "classifier": None})
    assert not np.allclose(head["kernel"].value, task.init_head(jax.random.fold_in(key, 1))["kernel"])


@pytest.mark.standard_promotion  # optax.adam's bias correction (optax.tree.bias_correction) computes `float ** int32`
def test_variants_in_a_sweep(classifier):
    """PiSSA and LoRA+ as configurations (DoRA is a spec flag like any other: the notebook runs it); the
    validation curve; the residual base of PiSSA."""
    task, variables, arrays = classifier
    spec = CLASSIFIER_CONFIGS["lora"].spec
    kw = {"lr": 0.05, "lr_head": 0.1}
    configs = [
        sweep.Config("LoRA", spec=spec, **kw),
        sweep.Config("LoRA+", spec=spec, loraplus_ratio=16.0, **kw),
        sweep.Config("PiSSA", spec=dataclasses.replace(spec, init="pissa"), **kw),
    ]
    lora, plus, pissa = sweep.run(
        task,
        configs,
        variables,
        arrays,
        arrays,
        seeds=(0, 1),
        steps=1,
        batch_size=8,
        eval_every=1,
        eval_batch_size=16,
    )
    kernel = lambda r: r.trainable["deltas"]["params"]["dense"]["kernel"]
    # LoRA+ after one Adam step from b = 0: the same a, b's update 16x (Adam's first step is -lr·sign(g)).
    np.testing.assert_array_equal(kernel(plus).a, kernel(lora).a)
    np.testing.assert_allclose(kernel(plus).b, 16.0 * kernel(lora).b, rtol=1e-6)
    assert np.abs(np.asarray(kernel(lora).b)).max() > 0
    # PiSSA: the runs share the residual base; merge(residual, initial deltas) == the original kernel.
    w = variables["params"]["dense"]["kernel"]
    init = sweep.init(task, configs[2], variables, (0,))["deltas"]
    restored = lj.merge(pissa.base, jax.tree_util.tree_map(operator.itemgetter(0), init))["params"]["dense"][
        "kernel"
    ]
    np.testing.assert_allclose(restored, w, rtol=1e-6, atol=1e-6)
    assert not np.allclose(pissa.base["params"]["dense"]["kernel"], w)
    assert lora.base["params"]["dense"]["kernel"] is w  # plain LoRA: the base as given (no copy)
    # The curve's last point is the final evaluation, recomputed here on merged weights.
    for r in (lora, plus, pissa):
        assert [c["step"] for c in r.curve] == [1] and r.curve[-1]["accuracy"] == r.accuracy.tolist()
        for i in range(2):
            logits = task.apply(
                lj.merge(r.base, r.run(i)["deltas"]), arrays["input_ids"], arrays["attention_mask"]
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, arrays["labels"])
            np.testing.assert_allclose(r.curve[-1]["loss"][i], float(ce.mean()), rtol=1e-5)
            assert r.accuracy[i] == np.mean(np.asarray(logits).argmax(-1) == arrays["labels"])


@pytest.mark.standard_promotion  # optax.adam's bias correction (optax.tree.bias_correction) computes `float ** int32`
def test_make_step_is_the_step_train_runs(classifier):
    """`make_step` + `step_keys` + `seed_batches`, looped by hand, give exactly what `train` gives (the
    same compiled computation): LoRA with dropout (so the keys matter), LoRA+ and a head at its own rate."""
    task, variables, arrays = classifier
    spec = dataclasses.replace(CLASSIFIER_CONFIGS["lora"].spec, dropout=0.5)
    cfg = dataclasses.replace(CLASSIFIER_CONFIGS["lora"], spec=spec, loraplus_ratio=4.0)
    seeds, steps = (0, 2), 3
    ref = sweep.train(task, cfg, variables, arrays, seeds=seeds, steps=steps, batch_size=8, warmup=1)
    step, tx = sweep.make_step(task, cfg, steps=steps, warmup=1)
    trainable = sweep.init(task, cfg, variables, seeds)
    opt_state = jax.vmap(tx.init)(trainable)
    batches = sweep.seed_batches(arrays, 8, seeds)
    losses = []
    for i in range(steps):
        trainable, opt_state, loss = step(
            trainable, opt_state, ref.base, next(batches), sweep.step_keys(seeds, i)
        )
        losses.append(np.asarray(loss))
    np.testing.assert_array_equal(np.stack(losses), ref.losses)
    assert_trees_close(trainable, ref.trainable, rtol=0, atol=0)
    # Result.step is that step, already compiled: one more step with it or with make_step's agrees.
    more = [
        s(
            jax.tree_util.tree_map(jnp.copy, trainable),
            jax.tree_util.tree_map(jnp.copy, opt_state),
            ref.base,
            next(sweep.seed_batches(arrays, 8, seeds)),
            sweep.step_keys(seeds, steps),
        )
        for s in (step, ref.step[0])
    ]
    assert_trees_close(more[0], more[1], rtol=0, atol=0)
    # The keys are each run's own per step (dropout differs between runs and steps).
    keys = np.asarray(jax.random.key_data(sweep.step_keys(seeds, 1)))
    assert keys.shape[0] == 2 and not np.array_equal(keys[0], keys[1])
    assert not np.array_equal(keys, np.asarray(jax.random.key_data(sweep.step_keys(seeds, 2))))
    np.testing.assert_array_equal(
        keys[1], jax.random.key_data(jax.random.fold_in(jax.random.fold_in(jax.random.key(2), 2), 1))
    )


def test_errors(classifier):
    task, variables, arrays = classifier
    spec = lj.LoraSpec(rank=2, targets="params/dense/kernel")
    with pytest.raises(
        ValueError, match=r"Config 'x': full=True trains every parameter, so it takes no LoRA spec"
    ):
        sweep.Config("x", spec=spec, full=True)
    with pytest.raises(ValueError, match="head_key .* and init_head .* go together"):
        sweep.Task(apply=task.apply, loss=task.loss, scores=task.scores, head_key="classifier")
    with pytest.raises(ValueError, match=r"seeds is empty"):
        sweep.train(task, sweep.Config("h"), variables, arrays, seeds=(), steps=1, batch_size=8)
    with pytest.raises(ValueError, match=r"seeds \[0, 1, 0\] repeat a seed"):
        sweep.init(task, sweep.Config("h"), variables, (0, 1, 0))
    with pytest.raises(
        ValueError, match=r"steps must be >= 0 and batch_size >= 1, got steps=1, batch_size=0"
    ):
        sweep.train(task, sweep.Config("h"), variables, arrays, seeds=(0,), steps=1, batch_size=0)
    with pytest.raises(ValueError, match=r"Config 'p': loraplus_ratio=16.0 .* has no LoRA spec; give spec="):
        sweep.Config("p", loraplus_ratio=16.0)
    with pytest.raises(
        ValueError, match=r"loraplus_ratio must be > 0, got 0.0; the LoRA\+ paper recommends 16"
    ):
        sweep.Config("p", spec=spec, loraplus_ratio=0.0)
    with pytest.raises(ValueError, match=r"init='pissa_niter_2'\) draws a random residual base per key"):
        sweep.Config("p", spec=dataclasses.replace(spec, init="pissa_niter_2"))
    with pytest.raises(ValueError, match=r"init='loftq'\) \(LoftQ\) fits the adapters to a quantized base"):
        sweep.Config("q", spec=dataclasses.replace(spec, init="loftq"))
    with pytest.raises(ValueError, match=r"eval_every must be >= 0 .*, got -1"):
        sweep.train(
            task, sweep.Config("h"), variables, arrays, seeds=(0,), steps=1, batch_size=8, eval_every=-1
        )
    nothing = {"deltas": None}
    with pytest.raises(ValueError, match="pass num_runs="):
        sweep.evaluate(task, nothing, variables, arrays, 8)


def test_table():
    rows = [
        {
            "name": "head only",
            "acc": [0.5, 0.75],
            "acc_mean": 0.625,
            "acc_std": 0.125,
            "seeds": [0, 1],
            "trainable_params": 770,
            "adapter_params": 0,
        },
        {"name": "LoRA r=8", "acc": None, "seeds": [0], "trainable_params": 37634, "adapter_params": 36864},
    ]
    assert sweep.table(rows).splitlines() == [
        "| configuration | accuracy (%) | seeds | trainable params | adapter params | adapter size (fp32) |",
        "|---|---|---|---|---|---|",
        "| head only | 62.50 ± 12.50 | 2 | 770 | 0 | – |",
        "| LoRA r=8 | – | 1 | 37,634 | 36,864 | 144.0 KiB |",
    ]
