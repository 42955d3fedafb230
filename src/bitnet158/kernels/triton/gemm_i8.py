"""Prefill W2A8 GEMM: the 2-bit weights unpacked into a transient int8 matrix, then an int8 x int8
tensor-core GEMM with both operands in shared memory.

    cfg = i8_config(M, N, K)
    i8_linear(x_q int8 [M, K], s_x fp32 [M], w uint8 [R, K], gammas, P1, P2, out [M, 4R], cfg)

At thousands of activation rows a projection is bound by tensor-core throughput, not by weight
bytes, and the register-operand kernel of :mod:`.gemm_tc` (weights unpacked in registers, 64-row
MMAs) runs at about bf16 cuBLAS speed there. Here, per call:

1. ``_unpack_i8``: packed uint8 ``[R, K]`` (released Hugging Face layout, segments as in
   :mod:`.w2a8`) -> ternary int8 ``[4R, K]`` in output-column order. Memory-bound: for gate|up of
   2B4T (R = 3456, K = 2560) it reads 8.8 MB and writes 35 MB. The int8 matrix is a workspace of
   this call only (the caching allocator hands the same block to the next projection); the
   resident weights stay the 2-bit ones.
2. the int8 GEMM of the training BitLinear (``bitlinear_train._i8_gemm_scaled``, per-segment
   gammas): ``acc [BM, BN] = x [BM, K] @ w8[BN, K]^T`` in int32 over K tiles, both tiles K-major in
   shared memory (``num_stages`` deep: compiled for sm_90 with the runtime's 16-byte alignments,
   a 3-4 stage ``cp.async`` pipeline into int8 ``wgmma`` m64n128k32); programs grouped by
   ``GROUP_M`` row tiles so a weight column tile is read from L2 by the group. The epilogue is the
   reference's fp32 ``acc * (gamma_seg / s_x)`` (correctly rounded division), cast to the output
   dtype: integer results are exact and the outputs equal those of :mod:`.gemm_tc` bit for bit.

Tests: ``tests/kernels/test_gemm_i8.py`` (interpreter on CPU, compiled on CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bitlinear_train import _i8_gemm_scaled
from .common import INTERPRET, cdiv
from .gemm_tc import _cols, m_bucket


@triton.jit
def _unpack_i8(w_ptr, out_ptr, K, R_total, P1, P2, BR: tl.constexpr, BK: tl.constexpr):
    """Packed uint8 [R, K] -> ternary int8 [4R, K]: field j of packed row r is output row
    ``_cols(r, j)``, value ``((b >> 2j) & 3) - 1``."""
    r0 = tl.program_id(0) * BR
    rows = r0 + tl.arange(0, BR)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows < R_total)[:, None] & (ks < K)[None, :]
    w = tl.load(w_ptr + rows[:, None] * K + ks[None, :], mask=mask, other=0)          # uint8 [BR, BK]
    for j in tl.static_range(4):
        cols, _ = _cols(rows, j, P1, P2, R_total, r0, BR, False)
        v = ((w >> (2 * j)) & 3).to(tl.int8) - 1
        tl.store(out_ptr + cols[:, None] * K + ks[None, :], v, mask=mask)


# ---------------------------------------------------------------- host side

# Block shapes (BM, BN, BK, GROUP_M, num_warps, num_stages) by (M bucket, N, K), to be filled from
# ``bench/gpu_gemm.py`` (its ``i8_tuned``) on an H100; ``i8_config`` falls back to DEFAULT, not yet
# timed on this path.
TUNED: dict = {}
DEFAULT = (128, 128, 128, 8, 8, 4)       # the training GEMM's large-M tile (bitlinear_train)


def i8_config(M: int, N: int, K: int) -> dict:
    """Block shapes for an [M, K] x [N, K] int8 product (tuned table, else ``DEFAULT``)."""
    bm, bn, bk, gm, nw, ns = TUNED.get((m_bucket(M), N, K), DEFAULT)
    return dict(kind="i8", BM=bm, BN=bn, BK=bk, GROUP_M=gm, num_warps=nw, num_stages=ns)


def unpack_i8(w: torch.Tensor, P1: int, P2: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed uint8 [R, K] -> ternary int8 [4R, K] in output-column order (segments P1, P2)."""
    R, K = w.shape
    if out is None:
        out = torch.empty((4 * R, K), dtype=torch.int8, device=w.device)
    br, bk = (16, 64) if INTERPRET else (32, 256)
    _unpack_i8[(cdiv(R, br), cdiv(K, bk))](w, out, K, R, P1, P2, BR=br, BK=bk, num_warps=4)
    return out


def i8_linear(x_q, s_x, w, gammas, P1: int, P2: int, out, cfg: dict):
    """out [M, 4R] = (x_q [M, K] @ W_t^T) * gamma_seg / s_x via a transient int8 weight matrix."""
    M, K = x_q.shape
    N = 4 * w.shape[0]
    cfg = dict(cfg)
    cfg.pop("kind", None)
    w8 = unpack_i8(w, P1, P2)
    grid = (cdiv(M, cfg["BM"]) * cdiv(N, cfg["BN"]),)
    _i8_gemm_scaled[grid](x_q, w8, s_x, gammas, out, M, N, K, 4 * P1, 4 * P2, x_q.stride(0), K, out.stride(0),
                          G_MODE=2, EVEN_K=K % cfg["BK"] == 0, K_ITERS=cdiv(K, cfg["BK"]) if INTERPRET else 0,
                          INTERP=INTERPRET, **cfg)
    return out


__all__ = ["DEFAULT", "TUNED", "i8_config", "i8_linear", "unpack_i8"]
