"""Triton kernels that end in int8 activations: (residual add +) RMSNorm + absmax quantization.

One program per token row, the whole row in registers. Numerics follow the reference exactly:

- residual: ``h = (x + d)`` rounded to the model dtype (a bf16 add), written back for the next add;
- RMSNorm (``model.RMSNorm``): fp32 ``h * 1/sqrt(mean(h^2) + eps)``, cast to the model dtype, times
  the weight (rounded again);
- activation quant (``quant.act_quant``): fp32 ``s = 127 / max(max|y|, 1e-5)``, which torch
  evaluates as ``127 * (1 / t)`` (two roundings; done the same way here), then
  ``q = clamp(rint(y * s), -128, 127)`` with round-half-to-even.

Modes: 0 = plain row, 1 = ``x + d`` residual, 2 = squared-ReLU gate ``relu(g)^2 * u`` of a fused
gate/up row ``[g | u]`` (bf16 rounding after each op, as the reference's torch ops).

Roundings (``rint``, fp32 -> bf16) come from :mod:`.common`, exact on the GPU and the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, PDL, cast, gdc_launch_dependents, gdc_wait, next_pow2, rint, rnd


@triton.jit
def _quant_store(y, mask, q_ptr, s_ptr, row, stride_q, offs, INTERP: tl.constexpr):
    """Absmax-quantize fp32 y [BLOCK] (masked lanes 0) into q_ptr row and s_ptr[row]."""
    amax = tl.max(tl.abs(y), axis=0)
    s = 127.0 * tl.math.div_rn(1.0, tl.maximum(amax, 1e-5))   # torch's `127 / t` = 127 * (1 / t)
    q = tl.minimum(tl.maximum(rint(y * s, INTERP), -128.0), 127.0)
    tl.store(q_ptr + row * stride_q + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, s)


@triton.jit
def _norm_quant_kernel(x_ptr, d_ptr, h_ptr, w_ptr, y_ptr, q_ptr, s_ptr,
                       D, stride_x, stride_d, stride_h, stride_y, stride_q, eps,
                       MODE: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr,
                       STORE_Y: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr,
                       INTERP: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    dt = h_ptr.dtype.element_ty
    if NORM:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)   # before the wait: a weight
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    if MODE == 2:  # fused gate/up row [g | u] of width 2D
        g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.maximum(g, 0.0)
        h = cast(rnd(g * g, dt, INTERP) * u, dt, INTERP)
    else:
        h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if MODE == 1:
            d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0)
            h = cast(h.to(tl.float32) + d.to(tl.float32), dt, INTERP)
            tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    hf = h.to(tl.float32)
    if NORM:
        var = tl.sum(hf * hf, axis=0) / D
        r = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        y = rnd(w * rnd(hf * r, dt, INTERP), dt, INTERP)
    else:
        y = hf
    if STORE_Y:
        tl.store(y_ptr + row * stride_y + offs, cast(y, y_ptr.dtype.element_ty, INTERP), mask=mask)
    if QUANT:
        _quant_store(y, mask, q_ptr, s_ptr, row, stride_q, offs, INTERP)


_pdl = dict(launch_pdl=True) if PDL else {}


def _warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def norm_quant(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5, *,
               residual: torch.Tensor | None = None, h_out: torch.Tensor | None = None,
               gated: bool = False, quant: bool = True, y_out: torch.Tensor | None = None,
               q_out: torch.Tensor | None = None, s_out: torch.Tensor | None = None):
    """Fused row kernel over x [M, W] (2-D, unit column stride).

    - ``residual`` d [M, D]: ``h = x + d`` (model dtype) is written to ``h_out`` (may be ``x``).
    - ``gated``: x is a fused gate/up row [M, 2D]; ``h = relu(g)^2 * u``.
    - ``weight`` [D] or None (no norm, quantize h itself).
    - ``quant``: return (q int8 [M, D], s fp32 [M]); else return y (the normed row, x's dtype).
    """
    M = x.shape[0]
    D = x.shape[1] // 2 if gated else x.shape[1]
    dt = x.dtype
    mode = 2 if gated else (1 if residual is not None else 0)
    if mode == 1 and h_out is None:
        h_out = torch.empty((M, D), dtype=dt, device=x.device)
    h = h_out if h_out is not None else x
    if quant:
        q_out = q_out if q_out is not None else torch.empty((M, D), dtype=torch.int8, device=x.device)
        s_out = s_out if s_out is not None else torch.empty((M,), dtype=torch.float32, device=x.device)
    else:
        y_out = y_out if y_out is not None else torch.empty((M, D), dtype=dt, device=x.device)
    d = residual if residual is not None else x
    y = y_out if y_out is not None else x
    q = q_out if q_out is not None else x
    s = s_out if s_out is not None else x
    w = weight if weight is not None else x
    block = next_pow2(D)
    _norm_quant_kernel[(M,)](x, d, h, w, y, q, s, D, x.stride(0), d.stride(0), h.stride(0),
                             y.stride(0), q.stride(0), eps, MODE=mode, BLOCK=block,
                             NORM=weight is not None, STORE_Y=not quant, QUANT=quant, PDL=PDL,
                             INTERP=INTERPRET, num_warps=_warps(block), **_pdl)
    return (q_out, s_out) if quant else y_out


def act_quant(x: torch.Tensor):
    """Triton ``quant.act_quant`` for x [M, K]: (q int8 [M, K], s fp32 [M])."""
    return norm_quant(x, None, quant=True)
