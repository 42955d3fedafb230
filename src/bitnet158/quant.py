"""The reference quantization math of BitNet b1.58: every kernel, checkpoint and layer agrees on this.

- Weights: absmean ternary, one scale per tensor. ``gamma = max(mean|W|, 1e-5)``,
  ``W_t = clamp(round(W / gamma), -1, 1)`` in {-1, 0, +1}; dequantized ``W_t * gamma``.
- Activations: absmax int8 per token. ``s_x = 127 / max(max|x|, 1e-5)``,
  ``x_q = clamp(round(x * s_x), -128, 127)``; dequantized ``x_q / s_x``.
- Linear: ``y = (x_q @ W_t^T) * gamma / s_x``. The integer product is exact in int32, and also
  exact in fp32 while ``|sum| < 2**24`` (``128 * K`` for K up to 131072), which is what
  :func:`int_matmul` relies on.
- Hugging Face 2-bit packing (``[out, in]`` -> uint8 ``[out/4, in]``): field ``k`` (bits 2k..2k+1)
  of packed row ``r`` holds row ``k*R + r`` with ``R = out/4``, stored as ``w + 1``.

All math runs in fp32 with ``torch.round`` (half to even), as transformers' BitNet does.
This module imports nothing of ours.
"""

from __future__ import annotations

import torch

EPS = 1e-5
QMAX = 127
QMIN = -128


# ---------------------------------------------------------------- weights (absmean ternary)

def absmean(w: torch.Tensor) -> torch.Tensor:
    """gamma = max(mean|W|, 1e-5), an fp32 scalar tensor. The released ``weight_scale`` is this."""
    return w.float().abs().mean().clamp(min=EPS)


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] (any float dtype) -> (W_t int8 in {-1,0,1}, gamma fp32 scalar).

    Matches transformers: ``scale = 1 / mean|W|.clamp(1e-5)``; ``round(W * scale).clamp(-1, 1)``.
    """
    wf = w.float()
    gamma = absmean(wf)
    w_t = (wf * (1.0 / gamma)).round().clamp(-1, 1).to(torch.int8)
    return w_t, gamma


def ternary_dequant(w: torch.Tensor) -> torch.Tensor:
    """The fake-quantized weight ``W_t * gamma`` in W's dtype (what the training forward uses)."""
    wf = w.float()
    scale = 1.0 / absmean(wf)
    return ((wf * scale).round().clamp(-1, 1) / scale).to(w.dtype)


# ---------------------------------------------------------------- activations (absmax int8)

def act_scale(x: torch.Tensor) -> torch.Tensor:
    """s_x = 127 / max(max|x|, 1e-5) per token: x [..., K] -> fp32 [..., 1]."""
    return QMAX / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_q int8 [..., K], s_x fp32 [..., 1])."""
    s = act_scale(x)
    x_q = (x.float() * s).round().clamp(QMIN, QMAX).to(torch.int8)
    return x_q, s


def act_dequant(x: torch.Tensor) -> torch.Tensor:
    """The fake-quantized activation ``x_q / s_x`` in x's dtype."""
    s = act_scale(x)
    return ((x.float() * s).round().clamp(QMIN, QMAX) / s).to(x.dtype)


# ---------------------------------------------------------------- straight-through estimators

def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward ``q``, backward identity to ``x``: ``x + (q - x).detach()``."""
    return x + (q - x).detach()


# ---------------------------------------------------------------- the integer product

def int_matmul(x_q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x_q int8 [..., K] @ W_t int8 [N, K]^T -> int32 [..., N], exact.

    Computed in fp32, which is exact here: every partial sum is an integer of magnitude
    <= 128 * K < 2**24 for K <= 131072.
    """
    if x_q.shape[-1] > 131072:
        raise ValueError(f"int_matmul: K={x_q.shape[-1]} too large for exact fp32 accumulation")
    return torch.matmul(x_q.float(), w_t.float().t()).to(torch.int32)


def bitlinear_ref(x: torch.Tensor, w_t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The reference BitLinear inference forward: x [..., K] float, W_t int8 [N, K], gamma scalar.

    ``y = (x_q @ W_t^T) * gamma / s_x`` computed in fp32, returned in x's dtype.
    """
    x_q, s = act_quant(x)
    acc = int_matmul(x_q, w_t)
    return (acc.float() * (gamma.float() / s)).to(x.dtype)


# ---------------------------------------------------------------- Hugging Face 2-bit packing

def pack_hf(w_t: torch.Tensor) -> torch.Tensor:
    """Ternary int8 [out, in] -> uint8 [out/4, in] in the released (block, not interleaved) layout."""
    out = w_t.shape[0]
    if out % 4:
        raise ValueError(f"pack_hf: out_features={out} is not a multiple of 4")
    if w_t.numel() and (w_t.min() < -1 or w_t.max() > 1):
        raise ValueError("pack_hf: weights must be ternary (-1, 0, 1)")
    u = (w_t.to(torch.int16) + 1).to(torch.uint8)  # {0, 1, 2}
    r = out // 4
    packed = torch.zeros((r,) + tuple(w_t.shape[1:]), dtype=torch.uint8, device=w_t.device)
    for k in range(4):
        packed |= u[k * r:(k + 1) * r] << (2 * k)
    return packed


def unpack_hf(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/4, in] -> ternary int8 [out, in]. Code 3 (never written) would decode to +2."""
    fields = [((packed >> (2 * k)) & 3) for k in range(4)]
    return (torch.cat(fields, dim=0).to(torch.int8) - 1)
