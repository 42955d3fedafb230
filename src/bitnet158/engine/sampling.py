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

from typing import Iterable

import torch

from ..sampling_params import GenerationError, SamplingError, SamplingParams  # noqa: F401 (re-exported)


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


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id from probs [V] -> long [1]: ``torch.multinomial(probs, 1, generator=generator)``'s
    draw (the same exponential race, so the same ids from the same generator state) without its
    validity checks, which recent torch runs as ~8 extra kernels with device-side asserts (a
    failed one ends the process's CUDA context) and older torch as host reads that wait for the
    device. Like the greedy argmax, NaN probabilities give an id rather than an error."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)       # [V], Exp(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True)                   # argmax p_i / q_i ~ probs


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

    def next_id(self, logits: torch.Tensor) -> torch.Tensor:
        """logits float32 [V] -> the next id as a long tensor [1] on the logits' device, recorded
        as seen there without reading it on the host, so a GPU loop can feed it to the next step
        before the host reads it. The same draws as :meth:`__call__`."""
        x = process_logits(logits, self.params, self.seen)
        if self.params.greedy:
            tok = torch.argmax(x, dim=-1, keepdim=True)                          # [1]
        else:
            tok = draw(torch.softmax(x.float(), dim=-1), self.generator)         # [1]
        if self.seen is not None:
            self.seen[tok] = True
        return tok

    def __call__(self, logits: torch.Tensor) -> int:
        """logits float32 [V] (row of the last position) -> next token id; records it as seen."""
        return int(self.next_id(logits))


__all__ = ["SamplingParams", "GenerationError", "SamplingError", "Sampler", "apply_repetition_penalty", "top_k_mask",
           "top_p_mask", "process_logits", "draw"]
