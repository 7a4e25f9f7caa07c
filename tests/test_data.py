"""Movie-review sentiment data: parsing, the fixed split, batching, resumption, LM loss masks."""

import itertools

import numpy as np
import pytest

from lora_jax import data
from lora_jax.data import Example
from lora_jax.models import wordpiece

HEADER = "id\tsentiment\ttext\r\n"
ROWS = [
    "1\t2.5\tA gorgeous, witty film.",
    "2\t-1.25\tA dull mess.",
    "3\t0.0\tIt is a film.",  # zero score: dropped
    "4\t1.0\tA gorgeous, witty film.",  # repeated sentence: dropped
    "5\t-0.1\tToo long \u2028 by half.",  # odd whitespace inside the text survives
]


def _write(path, rows=ROWS):
    path.write_bytes((HEADER + "".join(r + "\r\n" for r in rows)).encode("utf-8"))
    return path


def _examples(n):
    return [Example(i, f"text {i}", 1.0 if i % 2 else -1.0, i % 2) for i in range(n)]


def test_read_snippets(tmp_path):
    examples = data.read_snippets(_write(tmp_path / "reviews.txt"))
    assert examples == [
        Example(1, "A gorgeous, witty film.", 2.5, 1),
        Example(2, "A dull mess.", -1.25, 0),
        Example(5, "Too long \u2028 by half.", -0.1, 0),
    ]


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="movie-review file not found: .*nope.txt"):
        data.read_snippets(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="movie-review file not found"):
        data.load_sentiment(tmp_path / "nope.txt")
    bad = _write(tmp_path / "bad.txt", ROWS[:2] + ["7\tgreat\tA film."])
    with pytest.raises(
        ValueError, match=r"line 4: expected 'id<TAB>score<TAB>text', found '7\\tgreat\\tA film.'"
    ):
        data.read_snippets(bad)


@pytest.mark.assets
def test_real_split(movie_reviews):
    splits = movie_reviews
    assert (
        {k: len(v) for k, v in splits.items()}
        == data.SPLIT_SIZES
        == {"train": 8454, "validation": 1056, "test": 1056}
    )
    assert {k: sum(e.label for e in v) for k, v in splits.items()} == {
        "train": 4181,
        "validation": 529,
        "test": 531,
    }
    for a, b in itertools.combinations(splits.values(), 2):
        assert not {e.id for e in a} & {e.id for e in b}
        assert not {e.text for e in a} & {e.text for e in b}
    for part in splits.values():
        assert 0.45 < np.mean([e.label for e in part]) < 0.55
        # The file lists positives first; splits keep a random order, so prefixes are fair samples too.
        assert 0.4 < np.mean([e.label for e in part[:256]]) < 0.6
        assert all((e.score > 0) == (e.label == 1) and e.score != 0 for e in part)
    again = data.load_sentiment()
    assert again == splits  # deterministic across calls


def test_split_is_seeded():
    examples = _examples(100)
    a, b, c = data.split(examples), data.split(examples), data.split(examples, seed=1)
    assert a == b and a != c
    assert {k: len(v) for k, v in a.items()} == {"train": 80, "validation": 10, "test": 10}
    assert sorted(e.id for v in a.values() for e in v) == list(range(100))


# --- batching and resumption ---


def test_subset_is_a_fixed_random_sample_in_order():
    examples = _examples(50)
    sample = data.subset(examples, 10)
    assert sample == data.subset(examples, 10) and len(sample) == 10
    assert [e.id for e in sample] == sorted(e.id for e in sample)  # original order kept
    assert [e.id for e in sample] != list(range(10))  # not a prefix
    assert {e.label for e in sample} == {0, 1}
    assert data.subset(examples, 10, seed=1) != sample
    assert data.subset(examples, 0) == data.subset(examples, 50) == data.subset(examples, 99) == examples


def _ids(it):
    return [b["x"].tolist() for b in it]


def test_batches_resume_exactly():
    arrays = {"x": np.arange(10, dtype=np.int32)}
    kw = dict(seed=3, shuffle=True, num_epochs=None, drop_remainder=True)
    full = _ids(itertools.islice(data.batches(arrays, 3, **kw), 12))  # 4 epochs of 3 batches
    for k in (0, 1, 3, 7):
        assert _ids(itertools.islice(data.batches(arrays, 3, start_step=k, **kw), 12 - k)) == full[k:]
    # The order of an epoch depends only on (seed, epoch).
    assert sum(full[3:6], []) == data.epoch_order(10, 1, seed=3)[:9].tolist()
    assert full[0:3] != full[3:6]
    assert data.data_position(7, 10, 3, drop_remainder=True) == (2, 1)
    assert (
        _ids(itertools.islice(data.batches(arrays, 3, seed=4, shuffle=True, num_epochs=None), 1)) != full[:1]
    )


def test_batches_padding_and_epochs():
    arrays = {"x": np.arange(5, dtype=np.int32), "y": np.ones((5, 2), np.int32)}
    out = list(data.batches(arrays, 2, num_epochs=2))
    assert len(out) == 6 and data.steps_per_epoch(5, 2) == 3
    assert out[2]["x"].tolist() == [4, 0] and out[2]["valid"].tolist() == [1, 0]
    assert out[2]["y"].tolist() == [[1, 1], [0, 0]]
    assert all(b["x"].shape == (2,) and b["x"].dtype == np.int32 for b in out)
    assert len(list(data.batches(arrays, 2, drop_remainder=True))) == 2
    assert list(data.batches(arrays, 2, start_step=6, num_epochs=2)) == []


