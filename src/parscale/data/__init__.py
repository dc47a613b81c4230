"""The training data pipeline: corpus → tokenizer → tokenized cache → deterministic batches.

Typical use (what the trainer does)::

    from parscale.data import prepare_data, TokenBatches, validation_windows

    data = prepare_data("stdlib", vocab_size=4096)          # cached after the first run
    batches = TokenBatches(data.train, seq_len=256, global_batch=32, seed=0)
    for micro in batches.micro_batches(step, rank=r, world_size=W, accum_steps=2):
        ...  # micro.inputs, micro.labels: int64 (rows, seq_len); labels already shifted
    val = validation_windows(data.validation, seq_len=256, n=64)

See docs/data.md for the exact rules (split, cap, cache key, batch order).
"""

from .batches import Batch, TokenBatches, validation_windows
from .corpus import (DEFAULT_VAL_FRACTION, TRAIN, VALIDATION, Corpus, CorpusStats, Document,
                     corpus_from_spec, load_corpus, split_value, stdlib_corpus)
from .tokenizer import (DEFAULT_VOCAB_SIZE, EOS_TOKEN, TextTokenizer, load_or_train_tokenizer,
                        load_tokenizer, train_tokenizer)
from .tokens import (PreparedData, TokenizedSplit, default_cache_dir, prepare_data, token_dtype,
                     tokenize_split)

__all__ = [
    "Batch", "TokenBatches", "validation_windows",
    "DEFAULT_VAL_FRACTION", "TRAIN", "VALIDATION", "Corpus", "CorpusStats", "Document",
    "corpus_from_spec", "load_corpus", "split_value", "stdlib_corpus",
    "DEFAULT_VOCAB_SIZE", "EOS_TOKEN", "TextTokenizer", "load_or_train_tokenizer", "load_tokenizer",
    "train_tokenizer",
    "PreparedData", "TokenizedSplit", "default_cache_dir", "prepare_data", "token_dtype",
    "tokenize_split",
]
