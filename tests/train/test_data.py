"""Shards and the mixture sampler: round trip, document separators, val split, determinism, resume."""

import gzip
import json

import numpy as np
import pytest
from conftest import SHARED, synthetic_corpus

from bitnet158.train.data import MixtureSampler, TokenShards, build_shards, read_index, val_rows
from bitnet158.train.text import DataError, iter_documents, strip_gutenberg


def test_shards_round_trip_with_separators(shards_dir, tokenizer_dir):
    from tokenizers import Tokenizer
    idx = read_index(shards_dir)
    assert idx["dtype"] == "uint16" and idx["vocab_size"] == 320
    tr, va = TokenShards(shards_dir, "train"), TokenShards(shards_dir, "val")
    assert tr.tokens == idx["splits"]["train"]["tokens"] and va.tokens > 0
    assert idx["splits"]["train"]["docs"] + idx["splits"]["val"]["docs"] == 40
    ids = np.concatenate(tr.arrays)
    bos, eos = idx["bos_id"], idx["eos_id"]
    assert ids[0] == bos and ids[-1] == eos
    assert (ids == eos).sum() == idx["splits"]["train"]["docs"]      # one separator per document
    # the first document decodes back to its text
    first_end = int(np.argmax(ids == eos))
    tok = Tokenizer.from_file(str(shards_dir / "tokenizer" / "tokenizer.json"))
    text = tok.decode(ids[1:first_end].tolist())
    assert text.strip() in [d.strip() for d in synthetic_corpus()]
    # validation holds whole documents of its own
    v = np.concatenate(va.arrays)
    assert v[0] == bos and v[-1] == eos


def test_single_document_tail_goes_to_val(tmp_path, tokenizer_dir):
    text = " ".join(synthetic_corpus(5))
    idx = build_shards([("one", text)], tokenizer_dir, tmp_path / "s", val_fraction=0.2, progress=False)
    tr, va = idx["splits"]["train"]["tokens"], idx["splits"]["val"]["tokens"]
    assert 0.15 < va / (tr + va) < 0.25


def test_sampler_epochs_cover_every_window_once(shards_dir):
    tr = TokenShards(shards_dir, "train")
    s = MixtureSampler({"a": tr}, [{"a": 1.0}], seq_len=16, seed=3)
    n = tr.num_windows(16)
    rows = s.next_rows(n)
    assert rows.shape == (n, 17)
    assert s.epochs()["a"] == 1.0
    every = tr.windows(np.arange(n), 16)
    assert sorted(map(tuple, rows)) == sorted(map(tuple, every))   # a permutation of all windows
    assert not np.array_equal(rows, every)
    # overlapping by one token: window i's last token is window i+1's first
    w = tr.windows(np.array([0, 1]), 16)
    assert w[0, -1] == w[1, 0]


def test_sampler_resume_and_rank_slices_are_exact(shards_dir):
    tr = TokenShards(shards_dir, "train")
    stages = [{"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5}]

    def make():
        return MixtureSampler({"a": tr, "b": tr}, stages, seq_len=8, seed=1)

    s1 = make()
    full = [s1.next_rows(6, stage=1 + (k >= 3)) for k in range(6)]
    s2 = make()
    for k in range(2):
        s2.next_rows(6, stage=1)
    state = json.loads(json.dumps(s2.state_dict()))
    s3 = make()
    s3.load_state_dict(state)
    for k in range(2, 6):
        np.testing.assert_array_equal(s3.next_rows(6, stage=1 + (k >= 3)), full[k])
    # two ranks each taking their half draw the same rows as one process
    r0, r1 = make(), make()
    for k in range(6):
        a = r0.next_rows(6, 1 + (k >= 3), rows=(0, 3))
        b = r1.next_rows(6, 1 + (k >= 3), rows=(3, 6))
        np.testing.assert_array_equal(np.concatenate([a, b]), full[k])
    assert s1.cursor["b"] > 0 and make().next_rows(4, 1) is not None   # stage 2 draws from b


def test_bad_inputs_name_the_problem(tmp_path, shards_dir):
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents([tmp_path / "missing.txt"]))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    with pytest.raises(DataError, match="unknown source"):
        MixtureSampler({"a": TokenShards(shards_dir)}, [{"zz": 1.0}], seq_len=8)
    assert val_rows(TokenShards(shards_dir, "val"), 8, 4).shape == (4, 9)


def test_jsonl_and_gzip_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello\\r\\nworld"}\n\n"plain string"\n')
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("\ufeffgzipped text")
    docs = [t for _, t in iter_documents([tmp_path])]
    assert docs == ["hello\nworld", "plain string", "gzipped text"]


def test_strip_gutenberg_markers():
    raw = ("\ufeffThe Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "Body line.\r\n\r\nEnd of the Project Gutenberg EBook of X\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence\r\n")
    assert strip_gutenberg(raw) == "Body line."
    assert strip_gutenberg("no markers\r\n") == "no markers"


@pytest.mark.skipif(not (SHARED / "data" / "gutenberg" / "texts").is_dir(), reason="../shared data absent")
def test_real_gutenberg_books_are_stripped():
    texts = sorted((SHARED / "data" / "gutenberg" / "texts").glob("*.txt.gz"))[:3]
    for _, body in iter_documents(texts):
        assert "PROJECT GUTENBERG" not in body[:2000].upper()
        assert "PROJECT GUTENBERG" not in body[-2000:].upper()
        assert len(body) > 10000 and "\r" not in body


def test_data_command(tmp_path, corpus_dir, tokenizer_dir, capsys):
    import sys

    from bitnet158 import cli
    argv = sys.argv[:]
    try:
        rc = cli.main(["data", "--input", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out",
                       str(tmp_path / "s"), "--val-fraction", "0.1", "--quiet"])
    finally:
        sys.argv = argv
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["train_docs"] + line["val_docs"] == 40 and line["val_tokens"] > 0
    assert (tmp_path / "s" / "tokenizer" / "tokenizer.json").is_file()
