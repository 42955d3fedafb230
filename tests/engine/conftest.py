"""Fixtures of the engine tests: tiny random models built in code (fp32, BitLinear and packed)."""

from __future__ import annotations

import pytest
import torch

from bitnet158.config import ModelConfig
from bitnet158.model import Transformer, init_weights


def tiny_model(packed: bool = False, seed: int = 0, vocab_size: int = 512, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", vocab_size=vocab_size, dtype="float32", **overrides)
    m = init_weights(Transformer(cfg), std=0.3).float().eval()
    if packed:
        m.pack()
    return m


@pytest.fixture(scope="session")
def model() -> Transformer:
    return tiny_model()


@pytest.fixture(scope="session")
def packed_model() -> Transformer:
    return tiny_model(packed=True, seed=1)


# ---------------------------------------------------------------- a tiny model folder with a tokenizer

BYTE_VOCAB = 256            # one token per byte: every multi-byte character spans several tokens
N_SPECIAL = 16              # Llama-3 names: bos = 256, eos = 257, eot = 265


def write_byte_tokenizer(folder) -> None:
    """A byte-level BPE tokenizer folder (256 byte tokens + 16 Llama-3 specials, 2B4T template)."""
    import json

    from bitnet158.tokenizer_build import (assemble_byte_level, bytes_to_unicode, llama3_special_tokens,
                                           tokenizer_config)
    folder.mkdir(parents=True, exist_ok=True)
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    text = assemble_byte_level(vocab, [], llama3_special_tokens(N_SPECIAL))
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    cfg = tokenizer_config()
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A packed tiny model folder (config, safetensors, tokenizer) written by bitnet158.checkpoint."""
    checkpoint = pytest.importorskip("bitnet158.checkpoint")
    root = tmp_path_factory.mktemp("tiny-chat")
    write_byte_tokenizer(root / "tok")
    m = tiny_model(seed=5, vocab_size=BYTE_VOCAB + N_SPECIAL, bos_token_id=256,
                   eos_token_id=[257, 265], max_position_embeddings=192)
    checkpoint.save(m, root / "model", layout="packed", tokenizer_dir=root / "tok")
    return root / "model"
