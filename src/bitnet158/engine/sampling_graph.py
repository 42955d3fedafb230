"""The sampler's logit transforms and draw replayed from a CUDA graph (one launch instead of ~20).

    g = graphed(params, V, device)           # cached per (device, V, transform parameters)
    tok = g.run(logits, state, seen)         # long [1]: the same id as Sampler's eager ops
    g = graphed(params, V, device, rows=64)  # the batch scheduler's rows drawn together
    toks = g.run_rows(logits, states, seen)  # logits [k <= 64, V], states [[key, draw]] * k -> long [k]

A sampled token on a GPU runs ~20 small torch ops (temperature, top-k, top-p's sort, softmax,
cumulative sums and masks, the draw). Each costs the host ~10-15 us to launch: with top-p the
sampler alone took 243 us of host time a token on an H100 machine (33 us replayed from the
graph). Batch-1 generation queues the next decode step first and so hides that behind the step;
where the host is the bound (many requests, each drawn by its own sampler) it adds up. Here
those ops are captured once into a CUDA graph over static buffers; a token costs four copies or
launches (five with a repetition penalty, whose seen set is copied in too): the logits copied in,
the request's (key, draw number) of the keyed draw copied in (so every request keeps its own
random stream and seeded requests stay reproducible), the replay, and the id copied out. The
graph replays the eager ops' kernels on the same inputs, so the ids are the eager sampler's.

The batch scheduler's draw of many rows with the same parameters (``sampling.next_ids``) is ~20
launches too, whatever the row count: a graph over ``rows`` static rows serves any k <= rows of
them (the rows past k hold earlier rows' logits, drawn and ignored: a row's bits never depend on
the others). ``next_ids`` asks for row counts rounded up to a power of two, so a server meets at
most 7 such graphs a parameter set (1..64 rows), each captured the second time its count comes.
By the ops it captures, a graph of ``rows`` rows holds three float32 ``[rows, V]`` buffers: its
static logits, the scaled logits and their softmax (98.5 MB at 64 rows of 128256; top-k and a
repetition penalty add one more each for their masked logits).

A graph is cached per (device, vocabulary size, row count, temperature, top-k, top-p, repetition
penalty): requests with the same parameters share it (replays are serialized by a lock and run in
stream order). At most ``CACHE`` graphs are kept, least recently used dropped.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ..sampling_params import SamplingParams

CACHE = 16
_graphs: OrderedDict = OrderedDict()
_lock = threading.Lock()


class GraphedSampler:
    """One captured sampler: static logits, (key, draw number) and seen buffers in, the drawn id
    out; ``rows`` > 0: that many rows of each ([rows, V] logits, [rows] ids)."""

    def __init__(self, params: SamplingParams, vocab: int, device: torch.device, rows: int = 0):
        from .sampling import keyed_draw               # sampling imports this module lazily
        self.device = device
        with torch.cuda.device(device), torch.inference_mode():
            shape = (rows, vocab) if rows else (vocab,)
            self.logits = torch.zeros(shape, dtype=torch.float32, device=device)         # [V] / [rows, V]
            self.state = torch.zeros(max(rows, 1), 2, dtype=torch.long, device=device)   # [rows, 2] key, draw
            self.seen = (torch.zeros(shape, dtype=torch.bool, device=device)
                         if params.repetition_penalty != 1.0 else None)                   # like logits

            def body() -> torch.Tensor:              # the eager path of Sampler.next_id, keyed
                return keyed_draw(self.logits, params, self.seen, self.state)                # [1]

            side = torch.cuda.Stream(device)         # warm up off the current stream, then capture
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                body()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.out = body()

    def run(self, logits: torch.Tensor, state: list[int], seen: torch.Tensor | None) -> torch.Tensor:
        """logits float32 [V] on this device, state (key, draw number) of the request's keyed
        draw -> long [1], queued on the current stream."""
        st = torch.tensor([state], dtype=torch.long).pin_memory()                         # [1, 2]
        with _lock, torch.cuda.device(self.device), torch.inference_mode():
            self.logits.copy_(logits)
            self.state.copy_(st, non_blocking=True)
            if self.seen is not None:
                self.seen.copy_(seen)
            self.graph.replay()
            return self.out.clone()

    def run_rows(self, logits: torch.Tensor, states: list[list[int]], seen: torch.Tensor | None) -> torch.Tensor:
        """logits float32 [k, V] (k up to the graph's rows), each row's (key, draw number), seen
        bool [k, V] (with a repetition penalty) -> long [k], queued on the current stream."""
        k = logits.shape[0]
        st = torch.tensor(states, dtype=torch.long).pin_memory()                         # [k, 2]
        with _lock, torch.cuda.device(self.device), torch.inference_mode():
            self.logits[:k].copy_(logits)
            self.state[:k].copy_(st, non_blocking=True)
            if self.seen is not None:
                self.seen[:k].copy_(seen)
            self.graph.replay()
            return self.out[:k].clone()


_asked: dict = {}            # key -> times asked for before its capture
ASKED_MAX = 4096


def graphed(params: SamplingParams, vocab: int, device: torch.device, rows: int = 0,
            capture_from: int = 1) -> GraphedSampler | None:
    """The cached graph for these transform parameters (``rows`` > 0: of that many rows), captured
    the ``capture_from``-th time it is asked for (None before)."""
    key = (str(device), vocab, rows, params.temperature, params.top_k, params.top_p, params.repetition_penalty)
    with _lock:
        g = _graphs.get(key)
        if g is not None:
            _graphs.move_to_end(key)
            return g
        if len(_asked) > ASKED_MAX:                   # parameter sets asked for once, never again
            _asked.clear()
        _asked[key] = _asked.get(key, 0) + 1
        if _asked[key] < capture_from:
            return None
    g = GraphedSampler(params, vocab, device, rows)
    with _lock:
        _graphs[key] = g
        _asked.pop(key, None)
        while len(_graphs) > CACHE:
            _graphs.popitem(last=False)
    return g


__all__ = ["CACHE", "GraphedSampler", "graphed"]
