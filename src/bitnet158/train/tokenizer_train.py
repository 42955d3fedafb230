"""Train a small byte-level BPE tokenizer (Llama-3 split regex + byte level) with the `tokenizers` library.

    from bitnet158.train.tokenizer_train import train_bpe
    train_bpe(["../shared/data/gutenberg/texts"], vocab_size=16384, out_dir="tok16k")
    # or: bitnet158 tokenizer train --input ../shared/data/gutenberg/texts --vocab-size 16384 --out tok16k

For small models, where a 128k vocabulary would dominate the parameters. The result has the same
pipeline as the Llama-3 tokenizer (so the same chat template and special-token names work) and loads
with `Tokenizer.from_pretrained`. Special tokens come FIRST: with the default list
`<|begin_of_text|>` = 0, `<|end_of_text|>` = 1, `<|start_header_id|>` = 2, `<|end_header_id|>` = 3,
`<|eot_id|>` = 4 (ModelConfig "tiny" uses bos 0, eos 1), then the 256 byte tokens, then merges.

Inputs: .txt/.md (optionally .gz), .jsonl (field `text`, or `text_key`), .parquet, or directories of
them, read by `bitnet158.train.text.iter_documents` (Project Gutenberg licence text stripped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from ..chat_template import DEFAULT_CHAT_TEMPLATE
from ..errors import TokenizerError
from ..tokenizer_build import (BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, LLAMA3_PATTERN, pipeline, post_processor,
                               tokenizer_config)

DEFAULT_SPECIALS = [BOS_TOKEN, EOS_TOKEN, "<|start_header_id|>", "<|end_header_id|>", EOT_TOKEN]
_PIECE_CHARS = 1 << 20  # documents are fed in pieces of about this many characters (cut at newlines)


def _pieces(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """Split documents into pieces of ~1M characters at line ends, stopping after `max_chars`."""
    total = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"training text #{i} is a {type(text).__name__}, not a str")
        if max_chars is not None:
            text = text[:max(0, max_chars - total)]
        pos = 0
        while pos < len(text):
            end = min(len(text), pos + _PIECE_CHARS)
            if end < len(text):
                nl = text.rfind("\n", pos, end)
                end = nl + 1 if nl > pos else end
            yield text[pos:end]
            pos = end
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def train_bpe_from_texts(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                         specials: list[str] | None = None, chat_template: str = DEFAULT_CHAT_TEMPLATE,
                         min_frequency: int = 2, bos_token: str | None = BOS_TOKEN,
                         eos_token: str | None = EOS_TOKEN, pattern: str = LLAMA3_PATTERN,
                         max_chars: int | None = None, show_progress: bool = False) -> Path:
    """Train on an iterable of strings; write tokenizer.json + tokenizer_config.json to `out_dir`."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    specials = list(DEFAULT_SPECIALS if specials is None else specials)
    if len(set(specials)) != len(specials) or not all(isinstance(s, str) and s for s in specials):
        raise TokenizerError(f"special tokens must be distinct non-empty strings, got {specials}")
    for name, tok_ in (("bos_token", bos_token), ("eos_token", eos_token)):
        if tok_ is not None and tok_ not in specials:
            raise TokenizerError(f"{name} {tok_!r} is not among the special tokens {specials}")
    floor = len(specials) + 256
    if not isinstance(vocab_size, int) or vocab_size < floor:
        raise TokenizerError(f"vocab_size must be at least {floor} ({len(specials)} specials + 256 bytes), "
                             f"got {vocab_size}")
    if min_frequency < 1:
        raise TokenizerError(f"min_frequency must be >= 1, got {min_frequency}")

    tok = Tokenizer(BPE(fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer, tok.decoder = pipeline(pattern)
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                         special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    n_pieces = 0

    def counted():
        nonlocal n_pieces
        for p in _pieces(texts, max_chars):
            n_pieces += 1
            yield p

    tok.train_from_iterator(counted(), trainer=trainer)
    if n_pieces == 0:
        raise TokenizerError("no training text: the inputs are empty")
    bos = (bos_token, tok.token_to_id(bos_token)) if bos_token is not None else None
    tok.post_processor = post_processor(bos)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = tokenizer_config(bos_token=bos_token, eos_token=eos_token, chat_template=chat_template)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return out


def train_bpe(inputs: Iterable[str | os.PathLike], vocab_size: int, out_dir: str | os.PathLike,
              specials: list[str] | None = None, chat_template: str = DEFAULT_CHAT_TEMPLATE,
              text_key: str | None = None, strip_gutenberg: bool = True, **kwargs) -> Path:
    """Train on files / directories (.txt, .md, .gz, .jsonl, .parquet); see `train_bpe_from_texts`."""
    from .text import iter_documents

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise TokenizerError("no input files given")
    docs = (text for _, text in iter_documents(inputs, text_key=text_key, gutenberg=strip_gutenberg))
    return train_bpe_from_texts(docs, vocab_size, out_dir, specials=specials, chat_template=chat_template,
                                **kwargs)
