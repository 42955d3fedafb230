"""Tokenizer trainer and `bitnet158 tokenizer` CLI tests (small texts, a few seconds in all).

    python3 -m pytest -q tests/train/test_tokenizer_train.py
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import sys

import pytest

from bitnet158 import cli
from bitnet158.errors import BitNetError, TokenizerError
from bitnet158.tokenizer import Tokenizer
from bitnet158.train.tokenizer_train import DEFAULT_SPECIALS, train_bpe, train_bpe_from_texts

WORDS = ("the quick brown fox jumps over the lazy dog while seven wizards quietly hex "
         "a jovial judge and 1234 zebras; don't they'll we're It's naïve café 東京 🦙").split()
ROUNDTRIP = ["", "Hello, world!", "  two  spaces\n\nand\ttabs\r\n", "I'M don't", "12345678",
             "東京 🦙 😶‍🌫️ Straße", "<|eot_id|> literal", "unseen: ẞ ǅ ₿ 𝔘"]


def _corpus(n_docs: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 200))) + "\n" for _ in range(n_docs)]


@pytest.fixture(autouse=True)
def _keep_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:])  # cli.main rewrites sys.argv


def test_train_from_texts_loads_and_round_trips(tmp_path):
    out = train_bpe_from_texts(_corpus(), vocab_size=300, out_dir=tmp_path / "tok")
    tok = Tokenizer.from_pretrained(out)
    assert tok.vocab_size == 300
    assert [tok.token_to_id(s) for s in DEFAULT_SPECIALS] == [0, 1, 2, 3, 4]
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.stop_ids) == (0, 1, 4, {1, 4})
    for s in ROUNDTRIP:
        assert tok.decode(tok.encode(s)) == s
    # merges were learned: frequent words are single tokens (with their leading space)
    assert len(tok.encode(" the")) == 1 and len(tok.encode(" quick")) < len(" quick")
    ids = tok.encode_chat([{"role": "user", "content": "the fox"}])
    assert ids[0] == 0 and ids.count(0) == 1 and ids.count(4) == 1
    assert tok.render_chat([{"role": "user", "content": "the fox"}]) == \
        "<|begin_of_text|>User: the fox<|eot_id|>Assistant: "


def test_training_is_deterministic(tmp_path):
    a = train_bpe_from_texts(_corpus(), 300, tmp_path / "a")
    b = train_bpe_from_texts(_corpus(), 300, tmp_path / "b")
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_custom_specials_and_template(tmp_path):
    out = train_bpe_from_texts(_corpus(10), 280, tmp_path / "tok", specials=["<pad>", "<s>", "</s>"],
                               bos_token="<s>", eos_token="</s>", chat_template="{{ messages[0]['content'] }}")
    tok = Tokenizer.from_pretrained(out)
    assert (tok.token_to_id("<pad>"), tok.bos_id, tok.eos_id, tok.eot_id) == (0, 1, 2, None)
    assert tok.stop_ids == {2}
    assert tok.encode_chat([{"role": "user", "content": "fox"}]) == [1, *tok.encode("fox")]


def test_train_from_files_txt_gz_jsonl(tmp_path):
    docs = _corpus(12)
    (tmp_path / "a.txt").write_text(docs[0] + docs[1])
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[2] + docs[3])
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[4:])))
    out = train_bpe([tmp_path / "a.txt", tmp_path / "b.txt.gz", tmp_path / "c.jsonl"], 300, tmp_path / "tok")
    tok = Tokenizer.from_pretrained(out)
    assert tok.vocab_size == 300 and tok.decode(tok.encode(docs[5])) == docs[5]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(BitNetError, match="bad.jsonl:1"):
        train_bpe([tmp_path / "bad.jsonl"], 300, tmp_path / "tok2")


def test_gutenberg_licence_is_stripped(tmp_path):
    licence = "Zqxj Project Gutenberg licence zqxjzqxj. " * 400
    book = ("The Project Gutenberg EBook of Foxes\r\n" + licence + "\r\n*** START OF THIS PROJECT GUTENBERG "
            "EBOOK FOXES ***\r\n" + "".join(_corpus(20)) + "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK FOXES ***"
            "\r\n" + licence)
    (tmp_path / "pg1.txt").write_text(book)
    stripped = Tokenizer.from_pretrained(train_bpe([tmp_path / "pg1.txt"], 300, tmp_path / "s"))
    kept = Tokenizer.from_pretrained(train_bpe([tmp_path / "pg1.txt"], 300, tmp_path / "k", strip_gutenberg=False))
    assert len(kept.encode(" zqxjzqxj")) == 1 and len(stripped.encode(" zqxjzqxj")) > 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=200), "at least 261"),
    (dict(specials=["<a>", "<a>"]), "distinct"),
    (dict(bos_token="<|nope|>"), "bos_token"),
    (dict(min_frequency=0), "min_frequency"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    args = dict(vocab_size=300, out_dir=tmp_path / "t") | kwargs
    with pytest.raises(TokenizerError, match=match):
        train_bpe_from_texts(_corpus(2), **args)


def test_empty_inputs(tmp_path):
    with pytest.raises(TokenizerError, match="no training text"):
        train_bpe_from_texts([], 300, tmp_path / "t")
    with pytest.raises(TokenizerError, match="not a str"):
        train_bpe_from_texts([b"bytes"], 300, tmp_path / "t")
    with pytest.raises(TokenizerError, match="no input"):
        train_bpe([], 300, tmp_path / "t")


def test_cli_train_encode_convert(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("".join(_corpus(20)))
    rc = cli.main(["tokenizer", "train", "--input", str(tmp_path / "corpus.txt"), "--vocab-size", "300",
                   "--out", str(tmp_path / "tok")])
    assert rc == 0 and "vocab 300 (bos 0, eos 1, eot 4)" in capsys.readouterr().out
    tok = Tokenizer.from_pretrained(tmp_path / "tok")

    assert cli.main(["tokenizer", "encode", str(tmp_path / "tok"), "the lazy 🦙", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == tok.encode("the lazy 🦙")
    assert cli.main(["tokenizer", "encode", str(tmp_path / "tok"), "--chat", "hi"]) == 0
    assert "'<|eot_id|>'" in capsys.readouterr().out

    # the trained vocabulary as a tiktoken rank file, converted back: same ids
    ranks = tmp_path / "tok.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(tok.token_bytes(i)).decode()} {i - 5}\n" for i in range(5, 300)))
    assert cli.main(["tokenizer", "convert-tiktoken", str(ranks), str(tmp_path / "conv"),
                     "--num-special", "10"]) == 0
    conv = Tokenizer.from_pretrained(tmp_path / "conv")
    assert conv.vocab_size == 305 and conv.bos_id == 295 and conv.eot_id == 304
    for s in ROUNDTRIP:
        assert [i + 5 for i in conv.encode(s)] == tok.encode(s)

    # user errors: clean message, exit code 1
    assert cli.main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                     "--out", str(tmp_path / "x")]) == 1
    assert "missing.txt" in capsys.readouterr().err
