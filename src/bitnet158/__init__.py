"""bitnet158: run, train and convert native 1.58-bit (ternary) LLMs of the BitNet b1.58 family.

    import bitnet158
    model = bitnet158.load("path/to/bitnet-b1.58-2B-4T")      # HF folder or hub id
    tok = bitnet158.Tokenizer.from_pretrained("path/to/bitnet-b1.58-2B-4T")
    print(bitnet158.generate_text(model, tok, "The capital of France is", max_new_tokens=16))
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import BitNetError, CheckpointError, ConfigError, ContextLengthError, TokenizerError

__version__ = "0.1.0"

_LAZY = {
    "load": ("bitnet158.checkpoint", "load"),
    "save": ("bitnet158.checkpoint", "save"),
    "Transformer": ("bitnet158.model", "Transformer"),
    "Tokenizer": ("bitnet158.tokenizer", "Tokenizer"),
    "generate": ("bitnet158.engine", "generate"),
    "generate_text": ("bitnet158.engine", "generate_text"),
    "SamplingParams": ("bitnet158.engine", "SamplingParams"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'bitnet158' has no attribute {name!r}")


__all__ = ["ModelConfig", "BitNetError", "CheckpointError", "ConfigError", "ContextLengthError",
           "TokenizerError", *_LAZY]
