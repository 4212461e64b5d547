"""Training data: documents from a source, tokenized, packed into fixed-length sequences, batched.

`data.source`:
- `synthetic`: uniform random tokens (memory sweeps; no bits per byte).
- `corpus`: the Python documentation that every CPython installation carries (`pydoc_data.topics`:
  the language reference and library topics that `help()` shows, about 465 KB of English prose; PSF
  License, read from the local installation, nothing downloaded or shipped), split into documents of
  about 2,000 characters at paragraph boundaries.
- `text:PATH` / `parquet:PATH`: local files or a glob, read through `datasets` (streamed, no cache
  written). A text file is one document; a Parquet row is one document (column `data.text_column`).
- `hf:NAME[:CONFIG]`: a hub data set's `train` split, streamed (needs the hub, e.g. on a cluster).

Packing: every document is followed by the end-of-text id and the documents are concatenated into
one token stream; sequence i is the window tokens[i*T : i*T + T + 1] (inputs [:-1], targets [1:]), so
every token after the first is a target exactly once. Held-out split: a document is held out when a
stable hash of its position falls under `data.val_fraction` (the same documents for every seed); when
that leaves a side too short for one sequence, the last `val_fraction` of the token stream is held out
instead. `val_fraction: 0` evaluates on the training data (memorisation checks).

Order: global batch g is made of windows g*B .. g*B+B-1 of an endless sequence of epochs, each epoch a
permutation of the windows drawn from (seed, epoch); so batch g is a pure function of (seed, g), a
checkpoint only stores g, and data-loader worker w of W yields the batches g = start + w + k*W (no
overlap; torch's in-order loader returns them in order). Streamed sources (`hf:`) are shuffled
with a `datasets` buffer seeded the same way and read in order, each worker skipping others' batches.
Bits per byte: every token carries the UTF-8 bytes it covers (see txlab.data.tokenizer); a batch's byte
count is the sum over its targets.
"""

from __future__ import annotations

import glob
import math
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from txlab.config import ConfigError, TrialConfig
from txlab.data.batch import Batch, Indexed
from txlab.data.synthetic import Synthetic
from txlab.data.tokenizer import Tokenizer, load_tokenizer

CORPUS_DOC_CHARS = 2000  # corpus documents: paragraphs gathered up to about this many characters
ENCODE_GROUP = 64  # documents tokenized per call


# --- sources ------------------------------------------------------------------------------------


