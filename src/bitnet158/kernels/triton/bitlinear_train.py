"""Triton kernels of the fused training BitLinear: int8 GEMM with the scales in the epilogue.

:mod:`bitnet158.kernels.bitlinear_train` holds the autograd functions and the model swap
(importable without Triton); this module is their Triton forward GEMM:

- ``_i8_gemm_scaled``: int8 x int8 ``tl.dot`` tiles (int8 tensor cores: ``wgmma`` on Hopper) with
  int32 accumulation over K and the epilogue ``y = acc * (gamma[n] / s_x[m])`` in fp32 (exactly
  ``quant.bitlinear_ref``'s ops), cast to the output dtype with round-to-nearest-even (also under
  the interpreter, via ``common.cast``). ``gamma`` is one scalar, or one per output column when
  several projections (q/k/v, gate/up) run as one GEMM over their concatenated ternary weights,
  or one per segment of columns (the prefill path of the packed inference weights,
  :mod:`.gemm_i8`).
- programs are ordered in groups of ``GROUP_M`` row tiles so that neighbouring programs share
  weight tiles in L2; the K loop is a run-time loop (one compile serves every layer shape).
- ``ternarize``: absmean ternary weight in two passes (partial |W| sums, then the int8 quantization
  with ``W * (1 / gamma)``, round half to even, clamp), 9 bytes per fp32 weight instead of ~37 for
  the chain of torch ops.

The activations come from :mod:`.norm_quant_train` (RMSNorm + absmax int8 in one pass) or
``norm_quant.act_quant`` (a bare projection). The weight is the unpacked ternary int8 ``W_t``
[N, K] (no 2-bit packing during training, so any N works).

Tests: ``python3 -m pytest -q tests/kernels/test_bitlinear_train.py`` (CPU: Triton interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, cast, gpu_unsupported, grouped_tile, rint
from .norm_quant import act_quant

# (BM, BN, BK, warps, stages) for large M on Hopper; small M takes a narrower tile.
GEMM_CONFIG = (128, 128, 128, 8, 4)


# ---------------------------------------------------------------- Triton int8 GEMM

@triton.jit
def _k_step(x_ptrs, w_ptrs, acc, k0, K, mrow, ncol, ks, EVEN_K: tl.constexpr):
    if EVEN_K:
        x = tl.load(x_ptrs + k0, mask=mrow[:, None], other=0)
        w = tl.load(w_ptrs + k0, mask=ncol[None, :], other=0)
    else:
        kmask = ks + k0 < K
        x = tl.load(x_ptrs + k0, mask=mrow[:, None] & kmask[None, :], other=0)
        w = tl.load(w_ptrs + k0, mask=ncol[None, :] & kmask[:, None], other=0)
    return tl.dot(x, w, acc, out_dtype=tl.int32)


@triton.jit
def _i8_gemm_scaled(x_ptr, w_ptr, sx_ptr, g_ptr, out_ptr, M, N, K, C1, C2,
                    stride_xm, stride_wn, stride_om,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    G_MODE: tl.constexpr, EVEN_K: tl.constexpr, K_ITERS: tl.constexpr,
                    INTERP: tl.constexpr):
    """out [BM, BN] tile = (x_q [M, K] @ W_t [N, K]^T) * (gamma / s_x[m]); int32 accumulation.

    G_MODE: 0 one gamma; 1 one per output column; 2 one per segment, segments starting at output
    columns 0, C1, C2 (the fused projections of the packed inference weights)."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    pid_m, pid_n = grouped_tile(pid, n_m, n_n, GROUP_M)
    ms = pid_m * BM + tl.arange(0, BM)
    ns = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    mrow = ms < M
    ncol = ns < N
    x_ptrs = x_ptr + ms[:, None].to(tl.int64) * stride_xm + ks[None, :]      # int8 [BM, BK]
    w_ptrs = w_ptr + ns[None, :].to(tl.int64) * stride_wn + ks[:, None]      # int8 [BK, BN]
    acc = tl.zeros((BM, BN), tl.int32)
    if INTERP:   # the interpreter cannot loop to a run-time bound: K_ITERS is a constexpr there
        for it in range(0, K_ITERS):
            acc = _k_step(x_ptrs, w_ptrs, acc, it * BK, K, mrow, ncol, ks, EVEN_K)
    else:
        for it in range(0, tl.cdiv(K, BK)):
            acc = _k_step(x_ptrs, w_ptrs, acc, it * BK, K, mrow, ncol, ks, EVEN_K)
    sx = tl.load(sx_ptr + ms, mask=mrow, other=1.0)                                  # fp32 [BM]
    if G_MODE > 0:
        if G_MODE == 1:
            gamma = tl.load(g_ptr + ns, mask=ncol, other=1.0)                        # fp32 [BN]
        else:
            gamma = tl.load(g_ptr + (ns >= C1).to(tl.int32) + (ns >= C2).to(tl.int32))
        scale = tl.math.div_rn(gamma[None, :] + tl.zeros((BM, BN), tl.float32), sx[:, None])
        y = acc.to(tl.float32) * scale
    else:
        gamma = tl.load(g_ptr)                                                       # fp32 scalar
        scale = tl.math.div_rn(gamma + tl.zeros((BM,), tl.float32), sx)              # gamma / s_x
        y = acc.to(tl.float32) * scale[:, None]
    mask = mrow[:, None] & ncol[None, :]
    tl.store(out_ptr + ms[:, None].to(tl.int64) * stride_om + ns[None, :],
             cast(y, out_ptr.dtype.element_ty, INTERP), mask=mask)