def test_batches_errors():
    with pytest.raises(ValueError, match=r"same number of examples, found \{'a': 3, 'b': 2\}"):
        next(data.batches({"a": np.zeros(3), "b": np.zeros(2)}, 2))
    with pytest.raises(ValueError, match="start_step must be >= 0, got -1"):
        next(data.batches({"a": np.zeros(3)}, 2, start_step=-1))
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        data.steps_per_epoch(3, 0)
    with pytest.raises(ValueError, match="no full batch: 3 examples < batch_size 4"):
        data.steps_per_epoch(3, 4, drop_remainder=True)


# --- tokenization ---

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "text", "0", "1", "2", "3", "4", "5"]


def test_classification_batches():
    tok = wordpiece.from_vocab(VOCAB)
    examples = _examples(5) + [Example(9, "text 1 2 3 4 5 1 2 3", 1.0, 1)]
    out = list(data.classification_batches(examples, tok, batch_size=4, max_len=6))
    assert len(out) == 2
    first = out[0]
    assert set(first) == {"input_ids", "attention_mask", "labels", "valid"}
    assert all(v.dtype == np.int32 for v in first.values())
    assert first["input_ids"][0].tolist() == [2, 5, 6, 3, 0, 0]
    assert first["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert first["labels"].tolist() == [0, 1, 0, 1]
    assert out[1]["input_ids"][1].tolist() == [2, 5, 7, 8, 9, 3]  # truncated, [SEP] kept
    assert out[1]["valid"].tolist() == [1, 1, 0, 0]


def test_lm_loss_mask_is_exactly_the_completion(bpe_tokenizer):
    tok = bpe_tokenizer
    examples = [Example(0, "a gorgeous, witty and moving film.", 2.0, 1), Example(1, "a dull mess.", -2.0, 0)]
    eos = tok.token_to_id("<|endoftext|>")
    enc = data.encode_lm(examples, tok, max_len=32, eos_id=eos)
    assert set(enc) == {"input_ids", "attention_mask", "loss_mask", "labels", "prompt_len"}
    for i, e in enumerate(examples):
        prompt = tok.encode(data.DEFAULT_PROMPT.format(text=e.text)).ids
        completion = tok.encode(data.DEFAULT_COMPLETIONS[e.label]).ids + [eos]
        row = prompt + completion
        assert enc["input_ids"][i, : len(row)].tolist() == row  # prompt tokenized as one string
        assert enc["loss_mask"][i].tolist() == [0] * len(prompt) + [1] * len(completion) + [0] * (
            32 - len(row)
        )
        assert enc["attention_mask"][i].sum() == len(row) and enc["prompt_len"][i] == len(prompt)
    assert tok.decode(enc["input_ids"][0][enc["loss_mask"][0] == 1][:-1].tolist()) == " positive"
    assert tok.decode(enc["input_ids"][1][enc["loss_mask"][1] == 1][:-1].tolist()) == " negative"


def test_lm_truncates_review_keeps_prompt_and_completion(bpe_tokenizer):
    tok = bpe_tokenizer
    long = Example(0, " ".join(["the movie is funny and smart"] * 10), 1.0, 1)
    enc = data.encode_lm([long], tok, max_len=24, prompt=lambda t: f"Review: {t}\nSentiment:")
    text = tok.decode(enc["input_ids"][0].tolist())
    assert text.startswith("Review: the movie") and text.endswith("\nSentiment: positive")
    assert enc["attention_mask"][0].sum() <= 24 and enc["loss_mask"][0].sum() == len(
        tok.encode(" positive").ids
    )
    batches = list(data.lm_batches([long] * 3, tok, 2, 24, shuffle=True, seed=1))
    assert [b["valid"].tolist() for b in batches] == [[1, 1], [1, 0]]
    assert batches[0]["loss_mask"].shape == (2, 24)


def test_lm_errors(bpe_tokenizer):
    ex = [Example(0, "a film", 1.0, 1)]
    with pytest.raises(
        ValueError, match=r"max_len=4 is too small: the prompt without review text takes \d+ tokens"
    ):
        data.encode_lm(ex, bpe_tokenizer, max_len=4)
    with pytest.raises(ValueError, match="prompt template must contain '{text}'"):
        data.encode_lm(ex, bpe_tokenizer, max_len=16, prompt="Review:")


@pytest.mark.assets
def test_real_batches(movie_reviews, minilm_dir):
    tok = wordpiece.load_wordpiece(minilm_dir)
    it = data.classification_batches(
        movie_reviews["train"],
        tok,
        32,
        64,
        seed=0,
        shuffle=True,
        num_epochs=None,
        drop_remainder=True,
        start_step=300,
    )
    batch = next(it)
    assert batch["input_ids"].shape == (32, 64) and batch["valid"].all()
    assert (batch["input_ids"][:, 0] == tok.token_to_id("[CLS]")).all()
    assert data.data_position(300, 8454, 32, drop_remainder=True) == (1, 36)