def corpus_documents() -> list[str]:
    """The shipped-with-Python documentation topics, split at paragraphs into ~2,000-character documents."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ConfigError(
            "data.source: 'corpus' reads pydoc_data.topics, which this Python installation lacks"
        ) from None
    docs = []
    for name in sorted(topics):
        buf: list[str] = []
        size = 0
        for para in topics[name].split("\n\n"):
            buf.append(para)
            size += len(para)
            if size >= CORPUS_DOC_CHARS:
                docs.append("\n\n".join(buf).strip("\n"))
                buf, size = [], 0
        if buf and "\n\n".join(buf).strip():
            docs.append("\n\n".join(buf).strip("\n"))
    return [d for d in docs if d]


def _local_files(kind: str, pattern: str) -> list[str]:
    path = os.path.expanduser(pattern)
    if os.path.isdir(path):
        raise ConfigError(
            f"data.source: {kind}:{pattern} is a directory; give a file or a glob such as {pattern.rstrip('/')}/*"
        )
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
        what = "matches no file" if glob.has_magic(path) else "no such file"
        raise ConfigError(f"data.source: {kind}:{pattern}: {what}")
    if all(os.path.getsize(f) == 0 for f in files):
        raise ConfigError(
            f"data.source: {kind}:{pattern}: {'every matching file is' if len(files) > 1 else 'file is'} empty"
        )
    return files


def _datasets_quiet():
    import datasets
    import huggingface_hub

    huggingface_hub.utils.logging.set_verbosity_error()  # no retry chatter: a failure is one line of ours
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _text_documents(files: list[str]) -> Iterator[str]:
    ds = _datasets_quiet().load_dataset("text", data_files=files, split="train", streaming=True, sample_by="document")
    for row in ds:
        yield row["text"]


def _parquet_documents(files: list[str], column: str, pattern: str) -> Iterator[str]:
    ds = _datasets_quiet().load_dataset("parquet", data_files=files, split="train", streaming=True)
    for row in ds:
        if column not in row:
            raise ConfigError(f"data.text_column: no column {column!r} in parquet:{pattern}; columns: {', '.join(row)}")
        yield row[column]


def _hf_stream(name: str, config: str | None, seed: int, epoch: int, column: str):
    try:
        ds = _datasets_quiet().load_dataset(name, config, split="train", streaming=True)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad config: bad input, one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ConfigError(f"data.source: cannot open hf:{name}{':' + config if config else ''} ({first})") from None
    ds = ds.shuffle(seed=seed, buffer_size=10_000)
    ds.set_epoch(epoch)
    return ds


def parse_source(spec: str) -> tuple[str, str, str | None]:
    """`synthetic`, `corpus`, `text:PATH`, `parquet:PATH`, `hf:NAME[:CONFIG]` -> (kind, arg, config)."""
    if spec in ("synthetic", "corpus"):
        return spec, "", None
    kind, _, rest = spec.partition(":")
    if kind in ("text", "parquet") and rest:
        return kind, rest, None
    if kind == "hf" and rest:
        name, _, config = rest.partition(":")
        if name:
            return kind, name, config or None
    raise ConfigError(
        f"data.source: unknown source {spec!r}; allowed: synthetic, corpus, text:PATH, parquet:PATH, hf:NAME[:CONFIG]"
    )


# --- packing and splitting ----------------------------------------------------------------------


def held_out(index: int, fraction: float) -> bool:
    """Whether document `index` is held out: a stable hash, the same for every seed and run."""
    return zlib.crc32(f"doc{index}".encode()) % 1_000_000 < fraction * 1_000_000


def _pack(encoded: list[tuple[np.ndarray, np.ndarray]], eot: int) -> tuple[np.ndarray, np.ndarray]:
    ids, nbytes = [], []
    for t, b in encoded:
        ids += [t, np.array([eot], dtype=np.int32)]
        nbytes += [b, np.zeros(1, dtype=np.int32)]
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(ids), np.concatenate(nbytes)


class Packed(Indexed):
    """An in-memory token stream (ids and bytes per token) cut into windows and served in shuffled epochs."""

    def __init__(self, ids: np.ndarray, nbytes: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.ids, self.nbytes = ids, nbytes
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.n_windows = (len(ids) - 1) // seq_len
        self._perm: tuple[int, np.ndarray] | None = None

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._perm[1]

    def _window(self, w: int) -> tuple[np.ndarray, int]:
        s = w * self.seq_len
        return self.ids[s : s + self.seq_len + 1], int(self.nbytes[s + 1 : s + self.seq_len + 1].sum())

    def _batch_of(self, windows: list[int], g: int) -> Batch:
        rows, nbytes = zip(*(self._window(w) for w in windows))
        return Batch(torch.from_numpy(np.stack(rows).astype(np.int64)), sum(nbytes), g)

    def batch(self, g: int) -> Batch:
        windows = []
        for j in range(g * self.batch_size, (g + 1) * self.batch_size):
            windows.append(int(self._epoch_perm(j // self.n_windows)[j % self.n_windows]))
        return self._batch_of(windows, g)

    def eval_batches(self, n: int) -> list[Batch]:
        """The first n*B windows in stream order (no shuffle), the last batch possibly smaller."""
        windows = list(range(min(self.n_windows, n * self.batch_size)))
        return [
            self._batch_of(windows[i : i + self.batch_size], -1 - i // self.batch_size)
            for i in range(0, len(windows), self.batch_size)
        ]

    def token_counts(self, vocab_size: int) -> np.ndarray:
        return np.bincount(self.ids, minlength=vocab_size)


class Streamed:
    """Documents read in order from a stream, packed on the fly; batch g is the g-th batch of the stream."""

    def __init__(self, documents: Callable[[int], Iterator[str]], tok: Tokenizer, seq_len: int, batch_size: int):
        self.documents, self.tok, self.seq_len, self.batch_size = documents, tok, seq_len, batch_size

    def _windows(self, epochs: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
        T = self.seq_len
        ids, nb = np.zeros(0, np.int32), np.zeros(0, np.int32)
        epoch = 0
        while epochs is None or epoch < epochs:
            group: list[str] = []
            produced = False
            for doc in self.documents(epoch):
                group.append(doc)
                if len(group) < ENCODE_GROUP:
                    continue
                new_ids, new_nb = _pack(self.tok.encode_docs(group), self.tok.eot_id)
                group = []
                ids, nb = np.concatenate([ids, new_ids]), np.concatenate([nb, new_nb])
                while len(ids) >= T + 1:
                    produced = True
                    yield ids[: T + 1], int(nb[1 : T + 1].sum())
                    ids, nb = ids[T:], nb[T:]
            if group:
                new_ids, new_nb = _pack(self.tok.encode_docs(group), self.tok.eot_id)
                ids, nb = np.concatenate([ids, new_ids]), np.concatenate([nb, new_nb])
                while len(ids) >= T + 1:
                    produced = True
                    yield ids[: T + 1], int(nb[1 : T + 1].sum())
                    ids, nb = ids[T:], nb[T:]
            if not produced:
                raise ConfigError("data.source: the stream holds fewer tokens than one sequence (workload.seq_len + 1)")
            epoch += 1

    def _batches(self, epochs: int | None = None) -> Iterator[Batch]:
        g, rows, total = 0, [], 0
        for w, nbytes in self._windows(epochs):
            rows.append(w)
            total += nbytes
            if len(rows) == self.batch_size:
                yield Batch(torch.from_numpy(np.stack(rows).astype(np.int64)), total, g)
                g, rows, total = g + 1, [], 0
        if rows:
            yield Batch(torch.from_numpy(np.stack(rows).astype(np.int64)), total, g)

    def iter_batches(self, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        for b in self._batches():
            if b.index >= start and (b.index - start) % world == rank:
                yield b

    def batch(self, g: int) -> Batch:
        return next(self.iter_batches(g))

    def eval_batches(self, n: int) -> list[Batch]:
        out = []
        for b in self._batches(epochs=1):
            if len(out) == n:
                break
            out.append(Batch(b.tokens, b.nbytes, -1 - b.index))
        return out

    def token_counts(self, vocab_size: int, batches: int = 200) -> np.ndarray:
        counts = np.zeros(vocab_size, dtype=np.int64)
        for b in self._batches(epochs=1):
            if b.index >= batches:
                break
            counts += np.bincount(b.tokens[:, 1:].flatten().numpy(), minlength=vocab_size)[:vocab_size]
        return counts


Split = Synthetic | Packed | Streamed


@dataclass
class Data:
    tokenizer: Tokenizer | None  # None for synthetic data
    train: Split
    val: Split
    description: str  # one line for logs

    def unigram_bits_per_byte(self, batches: list[Batch]) -> float | None:
        """Bits per byte of the best context-free model: training-split token frequencies (add-one
        smoothed over the tokenizer's ids) scored on `batches`. The baseline a model must beat."""
        if self.tokenizer is None or not batches:
            return None
        V = self.tokenizer.vocab_size
        counts = self.train.token_counts(V)[:V].astype(np.float64) + 1.0
        logp = np.log2(counts / counts.sum())
        bits = sum(float(-logp[b.tokens[:, 1:].numpy()].sum()) for b in batches)
        return bits / sum(b.nbytes for b in batches)


def _documents_factory(cfg: TrialConfig) -> tuple[Callable[[int], Iterator[str]], bool, str]:
    """(epoch -> documents of the whole source, finite?, description)."""
    d = cfg.data
    kind, arg, config = parse_source(d.source)
    if kind == "corpus":
        docs = corpus_documents()
        return (lambda epoch: iter(docs)), True, f"corpus: Python's pydoc_data topics ({len(docs)} documents)"
    if kind == "text":
        files = _local_files(kind, arg)
        return (lambda epoch: _text_documents(files)), True, f"text: {len(files)} file(s) from {arg}"
    if kind == "parquet":
        files = _local_files(kind, arg)
        return (
            (lambda epoch: _parquet_documents(files, d.text_column, arg)),
            True,
            f"parquet: {len(files)} file(s) from {arg}",
        )
    assert kind == "hf"
    _hf_stream(arg, config, cfg.seed, 0, d.text_column)  # fail on a bad name before any work

    def stream(epoch: int) -> Iterator[str]:
        for row in _hf_stream(arg, config, cfg.seed, epoch, d.text_column):
            if d.text_column not in row:
                raise ConfigError(
                    f"data.text_column: no column {d.text_column!r} in hf:{arg}; columns: {', '.join(row)}"
                )
            yield row[d.text_column]

    return stream, False, f"hf: {arg}{':' + config if config else ''} (streamed)"


def _check_vocab(cfg: TrialConfig, tok: Tokenizer) -> None:
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than data.tokenizer {tok.spec!r} needs "
            f"({tok.vocab_size} ids); set model.vocab_size >= {tok.vocab_size}"
        )


