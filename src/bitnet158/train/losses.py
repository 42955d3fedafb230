"""Memory-safe head losses: the output projection and the loss computed together, chunk by chunk.

    from bitnet158.train.losses import linear_cross_entropy, sequence_logprobs, token_logprobs
    h = model.hidden(tokens)                                        # [B, T, D]
    loss = linear_cross_entropy(h.flatten(0, 1), model.head_weight, labels.flatten(), reduction="sum")
    logp = sequence_logprobs(h, model.head_weight, labels)          # [B]: sum of log p(label), DPO

At a 128k vocabulary the logits of a batch ([B, T, V], fp32 for the softmax) are gigabytes.
Here the tokens are processed ``chunk`` rows at a time: the forward keeps only one chunk of logits
[chunk, V] alive and returns the per-token log-probabilities [N]; the backward recomputes each
chunk's logits and turns them straight into gradients (``dlogp/dlogits = onehot(y) - softmax``),
so no [N, V] tensor ever exists, in the forward or the backward. Tokens whose label is
``ignore_index`` (-100) are dropped before the head: prompt tokens cost nothing.

The chunk size is ``max(1, max_chunk_elems // V)`` tokens unless given; every chunk of logits the
last call allocated is recorded in ``LAST_CHUNKS`` (``shapes`` per pass) so tests can assert that
none reached [N, V]. Under autocast (bf16 training) the chunk matmuls run in the autocast dtype
and the softmax in fp32, as a plain ``F.cross_entropy(logits.float())`` would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_MAX_CHUNK_ELEMS = 1 << 24        # 16 M logits = 64 MB of fp32 per chunk (~130 rows at 128k)


class ChunkLog:
    """Shapes of the logits chunks of the last call (forward and backward)."""

    def __init__(self) -> None:
        self.forward: list[tuple[int, int]] = []
        self.backward: list[tuple[int, int]] = []
        self.chunk_tokens = 0

    def reset(self, chunk_tokens: int) -> None:
        self.forward, self.backward, self.chunk_tokens = [], [], chunk_tokens

    @property
    def max_elems(self) -> int:
        return max((a * b for a, b in self.forward + self.backward), default=0)


LAST_CHUNKS = ChunkLog()


def chunk_tokens_for(vocab: int, chunk: int | None = None,
                     max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS) -> int:
    """Rows per chunk: ``chunk`` if given, else as many as fit in ``max_chunk_elems`` logits."""
    if chunk is not None:
        if chunk <= 0:
            raise ValueError(f"chunk={chunk} must be positive")
        return int(chunk)
    return max(1, max_chunk_elems // max(vocab, 1))


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, w.dtype)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p(labels[i] | hidden[i]) for every row, with logits = hidden @ weight.T made per chunk.

    hidden [M, D], weight [V, D], labels [M] (all valid) -> logp fp32 [M].
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, dtype: torch.dtype):
        M = hidden.shape[0]
        out = torch.empty(M, dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)                                             # [V, D]
        for s in range(0, M, chunk):
            h = hidden[s:s + chunk].to(dtype)                            # [c, D]
            logits = (h @ w.t()).float()                                 # [c, V]: the only big tensor
            LAST_CHUNKS.forward.append(tuple(logits.shape))
            lse = torch.logsumexp(logits, dim=-1)                        # [c]
            out[s:s + chunk] = logits.gather(1, labels[s:s + chunk, None]).squeeze(1) - lse
            del logits
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(dtype)
        go = grad_out.float()
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].to(dtype)                            # [c, D]
            logits = (h @ w.t()).float()                                 # [c, V], recomputed
            LAST_CHUNKS.backward.append(tuple(logits.shape))
            # d logp / d logits = onehot(y) - softmax; times the incoming grad of each row
            g = torch.softmax(logits, dim=-1)
            del logits
            g.neg_()
            g.scatter_add_(1, labels[s:s + chunk, None], torch.ones_like(g[:, :1]))
            g.mul_(go[s:s + chunk, None])                                # [c, V]
            if need_h:
                grad_h[s:s + chunk] = (g.to(dtype) @ w).to(hidden.dtype)
            if need_w:
                grad_w += (g.to(dtype).t() @ h).float()
            del g
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk: int | None = None, ignore_index: int = IGNORE_INDEX,
                   max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS) -> torch.Tensor:
    """Per-token log p(label) [N] (fp32; 0 where ``labels == ignore_index``), chunked over tokens.

    hidden [N, D] (the final-normed hidden states), weight [V, D] (the head), labels [N].
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be [N, D] and [V, D]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"token_logprobs: labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    V = weight.shape[0]
    c = chunk_tokens_for(V, chunk, max_chunk_elems)
    LAST_CHUNKS.reset(c)
    valid = labels != ignore_index
    idx = valid.nonzero().squeeze(1)                                     # [M]
    y = labels[idx]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= V):
        raise ValueError(f"token_logprobs: a label is outside [0, {V})")
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    if idx.numel() == 0:
        return out + 0.0 * hidden.sum() + 0.0 * weight.sum()             # keeps the graph connected
    lp = _ChunkedTokenLogprobs.apply(hidden[idx], weight, y, c, _compute_dtype(hidden, weight))
    return out.index_put((idx,), lp)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         reduction: str = "mean", chunk: int | None = None,
                         ignore_index: int = IGNORE_INDEX,
                         max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without the [N, V] logits.

    ``reduction``: "sum" (over valid tokens), "mean" (over valid tokens; 0 if none) or "none" ([N]).
    """
    nll = -token_logprobs(hidden, weight, labels, chunk, ignore_index, max_chunk_elems)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        n = (labels != ignore_index).sum().clamp(min=1)
        return nll.sum() / n
    raise ValueError(f"reduction={reduction!r} is not 'sum', 'mean' or 'none'")


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      chunk: int | None = None, ignore_index: int = IGNORE_INDEX,
                      max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS) -> torch.Tensor:
    """Summed log p(label) per row: hidden [B, T, D], labels [B, T] -> [B] fp32 (DPO's log pi(y|x))."""
    B, T, D = hidden.shape
    lp = token_logprobs(hidden.reshape(B * T, D), weight, labels.reshape(B * T), chunk, ignore_index,
                        max_chunk_elems)
    return lp.view(B, T).sum(-1)


def dpo_loss(pol_chosen: torch.Tensor, pol_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss (mean over pairs) from summed sequence log-probs [P] of policy and reference.

    Returns (loss, stats) with per-pair ``rewards_chosen`` = beta (pi_c - ref_c), ``rewards_rejected``,
    ``margins`` (their difference) and ``accuracy`` (1 where the chosen reward is higher), all [P].
    """
    rc = beta * (pol_chosen - ref_chosen)
    rr = beta * (pol_rejected - ref_rejected)
    margin = rc - rr
    losses = -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing
    stats = {"rewards_chosen": rc.detach(), "rewards_rejected": rr.detach(), "margins": margin.detach(),
             "accuracy": (margin > 0).float().detach()}
    return losses.mean(), stats


__all__ = ["linear_cross_entropy", "token_logprobs", "sequence_logprobs", "dpo_loss", "LAST_CHUNKS",
           "chunk_tokens_for", "IGNORE_INDEX", "DEFAULT_MAX_CHUNK_ELEMS"]
