"""Sampling parameters and the next-token sampler (greedy, temperature, top-k, top-p, repetition penalty).

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=0, max_new_tokens=64)
    sampler = Sampler(params, vocab_size=V, prompt_ids=prompt)     # one per request
    tok = sampler(logits)                                           # logits float32 [V] -> int

The order of the logit transforms is Hugging Face's: repetition penalty, temperature, top-k, top-p.
``temperature == 0`` means greedy (argmax after the repetition penalty). Each request owns its own
random stream, so concurrent requests never share RNG state and a seeded request is reproducible
whatever else runs: on a GPU with the Triton row kernels a key mixed from ``seed`` and a draw
counter (``row_ops.race``: Philox, one launch for any number of rows), elsewhere a
``torch.Generator`` seeded from ``seed``.
"""

from __future__ import annotations

import secrets
from typing import Iterable

import torch

from ..sampling_params import GenerationError, SamplingError, SamplingParams  # noqa: F401 (re-exported)
from . import row_ops


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


# On the CPU the nucleus is first looked for among this many most likely tokens (topk: ~1 ms on
# 128256 logits on 2 cores against ~12 ms for the full sort); the full sort when it ends past them
TOP_P_CANDIDATES = 1024


# top-p's cut on a GPU by the sort too (benchmarks compare): by default the row kernels find it
# digit by digit (rows.top_p_last), without sorting the row
SORTED_CUT = False