def open_data(cfg: TrialConfig, batch_size: int | None = None) -> Data:
    """The train and held-out splits of the config's data; ConfigError (one line) on bad data input.

    Everything that can be wrong with the input (missing or empty files, unknown source, a tokenizer
    that does not load, a vocabulary the model cannot hold, too little text) is found here, before
    any training starts.
    """
    d, w = cfg.data, cfg.workload
    B, T = batch_size or w.batch_size, w.seq_len
    kind, _, _ = parse_source(d.source)
    if kind == "synthetic":
        return Data(
            None,
            Synthetic(cfg.model.vocab_size, T, B, cfg.seed),
            Synthetic(cfg.model.vocab_size, T, B, cfg.seed + 1),
            "synthetic: uniform random tokens",
        )
    tok = load_tokenizer(d.tokenizer)
    _check_vocab(cfg, tok)
    documents, finite, desc = _documents_factory(cfg)
    if not finite:
        frac = d.val_fraction

        def split(val: bool) -> Callable[[int], Iterator[str]]:
            def docs(epoch: int) -> Iterator[str]:
                for i, doc in enumerate(documents(epoch if not val else 0)):
                    if doc and (frac == 0 or held_out(i, frac) == val):
                        yield doc

            return docs

        return Data(tok, Streamed(split(False), tok, T, B), Streamed(split(True), tok, T, B), desc)

    docs = [doc for doc in documents(0) if doc]
    if not docs:
        raise ConfigError(f"data.source: {d.source}: no text in it")
    encoded = []
    for s in range(0, len(docs), 1024):
        encoded += tok.encode_docs(docs[s : s + 1024])
    if d.val_fraction == 0:
        train_ids, train_nb = _pack(encoded, tok.eot_id)
        val_ids, val_nb = train_ids, train_nb
    else:
        mask = [held_out(i, d.val_fraction) for i in range(len(encoded))]
        train_ids, train_nb = _pack([e for e, m in zip(encoded, mask) if not m], tok.eot_id)
        val_ids, val_nb = _pack([e for e, m in zip(encoded, mask) if m], tok.eot_id)
        if len(train_ids) < T + 1 or len(val_ids) < T + 1:  # too few documents to split by document
            ids, nb = _pack(encoded, tok.eot_id)
            if len(ids) < 2 * T + 2:
                raise ConfigError(
                    f"data.source: {d.source}: {len(ids) - 1} tokens, too few for a training and a held-out sequence "
                    f"of workload.seq_len {T}; use more text, a shorter workload.seq_len or data.val_fraction 0"
                )
            cut = len(ids) - max(T + 1, math.ceil(d.val_fraction * len(ids)))
            train_ids, train_nb, val_ids, val_nb = ids[: cut + 1], nb[: cut + 1], ids[cut:], nb[cut:]
            val_nb = val_nb.copy()
            val_nb[0] = 0  # the boundary token is a target of the training side only
    for name, ids in (("training", train_ids), ("held-out", val_ids)):
        if len(ids) < T + 1:
            raise ConfigError(
                f"data.source: {d.source}: the {name} split has {max(len(ids) - 1, 0)} tokens, fewer than "
                f"workload.seq_len ({T}); use more text, a shorter workload.seq_len or another data.val_fraction"
            )
    desc += f", {len(train_ids):,} training and {len(val_ids):,} held-out tokens ({tok.spec})"
    return Data(tok, Packed(train_ids, train_nb, T, B, cfg.seed), Packed(val_ids, val_nb, T, B, cfg.seed), desc)


# --- loading ------------------------------------------------------------------------------------


class _Sharded(torch.utils.data.IterableDataset):
    """Batches from `start` on; data-loader worker w of W yields g = start + w + k*W."""

    def __init__(self, split: Split, start: int):
        super().__init__()
        self.split, self.start = split, start

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        rank, world = (0, 1) if info is None else (info.id, info.num_workers)
        return self.split.iter_batches(self.start, rank, world)


def batches(split: Split, start: int = 0, workers: int = 0) -> Iterator[Batch]:
    """Training batches from global batch `start` on, in order, with `workers` loader processes."""
    if workers == 0:
        return split.iter_batches(start)
    loader = torch.utils.data.DataLoader(
        _Sharded(split, start), batch_size=None, num_workers=workers, collate_fn=lambda b: b, persistent_workers=False
    )
    return iter(loader)


def bits_per_byte(loss_nats: float, n_targets: int, nbytes: int | None) -> float | None:
    """Mean loss (nats/token) over n_targets tokens covering nbytes bytes -> bits per byte."""
    if not nbytes:
        return None
    return loss_nats * n_targets / math.log(2) / nbytes
