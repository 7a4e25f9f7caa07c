"""Real data for fine-tuning: the movie-review sentiment set, with resumable fixed-shape batches.

Example:
    >>> from lora_jax import data
    >>> data.SPLIT_SIZES
    {'train': 8454, 'validation': 1056, 'test': 1056}
"""

from lora_jax.data.sentiment import (
    DEFAULT_COMPLETIONS,
    DEFAULT_PROMPT,
    SPLIT_SIZES,
    Example,
    batches,
    classification_batches,
    data_position,
    encode_classification,
    encode_lm,
    epoch_order,
    lm_batches,
    load_sentiment,
    read_snippets,
    split,
    steps_per_epoch,
    subset,
)

__all__ = [
    "DEFAULT_COMPLETIONS",
    "DEFAULT_PROMPT",
    "SPLIT_SIZES",
    "Example",
    "batches",
    "classification_batches",
    "data_position",
    "encode_classification",
    "encode_lm",
    "epoch_order",
    "lm_batches",
    "load_sentiment",
    "read_snippets",
    "split",
    "steps_per_epoch",
    "subset",
]
