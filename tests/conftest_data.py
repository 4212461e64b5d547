"""Helpers shared by the data, training and generation tests (imported, not a pytest plugin)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from txlab.config import load_config

TINY = {
    "model.n_layers": 2,
    "model.d_model": 64,
    "model.n_heads": 4,
    "workload.seq_len": 64,
    "workload.batch_size": 8,
    "measure.device": "cpu",
    "train.log_every": 1,
    "train.eval_batches": 4,
}

TEXT = (
    "Fünf Boxkämpfer jagen Eva quer über den Sylter Deich. The quick brown fox jumps over the lazy dog.\n\n"
    "Pack my box with five dozen liquor jugs — and a naïve café. 😀 Sphinx of black quartz, judge my vow.\n"
)


def cfg(**over):
    return load_config(None, {**TINY, **{k.replace("__", "."): v for k, v in over.items()}})


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning threads are ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_tokenizer(directory: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE trained on the fly with `tokenizers`, saved the way `transformers` loads it."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:10]] + [TEXT], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(directory))
    return directory
