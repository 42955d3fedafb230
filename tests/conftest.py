"""Shared pytest fixtures.

- ``shared_data``: Path of ``../shared/data`` (next to the repository); the test is skipped when
  it is absent (e.g. a bare clone).
- ``tiny_folder``: a factory writing a random model as a Hugging Face folder under ``tmp_path``:
  ``tiny_folder(cfg="tiny", layout="packed", seed=0, tokenizer_dir=None, name=None, **kw) -> Path``
  (``cfg``: a preset/size name of :mod:`bitnet158.random_model` or a ModelConfig; ``layout``:
  "packed" | "master" | "bitlinear"; ``kw`` goes to ``write_random_folder``).
- The whole session runs torch on one thread (restored at the end): the tests use tiny models,
  which gain nothing from more threads and lose a lot when the machine is busy (spinning threads).
  ``one_thread`` does the same for one test and is kept for tests that ask for it by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA.resolve()


@pytest.fixture
def tiny_folder(tmp_path):
    from bitnet158.config import ModelConfig
    from bitnet158.random_model import write_random_folder

    count = [0]

    def make(cfg="tiny", layout: str = "packed", seed: int = 0, tokenizer_dir=None,
             name: str | None = None, **kw) -> Path:
        count[0] += 1
        label = cfg if isinstance(cfg, str) else "model"
        if isinstance(cfg, ModelConfig):
            cfg = cfg.replace()
        path = tmp_path / (name or f"{label}-{layout}-{seed}-{count[0]}")
        return write_random_folder(path, cfg, layout=layout, seed=seed, tokenizer_dir=tokenizer_dir, **kw)

    return make


@pytest.fixture
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _torch_one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
