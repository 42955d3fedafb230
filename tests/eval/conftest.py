"""Fixtures of the eval tests: a tiny fp32 packed model, the tiny test tokenizer, a model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitnet158.config import ModelConfig
from bitnet158.model import Transformer, init_weights

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOKENIZER = ASSETS / "tokenizer-tiny"
SHARED_EVAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "eval"


def tiny_model(seed: int = 0, max_pos: int = 256) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", vocab_size=512, bos_token_id=0, eos_token_id=1, dtype="float32",
                                max_position_embeddings=max_pos)
    return init_weights(Transformer(cfg), std=0.3).eval().pack()


@pytest.fixture(scope="session")
def model() -> Transformer:
    return tiny_model()


@pytest.fixture(scope="session")
def tokenizer():
    from bitnet158.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="session")
def folder(tmp_path_factory, model) -> Path:
    from bitnet158.checkpoint import save
    path = tmp_path_factory.mktemp("eval") / "tiny"
    save(model, path, layout="packed", tokenizer_dir=TOKENIZER, dtype="float32")
    return path
