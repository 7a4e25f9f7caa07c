"""Real data for fine-tuning: the movie-review sentiment set, with resumable fixed-shape batches, and your
own data files (``--data PATH``: prompt/completion, chat ``messages`` or ``text`` rows; :mod:`.files`,
:mod:`.formats`, :mod:`.packing`, :mod:`.prepare`).

Example:
    >>> from lora_jax import data
    >>> data.SPLIT_SIZES
    {'train': 8454, 'validation': 1056, 'test': 1056}
"""

from lora_jax.data.files import DataError, carve, parse_data_arg, share
from lora_jax.data.formats import Encoder, detect_format, label_set
from lora_jax.data.packing import pack_rows, pad_rows, segment_apply
from lora_jax.data.prepare import build_rows, load_files
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
    "DataError",
    "Encoder",
    "Example",
    "batches",
    "build_rows",
    "carve",
    "classification_batches",
    "data_position",
    "detect_format",
    "encode_classification",
    "encode_lm",
    "epoch_order",
    "label_set",
    "load_files",
    "lm_batches",
    "load_sentiment",
    "pack_rows",
    "pad_rows",
    "parse_data_arg",
    "read_snippets",
    "segment_apply",
    "share",
    "split",
    "steps_per_epoch",
    "subset",
]
