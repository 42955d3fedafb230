"""The model and its head loss as one module: what pretraining, SFT and DPO call, and what DDP / FSDP2 wrap.

    from bitnet158.train.head_loss import HeadLoss, wrap_head_loss
    call = wrap_head_loss(ctx, model, "ce", head="fused", reduction="mean", dtype="bf16")   # pretraining
    loss = call(x, y)                          # x, y [B, T] -> scalar (mean over target tokens)
    loss = call(x, y, segments, reduction="sum")   # SFT: summed over the labels != -100
    call = wrap_head_loss(ctx, model, "logps", head="chunked")                           # DPO
    logps = call(tokens, labels)               # [B]: summed log-probs of the labelled tokens

Why one module: the head reads the tied embedding (``model.head_weight``) and the final norm. DDP
only syncs the gradients of what ran through the wrapped module's ``forward``, and FSDP2 only
unshards the root's parameters (embedding, final norm) around the root's ``forward``. A loss that
calls ``model.hidden`` and then the head outside ``forward`` gets neither; this module's ``forward``
runs both, so one process, DDP and FSDP2 compute the same loss with the same head.

Heads (``head``):

- ``"full"``: ``model.logits(h)`` [B, T, V] then ``F.cross_entropy`` in fp32: the plain reference
  (pretraining's default);
- ``"chunked"``: :func:`losses.linear_cross_entropy` / :func:`losses.sequence_logprobs`, one
  [chunk, V] logits block at a time, recomputed in backward (SFT's and DPO's default);
- ``"fused"``: :func:`losses.fused_linear_cross_entropy`, each logits chunk made once and turned
  into the gradient in the forward (``model.fused = true``). For DPO log-probs ("logps") the fused
  head is the chunked one: the gradient of a sequence's log-prob depends on the DPO loss of the
  whole batch, known only after every log-prob is, so each chunk's logits are made twice either way
  (forward, then backward); both passes run the same row kernel (:func:`losses.ce_rows`).

Under ``torch.compile`` the chunked and fused heads run eagerly (a graph break after the hidden
states): their Python chunk loops and Triton row kernel stay out of the compiled graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import IGNORE_INDEX, fused_linear_cross_entropy, linear_cross_entropy, sequence_logprobs

KINDS = ("ce", "logps")
HEADS = ("full", "chunked", "fused")


_DISABLED = None


def _eager(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` outside any torch.compile graph. ``torch.compiler.disable`` is applied on
    the first call, not at import: it imports torch._dynamo (and Triton), which importing this module
    must not do (``TRITON_INTERPRET`` may be set after the package is imported)."""
    global _DISABLED
    if _DISABLED is None:
        _DISABLED = torch.compiler.disable(lambda f, *a, **k: f(*a, **k))
    return _DISABLED(fn, *args, **kwargs)


class HeadLoss(nn.Module):
    """``net`` and its head loss. ``kind="ce"``: ``forward(tokens, labels, segments=None,
    reduction=None)`` -> cross-entropy over the labels != -100 ("mean" or "sum"; default
    ``reduction``); ``kind="logps"``: ``forward(tokens, labels, segments=None)`` -> summed label
    log-probs per row [B] (fp32)."""

    def __init__(self, net: nn.Module, kind: str = "ce", head: str = "chunked", reduction: str = "mean",
                 chunk: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"HeadLoss kind {kind!r} is not one of {KINDS}")
        if head not in HEADS:
            raise ValueError(f"HeadLoss head {head!r} is not one of {HEADS}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"HeadLoss reduction {reduction!r} is not 'mean' or 'sum'")
        if kind == "logps" and head == "full":
            raise ValueError("HeadLoss: the log-probs (DPO) have no full-logits head; use 'chunked'")
        self.net, self.kind, self.head, self.reduction, self.chunk = net, kind, head, reduction, chunk

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor | None = None,
                reduction: str | None = None) -> torch.Tensor:
        h = self.net.hidden(tokens, segment_ids=segments)                      # [B, T, D]
        w = self.net.head_weight                                               # [V, D]
        if self.kind == "logps":
            return _eager(sequence_logprobs, h, w, labels, chunk=self.chunk)   # [B]
        red = reduction or self.reduction
        if self.head == "full":
            logits = self.net.logits(h)                                        # [B, T, V]
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction=red,
                                   ignore_index=IGNORE_INDEX)
        fn = fused_linear_cross_entropy if self.head == "fused" else linear_cross_entropy
        return _eager(fn, h.flatten(0, 1), w, labels.flatten(), reduction=red, chunk=self.chunk)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, head={self.head}, reduction={self.reduction}, chunk={self.chunk}"


def wrap_head_loss(ctx, net: nn.Module, kind: str = "ce", head: str = "chunked", reduction: str = "mean",
                   chunk: int | None = None, dtype: str = "fp32", frozen: bool = False) -> nn.Module:
    """``HeadLoss(net)`` for ``ctx``: as is in one process; under torchrun DDP, or FSDP2 (``fully_shard``
    per block of ``net``, then the HeadLoss as the root; bf16 parameters when ``dtype == "bf16"`` on
    GPUs). ``frozen`` (a model that is only run, the DPO reference): as is under DDP, sharded like the
    trained model under FSDP2 (the same forward). Under torchrun it is wrapped even with one process
    (``--nproc_per_node=1``): the context's gradient-sync switch needs the DDP / FSDP2 module."""
    mod = HeadLoss(net, kind, head, reduction, chunk)
    if ctx.mode == "single":
        return mod
    mp = dtype == "bf16"
    if frozen:
        return ctx.wrap_frozen(mod, mixed_precision=mp, blocks=net.model.layers)
    return ctx.wrap(mod, mixed_precision=mp, blocks=net.model.layers, methods=())


def unwrap(model):
    """The module under torch.compile / DDP wrappers (FSDP2 modules are their own module)."""
    m = getattr(model, "_orig_mod", model)
    return getattr(m, "module", m)
