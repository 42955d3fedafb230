"""Triton kernels of the training block: RMSNorm + per-token absmax int8 in one pass, and its backward.

Every BitLinear of the BitNet block follows an RMSNorm (q/k/v after ``input_layernorm``, o after
``attn_sub_norm``, gate/up after ``post_attention_layernorm``, down after ``ffn_sub_norm``). The
training path (:mod:`bitnet158.kernels.norm_bitlinear`) runs the norm and the quantization of its
output as one row kernel and never writes the normed activations:

- ``rms_quant``: x [M, D] (fp32 residual or a bf16 activation) and the norm weight [D] ->
  ``x_q`` int8 [M, D], ``s_x`` fp32 [M] (= 127 / max|y|), ``rstd`` fp32 [M]. The numerics follow
  ``model.RMSNorm`` then ``quant.act_quant``: ``h = x * rstd`` in fp32, rounded to x's dtype,
  ``y = w * h`` (rounded to ``y_dtype``, the dtype torch's promotion gives), ``s = 127 * (1 / t)``,
  ``q = clamp(rint(y * s), -128, 127)``.
- ``rms_backward``: the gradient of the normed output ``gy`` [M, D] (straight through the
  quantization) -> ``gx = rstd * (w*gy - xhat * mean(w*gy * xhat))`` in x's dtype and the norm
  weight's gradient ``sum_rows(gy * h)`` (per-program partial sums, reduced in torch: deterministic).

One program per row (``rms_quant``) or per ``ROWS`` rows (``rms_backward``); the whole row sits in
registers (D up to 16384).

Tests: ``python3 -m pytest -q tests/kernels/test_norm_bitlinear.py`` (CPU: Triton interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, cast, rint, rnd
from .norm_quant import _warps

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _rms_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, r_ptr, D, stride_x, stride_q, eps,
                      YDT: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / D
    r = tl.math.div_rn(1.0, tl.sqrt_rn((var + eps).to(tl.float32)))   # eps may come in as fp64 (inductor)
    h = rnd(xf * r, x_ptr.dtype.element_ty, INTERP)                   # h.to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = rnd(w * h, YDT, INTERP)                                       # weight * h, promoted dtype
    amax = tl.max(tl.abs(y), axis=0)
    s = 127.0 * tl.math.div_rn(1.0, tl.maximum(amax, 1e-5))           # torch's 127 / t
    q = tl.minimum(tl.maximum(rint(y * s, INTERP), -128.0), 127.0)
    tl.store(q_ptr + row * stride_q + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, s)
    tl.store(r_ptr + row, r)


def rms_quant(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x [M, D], weight [D] -> (x_q int8 [M, D], s_x fp32 [M], rstd fp32 [M])."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, D = x.shape
    q = torch.empty((M, D), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    r = torch.empty((M,), dtype=torch.float32, device=x.device)
    ydt = torch.promote_types(weight.dtype, x.dtype)
    block = triton.next_power_of_2(D)
    _rms_quant_kernel[(M,)](x, weight.contiguous(), q, s, r, D, x.stride(0), q.stride(0), eps,
                            YDT=_TL[ydt], BLOCK=block, INTERP=INTERPRET, num_warps=_warps(block))
    return q, s, r


@triton.jit
def _rms_bwd_kernel(x_ptr, w_ptr, r_ptr, gy_ptr, gx_ptr, dw_ptr, M, D,
                    stride_x, stride_gy, stride_gx,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, ROWS):
        row = (pid * ROWS + i).to(tl.int64)
        m = mask & (row < M)
        xf = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row, mask=row < M, other=0.0)
        xhat = xf * r
        h = rnd(xhat, x_ptr.dtype.element_ty, INTERP)
        gy = tl.load(gy_ptr + row * stride_gy + offs, mask=m, other=0.0).to(tl.float32)
        dw += gy * h
        gh = gy * w
        c = tl.sum(gh * xhat, axis=0) / D
        gx = r * (gh - xhat * c)
        tl.store(gx_ptr + row * stride_gx + offs, cast(gx, gx_ptr.dtype.element_ty, INTERP), mask=m)
    tl.store(dw_ptr + pid * D + offs, dw, mask=mask)


def rms_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, gy: torch.Tensor,
                 rows: int | None = None):
    """(x [M, D], weight [D], rstd [M], gy [M, D]) -> (gx [M, D] in x's dtype, gw [D] fp32)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if gy.stride(-1) != 1:
        gy = gy.contiguous()
    M, D = x.shape
    if rows is None:
        rows = max(1, triton.cdiv(M, 1024))
    progs = triton.cdiv(M, rows)
    gx = torch.empty((M, D), dtype=x.dtype, device=x.device)
    part = torch.empty((progs, D), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(D)
    _rms_bwd_kernel[(progs,)](x, weight.contiguous(), rstd, gy, gx, part, M, D, x.stride(0),
                              gy.stride(0), gx.stride(0), ROWS=rows, BLOCK=block, INTERP=INTERPRET,
                              num_warps=_warps(block))
    return gx, part.sum(0)
