"""Triton kernels of the fused training BitLinear: int8 GEMM with the scales in the epilogue.

:mod:`bitnet158.kernels.bitlinear_train` holds the autograd function, the module and the model
swap (importable without Triton); this module is its Triton forward:

- activations: ``norm_quant.act_quant`` (per-token absmax int8, exact torch rounding);
- product: ``_i8_gemm_scaled``, int8 x int8 ``tl.dot`` tiles with int32 accumulation over K and
  the epilogue ``y = acc * (gamma / s_x)`` in fp32 (exactly ``quant.bitlinear_ref``'s ops), cast
  to the output dtype with round-to-nearest-even (also under the interpreter, via ``common.cast``).

The weight is the unpacked ternary int8 ``W_t`` [N, K] (no 2-bit packing during training, so any
N works). Block shapes are untuned defaults: GPU speed has not been measured yet.

Tests: ``python3 -m pytest -q tests/kernels/test_bitlinear_train.py`` (CPU: Triton interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, cast
from .norm_quant import act_quant


# ---------------------------------------------------------------- Triton int8 GEMM

@triton.jit
def _i8_gemm_scaled(x_ptr, w_ptr, sx_ptr, g_ptr, out_ptr, M, N, K,
                    stride_xm, stride_wn, stride_om,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ITERS: tl.constexpr,
                    INTERP: tl.constexpr):
    """out [BM, BN] tile = (x_q [M, K] @ W_t [N, K]^T) * (gamma / s_x[m]); int32 accumulation."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ms = pid_m * BM + tl.arange(0, BM)
    ns = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.int32)
    for it in range(0, ITERS):                   # ITERS = cdiv(K, BK): a constexpr (K is per layer)
        ks = it * BK + tl.arange(0, BK)
        kmask = ks < K
        x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :],
                    mask=(ms[:, None] < M) & kmask[None, :], other=0)             # int8 [BM, BK]
        w = tl.load(w_ptr + ns[None, :] * stride_wn + ks[:, None],
                    mask=(ns[None, :] < N) & kmask[:, None], other=0)             # int8 [BK, BN]
        acc = tl.dot(x, w, acc, out_dtype=tl.int32)
    gamma = tl.load(g_ptr)                                                        # fp32 scalar
    sx = tl.load(sx_ptr + ms, mask=ms < M, other=1.0)                             # fp32 [BM]
    scale = tl.math.div_rn(gamma + tl.zeros((BM,), tl.float32), sx)               # gamma / s_x
    y = acc.to(tl.float32) * scale[:, None]
    mask = (ms[:, None] < M) & (ns[None, :] < N)
    tl.store(out_ptr + ms[:, None] * stride_om + ns[None, :],
             cast(y, out_ptr.dtype.element_ty, INTERP), mask=mask)


def int8_linear(x_q: torch.Tensor, s_x: torch.Tensor, w_t: torch.Tensor, gamma: torch.Tensor,
                out_dtype: torch.dtype = torch.float32, block: tuple[int, int, int] | None = None
                ) -> torch.Tensor:
    """Triton ``(x_q [M, K] @ W_t [N, K]^T) * (gamma / s_x)`` -> [M, N] in ``out_dtype``.

    ``x_q``, ``w_t`` int8 with unit column stride; ``s_x`` fp32 [M] or [M, 1]; ``gamma`` fp32
    scalar tensor. With ``s_x = gamma = 1`` and fp32 output the int32 sums come back exactly
    (while ``|sum| < 2**24``). ``block`` = (BM, BN, BK), each >= 16.
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
    g = gamma.reshape(1).float().contiguous()
    out = torch.empty((M, N), dtype=out_dtype, device=x_q.device)
    if block is None:  # untuned defaults; the GPU tuning is still to be done
        bm = 16 if M <= 16 else (64 if M <= 256 else 128)
        block = (bm, 128 if N >= 128 else max(16, triton.next_power_of_2(N)),
                 min(128, max(32, triton.next_power_of_2(K))))
    BM, BN, BK = block
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _i8_gemm_scaled[grid](x_q, w_t, s, g, out, M, N, K, x_q.stride(0), w_t.stride(0), out.stride(0),
                          BM=BM, BN=BN, BK=BK, ITERS=triton.cdiv(K, BK), INTERP=INTERPRET,
                          num_warps=4 if BM * BN <= 8192 else 8)
    return out


def forward_int8(x2: torch.Tensor, w_t: torch.Tensor, gamma: torch.Tensor, out_dtype: torch.dtype):
    """x2 [M, K] float -> (y [M, N] out_dtype, x_q int8 [M, K], s_x fp32 [M, 1])."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    x_q, s = act_quant(x2)                                            # int8 [M, K], fp32 [M]
    s = s.reshape(-1, 1)
    return int8_linear(x_q, s, w_t, gamma, out_dtype=out_dtype), x_q, s


def usable(x: torch.Tensor) -> bool:
    """The kernels can run on x: a CUDA tensor, or any tensor under the interpreter."""
    return x.is_cuda or INTERPRET
