"""Your own data files (`lora_jax.data.files`, `formats`, `packing`, `prepare`): reading, formats, loss masks,
packing, shares, and one-line errors for bad input.

Tolerances (float32): losses to rtol 1e-5; gradients and logits to 1e-5 of the largest magnitude.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax.data import files, formats, packing, prepare
from lora_jax.data.files import DataError
from lora_jax.models import tokenizers
from lora_jax.models.llama import Llama, LlamaConfig
from lora_jax.train import step as step_lib
from lora_jax.train.loss import token_loss


def _jsonl(path, rows, blank_after=()):
    lines = []
    for i, r in enumerate(rows):
        lines.append(r if isinstance(r, str) else json.dumps(r))
        if i in blank_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


PC = [{"prompt": f"Q{i}: is {i} even?", "completion": " yes" if i % 2 == 0 else " no"} for i in range(12)]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Fine, thanks."},
        ]
    }
]


# ----------------------------------------------------------------------------------------------- --data


def test_parse_data_arg(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", PC)
    b = _jsonl(tmp_path / "b.jsonl", PC)
    (tmp_path / "notes.txt").write_text("not data")
    assert files.parse_data_arg(str(a)) == {"train": [a]}
    assert files.parse_data_arg(str(tmp_path)) == {"train": [a, b]}  # a folder: its data files, sorted
    assert files.parse_data_arg(f"{a}:train,{b}:validation") == {"train": [a], "validation": [b]}
    assert files.public_name(f"{a}:train,{b}:validation") == "a.jsonl:train,b.jsonl:validation"
    assert files.public_name("movie-reviews") == "movie-reviews"
    with pytest.raises(DataError, match=r"nope\.jsonl' does not exist") as e:
        files.parse_data_arg(str(tmp_path / "nope.jsonl"))
    _one_line(e)
    with pytest.raises(DataError, match=r"unknown split 'test'.*'PATH:train' or 'PATH:validation'"):
        files.parse_data_arg(f"{a}:test")
    with pytest.raises(
        DataError, match=r"'notes\.txt' is not a data file; use \.jsonl, \.json, \.csv, \.parquet"
    ):
        files.parse_data_arg(str(tmp_path / "notes.txt"))
    with pytest.raises(DataError, match="the train split is given twice"):
        files.parse_data_arg(f"{a},{b}")
    with pytest.raises(DataError, match="no training data"):
        files.parse_data_arg(f"{b}:validation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        files.parse_data_arg(str(tmp_path / "empty"))


def test_read_every_file_type_and_locate_rows(tmp_path):
    import pandas as pd

    j = _jsonl(tmp_path / "a.jsonl", PC[:3], blank_after=(0,))  # a blank line 2: row 2 is on line 3
    c = tmp_path / "b.csv"
    c.write_text('prompt,completion\n"two\nlines",x\n07,y\n')  # a quoted newline; "07" stays a string
    p = tmp_path / "c.parquet"
    pd.DataFrame({"prompt": ["p"], "completion": ["q"]}).to_parquet(p)
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(PC[:2]))
    t = files.read_table([j, c, p, arr], tmp_path / "cache")
    assert len(t) == 3 + 2 + 1 + 2 and t.columns == ["prompt", "completion"]
    assert t.dataset[4] == {"prompt": "07", "completion": "y"} and t.dataset[3]["prompt"] == "two\nlines"
    assert [t.where(i) for i in (0, 1, 2, 3, 4, 5, 6)] == [
        "a.jsonl line 1",
        "a.jsonl line 3",
        "a.jsonl line 4",
        "b.csv row 1 (line 2)",
        "b.csv row 2 (line 4)",
        "c.parquet row 1",
        "d.json row 1",
    ]


def test_carve_and_shares():
    train, val = files.carve(100, 0.1)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert np.array_equal(files.carve(100, 0.1)[1], val)  # a fixed seed: the same rows every time
    assert len(files.carve(3, 0.01)[1]) == 1  # at least one
    with pytest.raises(DataError, match="cannot be split into training and validation rows"):
        files.carve(1, 0.5)
    rows = list(range(17))
    for count in (1, 2, 3, 4):
        shares = [files.share(rows, i, count) for i in range(count)]
        assert sorted(sum(shares, [])) == rows  # the union is the data set ...
        assert sum(len(s) for s in shares) == len(rows)  # ... and no row is read twice
    with pytest.raises(ValueError, match=r"share index 2 must be in \[0, 2\)"):
        files.share(rows, 2, 2)


# ------------------------------------------------------------------------------------------ bad input


def _load(tmp_path, data, **kw):
    return prepare.load_files(data, _tok(), model="tiny-llama-test", cache_dir=tmp_path / "cache", **kw)


_TOKENIZER = []


def _tok():
    """A small byte-level BPE tokenizer with ChatML's special tokens (no assets)."""
    if not _TOKENIZER:
        import tokenizers as hf
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = hf.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        corpus = [json.dumps(r) for r in PC + CHAT] * 10
        trainer = trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(corpus, trainer)
        _TOKENIZER.append(tok)
    return _TOKENIZER[0]


