"""Memory-safe head losses: the output projection and the loss computed together, chunk by chunk.

    from bitnet158.train.losses import linear_cross_entropy, sequence_logprobs, token_logprobs
    h = model.hidden(tokens)                                        # [B, T, D]
    loss = linear_cross_entropy(h.flatten(0, 1), model.head_weight, labels.flatten(), reduction="sum")
    logp = sequence_logprobs(h, model.head_weight, labels)          # [B]: sum of log p(label), DPO
    loss = fused_linear_cross_entropy(h.flatten(0, 1), model.head_weight, labels.flatten())  # mean|sum

At a 128k vocabulary the logits of a batch ([B, T, V], fp32 for the softmax) are gigabytes.
Here the tokens are processed ``chunk`` rows at a time: the forward keeps only one chunk of logits
[chunk, V] alive and returns the per-token log-probabilities [N]; the backward recomputes each
chunk's logits and turns them straight into gradients (``dlogp/dlogits = onehot(y) - softmax``),
so no [N, V] tensor ever exists, in the forward or the backward. ``fused_linear_cross_entropy``
(mean or sum: a training loss) goes further: each chunk's logits are made once, the row kernel
(:func:`ce_rows`, Triton on CUDA) turns them in place into the gradient, which goes straight into
the hidden and head gradients during the forward; backward only scales them. The DPO log-probs use
the same row kernel. Tokens whose label is
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


# Triton's row kernel runs on CUDA tensors; tests set this to also run it under the interpreter.
FORCE_TRITON = False
TORCH_ROWS_ELEMS = 1 << 24               # rows of logits per block of the torch row fallback (x V)


def _triton_rows():
    try:
        from ..kernels.triton import linear_ce
        return linear_ce
    except ImportError:  # pragma: no cover - no Triton
        return None


def ce_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None = None,
            ignore_index: int = IGNORE_INDEX, write_grad: bool = True) -> torch.Tensor:
    """Per-row NLL of a logits chunk [c, V] -> fp32 [c]; with ``write_grad`` the logits are
    overwritten by ``scale_row * (softmax - onehot(label))`` (their dtype). Ignored rows: 0.

    The Triton kernel (:mod:`bitnet158.kernels.triton.linear_ce`) on CUDA; torch ops elsewhere.
    """
    if logits.is_cuda or FORCE_TRITON:
        k = _triton_rows()
        if k is not None:
            return k.ce_rows(logits, labels, scale, ignore_index, write_grad)
    # torch ops, a block of rows at a time: the fp32 temporaries (logsumexp, softmax) stay ~64 MB
    # whatever the chunk (the fused loss's chunks are 128 M logits)
    rows = max(1, TORCH_ROWS_ELEMS // max(logits.shape[1], 1))
    per_row = scale is not None and scale.dim() > 0
    out = [_ce_rows_torch(logits[s:s + rows], labels[s:s + rows], scale[s:s + rows] if per_row else scale,
                          ignore_index, write_grad) for s in range(0, logits.shape[0], rows)]
    return out[0] if len(out) == 1 else torch.cat(out)


def _ce_rows_torch(logits, labels, scale, ignore_index: int, write_grad: bool) -> torch.Tensor:
    valid = labels != ignore_index
    lab = torch.where(valid, labels, torch.zeros_like(labels))
    z = logits.float()                                                   # [c, V]
    lse = torch.logsumexp(z, dim=-1)
    nll = torch.where(valid, lse - z.gather(1, lab[:, None]).squeeze(1), torch.zeros_like(lse))
    if write_grad:
        sc = torch.ones((), device=z.device) if scale is None else scale.float()
        sc = torch.where(valid, sc.expand(valid.shape), torch.zeros_like(lse))
        g = z.sub_(lse[:, None]).exp_() if z is logits else torch.softmax(z, dim=-1)   # fp32 logits: in place
        del z
        g.scatter_add_(1, lab[:, None], -torch.ones_like(g[:, :1]))
        g.mul_(sc[:, None])
        if g is not logits:
            logits.copy_(g)
    return nll


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
            logits = h @ w.t()                                           # [c, V]: the only big tensor
            LAST_CHUNKS.forward.append(tuple(logits.shape))
            out[s:s + chunk] = -ce_rows(logits, labels[s:s + chunk], write_grad=False)
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
            logits = h @ w.t()                                           # [c, V], recomputed
            LAST_CHUNKS.backward.append(tuple(logits.shape))
            # d logp / d logits = onehot(y) - softmax, times the incoming grad of each row: the
            # head-loss row kernel with scale -grad (it writes scale * (softmax - onehot)) in place
            ce_rows(logits, labels[s:s + chunk], -go[s:s + chunk], write_grad=True)
            g = logits
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


FUSED_MAX_CHUNK_ELEMS = 1 << 27        # 128 M logits = 256 MB of bf16 per chunk (4096 rows at 32k)


class _FusedLinearCE(torch.autograd.Function):
    """``scale * sum_i nll_i`` of ``hidden @ weight.T`` with the gradients made in the forward.

    hidden [M, D], weight [V, D], labels [M] (``ignore_index`` allowed), scale fp32 [] (device).
    Each chunk's logits [c, V] are made once: the row kernel turns them in place into the gradient
    of the loss w.r.t. the logits, which goes straight into ``grad_h`` [M, D] and ``grad_W``
    [V, D] (fp32). Saved for backward: only those two; backward scales them by the incoming grad.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, chunk: int, dtype: torch.dtype, ignore_index: int,
                grad_enabled: bool):
        M = hidden.shape[0]
        # (needs_input_grad follows requires_grad even under no_grad: evaluation makes no gradients)
        need_h = ctx.needs_input_grad[0] and grad_enabled
        need_w = ctx.needs_input_grad[1] and grad_enabled
        grad = need_h or need_w
        w = weight.to(dtype)                                             # [V, D]
        nll = torch.empty(M, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, M, chunk):
            h = hidden[s:s + chunk].to(dtype)                            # [c, D]
            logits = h @ w.t()                                           # [c, V]: the only big tensor
            LAST_CHUNKS.forward.append(tuple(logits.shape))
            nll[s:s + chunk] = ce_rows(logits, labels[s:s + chunk], scale, ignore_index, write_grad=grad)
            if need_h:                                                   # logits now hold d loss/d logits
                grad_h[s:s + chunk] = logits @ w
            if need_w:
                grad_w.add_(logits.t() @ h)
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return nll.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        go = grad_out.float()
        gh = (grad_h * go).to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * go).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               reduction: str = "mean", chunk: int | None = None,
                               ignore_index: int = IGNORE_INDEX,
                               max_chunk_elems: int = FUSED_MAX_CHUNK_ELEMS) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` (mean or sum over valid tokens), head and loss fused.

    Same value and gradients as :func:`linear_cross_entropy` (and as ``F.cross_entropy`` of the full
    logits), but each logits chunk is computed ONCE: the gradient is made in the forward (no
    recomputation in backward) and the fp32 copies of the logits never exist. Peak memory: one
    chunk of logits in the compute dtype + ``grad_h`` [N, D] + ``grad_W`` [V, D] fp32, independent of
    N x V. The result must only be scaled/added on the way to ``backward`` (a loss, not a feature).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be [N, D] and [V, D]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: labels {tuple(labels.shape)} do not match "
                         f"hidden {tuple(hidden.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction={reduction!r} is not 'mean' or 'sum'")
    V = weight.shape[0]
    c = chunk_tokens_for(V, chunk, max_chunk_elems)
    LAST_CHUNKS.reset(c)
    if labels.numel() and not torch.compiler.is_compiling():
        bad = ((labels != ignore_index) & ((labels < 0) | (labels >= V))).any()
        if labels.is_cuda:          # checked on the device: no host sync in the training step
            torch._assert_async(~bad, f"fused_linear_cross_entropy: a label is outside [0, {V})")
        elif bool(bad):
            raise ValueError(f"fused_linear_cross_entropy: a label is outside [0, {V})")
    if reduction == "mean":
        scale = 1.0 / (labels != ignore_index).sum().clamp(min=1).float()
    else:
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    return _FusedLinearCE.apply(hidden, weight, labels, scale, c, _compute_dtype(hidden, weight),
                                ignore_index, torch.is_grad_enabled())


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


__all__ = ["linear_cross_entropy", "fused_linear_cross_entropy", "ce_rows", "token_logprobs", "sequence_logprobs", "dpo_loss", "LAST_CHUNKS",
           "chunk_tokens_for", "IGNORE_INDEX", "DEFAULT_MAX_CHUNK_ELEMS"]
