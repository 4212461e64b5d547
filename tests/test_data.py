"""Data: sources, packing with end-of-text, held-out split, shuffling, sharding, byte accounting, bad input."""

import math
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.support import TEXT, cfg, train_tokenizer
from txlab.config import ConfigError
from txlab.data.loader import Packed, Streamed, _pack, batches, corpus_documents, open_data
from txlab.data.tokenizer import ByteTokenizer, load_tokenizer
from txlab.results.columns import column_names
from txlab.trial import run_trial

pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def test_corpus_bytes_add_up_and_documents_are_split_off():
    docs = corpus_documents()
    assert len(docs) > 100 and sum(len(d) for d in docs) > 300_000
    d = open_data(cfg(data__source="corpus"))
    assert d.tokenizer.vocab_size == 257 and d.tokenizer.eot_id == 256
    ids = np.concatenate([d.train.ids, d.val.ids])
    nb = np.concatenate([d.train.nbytes, d.val.nbytes])
    assert (ids == 256).sum() == len(docs)  # one end-of-text after every document
    assert nb.sum() == sum(len(x.encode()) for x in docs) and (nb[ids == 256] == 0).all()
    assert 0.02 < len(d.val.ids) / len(ids) < 0.1  # val_fraction 0.05 of the documents
    b = d.train.batch(3)
    assert b.tokens.shape == (8, 65) and b.nbytes == int((b.tokens[:, 1:] != 256).sum())


def test_windows_cover_the_stream_and_shuffle_by_seed():
    ids = np.arange(1000, dtype=np.int32)
    p = Packed(ids, np.ones_like(ids), seq_len=10, batch_size=4, seed=0)
    assert p.n_windows == 99  # windows [10i, 10i + 11): every token after the first is a target once
    epoch = torch.cat([p.batch(g).tokens for g in range(24)])  # 96 of the 99 windows of epoch 0
    assert len({tuple(t.tolist()) for t in epoch}) == 96  # no window twice within an epoch
    assert ((epoch[:, 1:] - epoch[:, :-1]) == 1).all() and (
        epoch[:, 0] % 10 == 0
    ).all()  # each window is a contiguous slice
    assert not torch.equal(epoch[:, 0], torch.sort(epoch[:, 0]).values)  # shuffled
    again = Packed(ids, np.ones_like(ids), 10, 4, seed=0)
    other = Packed(ids, np.ones_like(ids), 10, 4, seed=1)
    assert torch.equal(torch.cat([again.batch(g).tokens for g in range(24)]), epoch)
    assert not torch.equal(torch.cat([other.batch(g).tokens for g in range(24)]), epoch)
    nxt = torch.cat([p.batch(g).tokens for g in range(24, 49)])  # the last 3 of epoch 0, then 97 of epoch 1
    assert len({tuple(t.tolist()) for t in torch.cat([epoch, nxt[:3]])}) == 99
    assert len({tuple(t.tolist()) for t in nxt[3:]}) == 97


def test_workers_shard_without_overlap_and_keep_the_order():
    d = open_data(cfg(data__source="corpus"))
    want = [d.train.batch(g).tokens for g in range(5, 13)]
    shards = [list(zip(range(4), d.train.iter_batches(5, rank, 2))) for rank in range(2)]
    got = {b.index for s in shards for _, b in s}
    assert got == set(range(5, 13))  # every batch once, none twice
    loaded = [b for _, b in zip(range(8), batches(d.train, 5, workers=2))]
    assert [b.index for b in loaded] == list(range(5, 13))
    assert all(torch.equal(a.tokens, w) for a, w in zip(loaded, want))


def test_text_files_through_datasets_with_a_tokenizer_trained_on_the_fly(tmp_path, tokenizer_dir):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(TEXT * (40 + i))
    c = cfg(
        data__source=f"text:{tmp_path}/*.txt",
        data__tokenizer=f"hf:{tokenizer_dir}",
        model__vocab_size=320,
        workload__seq_len=32,
    )
    d = open_data(c)
    tok = d.tokenizer
    assert tok.vocab_size == 320 and tok.decode(tok.encode(TEXT)) == TEXT
    total = sum(len((TEXT * (40 + i)).encode()) for i in range(3))
    ids = np.concatenate([d.train.ids, d.val.ids])
    nb = np.concatenate([d.train.nbytes, d.val.nbytes])
    assert (ids == tok.eot_id).sum() == 3 and nb.sum() == total  # multi-byte characters counted exactly
    assert len(ids) < total  # BPE merges: fewer tokens than bytes
    with pytest.raises(
        ConfigError, match=r"model.vocab_size: 256 is smaller than data.tokenizer .* set model.vocab_size >= 320"
    ):
        open_data(
            cfg(data__source=f"text:{tmp_path}/*.txt", data__tokenizer=f"hf:{tokenizer_dir}", model__vocab_size=256)
        )