@pytest.fixture(autouse=True)
def _no_model_files(monkeypatch):
    """`special_tokens` of the test model without reading any model folder: EOS = <|im_end|>."""
    real = formats.special_tokens

    def special(model, tokenizer):
        if model != "tiny-llama-test":
            return real(model, tokenizer)
        eos = tokenizer.token_to_id("<|im_end|>")
        return {"eos_id": eos, "eos_token": "<|im_end|>", "bos_token": None, "pad_id": 0}

    monkeypatch.setattr(formats, "special_tokens", special)
    monkeypatch.setattr(tokenizers, "chat_template", lambda model: tokenizers.SMOLLM2_CHAT_TEMPLATE)


def test_unknown_columns(tmp_path):
    f = _jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError,
        match=r"^qa\.jsonl: unknown columns \['answer', 'question'\]: expected 'prompt' \+ "
        r"'completion', 'messages' or 'text'",
    ) as e:
        _load(tmp_path, str(f))
    _one_line(e)
    with pytest.raises(DataError, match=r"qa\.jsonl: --format text needs the column\(s\) \['text'\]"):
        _load(tmp_path, str(f), fmt="text")
    both = _jsonl(tmp_path / "both.jsonl", [{"text": "t", "messages": []}])
    with pytest.raises(DataError, match=r"fit the formats \['messages', 'text'\]; choose one with --format"):
        _load(tmp_path, str(both))


@pytest.mark.parametrize(
    "message, pattern",
    [
        (
            {"role": "bot", "content": "x"},
            r"field 'messages\[1\]\.role': 'bot' is not one of 'system', 'user', 'assistant'",
        ),
        (
            {"role": "assistant", "content": 5},
            r"field 'messages\[1\]\.content': expected a string, found int",
        ),
        (
            {"role": "assistant", "content": None},
            r"field 'messages\[1\]\.content': expected a string, found null",
        ),
        ({"role": "assistant"}, r"field 'messages\[1\]\.content': expected a string, found null"),
        ({"content": "x"}, r"field 'messages\[1\]\.role': missing or not a string \(null\)"),
    ],
)
def test_bad_messages_row(tmp_path, message, pattern):
    good = CHAT[0]
    bad = {"messages": [{"role": "user", "content": "Hi"}, message]}
    f = _jsonl(tmp_path / "chat.jsonl", [good, good, bad], blank_after=(0,))
    with pytest.raises(DataError, match=r"^chat\.jsonl line 4: " + pattern) as e:
        _load(tmp_path, str(f))
    _one_line(e)


