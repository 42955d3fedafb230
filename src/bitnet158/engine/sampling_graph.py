"""The sampler's logit transforms and draw replayed from a CUDA graph (one launch instead of ~20).

    g = graphed(params, V, device)           # cached per (device, V, transform parameters)
    tok = g.run(logits, state, seen)         # long [1]: the same id as Sampler's eager ops

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

A graph is cached per (device, vocabulary size, temperature, top-k, top-p, repetition penalty):
requests with the same parameters share it (replays are serialized by a lock and run in stream
order). At most ``CACHE`` graphs are kept, least recently used dropped.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ..sampling_params import SamplingParams

CACHE = 8
_graphs: OrderedDict = OrderedDict()
_lock = threading.Lock()


class GraphedSampler:
    """One captured sampler: static logits, (key, draw number) and seen buffers in, the drawn id out."""

    def __init__(self, params: SamplingParams, vocab: int, device: torch.device):
        from . import row_ops
        from .sampling import sampling_probs           # sampling imports this module lazily
        self.device = device
        with torch.cuda.device(device), torch.inference_mode():
            self.logits = torch.zeros(vocab, dtype=torch.float32, device=device)          # [V]
            self.state = torch.zeros(1, 2, dtype=torch.long, device=device)              # [1, 2] key, draw
            self.seen = (torch.zeros(vocab, dtype=torch.bool, device=device)
                         if params.repetition_penalty != 1.0 else None)                   # [V]

            def body() -> torch.Tensor:              # the eager path of Sampler.next_id, keyed
                return row_ops.race(sampling_probs(self.logits, params, self.seen), self.state)  # [1]

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


def graphed(params: SamplingParams, vocab: int, device: torch.device) -> GraphedSampler:
    """The cached graph for these transform parameters (captured on first request)."""
    key = (str(device), vocab, params.temperature, params.top_k, params.top_p, params.repetition_penalty)
    with _lock:
        g = _graphs.get(key)
        if g is not None:
            _graphs.move_to_end(key)
            return g
    g = GraphedSampler(params, vocab, device)
    with _lock:
        _graphs[key] = g
        while len(_graphs) > CACHE:
            _graphs.popitem(last=False)
    return g


__all__ = ["CACHE", "GraphedSampler", "graphed"]
