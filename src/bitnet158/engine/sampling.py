"""Sampling parameters and the next-token sampler (greedy, temperature, top-k, top-p, repetition penalty).

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=0, max_new_tokens=64)
    sampler = Sampler(params, vocab_size=V, prompt_ids=prompt)     # one per request
    tok = sampler(logits)                                           # logits float32 [V] -> int

The order of the logit transforms is Hugging Face's: repetition penalty, temperature, top-k, top-p.
``temperature == 0`` means greedy (argmax after the repetition penalty). Each request owns its own
``torch.Generator`` (seeded from ``seed`` when given), so concurrent requests never share RNG state
and a seeded request is reproducible whatever else runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import torch

from ..errors import BitNetError


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

    def replace(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


# ---------------------------------------------------------------- logit transforms (pure functions)

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [..., V]; seen bool [..., V] (token occurred in prompt or output). Returns new logits."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass >= p.

    A token is dropped when the mass of the tokens strictly more likely than it already reaches p;
    the most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs                    # [..., V]
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """All transforms in HF order; returns the logits (before softmax) to sample from."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_mask(logits, params.top_k)
    return top_p_mask(logits, params.top_p)


# ---------------------------------------------------------------- per-request sampler

class Sampler:
    """Stateful sampler of one request: its RNG and the set of tokens seen so far (prompt + output)."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Iterable[int] = (),
                 device: torch.device | str = "cpu"):
        self.params = params
        self.vocab_size = vocab_size
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # [V]
            ids = [i for i in prompt_ids if 0 <= i < vocab_size]
            if ids:
                self.seen[torch.tensor(ids, device=device)] = True

    def observe(self, token: int) -> None:
        """Record a generated token (the repetition penalty then applies to it)."""
        if self.seen is not None and 0 <= token < self.vocab_size:
            self.seen[token] = True

    def __call__(self, logits: torch.Tensor) -> int:
        """logits float32 [V] (row of the last position) -> next token id; records it as seen."""
        x = process_logits(logits, self.params, self.seen)
        if self.params.greedy:
            tok = int(torch.argmax(x))
        else:
            probs = torch.softmax(x.float(), dim=-1)
            tok = int(torch.multinomial(probs, 1, generator=self.generator))
        self.observe(tok)
        return tok


__all__ = ["SamplingParams", "GenerationError", "SamplingError", "Sampler", "apply_repetition_penalty", "top_k_mask",
           "top_p_mask", "process_logits"]
