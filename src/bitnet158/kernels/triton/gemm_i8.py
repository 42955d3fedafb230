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

A second GEMM kernel, ``_i8_gemm_desc`` (config ``TMA=True``), loads both operands through tensor
descriptors (TMA on Hopper: one bulk copy per tile and stage instead of per-thread ``cp.async``),
computes the per-segment scales once per row (three ``gamma / s_x`` divisions a row instead of one
per output element; the same correctly rounded values), and optionally runs persistent
(``NPROG`` programs loop over the tiles, ``WS``: Triton's warp specialization of that loop; for
sm_90 Triton 3.6 compiles it to the same kernel as without). It is bit-identical to the pointer
kernel (tests) and faster than it on an H100; against :mod:`.gemm_tc` a layer's projections are
faster at 512-2048 rows (gate|up alone at 512 rows is not, see ``TUNED``), so every entry of
``TUNED`` selects it.

Tests: ``tests/kernels/test_gemm_i8.py`` (interpreter on CPU, compiled on CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bitlinear_train import _i8_gemm_scaled
from .common import INTERPRET, cast, cdiv, grouped_tile, sm_count
from .gemm_tc import _cols, m_bucket

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernel only
    TensorDescriptor = None


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


@triton.jit
def _scaled_store(acc, pid_m, pid_n, sx_ptr, g_ptr, out_ptr, M, N, C1, C2, stride_om,
                  BM: tl.constexpr, BN: tl.constexpr, INTERP: tl.constexpr):
    """out tile = acc [BM, BN] * (gamma_seg / s_x[m]): one correctly rounded division per row and
    segment (segments start at output columns C1, C2; N where absent)."""
    ms = pid_m * BM + tl.arange(0, BM)
    ns = pid_n * BN + tl.arange(0, BN)
    mrow = ms < M
    ncol = ns < N
    sx = tl.load(sx_ptr + ms, mask=mrow, other=1.0)                                  # fp32 [BM]
    i1 = (C1 < N).to(tl.int32)                     # gamma index of segment 1 (0 when there is none)
    i2 = i1 + (C2 < N).to(tl.int32)
    zero = tl.zeros((BM,), tl.float32)
    s0 = tl.math.div_rn(tl.load(g_ptr) + zero, sx)
    s1 = tl.math.div_rn(tl.load(g_ptr + i1) + zero, sx)
    s2 = tl.math.div_rn(tl.load(g_ptr + i2) + zero, sx)
    seg = (ns >= C1).to(tl.int32)[None, :] + (ns >= C2).to(tl.int32)[None, :]      # [1, BN]
    scale = tl.where(seg == 0, s0[:, None], tl.where(seg == 1, s1[:, None], s2[:, None]))
    y = acc.to(tl.float32) * scale
    tl.store(out_ptr + ms[:, None].to(tl.int64) * stride_om + ns[None, :],
             cast(y, out_ptr.dtype.element_ty, INTERP), mask=mrow[:, None] & ncol[None, :])


@triton.jit
def _k_loop(x_desc, w_desc, pid_m, pid_n, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            K_ITERS: tl.constexpr, INTERP: tl.constexpr):
    """int32 acc [BM, BN] = x tile rows [BM, K] @ w tile rows [BN, K]^T over the K tiles."""
    acc = tl.zeros((BM, BN), tl.int32)
    if INTERP:   # the interpreter cannot loop to a run-time bound
        for ki in range(0, K_ITERS):
            x = x_desc.load([pid_m * BM, ki * BK])                                      # int8 [BM, BK]
            w = w_desc.load([pid_n * BN, ki * BK])                                      # int8 [BN, BK]
            acc = tl.dot(x, w.T, acc, out_dtype=tl.int32)
    else:
        for ki in range(0, tl.cdiv(K, BK)):
            x = x_desc.load([pid_m * BM, ki * BK])
            w = w_desc.load([pid_n * BN, ki * BK])
            acc = tl.dot(x, w.T, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _i8_gemm_desc(x_desc, w_desc, sx_ptr, g_ptr, out_ptr, M, N, K, C1, C2, stride_om,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                  NPROG: tl.constexpr, WS: tl.constexpr, K_ITERS: tl.constexpr, TILES: tl.constexpr,
                  INTERP: tl.constexpr):
    """out [M, N] = (x_q [M, K] @ W8 [N, K]^T) * gamma_seg / s_x; x_desc blocks [BM, BK], w_desc
    [BN, BK] (out-of-range rows and K read as zeros). NPROG = 0: one tile a program; else NPROG
    programs loop over the tiles. Under the interpreter K_ITERS and TILES give the loop counts."""
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    if NPROG == 0:
        pid_m, pid_n = grouped_tile(tl.program_id(0), n_m, n_n, GROUP_M)
        acc = _k_loop(x_desc, w_desc, pid_m, pid_n, K, BM, BN, BK, K_ITERS, INTERP)
        _scaled_store(acc, pid_m, pid_n, sx_ptr, g_ptr, out_ptr, M, N, C1, C2, stride_om, BM, BN, INTERP)
    elif INTERP:
        for i in range(0, (TILES + NPROG - 1) // NPROG):
            t = tl.program_id(0) + i * NPROG
            if t < TILES:
                pid_m, pid_n = grouped_tile(t, n_m, n_n, GROUP_M)
                acc = _k_loop(x_desc, w_desc, pid_m, pid_n, K, BM, BN, BK, K_ITERS, INTERP)
                _scaled_store(acc, pid_m, pid_n, sx_ptr, g_ptr, out_ptr, M, N, C1, C2, stride_om, BM, BN,
                              INTERP)
    else:
        for t in tl.range(tl.program_id(0), n_m * n_n, NPROG, flatten=True, warp_specialize=WS):
            pid_m, pid_n = grouped_tile(t, n_m, n_n, GROUP_M)
            acc = _k_loop(x_desc, w_desc, pid_m, pid_n, K, BM, BN, BK, K_ITERS, INTERP)
            _scaled_store(acc, pid_m, pid_n, sx_ptr, g_ptr, out_ptr, M, N, C1, C2, stride_om, BM, BN, INTERP)

# ---------------------------------------------------------------- host side

# Block shapes (BM, BN, BK, GROUP_M, num_warps, num_stages, TMA, NPROG, WS) by (M bucket, N, K):
# the fastest of ``bench/gpu_gemm.py --i8-only`` on an H100 (2026-12-07), all descriptor kernels.
# 2048 rows, us with the unpack / bf16 cuBLAS / fp8 cuBLAS: q|k|v 45.7 / 55.1 / 33.7, o 37.8 / 36.7
# / 21.7, gate|up 155.3 / 189.2 / 110.0 (persistent), down 85.6 / 90.5 / 51.3. 512 rows, against the
# tensor-core kernel's best in the same run: q|k|v 16.9 / 20.7, o 15.1 / 20.2, gate|up 59.2 / 54.5,
# down 32.6 / 42.9 (124 against 138 us a layer). Other shapes fall back to DEFAULT.
TUNED: dict = {
    (512, 3840, 2560): (64, 128, 128, 8, 4, 4, True, 0, False),
    (512, 2560, 2560): (64, 128, 128, 8, 4, 4, True, 0, False),
    (512, 13824, 2560): (128, 256, 128, 8, 8, 3, True, -1, False),
    (512, 2560, 6912): (64, 128, 128, 8, 4, 4, True, 0, False),
    (2048, 3840, 2560): (128, 256, 128, 16, 8, 3, True, 0, False),
    (2048, 2560, 2560): (128, 128, 256, 8, 8, 3, True, 0, False),
    (2048, 13824, 2560): (128, 256, 128, 8, 8, 3, True, -1, False),
    (2048, 2560, 6912): (128, 128, 256, 8, 8, 3, True, 0, False),
}
DEFAULT = (128, 128, 128, 8, 8, 4)       # the training GEMM's large-M tile (bitlinear_train)


def i8_config(M: int, N: int, K: int) -> dict:
    """Block shapes for an [M, K] x [N, K] int8 product (tuned table, else ``DEFAULT``).

    A table entry is (BM, BN, BK, GROUP_M, num_warps, num_stages) or that + (TMA, NPROG, WS)."""
    t = TUNED.get((m_bucket(M), N, K), DEFAULT)
    return i8_dict(t)


def i8_dict(t) -> dict:
    """(BM, BN, BK, GROUP_M, num_warps, num_stages[, TMA, NPROG, WS]) -> a ``kind="i8"`` config."""
    if len(t) not in (6, 9):
        raise ValueError(f"gemm_i8: block-shape entry {tuple(t)} has {len(t)} fields; expected 6 (BM, BN, BK, "
                         f"GROUP_M, num_warps, num_stages) or 9 (those + TMA, NPROG, WS)")
    bm, bn, bk, gm, nw, ns = t[:6]
    cfg = dict(kind="i8", BM=bm, BN=bn, BK=bk, GROUP_M=gm, num_warps=nw, num_stages=ns)
    if len(t) > 6:
        cfg.update(TMA=bool(t[6]), NPROG=int(t[7]), WS=bool(t[8]))
    return cfg


def unpack_i8(w: torch.Tensor, P1: int, P2: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed uint8 [R, K] -> ternary int8 [4R, K] in output-column order (segments P1, P2)."""
    R, K = w.shape
    if out is None:
        out = torch.empty((4 * R, K), dtype=torch.int8, device=w.device)
    br, bk = (16, 64) if INTERPRET else (32, 256)
    _unpack_i8[(cdiv(R, br), cdiv(K, bk))](w, out, K, R, P1, P2, BR=br, BK=bk, num_warps=4)
    return out


def _descriptor_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor needs 16-byte aligned rows and base address (int8: row stride % 16)."""
    return TensorDescriptor is not None and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0


# shared memory a block may use on sm_90 (227 KB)
SMEM_LIMIT = 232448


def persistent_fits(cfg: dict, out_bytes: int) -> bool:
    """Whether a persistent descriptor kernel fits in shared memory: its loop keeps the
    ``num_stages`` operand buffers while the epilogue converts the [BM, BN] tile's layout through
    shared memory (a one-tile program reuses the buffers). For the 2B4T gate|up tile (128 x 256,
    BK 128, 3 stages) this count gives 212992 bytes with a bf16 output and 278528 with fp32; the
    sm_90 compile of the fp32 one asked for 278552 of the 232448 there are."""
    ops = cfg["num_stages"] * (cfg["BM"] + cfg["BN"]) * cfg["BK"]
    return ops + cfg["BM"] * cfg["BN"] * out_bytes <= SMEM_LIMIT


def i8_linear(x_q, s_x, w, gammas, P1: int, P2: int, out, cfg: dict, w8=None):
    """out [M, 4R] = (x_q [M, K] @ W_t^T) * gamma_seg / s_x via a transient int8 weight matrix
    (``w8`` int8 [4R, K]: that matrix unpacked already, e.g. by :mod:`.unpack_ahead`).

    ``cfg``: BM, BN, BK, GROUP_M, num_warps, num_stages; optional ``TMA`` (the descriptor kernel,
    where the rows are 16-byte aligned), ``NPROG`` (persistent programs; -1: one an SM) and ``WS``
    (warp specialization of the persistent loop); a persistent configuration that would not fit in
    shared memory with this output dtype (``persistent_fits``) runs one tile a program."""
    M, K = x_q.shape
    N = 4 * w.shape[0]
    cfg = dict(cfg)
    cfg.pop("kind", None)
    tma, nprog, ws = cfg.pop("TMA", False), cfg.pop("NPROG", 0), cfg.pop("WS", False)
    if w8 is None:
        w8 = unpack_i8(w, P1, P2)
    elif w8.shape != (N, K) or w8.dtype != torch.int8:
        raise ValueError(f"i8_linear: unpacked weights are {w8.dtype} {tuple(w8.shape)}; expected int8 {(N, K)}")
    tiles = cdiv(M, cfg["BM"]) * cdiv(N, cfg["BN"])
    k_iters = cdiv(K, cfg["BK"]) if INTERPRET else 0
    if tma and _descriptor_ok(x_q) and _descriptor_ok(w8):
        if nprog == -1:
            nprog = sm_count(x_q.device) if x_q.is_cuda else 2
        if nprog and not persistent_fits(cfg, out.element_size()):
            nprog = 0
        nprog = min(nprog, tiles)
        xd = TensorDescriptor.from_tensor(x_q, [cfg["BM"], cfg["BK"]])
        wd = TensorDescriptor.from_tensor(w8, [cfg["BN"], cfg["BK"]])
        _i8_gemm_desc[(nprog or tiles,)](xd, wd, s_x, gammas, out, M, N, K, 4 * P1, 4 * P2, out.stride(0),
                                        NPROG=nprog, WS=ws, K_ITERS=k_iters, TILES=tiles if INTERPRET else 0,
                                        INTERP=INTERPRET, **cfg)
        return out
    _i8_gemm_scaled[(tiles,)](x_q, w8, s_x, gammas, out, M, N, K, 4 * P1, 4 * P2, x_q.stride(0), K, out.stride(0),
                              G_MODE=2, EVEN_K=K % cfg["BK"] == 0, K_ITERS=k_iters, INTERP=INTERPRET, **cfg)
    return out


__all__ = ["DEFAULT", "TUNED", "i8_config", "i8_dict", "i8_linear", "persistent_fits", "unpack_i8"]
