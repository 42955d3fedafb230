"""Checks of :mod:`bitnet158.engine.runner` that need no model run: the KV-cache memory check.

    python3 -m pytest -q tests/engine/test_runner.py
"""

import pytest
import torch

from bitnet158.config import ModelConfig
from bitnet158.engine.runner import check_cache_fits
from bitnet158.errors import ConfigError


def test_a_cache_that_cannot_fit_is_a_clear_error(monkeypatch):
    cfg = ModelConfig.from_name("2b4t")          # 30 layers, 5 KV heads of 128
    check_cache_fits(cfg, 64, 4096, torch.bfloat16, "cpu")       # the host is not checked
    free = 8 * 10**9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 24 * 10**9))
    check_cache_fits(cfg, 8, 4096, torch.bfloat16, "cuda:0")     # 2.52 GB
    with pytest.raises(ConfigError, match=r"serve: a KV cache of 64 rows x 4096 positions needs 20\.13 GB, "
                                          r"but 8\.00 of 24\.00 GB are free on cuda:0; .*--max-batch"):
        check_cache_fits(cfg, 64, 4096, torch.bfloat16, torch.device("cuda", 0), "serve")