def test_bad_rows_named_by_file_line_and_field(tmp_path):
    f = _jsonl(tmp_path / "pc.jsonl", PC[:5] + [{"prompt": "p", "completion": 3}])
    with pytest.raises(
        DataError, match=r"^pc\.jsonl line 6: field 'completion': expected a string, found int"
    ):
        _load(tmp_path, str(f))
    f = _jsonl(tmp_path / "text.jsonl", [{"text": "a"}, {"text": ""}])
    data = _load(tmp_path, str(f))
    with pytest.raises(DataError, match=r"^text\.jsonl line 2: field 'text': is empty"):
        data.tokenize("train", [0, 1])
    f = _jsonl(tmp_path / "broken.jsonl", [PC[0], '{"prompt": "p", "completion": "c"'])
    with pytest.raises(DataError, match=r"^broken\.jsonl line 2: not valid JSON") as e:
        _load(tmp_path, str(f))
    _one_line(e)
    f = _jsonl(tmp_path / "noanswer.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}] * 3)
    data = _load(tmp_path, str(f))
    with pytest.raises(
        DataError, match=r"^noanswer\.jsonl line 1: field 'messages': has no assistant message"
    ):
        data.tokenize("train", [0])
    assert _load(tmp_path, str(f), train_on_prompt=True).tokenize("train", [0]).mask.sum() > 0


def test_empty_files(tmp_path):
    import pandas as pd

    (tmp_path / "e.jsonl").write_text("\n  \n")
    (tmp_path / "e.csv").write_text("prompt,completion\n")
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(tmp_path / "e.parquet")
    for name in ("e.jsonl", "e.csv", "e.parquet"):
        with pytest.raises(DataError, match=rf"^{name}: empty file \(no rows\)\.$") as e:
            _load(tmp_path, str(tmp_path / name))
        _one_line(e)


def test_labels_given_for_free_text(tmp_path):
    free = [{"prompt": f"Q{i}", "completion": f" answer number {i}"} for i in range(8)]
    f = _jsonl(tmp_path / "free.jsonl", free)
    assert _load(tmp_path, str(f)).labels is None  # not detected: every completion differs
    with pytest.raises(
        DataError,
        match=r"^free\.jsonl line 1: field 'completion': ' answer number 0' is not one of "
        r"--labels 'yes', 'no'; label accuracy needs every answer to be a label",
    ) as e:
        _load(tmp_path, str(f), labels="yes,no")
    _one_line(e)
    chat = _jsonl(tmp_path / "c.jsonl", CHAT * 3)
    with pytest.raises(
        DataError, match=r"c\.jsonl line 1: field 'messages\[4\]\.content': 'Fine, thanks\.' is not one"
    ):
        _load(tmp_path, str(chat), labels="yes,no")
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "x"}] * 4)
    with pytest.raises(DataError, match="text rows have no completions to be labels"):
        _load(tmp_path, str(text), labels="a,b")
    yes_no = _load(tmp_path, str(_jsonl(tmp_path / "yn.jsonl", PC)))
    assert yes_no.labels == formats.LabelSet(("no", "yes"), (" no", " yes"), detected=True)


def test_examples_longer_than_max_len_are_cut_or_dropped(tmp_path):
    rows = [{"text": "short"}, {"text": "a much longer text than the others " * 4}, {"text": "tiny"}]
    data = _load(tmp_path, str(_jsonl(tmp_path / "t.jsonl", rows)))
    tok = data.tokenize("train", [0, 1, 2])
    longest = int(tok.lengths().max())
    arrays, stats = prepare.build_rows(tok, 16)
    assert longest > 16 and stats["long"] == stats["truncated"] == 1 and stats["dropped"] == 0
    assert arrays["input_ids"].shape == (3, 16) and arrays["attention_mask"][1].sum() == 16
    arrays, stats = prepare.build_rows(tok, 16, drop_long=True)
    assert stats["dropped"] == 1 and stats["truncated"] == 0 and arrays["input_ids"].shape == (2, 16)


# ------------------------------------------------------------------------------------- loss masking