def int8_linear(x_q: torch.Tensor, s_x: torch.Tensor, w_t: torch.Tensor, gamma: torch.Tensor,
                out_dtype: torch.dtype = torch.float32, block: tuple[int, int, int] | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``(x_q [M, K] @ W_t [N, K]^T) * (gamma / s_x)`` -> [M, N] in ``out_dtype``.

    ``x_q``, ``w_t`` int8 with unit column stride; ``s_x`` fp32 [M] or [M, 1]; ``gamma`` fp32:
    a scalar, or [N] (one per output column). With ``s_x = gamma = 1`` and fp32 output the int32
    sums come back exactly (while ``|sum| < 2**24``). ``block`` = (BM, BN, BK), each >= 16.
    """
    M, K = x_q.shape
    N, Kw = w_t.shape
    if Kw != K:
        raise ValueError(f"int8_linear: weight has in_features={Kw}, activations have {K}")
    if x_q.dtype != torch.int8 or w_t.dtype != torch.int8:
        raise ValueError(f"int8_linear: x_q and w_t must be int8, got {x_q.dtype} and {w_t.dtype}")
    if x_q.stride(-1) != 1:
        x_q = x_q.contiguous()
    if w_t.stride(-1) != 1:
        w_t = w_t.contiguous()
    s = s_x.reshape(M).float().contiguous()
    per_col = gamma.numel() > 1
    if per_col and gamma.numel() != N:
        raise ValueError(f"int8_linear: gamma has {gamma.numel()} entries, expected 1 or N={N}")
    g = gamma.reshape(-1).float().contiguous()
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=x_q.device)
    warps, stages = 4, 2
    if block is None:
        if M >= 256 and not INTERPRET:
            BM, BN, BK, warps, stages = GEMM_CONFIG
        else:
            block = (16 if M <= 16 else 64, max(16, min(128, triton.next_power_of_2(N))),
                     min(128, max(32, triton.next_power_of_2(K))))
    if block is not None:
        BM, BN, BK = block
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _i8_gemm_scaled[grid](x_q, w_t, s, g, out, M, N, K, N, N, x_q.stride(0), w_t.stride(0), out.stride(0),
                          BM=BM, BN=BN, BK=BK, GROUP_M=8, G_MODE=int(per_col), EVEN_K=K % BK == 0,
                          K_ITERS=triton.cdiv(K, BK) if INTERPRET else 0,
                          INTERP=INTERPRET, num_warps=warps, num_stages=stages)
    return out


def forward_int8(x2: torch.Tensor, w_t: torch.Tensor, gamma: torch.Tensor, out_dtype: torch.dtype):
    """x2 [M, K] float -> (y [M, N] out_dtype, x_q int8 [M, K], s_x fp32 [M, 1])."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    x_q, s = act_quant(x2)                                            # int8 [M, K], fp32 [M]
    s = s.reshape(-1, 1)
    return int8_linear(x_q, s, w_t, gamma, out_dtype=out_dtype), x_q, s


# ---------------------------------------------------------------- absmean ternary weight

@triton.jit
def _abs_sum_partial(w_ptr, part_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(tl.abs(w), axis=0))


@triton.jit
def _ternarize_kernel(w_ptr, q_ptr, g_ptr, numel, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    inv = tl.math.div_rn(1.0, tl.load(g_ptr))                        # 1 / gamma, as the reference
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(rint(w * inv, INTERP), -1.0), 1.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=m)


def ternarize(w: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (W_t int8 [N, K], gamma fp32 scalar): ``quant.ternarize`` in two passes.

    gamma is the mean of |W| summed in fp32 blocks (its last bit may differ from torch's mean).
    """
    w = w.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    n = w.numel()
    nb = triton.cdiv(n, block)
    part = torch.empty(nb, dtype=torch.float32, device=w.device)
    _abs_sum_partial[(nb,)](w, part, n, BLOCK=block, num_warps=8)
    gamma = (part.sum() / n).clamp(min=1e-5)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    _ternarize_kernel[(nb,)](w, q, gamma, n, BLOCK=block, INTERP=INTERPRET, num_warps=8)
    return q, gamma


# ---------------------------------------------------------------- int8 rows back to floats

@triton.jit
def _dequant_rows_kernel(q_ptr, s_ptr, out_ptr, K, stride_q, stride_o, BLOCK: tl.constexpr,
                         INTERP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    offs = kb * BLOCK + tl.arange(0, BLOCK)
    m = offs < K
    s = tl.load(s_ptr + row)
    q = tl.load(q_ptr + row * stride_q + offs, mask=m, other=0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, cast(tl.math.div_rn(q, s), out_ptr.dtype.element_ty, INTERP),
             mask=m)


def dequant_rows(x_q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(x_q.float() / s).to(dtype)`` in one pass: x_q int8 [M, K], s fp32 [M] or [M, 1]."""
    M, K = x_q.shape
    out = torch.empty((M, K), dtype=dtype, device=x_q.device)
    block = min(4096, triton.next_power_of_2(K))
    _dequant_rows_kernel[(M, triton.cdiv(K, block))](x_q, s.reshape(M).contiguous(), out, K,
                                                      x_q.stride(0), out.stride(0), BLOCK=block,
                                                      INTERP=INTERPRET, num_warps=4)
    return out


def usable(x: torch.Tensor) -> bool:
    """The kernels can run on x: a CUDA tensor on an sm_80 or newer GPU, or any tensor under the
    interpreter."""
    return (x.is_cuda and gpu_unsupported(x.device) is None) or INTERPRET