def test_parquet_rows_are_documents(tmp_path):
    pq.write_table(pa.table({"body": [TEXT * 5, TEXT * 7, "x" * 300], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    d = open_data(cfg(data__source=f"parquet:{tmp_path}/a.parquet", data__text_column="body", data__val_fraction=0.0))
    assert (d.train.ids == 256).sum() == 3 and d.train.nbytes.sum() == len((TEXT * 12).encode()) + 300
    with pytest.raises(ConfigError, match="data.text_column: no column 'text'.*columns: body, n"):
        open_data(cfg(data__source=f"parquet:{tmp_path}/a.parquet"))


def test_a_train_trial_row_carries_loss_and_bits_per_byte():
    row = run_trial(cfg(data__source="corpus", workload__steps=1, workload__warmup_steps=0, workload__batch_size=2))
    assert row["status"] == "ok", row["error"]
    assert set(row) == set(column_names()) and row["model.vocab_size"] == 257 and row["data.source"] == "corpus"
    assert math.isfinite(row["loss"]) and 5.0 < row["loss"] < 6.5  # about ln 257 untrained
    # bytes tokenizer: one byte per target except end-of-text, so bits/byte is at least loss / ln 2
    assert row["loss"] / math.log(2) <= row["bits_per_byte"] < row["loss"] / math.log(2) * 1.05
    synthetic = run_trial(cfg(workload__steps=1, workload__warmup_steps=0, workload__batch_size=2))
    assert synthetic["bits_per_byte"] is None and math.isfinite(synthetic["loss"])


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"data.source": "text:/no/such/file.txt"}, "data.source: text:/no/such/file.txt: no such file"),
        ({"data.source": "text:/no/such/*.txt"}, "matches no file"),
        ({"data.source": "EMPTY"}, "file is empty"),
        ({"data.source": "webtext"}, "data.source: unknown source 'webtext'; allowed: synthetic, corpus"),
        ({"data.tokenizer": "sentencepiece"}, "data.tokenizer: unknown tokenizer 'sentencepiece'"),
        (
            {"data.source": "corpus", "data.tokenizer": "hf:/no/such/dir"},
            "data.tokenizer: /no/such/dir: no such tokenizer directory",
        ),
        (
            {"data.source": "corpus", "data.tokenizer": "hf:nobody-here/no-such-tokenizer"},
            "data.tokenizer: cannot load 'hf:nobody-here/no-such-tokenizer' here",
        ),
        (
            {"data.source": "corpus", "model.vocab_size": 256},
            "model.vocab_size: 256 is too small for data.tokenizer 'bytes'",
        ),
        ({"data.source": "corpus", "workload.seq_len": 300_000}, "too few for a training and a held-out sequence"),
    ],
)
def test_bad_data_input_is_one_config_error(over, needle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    over = {k: (f"text:{empty}" if v == "EMPTY" else v) for k, v in over.items()}
    with pytest.raises(ConfigError) as e:
        open_data(cfg(**{k.replace(".", "__"): v for k, v in over.items()}))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_exits_2_on_bad_data_before_training(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, needle in [
        (
            ["train", "examples/debug.yaml", "--set", "data.source=text:/no/such.txt", "--out", str(tmp_path / "r")],
            "no such file",
        ),
        (
            [
                "run",
                "examples/debug.yaml",
                "--set",
                "data.source=corpus",
                "--set",
                "data.tokenizer=hf:nobody-here/none",
            ],
            "cannot load",
        ),
        (
            ["run", "examples/debug.yaml", "--set", "data.source=hf:nobody-here/no-such-dataset"],
            "data.source: cannot open hf:nobody-here",
        ),
    ]:
        r = subprocess.run([sys.executable, "-m", "txlab", *args], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("bytes")
    assert tok.decode(tok.encode(TEXT)) == TEXT
    ((ids, nb),) = tok.encode_docs([TEXT])
    assert len(ids) == nb.sum() == len(TEXT.encode())


def test_streamed_source_packs_and_shards_like_the_in_memory_one():
    docs = corpus_documents()[:40]
    tok = ByteTokenizer()
    ids, nb = _pack(tok.encode_docs(docs), tok.eot_id)
    s = Streamed(lambda epoch: iter(docs), tok, seq_len=64, batch_size=4)
    for _, b in zip(range(6), s.iter_batches(0)):
        for r in range(4):
            w = b.index * 4 + r
            assert b.tokens[r].tolist() == ids[w * 64 : w * 64 + 65].tolist()
        assert b.nbytes == int(
            sum(nb[(b.index * 4 + r) * 64 + 1 : (b.index * 4 + r) * 64 + 65].sum() for r in range(4))
        )
    assert [b.index for _, b in zip(range(3), s.iter_batches(2, 1, 3))] == [3, 6, 9]
    assert len(s.eval_batches(3)) == 3