@functools.cache
def _tiny_llama(vocab=300, scan=True):
    """A random tiny Llama, initialised once per (vocab, scan) by one jitted program (read only)."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        scan_layers=scan,
    )
    model = Llama(cfg)
    import flax.linen as nn

    return model, nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))


def _deltas(variables, scan=True):
    axes = {r"params/layers/.*": lj.LoraAxes((0,), (1,), (2,))} if scan else {}
    spec = lj.LoraSpec(rank=4, targets=r".*/attn/(query|value)/kernel", axes=axes)
    deltas = lj.init(jax.random.key(1), variables, spec)
    # b = 0 at init; random b so that every delta's gradient is non-zero.
    keys = iter(jax.random.split(jax.random.key(2), 16))
    return jax.tree_util.tree_map(
        lambda d: (
            dataclasses.replace(d, b=0.1 * jax.random.normal(next(keys), d.b.shape))
            if lj.delta.is_delta(d)
            else d
        ),
        deltas,
        is_leaf=lj.delta.is_delta,
    )


def test_prompt_completion_mask_and_per_token_mean_under_grad_accum():
    tok = _tok()
    enc = formats.Encoder(tok, "prompt-completion", eos_id=tok.token_to_id("<|im_end|>"))
    rows = [
        {"prompt": "Q: one", "completion": " yes"},
        {"prompt": "Q: a longer one", "completion": " no, never ever"},
        {"prompt": "Q", "completion": " maybe"},
        {"prompt": "Q: x y z", "completion": " yes indeed"},
    ]
    examples = [enc(r, "x") for r in rows]
    for r, e in zip(rows, examples):  # the mask is exactly the completion + EOS
        p = tok.encode(r["prompt"]).ids
        c = tok.encode(r["completion"], add_special_tokens=False).ids + [tok.token_to_id("<|im_end|>")]
        assert e.ids == p + c and e.mask == [0] * len(p) + [1] * len(c) and e.prompt_len == len(p)
    every = formats.Encoder(tok, "prompt-completion", train_on_prompt=True)(rows[1], "x")
    assert every.mask == [0] + [1] * (len(every.ids) - 1)  # all but the first token (nothing predicts it)

    model, variables = _tiny_llama()
    arrays = packing.pad_rows([(e.ids, e.mask) for e in examples], 24)
    # By hand: mean over every completion token of -log p(token | everything before it), one row at a time.
    logp = jax.nn.log_softmax(
        jax.jit(model.apply)(  # the plain forward, one program (op by op, each small op compiles alone)
            variables, jnp.asarray(arrays["input_ids"]), attention_mask=jnp.asarray(arrays["attention_mask"])
        ),
        axis=-1,
    )
    nll = []
    for r, e in enumerate(examples):  # right padding: a causal model's logits at real positions are unchanged
        nll += [-float(logp[r, t - 1, e.ids[t]]) for t in range(1, len(e.ids)) if e.mask[t]]
    hand = np.mean(nll)
    deltas = lj.init(
        jax.random.key(0),
        variables,
        lj.LoraSpec(
            rank=2, targets=r".*/attn/query/kernel", axes={r"params/layers/.*": lj.LoraAxes((0,), (1,), (2,))}
        ),
    )
    num_targets = int(arrays["loss_mask"][:, 1:].sum(1).max())
    for accum in (1, 2):  # 1 micro-batch of 4 rows, 2 of 2 (rows of 3 and 10 loss tokens): the same mean
        step = step_lib.make_train_step(model.apply, optax.sgd(0.0), num_targets=num_targets)
        batch = {k: jnp.asarray(v.reshape(accum, 4 // accum, 24)) for k, v in arrays.items()}
        fresh = jax.tree_util.tree_map(jnp.copy, deltas)  # the step donates its deltas
        _, _, m = step(fresh, optax.sgd(0.0).init(fresh), variables, batch, jax.random.key(0))
        np.testing.assert_allclose(float(m["loss"]), hand, rtol=1e-5)
        assert float(m["loss_tokens"]) == len(nll) == sum(arrays["loss_mask"][:, 1:].sum(1))
    # The held-out loss of the evaluation: the same sum, materialised or in chunks of 2 positions.
    from lora_jax.train.filetask import make_loss_step

    for chunk in (128, 2):
        out = make_loss_step(model.apply, num_targets, chunk=chunk)(
            deltas, variables, {k: jnp.asarray(v) for k, v in arrays.items()}
        )
        np.testing.assert_allclose(float(out["loss"]) / float(out["tokens"]), hand, rtol=1e-5)
        assert float(out["tokens"]) == len(nll)


# ------------------------------------------------------------------------------------------ packing


def test_pack_is_deterministic_best_fit():
    assert packing.pack([5, 3, 4, 2, 1], 6) == [
        [0, 4],
        [1],
        [2, 3],
    ]  # 5+1, 3, 4+2 (best fit: the fullest row)
    assert packing.pack([], 4) == []
    with pytest.raises(ValueError, match="does not fit in max_len=4"):
        packing.pack([5], 4)


@pytest.mark.parametrize("scan", [True, False])
def test_packed_equals_unpacked_loss_gradients_and_logits(scan):
    model, variables = _tiny_llama(scan=scan)
    rng = np.random.default_rng(0)
    examples = []
    for n in (7, 3, 9, 5, 2, 6):
        ids = rng.integers(3, 300, n).tolist()
        mask = [0] + rng.integers(0, 2, n - 1).tolist()
        mask[-1] = 1
        examples.append((ids, mask))
    unpacked = packing.pad_rows(examples, 12)
    packed = packing.pack_rows(examples, 12)
    assert len(packed["input_ids"]) < len(unpacked["input_ids"]) and packed["attention_mask"].max() > 1
    assert packing.padding_fraction(packed) < packing.padding_fraction(unpacked)
    deltas = _deltas(variables, scan)

    def loss(apply_fn, arrays):
        f = lj.wrap(step_lib.at_positions(apply_fn))
        k = int(arrays["loss_mask"][:, 1:].sum(1).max())

        def total(d):
            ids, lm = jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["loss_mask"])
            pos, tgt, w = step_lib.completion_targets(ids, lm, k)
            return token_loss(f(variables, d, ids, jnp.asarray(arrays["attention_mask"]), pos), tgt, w)

        return jax.jit(jax.value_and_grad(total, has_aux=True))(deltas)

    (l1, n1), g1 = loss(model.apply, unpacked)
    (l2, n2), g2 = loss(packing.segment_apply(model.apply), packed)
    assert float(n1) == float(n2) == sum(sum(m[1:]) for _, m in examples)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        scale = float(np.max(np.abs(a)))
        assert scale > 0 and float(np.max(np.abs(a - b))) <= 1e-5 * scale

    # A packed example's logits are its logits alone: one example per call, right-padded to the row length
    # (causal, so the padding after it changes nothing; one shape, one compile for all six examples).
    seg = jnp.asarray(packed["attention_mask"])
    apply = jax.jit(model.apply)
    logits = apply(variables, jnp.asarray(packed["input_ids"]), attention_mask=seg > 0, segment_ids=seg)
    for r, members in enumerate(packing.pack([len(i) for i, _ in examples], 12)):
        at = 0
        for i in members:
            ids = examples[i][0]
            alone_ids = jnp.asarray([ids + [0] * (12 - len(ids))])
            alone = apply(variables, alone_ids, attention_mask=jnp.arange(12)[None] < len(ids))[0, : len(ids)]
            got = logits[r, at : at + len(ids)]
            assert float(jnp.max(jnp.abs(got - alone))) <= 1e-5 * float(jnp.max(jnp.abs(alone)))
            at += len(ids)
    with pytest.raises(ValueError, match="segment_ids .* cannot be combined with a KV cache"):
        from lora_jax.models.llama import KVCache

        model.apply(
            variables,
            jnp.ones((1, 2), jnp.int32),
            segment_ids=jnp.ones((1, 2), jnp.int32),
            cache=KVCache.empty(1, 4),
        )


def test_choice_step_picks_the_answer_with_the_least_loss():
    """Whole-answer scoring: per example, the candidate whose answer tokens have the least summed loss."""
    from lora_jax.train.filetask import make_choice_step

    model, variables = _tiny_llama()
    deltas = _deltas(variables)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 300, n).tolist() for n in (5, 8, 3)]
    answers = [[17, 18], [17, 19, 20]]  # two candidates sharing their first token
    examples = []
    for p in prompts:
        for a in answers:
            examples.append((p + a, [0] * len(p) + [1] * len(a)))
    rows = packing.pad_rows(examples, 12)
    wrapped = lj.wrap(model.apply)
    logp = jax.nn.log_softmax(
        wrapped(
            variables,
            deltas,
            jnp.asarray(rows["input_ids"]),
            attention_mask=jnp.asarray(rows["attention_mask"]),
        ),
        axis=-1,
    )
    nll = [
        -sum(float(logp[r, t - 1, ids[t]]) for t in range(1, len(ids)) if m[t])
        for r, (ids, m) in enumerate(examples)
    ]
    hand = np.argmin(np.reshape(nll, (3, 2)), axis=1)
    step = make_choice_step(model.apply, 3, 2)
    for labels, valid in ((hand, [1, 1, 1]), (1 - hand, [1, 1, 1]), (hand, [1, 0, 1])):
        out = step(
            deltas,
            variables,
            {
                **{k: jnp.asarray(v) for k, v in rows.items()},
                "labels": jnp.asarray(labels, jnp.int32),
                "valid": jnp.asarray(valid, jnp.int32),
            },
        )
        assert float(out["correct"]) == float(np.sum((hand == labels) * np.asarray(valid)))
        assert float(out["count"]) == sum(valid)


# ------------------------------------------------------------------------------------------ chat


_LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", [None, _LLAMA3_STYLE], ids=["smollm2", "llama3-style"])
def test_chat_rendering_equals_the_templates_own_output(template):
    import jinja2

    tok = _tok()
    messages = CHAT[0]["messages"]
    enc = formats.Encoder(
        tok, "messages", template=template, template_vars={"bos_token": "<|begin_of_text|>"}
    )
    e = enc(CHAT[0], "chat.jsonl line 1")
    own = (
        jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        .from_string(template or tokenizers.SMOLLM2_CHAT_TEMPLATE)
        .render(messages=messages, add_generation_prompt=False, bos_token="<|begin_of_text|>")
    )
    assert tok.decode(e.ids, skip_special_tokens=False) == own
    # The loss tokens are exactly the two assistant turns, with the template's end-of-turn marker.
    counted = tok.decode([i for i, m in zip(e.ids, e.mask) if m], skip_special_tokens=False)
    end = "<|im_end|>\n" if template is None else "<|eot_id|>"
    assert counted == "Hello" + end + "Fine, thanks." + end
    # The prompt is the conversation up to the last answer, generation prompt included.
    prompt = tok.decode(e.ids[: e.prompt_len], skip_special_tokens=False)
    assert prompt == enc.render(messages[:4], True) and own.startswith(prompt)


def test_chat_template_that_rewrites_history_is_an_error():
    tok = _tok()
    # Drops earlier assistant turns when there is a later one: the prefix of the whole conversation is not kept.
    rewrites = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    enc = formats.Encoder(tok, "messages", template=rewrites)
    with pytest.raises(
        DataError,
        match=r"^chat\.jsonl line 1: field 'messages\[2\]': the chat template does not "
        r"render the conversation up to this turn as a prefix of the whole",
    ):
        enc(CHAT[0], "chat.jsonl line 1")


# ------------------------------------------------------------------------------- shares and caching


def test_two_shares_are_disjoint_and_cover_the_data(tmp_path):
    rows = [{"prompt": f"Q{i}", "completion": f" {i % 3}"} for i in range(23)]
    data = _load(tmp_path, str(_jsonl(tmp_path / "d.jsonl", rows)), val_fraction=0.2)
    assert len(data.val_rows) == 5 and len(data.train_rows) == 18
    parts = [
        data.tokenize("train", files.share(data.train_rows, i, 2), tmp_path / "cache", f"{i}of2")
        for i in range(2)
    ]
    assert not set(parts[0].rows) & set(parts[1].rows)
    assert sorted(np.concatenate([p.rows for p in parts]).tolist()) == data.train_rows.tolist()
    whole = data.tokenize("train", data.train_rows)
    for p in parts:  # each share tokenizes exactly like the whole
        sel = whole.select(p.rows)
        assert np.array_equal(sel.ids, p.ids) and np.array_equal(sel.mask, p.mask)
    # The cache: a second read of the same rows comes from the .npz file, identical.
    cached = sorted((tmp_path / "cache").glob("tokens-train-0of2-*.npz"))
    assert len(cached) == 1
    again = data.tokenize("train", files.share(data.train_rows, 0, 2), tmp_path / "cache", "0of2")
    assert all(
        np.array_equal(getattr(again, f), getattr(parts[0], f)) for f in ("rows", "ids", "mask", "offsets")
    )


@pytest.mark.assets
@pytest.mark.parametrize("pack", [False, True])
def test_a_restarted_run_takes_the_same_next_batch(tmp_path, pack):
    """The batches of step k on: a function of k alone, the same after a restart (tokens from the cache)."""
    import itertools

    from lora_jax import assets
    from lora_jax.train import mesh as mesh_lib
    from lora_jax.train.config import TrainConfig
    from lora_jax.train.filetask import KEYS, FileTask

    tok = tokenizers.bpe_from_gguf_file(assets.fetch("smollm2-135m"))  # what `lora-jax` uses (kept as JSON)
    rows = [{"prompt": f"Q{i}: " + "word " * (i % 7), "completion": f" a{i % 3}"} for i in range(40)]
    cfg = TrainConfig(
        model="tiny-llama",
        data=str(_jsonl(tmp_path / "d.jsonl", rows)),
        batch=4,
        grad_accum=2,
        max_len=24,
        pack=pack,
    )
    mesh = mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1")

    class Setup:
        shardings = {"batch": mesh_lib.batch_sharding(mesh, leading=1)}

    task = FileTask(cfg, tok, mesh, tmp_path / "run")
    per_epoch = task.train_rows // cfg.batch
    assert per_epoch >= 2 and task.stats["packed"] == pack
    run = [
        {k: np.asarray(b[k]) for k in KEYS}
        for b in itertools.islice(task.train_batches(cfg, Setup, 0), 2 * per_epoch)
    ]
    assert all(b["input_ids"].shape == (2, 2, 24) for b in run)
    cached = sorted(p.name for p in (tmp_path / "run" / "data_cache").glob("tokens-*.npz"))
    assert len(cached) == 2  # the train and validation tokens of this process's share (0 of 1)
    again = FileTask(cfg, tok, mesh, tmp_path / "run")  # a restarted process
    for k in (1, per_epoch + 1, 2 * per_epoch - 1):  # mid-epoch (the kill can come at any step)
        resumed = next(again.train_batches(cfg, Setup, k))
        for key in KEYS:
            np.testing.assert_array_equal(np.asarray(resumed[key]), run[k][key])
    assert not np.array_equal(run[0]["input_ids"], run[per_epoch]["input_ids"])  # each epoch reshuffled


@pytest.mark.assets
def test_smollm2_special_tokens_are_the_gguf_ones():
    from lora_jax import assets
    from lora_jax.models import gguf

    reader = gguf.read_gguf(assets.fetch("smollm2-135m"))
    tok = tokenizers.bpe_from_gguf(reader)
    ids = tokenizers.special_ids(reader)
    got = formats.special_tokens("smollm2-135m", tok)
    assert (got["eos_id"], got["pad_id"], tok.token_to_id(got["bos_token"])) == (
        ids["eos"],
        ids["pad"],
        ids["bos"],
    )


def test_resume_refuses_changed_data_files(tmp_path):
    from lora_jax import checkpoint
    from lora_jax.train import config, resume
    from lora_jax.train.config import TrainConfig

    data = _jsonl(tmp_path / "d.jsonl", PC)
    cfg = TrainConfig(model="tiny-llama", data=str(data), steps=4)
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", every=1)
    try:
        # A checkpoint saved before the data-file settings existed: their defaults, and no fingerprint.
        old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in config.DATA_FIELDS}
        ckpt.save(1, {"w": jnp.zeros(3)}, {"config": old})
        ckpt.save(
            2,
            {"w": jnp.zeros(3)},
            {"config": dataclasses.asdict(cfg), "data_fingerprint": files.data_fingerprint(str(data))},
            force=True,
        )
        ckpt.wait()
        assert resume.check_resume(ckpt, dataclasses.replace(cfg, resume_from=1)) is True  # old: the defaults
        assert resume.check_resume(ckpt, cfg) is True
        with pytest.raises(ValueError, match=r"'pack': \(False, True\)"):
            resume.check_resume(ckpt, dataclasses.replace(cfg, pack=True))
        _jsonl(data, PC[:-1])  # the file changed since
        with pytest.raises(
            ValueError,
            match=r"holds a run on other data: the files of --data .* changed since it was "
            r"saved; nothing was restored or deleted",
        ):
            resume.check_resume(ckpt, cfg)
    finally:
        ckpt.close()
