"""Tokenizers chosen by name (`data.tokenizer`), each able to say how many bytes every token covers.

- `bytes`: the 256 byte values of UTF-8 text plus one end-of-text id (256), so 257 ids. Every token
  covers exactly one byte (end-of-text covers none), so bits per byte is exact.
- `hf:NAME_OR_PATH`: any tokenizer `transformers.AutoTokenizer` can load (a local directory written by
  `save_pretrained`, or a hub name already in the local cache; the hub is tried only when
  HF_HUB_OFFLINE is not set). Bytes per token come from the fast tokenizer's character offsets: each
  character's UTF-8 bytes are counted once, on the token whose span ends it, so the bytes of a
  document always add up exactly even when byte-level BPE splits a character across tokens.

A tokenizer that cannot load fails with a ConfigError (one line, exit 2) before any training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from txlab.config import ConfigError

EOT_TEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    spec: str  # the data.tokenizer value it was loaded from
    vocab_size: int  # ids are 0 .. vocab_size-1
    eot_id: int  # end-of-text id, put between documents

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_docs(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text -> (token ids int32, UTF-8 bytes each token covers int32), without end-of-text."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text 256."""

    spec = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def encode_docs(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for t in texts:
            ids = np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32)
            out.append((ids, np.ones_like(ids)))
        return out


class HFTokenizer:
    """A `transformers` tokenizer (fast, for offsets); bytes per token from character offsets."""

    def __init__(self, spec: str, tok) -> None:
        self.spec, self.tok = spec, tok
        self.vocab_size = len(tok)
        eot = tok.eos_token_id
        if eot is None:
            eot = tok.convert_tokens_to_ids(EOT_TEXT)
            if eot is None or eot == tok.unk_token_id:
                raise ConfigError(f"data.tokenizer: {spec!r} has no end-of-text token (no eos_token and no {EOT_TEXT})")
        self.eot_id = int(eot)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def encode_docs(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
            nbytes = np.zeros(len(ids), dtype=np.int32)
            done = 0  # characters already attributed to a token
            for i, (_, end) in enumerate(offsets):
                if end > done:
                    nbytes[i] = len(text[done:end].encode("utf-8"))
                    done = end
            if len(ids) and done < len(text):  # trailing characters no span ended (trimmed whitespace)
                nbytes[-1] += len(text[done:].encode("utf-8"))
            out.append((np.asarray(ids, dtype=np.int32), nbytes))
        return out

    def save(self, directory: str | Path) -> None:
        self.tok.save_pretrained(str(directory))


def load_tokenizer(spec: str) -> Tokenizer:
    """`bytes` or `hf:NAME_OR_PATH`; ConfigError (one line) when it cannot be loaded here."""
    if spec == "bytes":
        return ByteTokenizer()
    if not spec.startswith("hf:") or not spec[3:]:
        raise ConfigError(f"data.tokenizer: unknown tokenizer {spec!r}; allowed: bytes, hf:NAME_OR_PATH")
    name = spec[3:]
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ConfigError(f"data.tokenizer: {name}: no such tokenizer directory")
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if looks_local:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            try:
                tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            except OSError:
                if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                    raise
                tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any loading failure is bad input, reported in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ConfigError(f"data.tokenizer: cannot load {spec!r} here ({first})") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"data.tokenizer: {spec!r} has no fast (Rust) version; byte accounting needs offsets")
    return HFTokenizer(spec, tok)
