"""Sampling parameters of a generation request, and the defaults a model folder suggests for them.

    from bitnet158.sampling_params import SamplingParams, generation_defaults
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=0, max_new_tokens=64)   # validated
    generation_defaults("path/to/model")   # {"temperature": 0.6, "top_p": 0.9, ...} from generation_config.json

No torch here: both samplers use these, the torch one (:mod:`bitnet158.engine.sampling`, which
re-exports the names) and the numpy one of the torch-free CPU engine
(:mod:`bitnet158.kernels.cpu.lite_generate`). Tests: tests/engine/test_sampling.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from .errors import BitNetError


class GenerationError(BitNetError, ValueError):
    """A bad generation request: a sampling parameter out of range, an empty prompt, a bad token id."""


SamplingError = GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature: 0 = greedy; > 0 divides the logits.   top_k: keep the k most likely (0 = all).
    top_p: nucleus mass to keep, in (0, 1] (1 = all).    repetition_penalty: >= 1 discourages tokens
    already in the prompt or output (HF semantics: positive logits divided, negative multiplied).
    seed: makes sampling reproducible (None = fresh randomness).   max_new_tokens: upper bound on
    generated tokens (>= 1). stop_ids: token ids that end generation (not yielded); None = the
    model config's eos ids (text helpers default to ``tokenizer.stop_ids`` instead).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop_ids: frozenset[int] | None = None

    def __post_init__(self) -> None:
        def bad(name: str, want: str):
            raise GenerationError(f"SamplingParams.{name}={getattr(self, name)!r}: {want}")

        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")
        for name in ("top_k", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "must be an integer")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 = disabled)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1] (1 = disabled)")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 = disabled)")
        if self.max_new_tokens < 1:
            bad("max_new_tokens", "must be >= 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "must be an integer or None")
        if self.stop_ids is not None:
            if isinstance(self.stop_ids, (str, bytes)) or not isinstance(self.stop_ids, Iterable):
                bad("stop_ids", "must be a collection of token ids")
            ids = frozenset(self.stop_ids)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                bad("stop_ids", "must contain non-negative integer token ids")
            object.__setattr__(self, "stop_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def argmax(self) -> bool:
        """Greedy without a repetition penalty: the next id is the argmax of the raw logits, so it
        can be taken on the device for many rows or steps at once."""
        return self.greedy and self.repetition_penalty == 1.0

    def replace(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


def generation_defaults(folder) -> dict:
    """Sampling defaults from a model folder's ``generation_config.json`` (empty if it has none).

    Keys as the CLI and server name them: temperature, top_p, top_k, repetition_penalty,
    max_tokens. ``do_sample: false`` means greedy (temperature 0).
    """
    p = Path(folder) / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        g = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(g, dict):
        return {}
    out: dict = {}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        v = g.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = int(v) if key == "top_k" else float(v)
    if g.get("do_sample") is False:
        out["temperature"] = 0.0
    if isinstance(g.get("max_new_tokens"), int) and g["max_new_tokens"] > 0:
        out["max_tokens"] = g["max_new_tokens"]
    return out


__all__ = ["SamplingParams", "GenerationError", "SamplingError", "generation_defaults"]
