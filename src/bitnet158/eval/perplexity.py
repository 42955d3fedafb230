"""Sliding-window perplexity of a model over a token stream or a text file.

    r = perplexity(model, ids, ctx=1024, stride=512)          # ids: list[int]
    r.ppl, r.nll, r.tokens                                    # exp(mean NLL), summed NLL, scored tokens
    r = perplexity_text(model, tokenizer, open(f).read(), ctx=1024, stride=512)
    r.word_ppl, r.byte_ppl, r.bits_per_byte                   # lm-eval's document-level metrics

The method is Hugging Face's: windows of ``ctx`` input tokens advance by ``stride`` tokens; each
window scores only the tokens no earlier window scored, so every token after the first is scored
exactly once, with at least ``ctx - stride + 1`` tokens of left context (``stride == ctx``: disjoint
windows as lm-eval's ``loglikelihood_rolling``; ``stride < ctx``: overlapping context, lower and
more honest perplexity, more compute). The text is
encoded once with one BOS in front. Logits are computed in fp32 from the model's head on just the
scored positions, chunked, so the [T, V] logits of a 128k vocabulary never exist for a whole window.

    bitnet158 eval ppl MODEL --data ../shared/data/wikitext-2/raw/wiki.test.raw --ctx 1024 --stride 512
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ContextLengthError

HEAD_CHUNK = 512  # positions per head/log-softmax chunk: [HEAD_CHUNK, V] fp32 at a time


@dataclass
class PerplexityResult:
    nll: float                 # summed negative log-likelihood (nats) over the scored tokens
    tokens: int                # scored tokens (all but the first)
    windows: int
    ctx: int
    stride: int
    seconds: float = 0.0
    words: int | None = None   # whitespace-separated words of the text (for word perplexity)
    bytes: int | None = None   # UTF-8 bytes of the text
    extra: dict = field(default_factory=dict)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def word_ppl(self) -> float | None:
        return math.exp(self.nll / self.words) if self.words else None

    @property
    def byte_ppl(self) -> float | None:
        return math.exp(self.nll / self.bytes) if self.bytes else None

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / self.bytes / math.log(2) if self.bytes else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d.update(ppl=self.ppl, word_ppl=self.word_ppl, byte_ppl=self.byte_ppl,
                 bits_per_byte=self.bits_per_byte, tok_s=self.tokens / self.seconds if self.seconds else None,
                 **self.extra)
        return d


@torch.inference_mode()
def scored_logprobs(model, inputs: torch.Tensor, positions: list[torch.Tensor],
                    targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Log-probabilities of chosen next tokens.

    inputs: LongTensor [B, T] (right-padded rows); positions[b]: LongTensor [n_b] of input positions
    whose next-token distribution is scored; targets[b]: LongTensor [n_b] of the tokens to score.
    Returns, per row, fp32 [n_b] log p(target | inputs[b, :pos+1]) and appends nothing else.
    """
    h = model.hidden(inputs)                                               # [B, T, D]
    rows = torch.cat([torch.full_like(p, b) for b, p in enumerate(positions)])
    cols = torch.cat(positions)
    tgt = torch.cat(targets).to(h.device)
    hs = h[rows.to(h.device), cols.to(h.device)]                           # [N, D]
    out = torch.empty(hs.shape[0], dtype=torch.float32)
    for i in range(0, hs.shape[0], HEAD_CHUNK):
        logits = model.logits(hs[i:i + HEAD_CHUNK]).float()                # [n, V]
        lp = F.log_softmax(logits, dim=-1)
        out[i:i + HEAD_CHUNK] = lp.gather(1, tgt[i:i + HEAD_CHUNK, None])[:, 0].cpu()
    return list(out.split([len(p) for p in positions]))


def windows(n: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over n tokens.

    A window feeds tokens ``[begin, end - 1)`` (at most ``ctx``) and scores tokens ``[first, end)``.
    The first window scores tokens ``1..ctx``; each later one scores the next ``stride`` tokens with
    the ``ctx`` tokens before its last one as input, so every token after the first is scored
    exactly once with at least ``ctx - stride + 1`` tokens of context (``stride == ctx``: lm-eval's
    disjoint rolling windows).
    """
    if ctx < 1:
        raise ContextLengthError(f"ctx={ctx}: a window needs at least 1 input token")
    if not 1 <= stride <= ctx:
        raise ContextLengthError(f"stride={stride} must be in [1, ctx={ctx}]")
    e = min(ctx + 1, n)
    out = [(0, e, 1)]
    while e < n:
        s, e = e, min(e + stride, n)
        out.append((max(0, e - ctx - 1), e, s))
    return out


def perplexity(model, ids: list[int], ctx: int | None = None, stride: int | None = None,
               batch_size: int = 4, progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Sliding-window perplexity of ``ids`` (see the module docstring). ``ctx`` defaults to the
    model's context, ``stride`` to ``ctx // 2``."""
    max_pos = model.config.max_position_embeddings
    ctx = ctx or max_pos
    if ctx > max_pos:
        raise ContextLengthError(f"ctx={ctx} exceeds the model's context of {max_pos} tokens")
    stride = stride or max(1, ctx // 2)
    if len(ids) < 2:
        raise ContextLengthError(f"need at least 2 tokens to score, got {len(ids)}")
    wins = windows(len(ids), ctx, stride)
    data = torch.tensor(ids, dtype=torch.long)
    dev = model.device
    t0 = time.perf_counter()
    nll, scored = 0.0, 0
    for i in range(0, len(wins), batch_size):
        group = wins[i:i + batch_size]
        T = max(e - 1 - b for b, e, _ in group)
        x = torch.zeros(len(group), T, dtype=torch.long)                  # right-padded inputs
        pos, tgt = [], []
        for r, (b, e, first) in enumerate(group):
            x[r, :e - 1 - b] = data[b:e - 1]
            pos.append(torch.arange(first - b - 1, e - b - 1))    # position j predicts token j + 1
            tgt.append(data[first:e])
        for lp in scored_logprobs(model, x.to(dev), pos, tgt):
            nll -= float(lp.double().sum())
            scored += lp.numel()
        if progress:
            progress(min(i + batch_size, len(wins)), len(wins))
    return PerplexityResult(nll=nll, tokens=scored, windows=len(wins), ctx=ctx, stride=stride,
                            seconds=time.perf_counter() - t0)


def perplexity_text(model, tokenizer, text: str, ctx: int | None = None, stride: int | None = None,
                    batch_size: int = 4, max_tokens: int | None = None, add_bos: bool = True,
                    progress=None) -> PerplexityResult:
    """Perplexity of a document: encoded once (one BOS in front); word/byte metrics from the text.

    ``max_tokens`` scores only the first tokens (the word/byte counts then refer to that prefix).
    """
    ids = tokenizer.encode(text, add_bos=add_bos)
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids, skip_special=True)
    r = perplexity(model, ids, ctx, stride, batch_size, progress)
    r.words = len(text.split())
    r.bytes = len(text.encode("utf-8"))
    return r


def read_text(path) -> str:
    """A text file as the evaluation document (WikiText raw: the file as is, UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


__all__ = ["PerplexityResult", "perplexity", "perplexity_text", "scored_logprobs", "windows", "read_text"]
