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


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def model() -> Transformer:
    return tiny_model()


@pytest.fixture(scope="session")
def packed_model() -> Transformer:
    return tiny_model(packed=True, seed=1)
