"""Tokens for trials and training: sources, packing and loaders (`loader`), the synthetic token
source (`synthetic`) and tokenizers (`tokenizer`)."""