def _top_p_last(logits: torch.Tensor, probs: torch.Tensor, p: float) -> torch.Tensor:
    """The last logit top-p keeps in each row of logits [..., V] (probs: their softmax) -> [..., 1]."""
    if row_ops.batch_invariant(logits) and not SORTED_CUT:   # GPU: the cut digit by digit, no sort
        return row_ops.top_p_last(logits, probs, p).view(*logits.shape[:-1], 1)

    def ranked(vals_idx):          # (values descending, ids) -> the values, the kept count [n]
        vals, idx = vals_idx
        return vals, row_ops.first_reaching(probs.gather(-1, idx), p)

    kept = None
    if logits.device.type == "cpu" and logits.shape[-1] > TOP_P_CANDIDATES:
        # the host can read the tensors here without waiting on a device: use the top candidates
        # when the nucleus provably ends among them (the same prefix sums as the full sort's)
        vals, kept = ranked(torch.topk(logits, TOP_P_CANDIDATES, dim=-1))   # [..., C], [n]
        if not bool((kept < TOP_P_CANDIDATES).all()):
            kept = None
    if kept is None:
        vals, kept = ranked(torch.sort(logits, dim=-1, descending=True))  # [..., V], [n]
    kept = kept.clamp_(min=1).view(*vals.shape[:-1], 1)                    # [..., 1]
    return vals.gather(-1, kept - 1)                                       # [..., 1] value of the last kept


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens, in order, while the probability mass of those
    before them is below p (the most likely token always); every token exactly as likely as the
    last one kept is kept too, so ties are never split by sort order. logits [..., V].
    """
    if p >= 1.0:
        return logits
    last = _top_p_last(logits, row_ops.softmax(logits), p)                 # [..., 1]
    return logits.masked_fill(logits < last, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                   top_p: bool = True) -> torch.Tensor:
    """All transforms in HF order; returns the logits (before softmax) to sample from (``top_p=False``:
    all but top-p's mask)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_mask(logits, params.top_k)
    return top_p_mask(logits, params.top_p) if top_p else logits


def sampling_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """The probabilities a sampled (not greedy) token is drawn from: float32 [V]."""
    return row_ops.softmax(process_logits(logits, params, seen).float())


def keyed_draw(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
               state: torch.Tensor) -> torch.Tensor:
    """A sampled id from each row of logits float32 [V] / [n, V] by the keyed race (``state``:
    int64 [n, 2], each row's key and draw number) -> long [1] / [n]; where the row kernels run
    (``row_ops.batch_invariant``). The race runs over the softmax of the transformed logits, top-p
    without its mask: ``row_ops.race_top_p`` looks for the winner among the nucleus (one or two
    passes over a row where the sort or the cut digit by digit take many), the same id as the race
    over the masked row's probabilities drawn from the same keys."""
    lg = process_logits(logits, params, seen, top_p=False).float()
    probs = row_ops.softmax(lg)
    if params.top_p >= 1.0:
        return row_ops.race(probs, state)
    last = _top_p_last(lg, probs, params.top_p).reshape(-1) if SORTED_CUT else None
    return row_ops.race_top_p(lg, probs, params.top_p, state, last)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id from probs [V] (summing to ~1, zeros for masked tokens) -> long [1].

    On a GPU ``torch.multinomial(probs, 1, generator=generator)``'s draw: the same exponential
    race (``argmax(p / q)``, ``q ~ Exp(1)``), so the same ids from the same generator state,
    without its validity checks (recent torch runs them as ~8 kernels with device-side asserts,
    older torch as host reads that wait for the device). On the CPU by inversion, one uniform
    against the cumulative sum (~0.2 ms on 128256 probabilities against ~3.7 ms for the race's V
    exponentials on 2 cores); the sequential sum is flat across zeros and the target stays below
    the total, so a masked token is never drawn. Like the greedy argmax, NaN probabilities give an
    id rather than an error."""
    if probs.device.type != "cpu":
        q = torch.empty_like(probs).exponential_(1, generator=generator)   # [V], Exp(1)
        return row_ops.argmax(probs / q)                                   # argmax p_i / q_i ~ probs
    c = torch.cumsum(probs, dim=-1, dtype=torch.float64)                   # [V]
    u = torch.rand(1, generator=generator, dtype=torch.float64)            # [1] in [0, 1)
    total = c[-1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # < total
    return torch.searchsorted(c, target, right=True)                       # first c_i > target


# ---------------------------------------------------------------- per-request sampler

# On a GPU a sampled (not greedy) token's transforms and draw replay a CUDA graph from a request's
# GRAPH_FROM_CALL-th token on (sampling_graph: one launch for ~20 ops, the same ids; H100 machine,
# top-p: 33 us of host time a token against 243 eager). A request of one token never captures.
GRAPHS = True
GRAPH_FROM_CALL = 2


def request_key(seed: int | None) -> int:
    """A request's 63-bit key for the keyed draw: a fixed mix of its seed (splitmix64), random
    without one."""
    if seed is None:
        return secrets.randbits(63)
    z = (seed + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 1


class Sampler:
    """Stateful sampler of one request: its RNG and the set of tokens seen so far (prompt + output).

    Where the row kernels run (CUDA with Triton: ``row_ops.batch_invariant``) a sampled token is
    drawn by the keyed exponential race (``row_ops.race``): its variates come from the request's
    key (:func:`request_key`) and the number of draws so far, so a request's ids do not depend on
    what is drawn beside it, in a batch or alone. Elsewhere from the request's ``torch.Generator``
    (:func:`draw`)."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Iterable[int] = (),
                 device: torch.device | str = "cpu"):
        self.params = params
        self.vocab_size = vocab_size
        self.generator: torch.Generator | None = None
        self.key = request_key(params.seed)
        self.draws = 0
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.calls = 0
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # [V]
            ids = [i for i in prompt_ids if 0 <= i < vocab_size]
            if ids:
                self.seen[torch.tensor(ids, device=device)] = True

    def take_state(self) -> list[int]:
        """(key, draw number) of the next keyed draw; counts the draw."""
        self.draws += 1
        return [self.key, self.draws - 1]

    def observe(self, token: int) -> None:
        """Record a generated token (the repetition penalty then applies to it)."""
        if self.seen is not None and 0 <= token < self.vocab_size:
            self.seen[token] = True

    def next_id(self, logits: torch.Tensor) -> torch.Tensor:
        """logits float32 [V] -> the next id as a long tensor [1] on the logits' device, recorded
        as seen there without reading it on the host, so a GPU loop can feed it to the next step
        before the host reads it. The same draws as :meth:`__call__`."""
        self.calls += 1
        keyed = not self.params.greedy and logits.dim() == 1 and row_ops.batch_invariant(logits)
        if keyed and GRAPHS and self.calls >= GRAPH_FROM_CALL and logits.is_cuda:
            from .sampling_graph import graphed           # the same ops, replayed from a CUDA graph
            tok = graphed(self.params, logits.shape[-1], logits.device).run(logits, self.take_state(), self.seen)
        elif self.params.greedy:
            tok = row_ops.argmax(process_logits(logits, self.params, self.seen))        # [1]
        elif keyed:
            state = to_device([self.take_state()], logits.device)                       # [1, 2]
            tok = keyed_draw(logits, self.params, self.seen, state)                      # [1]
        else:
            tok = draw(sampling_probs(logits, self.params, self.seen), self.generator)  # [1]
        if self.seen is not None:
            self.seen[tok] = True
        return tok

    def __call__(self, logits: torch.Tensor) -> int:
        """logits float32 [V] (row of the last position) -> next token id; records it as seen."""
        return int(self.next_id(logits))


