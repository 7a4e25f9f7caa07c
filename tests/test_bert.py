"""BERT encoder, Hugging Face loading, MiniLM, and the WordPiece tokenizer."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import bert, wordpiece

SMALL = bert.BertConfig(
    vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32, max_position_embeddings=12
)


def _paths(tree):
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): x.shape
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _to_hf(config, variables, prefix=""):
    """Inverse of from_hf: Flax params -> HF state-dict names (numpy)."""
    out = {}
    for path, (name, transpose) in bert._hf_names(config).items():
        value = np.asarray(functools.reduce(lambda node, key: node[key], path, variables["params"]))
        out[prefix + name] = value.T if transpose else value
    return out


def _hf_config(c):
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
    }


@pytest.fixture(scope="module")
def small():
    return bert.init(jax.random.key(0), SMALL)


def test_param_paths_and_logical_axes(small):
    model, variables = small
    paths = _paths(variables)
    for i in range(2):
        for name in ("query", "key", "value", "out"):
            assert paths[f"params/encoder/layers_{i}/attn/{name}/kernel"] == (16, 16)
            assert paths[f"params/encoder/layers_{i}/attn/{name}/bias"] == (16,)
        assert paths[f"params/encoder/layers_{i}/mlp/up/kernel"] == (16, 32)
        assert paths[f"params/encoder/layers_{i}/mlp/down/kernel"] == (32, 16)
    assert paths["params/embeddings/word/embedding"] == (50, 16)
    axes = bert.logical_axes(model)["params"]
    assert tuple(axes["encoder"]["layers_0"]["attn"]["query"]["kernel"]) == ("embed", "heads")
    assert tuple(axes["encoder"]["layers_0"]["attn"]["out"]["kernel"]) == ("heads", "embed")
    assert tuple(axes["embeddings"]["word"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["encoder"]["layers_1"]["mlp"]["down"]["kernel"]) == ("mlp", "embed")


def test_padding_does_not_change_tokens(small):
    model, variables = small
    apply = jax.jit(model.apply)
    ids = jnp.asarray([[2, 7, 9, 3]], jnp.int32)
    short = apply(variables, ids, jnp.ones((1, 4), jnp.int32))
    padded_ids = jnp.concatenate([ids, jnp.zeros((1, 3), jnp.int32)], axis=1)
    padded = apply(variables, padded_ids, jnp.asarray([[1, 1, 1, 1, 0, 0, 0]], jnp.int32))
    assert padded.shape == (1, 7, 16) and padded.dtype == jnp.float32
    np.testing.assert_allclose(padded[:, :4], short, atol=1e-5)


def test_mean_pool():
    hidden = jnp.arange(12, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.asarray([[1, 1, 0], [0, 0, 0]], jnp.int32)
    np.testing.assert_allclose(bert.mean_pool(hidden, mask), [[1.0, 2.0], [0.0, 0.0]])


def test_bfloat16_compute(small):
    _, variables = small
    model = bert.BertModel(bert.BertConfig(**{**SMALL.__dict__, "dtype": jnp.bfloat16}))
    out = jax.jit(model.apply)(variables, jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32))
    ref = jax.jit(bert.BertModel(SMALL).apply)(
        variables, jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32)
    )
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1)


def test_classifier_shares_encoder_paths(small):
    model, variables = small
    clf, cvars = bert.classifier_from_encoder(jax.random.key(1), model, variables, num_labels=3)
    paths = _paths(cvars)
    assert paths["params/classifier/kernel"] == (16, 3)
    assert cvars["params"]["encoder"] is variables["params"]["encoder"]
    ids, mask = jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32)
    logits = jax.jit(clf.apply)(cvars, ids, mask)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    pooled = bert.mean_pool(jax.jit(model.apply)(variables, ids, mask), mask)
    head = cvars["params"]["classifier"]
    np.testing.assert_allclose(logits, pooled @ head["kernel"] + head["bias"][None, :], atol=1e-5)


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_from_hf_round_trip(small, prefix):
    _, variables = small
    tensors = _to_hf(SMALL, variables, prefix)
    tensors[prefix + "pooler.dense.weight"] = np.zeros((16, 16), np.float32)  # ignored
    tensors[prefix + "embeddings.position_ids"] = np.arange(12)[None]  # ignored
    _, loaded = bert.from_hf(_hf_config(SMALL), tensors)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)


def test_from_hf_errors_name_tensor_and_shapes(small):
    _, variables = small
    tensors = _to_hf(SMALL, variables)
    bad = dict(tensors)
    bad["encoder.layer.1.attention.self.query.weight"] = np.zeros((16, 15), np.float32)
    with pytest.raises(
        ValueError,
        match=r"'encoder\.layer\.1\.attention\.self\.query\.weight' \(for "
        r"params/encoder/layers_1/attn/query/kernel\): expected shape \(16, 16\), found \(16, 15\)",
    ):
        bert.from_hf(_hf_config(SMALL), bad)
    missing = {k: v for k, v in tensors.items() if k != "embeddings.LayerNorm.bias"}
    with pytest.raises(ValueError, match=r"missing tensor 'embeddings\.LayerNorm\.bias'"):
        bert.from_hf(_hf_config(SMALL), missing)
    extra = {**tensors, "encoder.layer.2.output.dense.weight": np.zeros((16, 32), np.float32)}
    with pytest.raises(
        ValueError, match=r"unexpected tensors \['encoder\.layer\.2\.output\.dense\.weight'\]"
    ):
        bert.from_hf(_hf_config(SMALL), extra)


def test_config_errors(small):
    with pytest.raises(ValueError, match=r"hidden_size \(10\) must be divisible by num_heads \(4\)"):
        bert.BertConfig(hidden_size=10, num_heads=4)
    with pytest.raises(ValueError, match="unsupported hidden_act 'relu'"):
        bert.BertConfig.from_hf({**_hf_config(SMALL), "hidden_act": "relu"})
    with pytest.raises(ValueError, match="unsupported position_embedding_type 'relative_key'"):
        bert.BertConfig.from_hf({**_hf_config(SMALL), "position_embedding_type": "relative_key"})
    model, variables = small
    with pytest.raises(ValueError, match="sequence length 13 exceeds max_position_embeddings=12"):
        model.apply(variables, jnp.ones((1, 13), jnp.int32))


# --- WordPiece ---

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "##s", "café", "cafe"]


def test_wordpiece_from_vocab_folder(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    tok = wordpiece.load_wordpiece(tmp_path)
    assert tok.encode("The MOVIES Café").ids == [2, 5, 6, 7, 9, 3]  # lowercased, accents stripped
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert wordpiece.load_wordpiece(tmp_path).encode("the café The").ids == [2, 5, 8, 1, 3]
    batch = wordpiece.encode(tok, ["the movies the movies the", "movie"], max_len=5)
    assert batch["input_ids"].dtype == np.int32
    assert batch["input_ids"].tolist() == [[2, 5, 6, 7, 3], [2, 6, 3, 0, 0]]  # truncation keeps [SEP]
    assert tok.padding is None and tok.truncation is None  # helpers never mutate the tokenizer


def test_wordpiece_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected 'tokenizer.json' or 'vocab.txt'"):
        wordpiece.load_wordpiece(tmp_path)
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[CLS\]'\]"):
        wordpiece.from_vocab(["[UNK]", "[SEP]", "a"])
    with pytest.raises(ValueError, match="max_len must be positive, got 0"):
        wordpiece.configured(wordpiece.from_vocab(VOCAB), 0)


@pytest.mark.assets
def test_wordpiece_from_vocab_matches_tokenizer_json(minilm_dir, tmp_path, movie_reviews):
    for name in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((minilm_dir / name).read_bytes())
    built, shipped = wordpiece.load_wordpiece(tmp_path), wordpiece.load_wordpiece(minilm_dir)
    texts = [e.text for e in movie_reviews["validation"]]
    a, b = wordpiece.encode(built, texts, 64), wordpiece.encode(shipped, texts, 64)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["attention_mask"], b["attention_mask"])


# --- MiniLM (real weights) ---


def _embed(minilm, texts):
    model, variables, tok = minilm
    batch = wordpiece.encode(tok, texts, 32)
    hidden = jax.jit(model.apply)(variables, batch["input_ids"], batch["attention_mask"])
    e = bert.mean_pool(hidden, jnp.asarray(batch["attention_mask"]))
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


@pytest.mark.assets
def test_minilm_paraphrase_similarity(minilm):
    e = _embed(
        minilm,
        [
            "A man is playing a guitar.",
            "Someone plays the guitar.",
            "The stock market crashed today amid inflation fears.",
        ],
    )
    paraphrase, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    # Measured: paraphrase 0.84, unrelated -0.04.
    assert paraphrase > 0.7 and unrelated < 0.2 and paraphrase - unrelated > 0.5


@pytest.mark.assets
@pytest.mark.torch
def test_minilm_matches_transformers(minilm, minilm_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, variables, tok = minilm
    texts = ["A man is playing a guitar.", "hi", "The gorgeously elaborate continuation of the trilogy."]
    batch = wordpiece.encode(tok, texts, 24)
    ours = np.asarray(jax.jit(model.apply)(variables, batch["input_ids"], batch["attention_mask"]))
    ref_model = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(
            input_ids=torch.from_numpy(batch["input_ids"]).long(),
            attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
        ).last_hidden_state.numpy()
    # fp32; measured max abs diff 2.5e-6 on real tokens, 2.3e-5 including padded positions.
    assert np.abs(ours - ref).max() <= 1e-3
    assert np.abs(ours - ref)[batch["attention_mask"] == 1].max() <= 1e-4


def test_lora_wrap_matches_merge_on_classifier(small):
    """The paper's recipe (rank-r deltas on query/value) runs factored through the BERT classifier."""
    import lora_jax as lj

    model, variables = small
    clf, cvars = bert.classifier_from_encoder(jax.random.key(1), model, variables)
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets=r".*/(query|value)/kernel")
    deltas = lj.init(jax.random.key(2), cvars, spec)
    deltas = jax.tree_util.tree_map(lambda x: x + 0.1, deltas)  # make b nonzero
    ids, mask = jnp.asarray([[2, 7, 9, 3, 0]], jnp.int32), jnp.asarray([[1, 1, 1, 1, 0]], jnp.int32)
    wrapped = jax.jit(lj.wrap(clf.apply))(cvars, deltas, ids, mask)
    apply = jax.jit(clf.apply)
    merged = apply(jax.jit(lj.merge)(cvars, deltas), ids, mask)
    np.testing.assert_allclose(wrapped, merged, atol=1e-5)
    assert not np.allclose(merged, apply(cvars, ids, mask))
    assert lj.count_params(deltas) == 2 * 2 * (16 * 4 + 4 * 16)
