"""Prefill weights unpacked on a side stream, ahead of the int8 GEMMs that read them.

    ahead = UnpackAhead(side_stream)                # one per runner; None off CUDA (in order)
    ahead.start([lin_0, lin_1, ...])                # the prefill's projections, in call order
    w8 = ahead.take(j)                              # before projection j's GEMM: its int8 weights
    ahead.done(j)                                   # after it: the buffer goes to projection j + depth
    ahead.finish()                                  # the main stream waits for the side stream

From ``w2a8.I8_MIN_M`` activation rows a projection unpacks its 2-bit weights into a transient int8
``[4R, K]`` matrix (``gemm_i8.unpack_i8``, memory-bound: ~37 us a 2B4T layer on an H100) before
its compute-bound GEMM. The weights do not depend on the activations, so here projection
``j + depth``'s unpack runs on a side stream while projection ``j``'s GEMM (and the attention and
norms between) run on the main stream. ``depth`` buffers, each the size of the widest projection,
rotate: projection ``j`` reads buffer ``j % depth``; the side stream refills it after an event
recorded behind that GEMM, and the GEMM waits on an event recorded behind its unpack. Under CUDA
graph capture the events become the graph's edges, so a prefill graph carries the overlap too.

Off CUDA (the interpreter's CPU tensors) there is no side stream: the same buffers and order run
in line, which is what the CPU tests exercise. The results are bit-identical to the in-line unpack
(the same int8 matrices feed the same GEMM).

Buffers are allocated on the main stream and live until :meth:`finish`, after which every side
stream write is ordered before the main stream's next use of that memory.
"""

from __future__ import annotations

import contextlib

import torch

from .gemm_i8 import unpack_i8
from .w2a8 import seg_bounds


class UnpackAhead:
    """Side-stream unpacks of a prefill's projection weights, ``depth`` projections ahead."""

    def __init__(self, side: torch.cuda.Stream | None, depth: int = 2):
        if depth < 1:
            raise ValueError(f"UnpackAhead: depth={depth} must be at least 1")
        self.side, self.depth = side, depth
        self.lins: list = []

    def _stream(self):
        return torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext()

    def _event(self, stream):
        if self.side is None:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def _unpack(self, j: int) -> None:
        """On the side stream: projection j's int8 weights into buffer j % depth, then its event."""
        lin = self.lins[j]
        R, K = lin.packed.shape
        P1, P2 = seg_bounds(lin.segs, R, "UnpackAhead")
        out = self.bufs[j % self.depth][:4 * R * K].view(4 * R, K)     # int8 [4R, K]
        with self._stream():
            unpack_i8(lin.packed, P1, P2, out=out)
            self.ready[j] = self._event(self.side)

    def start(self, lins: list) -> None:
        """Begin a prefill whose projections (``_Linear``s with ``packed`` and ``segs``) run in
        this order; queues the first ``depth`` unpacks behind the main stream's work so far."""
        self.lins = list(lins)
        if not self.lins:
            return
        dev = self.lins[0].packed.device
        widest = max(4 * lin.packed.numel() for lin in self.lins)
        self.bufs = [torch.empty(widest, dtype=torch.int8, device=dev) for _ in range(self.depth)]
        self.ready: list = [None] * len(self.lins)
        if self.side is not None:       # the buffers' memory may have been read just before
            self.side.wait_stream(torch.cuda.current_stream(dev))
        for j in range(min(self.depth, len(self.lins))):
            self._unpack(j)

    def take(self, j: int) -> torch.Tensor:
        """Projection j's int8 weights [4R, K], the main stream waiting for their unpack."""
        if self.ready[j] is not None:
            torch.cuda.current_stream(self.lins[j].packed.device).wait_event(self.ready[j])
        R, K = self.lins[j].packed.shape
        return self.bufs[j % self.depth][:4 * R * K].view(4 * R, K)

    def done(self, j: int) -> None:
        """Projection j's GEMM is queued: refill its buffer with projection j + depth's weights."""
        nxt = j + self.depth
        if nxt >= len(self.lins):
            return
        if self.side is not None:
            self.side.wait_event(self._event(torch.cuda.current_stream(self.lins[j].packed.device)))
        self._unpack(nxt)

    def finish(self) -> None:
        """The main stream waits for every side-stream unpack; the buffers are released."""
        if self.side is not None and self.lins:
            torch.cuda.current_stream(self.lins[0].packed.device).wait_stream(self.side)
        self.lins, self.bufs, self.ready = [], [], []


__all__ = ["UnpackAhead"]