def to_device(values: list, device: torch.device) -> torch.Tensor:
    """A (nested) list of ints as a long tensor on device, copied from pinned memory without
    waiting for the device (``torch.tensor(values, device=...)`` from pageable memory waits for
    the queued work, e.g. the decode step whose logits are being sampled)."""
    t = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# The batch scheduler's sampled rows drawn together where the row ops allow (next_ids); False: each
# row by its own sampler in turn (the same ids; bench/serve_batch.py times both)
BATCH_DRAW = True


def next_ids(samplers: list[Sampler], logits: torch.Tensor) -> torch.Tensor:
    """Row i of logits float32 [n, V] drawn by samplers[i] -> long [n] on the logits' device: the
    ids each ``samplers[i].next_id(logits[i])`` gives, recorded as seen the same way.

    Where the row ops are batch-invariant (CUDA with Triton: ``row_ops.batch_invariant``) the rows
    that share their transform parameters go through the transforms and the draw together: one
    softmax and one keyed race (top-p's nucleus found by it) for all of them, each row's variates
    from its own key and draw number, replayed from a CUDA graph over a power-of-two row count
    from the second time that count comes (``sampling_graph``; ~20 launches and fills eager) instead of 64
    replays of the sampler's graph, each a single row. Elsewhere the samplers run one by one."""
    n = logits.shape[0]
    if len(samplers) != n:
        raise ValueError(f"next_ids: {len(samplers)} samplers for {n} rows of logits")
    if n <= 1 or not BATCH_DRAW or logits.dim() != 2 or not row_ops.batch_invariant(logits):
        return torch.cat([s.next_id(logits[i]) for i, s in enumerate(samplers)]) if n else \
            torch.empty(0, dtype=torch.long, device=logits.device)
    groups: dict = {}
    for i, s in enumerate(samplers):
        p = s.params
        groups.setdefault((p.greedy, p.temperature, p.top_k, p.top_p, p.repetition_penalty), []).append(i)
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    for rows in groups.values():
        members = [samplers[i] for i in rows]
        params = members[0].params
        if len(rows) == n:                               # one group: every row, in order
            idx, lg = None, logits                                          # [n, V]
        else:
            idx = to_device(rows, logits.device)
            lg = logits.index_select(0, idx)                                # [k, V]
        seen = torch.stack([s.seen for s in members]) if members[0].seen is not None else None
        if params.greedy:
            tok = row_ops.argmax(process_logits(lg, params, seen))          # [k]
        else:
            states = [s.take_state() for s in members]                       # [k] (key, draw)
            g = None
            if GRAPHS and lg.is_cuda:     # ~20 launches replayed as one: a graph per power-of-two row count
                from .sampling_graph import graphed
                g = graphed(params, lg.shape[-1], lg.device, rows=1 << (len(rows) - 1).bit_length(),
                            capture_from=GRAPH_FROM_CALL)
            if g is not None:
                tok = g.run_rows(lg, states, seen)                            # [k]
            else:
                tok = keyed_draw(lg, params, seen, to_device(states, logits.device))  # [k]
        if idx is None:
            out = tok
        else:
            out.index_copy_(0, idx, tok)
        for j, s in enumerate(members):
            s.calls += 1
            if s.seen is not None:
                s.seen[tok[j:j + 1]] = True
    return out


__all__ = ["SamplingParams", "GenerationError", "SamplingError", "Sampler", "apply_repetition_penalty", "top_k_mask",
           "top_p_mask", "process_logits", "sampling_probs", "keyed_draw", "draw", "next_ids", "request_key", "to_device", "BATCH_DRAW"]
