"""Softmax, argmax and top-p's cut over rows of logits: Triton row kernels on a GPU, torch ops elsewhere.

    p = softmax(x)                 # x float [V] or [n, V] -> the same shape
    i = argmax(x)                  # x [V] -> long [1]; [n, V] -> long [n] (the first index of the maximum)
    k = first_reaching(ps, p)      # ps [V] / [n, V], most likely first -> long [1] / [n]: top-p's cut
    v = top_p_last(x, probs, p)    # x, probs [V] / [n, V] -> [1] / [n]: the last logit top-p keeps (GPU)
    t = race(probs, state)         # probs [V] / [n, V], state int64 [n, 2] (key, draw) -> long [1] / [n]
    t = race_top_p(x, probs, p, state)   # the race among the tokens top-p keeps (GPU)

On a CUDA float32 tensor these run :mod:`bitnet158.kernels.triton.rows`: each row is reduced in
chunks by many programs (torch reduces one 128256-logit row with a single thread block: softmax
44 us, argmax 28 us on an H100), and a row's result does not depend on how many rows run with it,
so the batch scheduler can draw all its rows at once and still give each request exactly the ids
it would get alone (:func:`batch_invariant`). Elsewhere (CPU, no Triton) the torch ops run; the
CPU's results are the reference the GPU's are tested against (argmax exactly, the softmax and
the cut within float32 rounding of the sums).

``first_reaching`` is top-p's boundary: with ``ps`` the probabilities in decreasing order, the
number of leading positions whose mass before them (the sum of the probabilities ahead of
them) is below ``p``; ``V`` where the whole row is.
"""

from __future__ import annotations

import torch


def _kernels(x: torch.Tensor):
    """The Triton row kernels for a CUDA float32 [V] / [n, V] tensor, else None (torch ops)."""
    if not x.is_cuda or x.dtype != torch.float32 or x.dim() not in (1, 2):
        return None
    try:
        from ..kernels.triton import rows
    except ImportError:                   # no Triton: torch's ops, drawn row by row (batch_invariant)
        return None
    return rows


def batch_invariant(x: torch.Tensor) -> bool:
    """Whether rows of x drawn together give the same bits as each row alone (the row kernels)."""
    return _kernels(x) is not None


def softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim."""
    k = _kernels(x)
    return k.softmax(x) if k is not None else torch.softmax(x, dim=-1)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dim: [V] -> long [1], [n, V] -> long [n]; NaN counts as the maximum."""
    k = _kernels(x)
    if k is not None:
        return k.argmax(x)
    return torch.argmax(x, dim=-1, keepdim=x.dim() == 1)


def race(probs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """An id drawn from each row of probs [V] / [n, V] -> long [1] / [n] by the exponential race,
    row r's Exp(1) variates keyed by ``state[r] = (key, draw)`` (int64 [n, 2]): the Triton
    kernel's Philox streams. Only where the kernels run (``batch_invariant``); elsewhere the
    sampler draws from its ``torch.Generator`` (``sampling.draw``)."""
    k = _kernels(probs)
    if k is None:
        raise ValueError(f"row_ops.race: the keyed draw needs the Triton row kernels (a CUDA float32 [V] or "
                         f"[n, V] tensor with Triton installed), got {probs.dtype} {tuple(probs.shape)} on "
                         f"{probs.device}; use sampling.draw with a torch.Generator there")
    return k.race(probs, state)


def first_reaching(ps: torch.Tensor, p: float) -> torch.Tensor:
    """ps [V] / [n, V] in decreasing order -> long [1] / [n]: the leading positions whose mass
    before them is below p (V where all are)."""
    k = _kernels(ps)
    if k is not None:
        return k.first_reaching(ps, p)
    before = torch.cumsum(ps, dim=-1) - ps                                 # [..., V]
    kept = (before < p).to(torch.int32).cumprod(dim=-1).sum(dim=-1)       # the leading run
    return kept.view(-1).long()


def top_p_last(x: torch.Tensor, probs: torch.Tensor, p: float) -> torch.Tensor:
    """The last logit top-p keeps in each row of x [V] / [n, V] (probs: their softmax) -> [1] / [n]:
    the smallest logit whose tokens have less than p of mass among larger logits, found without a
    sort (the Triton kernels' digit-by-digit cut). Only where the kernels run (``batch_invariant``);
    elsewhere the sampler sorts and takes :func:`first_reaching`."""
    k = _kernels(x)
    if k is None:
        raise ValueError(f"row_ops.top_p_last: needs the Triton row kernels (a CUDA float32 [V] or [n, V] "
                         f"tensor with Triton installed), got {x.dtype} {tuple(x.shape)} on {x.device}")
    return k.top_p_last(x, probs, p)


def race_top_p(x: torch.Tensor, probs: torch.Tensor, p: float, state: torch.Tensor,
               last: torch.Tensor | None = None) -> torch.Tensor:
    """``race`` over probs [V] / [n, V] with the tokens top-p drops from logits x at 0 -> long
    [1] / [n], found without masking (the winner first, then its test; ``last``, float32 [n]: the
    cut, given). Only where the kernels run (``batch_invariant``)."""
    k = _kernels(x)
    if k is None:
        raise ValueError(f"row_ops.race_top_p: needs the Triton row kernels (a CUDA float32 [V] or [n, V] "
                         f"tensor with Triton installed), got {x.dtype} {tuple(x.shape)} on {x.device}")
    return k.race_top_p(x, probs, p, state, last)


__all__ = ["argmax", "batch_invariant", "first_reaching", "race", "race_top_p", "softmax", "top_p_last"]
