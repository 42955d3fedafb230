"""Softmax, argmax and sum over one long row of logits on a GPU, as two-level reductions.

    p = softmax(x)            # x float [V] -> [V]
    i = argmax(x)             # x [V] -> long [1], the first index of the maximum (as torch.argmax)
    n = int_sum(c)            # c integer [V] -> [1]

PyTorch reduces a single row of V elements with one thread block: on an H100 a softmax over
V = 128256 logits took 44 us, an argmax 28 us and a sum 15 us (``bench/sampler.py --profile``),
most of a sampled token's 0.22 ms. Here the row is viewed as ``[G, V / G]`` (``G = gcd(V,
1024)``: 256 rows of 501 for the Llama-3 vocabulary), reduced along the rows by G blocks, then
the G partials. The argmax and the integer sum give exactly torch's results (the first index of
the maximum, NaN counting as the maximum; integer sums do not depend on the order); the softmax
sums its exponentials in another order, so its values may differ from ``torch.softmax``'s by
float32 rounding (up to ~2e-5 relative at 128256 logits, against the CPU's softmax). Off CUDA, for other shapes, or when V has fewer than ``MIN_ROWS`` such rows, the
torch ops run unchanged.
"""

from __future__ import annotations

import math

import torch

MIN_ROWS = 8


def _rows(x: torch.Tensor) -> int:
    """G of the [G, V / G] view, or 0 where the torch op runs as it is."""
    if not x.is_cuda or x.dim() != 1 or not x.is_contiguous():
        return 0
    g = math.gcd(x.numel(), 1024)
    return g if g >= MIN_ROWS else 0


def softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim; a contiguous CUDA row [V] two-level (exp(x - max) / sum)."""
    g = _rows(x)
    if not g:
        return torch.softmax(x, dim=-1)
    m = x.view(g, -1).amax(dim=1).amax()                        # [] the max: order-free
    e = torch.exp(x - m)                                         # [V]
    return e / e.view(g, -1).sum(dim=1).sum()


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1, keepdim=True); a contiguous CUDA row [V] -> long [1], two-level."""
    g = _rows(x)
    if not g:
        return torch.argmax(x, dim=-1, keepdim=True)
    xv = x.view(g, -1)                                           # [G, V/G]
    vals, cols = xv.max(dim=1)                                   # [G] first maximum of each row
    r = torch.argmax(vals, dim=0, keepdim=True)                  # [1] first row holding the maximum
    return r * xv.shape[1] + cols.gather(0, r)


def int_sum(c: torch.Tensor) -> torch.Tensor:
    """c.sum(dim=-1, keepdim=True) of an integer tensor; a contiguous CUDA row [V] two-level."""
    g = _rows(c)
    if not g:
        return c.sum(dim=-1, keepdim=True)
    return c.view(g, -1).sum(dim=1).sum(dim=0, keepdim=True)


__all__ = ["MIN_ROWS", "argmax", "int_sum", "softmax"]
