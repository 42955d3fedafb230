"""Triton W2A8 linear kernels: ternary 2-bit weights x int8 activations, int32 accumulation.

Weights stay in the released Hugging Face layout (uint8 ``[out/4, in]``; field ``k`` of packed row
``r`` is output row ``k*R + r``, stored ``w + 1``), so no second copy is ever made. Projections that
read the same input (q/k/v, gate/up) are concatenated along the packed rows into one *segmented*
weight: segment ``s`` starts at packed row ``P_s`` (``R_s`` rows) and its outputs occupy columns
``4*P_s .. 4*P_s + 4*R_s`` of the result, each with its own ``weight_scale``.

Two kernels, one epilogue (``y = acc * (gamma_s / s_x)``, exactly the reference's fp32 ops):

- ``_gemv_dp4a``: decode (M <= ``GEMV_MAX_M``). An int32 of packed weights holds 4 consecutive K
  columns; ``(w >> 2k) & 0x03030303`` gives 4 codes ``u = w + 1`` of output row ``k*R + r`` at
  once, and one ``dp4a`` multiplies them with 4 int8 activations: ``x . w = x . u - sum(x)``, 3 ALU
  ops per packed byte instead of ~16 for byte-wise unpacking. A program holds the whole K of its
  rows in one tile, loaded before it waits on the previous kernel (programmatic dependent launch).
  ``JOINT`` (``GEMV_JOINT``, on): each lane starts its ``dp4a`` from minus its own activation sum,
  the four fields are summed in one cross-thread reduction of a ``[BR, K, 2, 2]`` join and stored
  in one epilogue, which leaves 4 barriers after the wait instead of 14-22 (sm_90 PTX of the 2B4T
  GEMVs); bit-identical results, and the batch-1 step 2-3.5 % faster on an H100 (below).
- ``_gemm_dot``: prefill and batched decode. Unpacks each ``[BK, BR]`` byte tile into four int8
  code tiles and runs ``tl.dot`` int8 x int8 -> int32 on the tensor cores (M padded to 16). It can
  split K over ``SPLIT_K`` programs: partial int32 sums go atomically into a workspace; the last
  program of a tile (a per-tile counter) applies the epilogue and zeroes workspace and counter,
  so it replays in CUDA graphs.

Integer results are exact. :mod:`.gemm_i8` (transient int8 unpack + shared-memory int8 GEMM) serves
prefill from ``I8_MIN_M`` rows; ``unpack_i8`` + ``torch._int_mm`` + ``_scale_rows`` is an optional
large-M path on cuBLAS int8 (off by default, see ``INTMM_MIN_M``).

Run the tests: ``TRITON_INTERPRET=1 pytest tests/kernels/test_triton_kernels.py`` (CPU) or on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, PDL, cast, cdiv, gdc_launch_dependents, gdc_wait, grouped_tile, next_pow2
from .gemm_i8 import i8_config, i8_linear, unpack_i8
from .gemm_tc import tc_config, tc_linear


@triton.jit
def _dp4a(a, b, c, INTERP: tl.constexpr):
    """c + sum_j a.byte[j] * b.byte[j] for int32 tensors (a: unsigned codes 0..2, b: signed int8x4)."""
    if INTERP:
        for j in tl.static_range(4):
            aj = (a >> (8 * j)) & 0xFF
            bj = ((b << (24 - 8 * j)) >> 24)          # sign-extended byte j
            c += aj * bj
        return c
    else:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _out_cols(rows, k, P1, P2, R_total):
    """Output column of field k (an int, or a tensor broadcasting with ``rows``) of packed rows
    ``rows`` in a weight of up to 3 segments, and the segment index."""
    seg = (rows >= P1).to(tl.int32) + (rows >= P2).to(tl.int32)
    p0 = tl.where(seg == 0, 0, tl.where(seg == 1, P1, P2))
    p1 = tl.where(seg == 0, P1, tl.where(seg == 1, P2, R_total))
    return 4 * p0 + k * (p1 - p0) + (rows - p0), seg


@triton.jit
def _epilogue(acc, ms, rows, k: tl.constexpr, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om,
              INTERP: tl.constexpr):
    """acc int32 [BM, BR] (field k) -> out[ms, cols] = acc * (gamma_seg / s_x[m]) in out's dtype."""
    cols, seg = _out_cols(rows, k, P1, P2, R_total)
    gamma = tl.load(g_ptr + seg)                                        # fp32 [BR]
    sx = tl.load(sx_ptr + ms, mask=ms < M, other=1.0)                   # fp32 [BM]
    scale = tl.math.div_rn(gamma[None, :], sx[:, None])                 # [BM, BR], as the reference
    y = acc.to(tl.float32) * scale
    mask = (ms[:, None] < M) & (rows[None, :] < R_total)
    tl.store(out_ptr + ms[:, None] * stride_om + cols[None, :], cast(y, out_ptr.dtype.element_ty, INTERP),
             mask=mask)


@triton.jit
def _split_k_finish(acc, ms, rows, k: tl.constexpr, M, P1, P2, R_total, ws_ptr, N_out):
    """Add a partial field-k tile into the int32 workspace [M, N_out]."""
    cols, seg = _out_cols(rows, k, P1, P2, R_total)
    mask = (ms[:, None] < M) & (rows[None, :] < R_total)
    tl.atomic_add(ws_ptr + ms[:, None] * N_out + cols[None, :], acc, mask=mask)


@triton.jit
def _split_k_take(ms, rows, k: tl.constexpr, M, P1, P2, R_total, ws_ptr, N_out):
    """Read the full sum of a field-k tile from the workspace and zero it for the next call."""
    cols, seg = _out_cols(rows, k, P1, P2, R_total)
    mask = (ms[:, None] < M) & (rows[None, :] < R_total)
    return tl.atomic_xchg(ws_ptr + ms[:, None] * N_out + cols[None, :], 0, mask=mask)


@triton.jit
def _finish(acc0, acc1, acc2, acc3, ms, rows, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om,
            ws_ptr, cnt_ptr, tile, SPLIT_K: tl.constexpr, INTERP: tl.constexpr):
    N_out = 4 * R_total
    if SPLIT_K == 1:
        _epilogue(acc0, ms, rows, 0, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om, INTERP)
        _epilogue(acc1, ms, rows, 1, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om, INTERP)
        _epilogue(acc2, ms, rows, 2, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om, INTERP)
        _epilogue(acc3, ms, rows, 3, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om, INTERP)
    else:
        _split_k_finish(acc0, ms, rows, 0, M, P1, P2, R_total, ws_ptr, N_out)
        _split_k_finish(acc1, ms, rows, 1, M, P1, P2, R_total, ws_ptr, N_out)
        _split_k_finish(acc2, ms, rows, 2, M, P1, P2, R_total, ws_ptr, N_out)
        _split_k_finish(acc3, ms, rows, 3, M, P1, P2, R_total, ws_ptr, N_out)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + tile, 1)          # acq_rel: orders our adds before it
        if done == SPLIT_K - 1:                          # the last program of this tile finishes it
            tl.debug_barrier()
            t0 = _split_k_take(ms, rows, 0, M, P1, P2, R_total, ws_ptr, N_out)
            _epilogue(t0, ms, rows, 0, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om, INTERP)
            t1 = _split_k_take(ms, rows, 1, M, P1, P2, R_total, ws_ptr, N_out)
            _epilogue(t1, ms, rows, 1, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om, INTERP)
            t2 = _split_k_take(ms, rows, 2, M, P1, P2, R_total, ws_ptr, N_out)
            _epilogue(t2, ms, rows, 2, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om, INTERP)
            t3 = _split_k_take(ms, rows, 3, M, P1, P2, R_total, ws_ptr, N_out)
            _epilogue(t3, ms, rows, 3, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om, INTERP)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _gemv_field(w, x, k: tl.constexpr, INTERP: tl.constexpr):
    """sum over K of field k of packed int32 weights w [BR, BK4] times int8x4 x [BK4] -> int32 [BR]."""
    u = (w >> (2 * k)) & 0x03030303
    return tl.sum(_dp4a(u, x[None, :], tl.zeros_like(w), INTERP), axis=1)


@triton.jit
def _gemv_fields_joint(w, x, ones, INTERP: tl.constexpr):
    """The four field sums of w [BR, BK4] against x [BK4] in one cross-thread reduction -> int32
    [BR, 2, 2], element [r, i, j] field i + 2j of packed row r, already ``x.w`` (every lane starts
    from minus its own activation sum, so no separate ``sum(x)``)."""
    c = tl.zeros_like(w) - _dp4a(ones, x, tl.zeros_like(x), INTERP)[None, :]          # [BR, BK4]
    p0 = _dp4a(w & 0x03030303, x[None, :], c, INTERP)
    p1 = _dp4a((w >> 2) & 0x03030303, x[None, :], c, INTERP)
    p2 = _dp4a((w >> 4) & 0x03030303, x[None, :], c, INTERP)
    p3 = _dp4a((w >> 6) & 0x03030303, x[None, :], c, INTERP)
    return tl.sum(tl.join(tl.join(p0, p1), tl.join(p2, p3)), axis=1)               # [BR, 2, 2]


@triton.jit
def _epilogue_joint(acc, m, rows, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om,
                    INTERP: tl.constexpr):
    """acc int32 [BR, 2, 2] of ``_gemv_fields_joint`` -> out[m, cols] = acc * (gamma_seg / s_x[m])
    in one store (the same values as ``_epilogue``, field by field)."""
    r3 = rows[:, None, None]                                                        # [BR, 1, 1]
    k3 = tl.arange(0, 2)[None, :, None] + 2 * tl.arange(0, 2)[None, None, :]        # [1, 2, 2]
    cols, seg = _out_cols(r3, k3, P1, P2, R_total)                          # [BR, 2, 2], [BR, 1, 1]
    mvalid = m < M
    gamma = tl.load(g_ptr + seg)                                                    # fp32 [BR, 1, 1]
    sx = tl.load(sx_ptr + m, mask=mvalid, other=1.0)                                # fp32
    y = acc.to(tl.float32) * tl.math.div_rn(gamma, sx)
    tl.store(out_ptr + m * stride_om + cols, cast(y, out_ptr.dtype.element_ty, INTERP),
             mask=(r3 < R_total) & mvalid)


@triton.jit
def _gemv_dp4a(x_ptr, sx_ptr, w_ptr, g_ptr, out_ptr, M, K4, R_total, P1, P2, stride_xm, stride_om,
               BR: tl.constexpr, BK4: tl.constexpr, ITERS: tl.constexpr, MB: tl.constexpr,
               PDL: tl.constexpr, INTERP: tl.constexpr, JOINT: tl.constexpr = False):
    """BR packed rows (4*BR outputs) for MB activation rows; K in ITERS tiles of BK4 int32.

    The first weight tile is loaded before waiting on the previous kernel (programmatic dependent
    launch): with ITERS == 1 a program's whole weight slice streams in while the kernel before
    it is still finishing. JOINT: the four fields and ``sum(x)`` in one cross-thread reduction
    instead of five (fewer shared-memory round trips and barriers after the wait).
    """
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < R_total
    k0 = tl.arange(0, BK4)
    w_first = tl.load(w_ptr + rows[:, None] * K4 + k0[None, :],
                      mask=rmask[:, None] & (k0 < K4)[None, :], other=0)                  # [BR, BK4]
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    ones = tl.full((BK4,), 0x01010101, tl.int32)
    for mi in tl.static_range(MB):
        m = pid_m * MB + mi
        mvalid = m < M
        acc0 = tl.zeros((BR,), tl.int32)
        acc1 = tl.zeros((BR,), tl.int32)
        acc2 = tl.zeros((BR,), tl.int32)
        acc3 = tl.zeros((BR,), tl.int32)
        sumx = tl.zeros((BK4,), tl.int32)
        for it in tl.static_range(ITERS):
            ks = it * BK4 + k0
            kmask = ks < K4
            if it == 0:
                w = w_first
            else:
                w = tl.load(w_ptr + rows[:, None] * K4 + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                            other=0)
            x = tl.load(x_ptr + m * stride_xm + ks, mask=kmask & mvalid, other=0)          # int8x4 [BK4]
            if JOINT:
                if it == 0:
                    accj = _gemv_fields_joint(w, x, ones, INTERP)                  # [BR, 2, 2]
                else:
                    accj += _gemv_fields_joint(w, x, ones, INTERP)
            else:
                sumx = _dp4a(ones, x, sumx, INTERP)
                acc0 += _gemv_field(w, x, 0, INTERP)
                acc1 += _gemv_field(w, x, 1, INTERP)
                acc2 += _gemv_field(w, x, 2, INTERP)
                acc3 += _gemv_field(w, x, 3, INTERP)
        if JOINT:
            _epilogue_joint(accj, m, rows, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om, INTERP)
        else:
            sx = tl.sum(sumx, axis=0)
            ms = m + tl.arange(0, 1)
            _epilogue((acc0 - sx)[None, :], ms, rows, 0, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om,
                      INTERP)
            _epilogue((acc1 - sx)[None, :], ms, rows, 1, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om,
                      INTERP)
            _epilogue((acc2 - sx)[None, :], ms, rows, 2, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om,
                      INTERP)
            _epilogue((acc3 - sx)[None, :], ms, rows, 3, M, P1, P2, R_total, sx_ptr, g_ptr, out_ptr, stride_om,
                      INTERP)


@triton.jit
def _gemm_dot(x_ptr, sx_ptr, w_ptr, g_ptr, out_ptr, ws_ptr, cnt_ptr,
              M, K, R_total, P1, P2, stride_xm, stride_om, K_PER_SPLIT,
              BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
              ITERS: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr, INTERP: tl.constexpr):
    """Tile of BM activation rows x BR packed rows (4*BR outputs) on int8 tensor cores."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_r = tl.cdiv(R_total, BR)
    n_m = tl.cdiv(M, BM)
    pid_m, pid_r = grouped_tile(pid, n_m, n_r, GROUP_M)     # consecutive programs share weight tiles
    ms = pid_m * BM + tl.arange(0, BM)
    rows = pid_r * BR + tl.arange(0, BR)
    acc0 = tl.zeros((BM, BR), tl.int32)
    acc1 = tl.zeros((BM, BR), tl.int32)
    acc2 = tl.zeros((BM, BR), tl.int32)
    acc3 = tl.zeros((BM, BR), tl.int32)
    sumx = tl.zeros((BM,), tl.int32)
    k_lo = pid_k * K_PER_SPLIT                      # K_PER_SPLIT is a multiple of BK
    for it in range(0, ITERS):
        ks = k_lo + it * BK + tl.arange(0, BK)
        kmask = ks < K
        x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :],
                    mask=(ms[:, None] < M) & kmask[None, :], other=0)                     # int8 [BM, BK]
        w = tl.load(w_ptr + rows[None, :] * K + ks[:, None],
                    mask=(rows[None, :] < R_total) & kmask[:, None], other=0)             # uint8 [BK, BR]
        sumx += tl.sum(x.to(tl.int32), axis=1)
        acc0 = tl.dot(x, (w & 3).to(tl.int8), acc0, out_dtype=tl.int32)
        acc1 = tl.dot(x, ((w >> 2) & 3).to(tl.int8), acc1, out_dtype=tl.int32)
        acc2 = tl.dot(x, ((w >> 4) & 3).to(tl.int8), acc2, out_dtype=tl.int32)
        acc3 = tl.dot(x, (w >> 6).to(tl.int8), acc3, out_dtype=tl.int32)
    sb = sumx[:, None]
    tile = pid
    _finish(acc0 - sb, acc1 - sb, acc2 - sb, acc3 - sb, ms, rows, M, P1, P2, R_total, sx_ptr, g_ptr,
            out_ptr, stride_om, ws_ptr, cnt_ptr, tile, SPLIT_K, INTERP)


@triton.jit
def _scale_rows(acc_ptr, sx_ptr, g_ptr, out_ptr, M, N, C1, C2, stride_om, BM: tl.constexpr,
                BN: tl.constexpr, INTERP: tl.constexpr):
    """out = acc int32 [M, N] * (gamma_seg / s_x[m]); segments start at output columns C1, C2."""
    ms = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (ms < M)[:, None] & (cols < N)[None, :]
    acc = tl.load(acc_ptr + ms[:, None] * N + cols[None, :], mask=mask, other=0)
    seg = (cols >= C1).to(tl.int32) + (cols >= C2).to(tl.int32)
    gamma = tl.load(g_ptr + seg)
    sx = tl.load(sx_ptr + ms, mask=ms < M, other=1.0)
    y = acc.to(tl.float32) * tl.math.div_rn(gamma[None, :], sx[:, None])
    tl.store(out_ptr + ms[:, None] * stride_om + cols[None, :], cast(y, out_ptr.dtype.element_ty, INTERP),
             mask=mask)


def _intmm_linear(x_q, s_x, w, gammas, P1, P2, out):
    """Large M: unpack the 2-bit weights into a transient int8 matrix and use cuBLAS int8 GEMM.

    The int8 matrix lives only for this call (the caching allocator reuses the block): the
    resident copy of the weights stays the 2-bit one.
    """
    M, K = x_q.shape
    R = w.shape[0]
    N = 4 * R
    w8 = unpack_i8(w, P1, P2)
    acc = torch._int_mm(x_q, w8.t())                                                  # int32 [M, N]
    _scale_rows[(cdiv(M, 16), cdiv(N, 256))](acc, s_x, gammas, out, M, N, 4 * P1, 4 * P2,
                                                           out.stride(0), BM=16, BN=256, INTERP=INTERPRET,
                                                           num_warps=4)
    return out


# From this many activation rows on, cuBLAS int8 GEMM on transiently unpacked weights. Off by
# default: on an H100 a 2048-token prefill took 52 ms this way against 40 ms with the Triton kernel.
INTMM_MIN_M = 1 << 62
# From this many activation rows on (prefill), :mod:`.gemm_i8`: weights unpacked into a transient
# int8 matrix, then the descriptor (TMA) int8 GEMM with both operands in shared memory, on its
# table (``gemm_i8.TUNED``, tuned at 512 and 2048 rows). On an H100 (2026-12-07) a 2048-token
# prefill took 14.1 ms of GPU time this way against 15.6 ms on the tensor-core kernel and 15.5 ms
# for bf16 cuBLAS (``bench/gpu.py --i8-min-m``); a layer's projections took 124 / 206 us at 512 /
# 1024 rows against the tensor-core kernel's 138 / 211 (``bench/gpu_gemm.py --ms 512,1024``).
# Fewer rows were not timed. The pointer kernel it replaces lost to the tensor-core kernel.
I8_MIN_M = 512
# the dp4a GEMV's one-reduction epilogue: H100 (2026-12-07, bench/gpu_breakdown.py --variants
# gemv_joint, two rounds in one run) batch-1 step at ctx 1024 1.179 / 1.175 ms against 1.204 /
# 1.219 without
GEMV_JOINT = True
GEMV_MAX_M = 4      # up to this many rows the dp4a GEMV (weights read once, rows looped); from 5
                    # rows on the tensor-core kernel: batch-8 decode on an H100 took 2.26 ms/step
                    # that way against 4.67 ms with the GEMV (bench/gpu.py, decode_b8_w2a8_tc_ms)
# activation rows a GEMV program takes (None: all M, the weights read once and the rows looped,
# one reduction each; fewer: more programs, each reading the weights again from L2). At batch 8 on
# an H100 (2026-12-07, bench/gpu.py --b8-gemv-rows) the GEMV took 2.93 / 2.92 / 2.73 ms a step at
# 1 / 2 / 4 rows a program against 2.11 on the tensor-core kernel, so GEMV_MAX_M stays 4
GEMV_ROWS: int | None = None


# ---------------------------------------------------------------- host side

class Workspace:
    """Zeroed int32 split-K accumulators and per-tile counters, shared by the kernels of one stream.

    Every kernel leaves them zeroed again, so one workspace serves a whole CUDA graph.
    """

    def __init__(self, device, numel: int = 1 << 20, tiles: int = 1 << 14):
        self.ws = torch.zeros(numel, dtype=torch.int32, device=device)
        self.cnt = torch.zeros(tiles, dtype=torch.int32, device=device)


_WS: dict = {}


def workspace(device) -> Workspace:
    key = str(device)
    if key not in _WS:
        _WS[key] = Workspace(device)
    return _WS[key]


def pick_config(M: int, R: int, K: int, n_sm: int = 132) -> dict:
    """Block shapes for an [M, K] x [4R, K] product (tuned on an H100 at 2B4T shapes).

    M <= GEMV_MAX_M: dp4a GEMV, the whole K of BR packed rows in one tile (BR * BK4 <= 8K int32)
    so that a program's weights are loaded in one go ahead of the wait on the previous kernel.
    Larger M: :mod:`.gemm_tc` (weights as the register operand of int8 tensor-core MMAs); from
    ``I8_MIN_M`` rows on :mod:`.gemm_i8` (transiently unpacked weights, shared-memory operands).
    """
    if M >= I8_MIN_M:
        return i8_config(M, 4 * R, K)
    if M <= GEMV_MAX_M:
        bk4 = min(next_pow2(max(K // 4, 1)), 2048)
        # rows a program: half of what was fastest for the GEMVs alone (down 2, others 4 / 8),
        # because inside the batch-1 step more, smaller programs overlap the previous kernel's
        # tail better: H100 (2026-12-07, bench/gpu_breakdown.py --variants gemv_br_half) 1.157 /
        # 1.158 ms a step at ctx 1024 against 1.179 / 1.180
        if bk4 >= 2048:          # K = 6912 (down): 1 row a program, 8 warps
            br, nw = 1, 8
        else:                    # K = 2560: 2 rows while that still fills the SMs, else 4
            br, nw = (2 if R <= 1024 else 4), 4
        return dict(kind="gemv", BR=br, BK4=bk4, MB=min(M, GEMV_ROWS or M), num_warps=nw, JOINT=GEMV_JOINT)
    return tc_config(M, R, K, n_sm)


def uses_unpacked(M: int, R: int, K: int) -> bool:
    """Whether an [M, K] x [4R, K] product with the default configuration reads an int8 [4R, K]
    unpack of the weights (the prefill GEMM of :mod:`.gemm_i8`), which ``w8`` may supply."""
    return M < INTMM_MIN_M and pick_config(M, R, K)["kind"] == "i8"


def _tc(x_q, s_x, w, gammas, P1, P2, out, cfg, ws):
    ws = ws or workspace(x_q.device)
    return tc_linear(x_q, s_x, w, gammas, P1, P2, out, cfg, ws.cnt)


def seg_bounds(seg_rows: tuple[int, ...], R: int, who: str) -> tuple[int, int]:
    """Packed-row bounds (P1, P2) of the 2nd and 3rd segment (R where there is none); ``who``
    names the caller in the error raised when 1-3 segments do not tile R packed rows."""
    if sum(seg_rows) != R or not 1 <= len(seg_rows) <= 3:
        raise ValueError(f"{who}: segments {seg_rows} do not tile {R} packed rows")
    P1 = min(seg_rows[0], R)
    P2 = seg_rows[0] + seg_rows[1] if len(seg_rows) > 1 else R
    return P1, P2


def w2a8_linear(x_q: torch.Tensor, s_x: torch.Tensor, w: torch.Tensor, gammas: torch.Tensor,
                seg_rows: tuple[int, ...], out: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
                ws: Workspace | None = None, w8: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, 4R] = (x_q [M, K] @ W_t^T) * gamma_seg / s_x for packed ``w`` uint8 [R, K].

    ``x_q`` int8 (row stride free, unit column stride), ``s_x`` fp32 [M] (or [M, 1]),
    ``gammas`` fp32 [n_seg], ``seg_rows``: the packed-row count of each segment (sum = R, <= 3).
    ``w8``: ``w`` unpacked already (int8 [4R, K]), used where the configuration is :mod:`.gemm_i8`'s
    (``uses_unpacked``), else ignored.
    """
    M, K = x_q.shape
    R, Kw = w.shape
    if Kw != K:
        raise ValueError(f"w2a8_linear: weight has in_features={Kw}, activations have {K}")
    P1, P2 = seg_bounds(seg_rows, R, "w2a8_linear")
    if x_q.stride(1) != 1 or not w.is_contiguous():
        raise ValueError("w2a8_linear: activations need unit column stride and weights contiguity")
    if out is None:
        out = torch.empty((M, 4 * R), dtype=out_dtype, device=x_q.device)
    s_x = s_x.reshape(-1)
    if (config is None and M >= INTMM_MIN_M and x_q.is_cuda and hasattr(torch, "_int_mm")
            and K % 8 == 0 and R % 2 == 0 and x_q.is_contiguous()):
        return _intmm_linear(x_q, s_x, w, gammas, P1, P2, out)
    cfg = dict(config or pick_config(M, R, K))
    kind = cfg.pop("kind")
    if kind == "intmm":
        return _intmm_linear(x_q.contiguous(), s_x, w, gammas, P1, P2, out)
    if kind == "tc":
        return _tc(x_q, s_x, w, gammas, P1, P2, out, cfg, ws)
    if kind == "i8":
        return i8_linear(x_q, s_x, w, gammas, P1, P2, out, cfg, w8=w8)
    pdl = dict(launch_pdl=True) if PDL else {}
    if kind == "gemv" and K % 4 == 0 and x_q.stride(0) % 4 == 0 and x_q.data_ptr() % 4 == 0:
        K4 = K // 4
        mb = cfg.pop("MB", 1)
        grid = (cdiv(R, cfg["BR"]), cdiv(M, mb))
        _gemv_dp4a[grid](x_q.view(torch.int32), s_x, w.view(torch.int32), gammas, out,
                         M, K4, R, P1, P2, x_q.stride(0) // 4, out.stride(0),
                         ITERS=cdiv(K4, cfg["BK4"]), MB=mb, PDL=PDL, INTERP=INTERPRET, **cfg, **pdl)
        return out
    if kind == "gemv":  # odd K: fall back to the tensor-core kernel
        return _tc(x_q, s_x, w, gammas, P1, P2, out, tc_config(M, R, K), ws)
    split = cfg["SPLIT_K"]
    ws = ws or workspace(x_q.device)
    if split > 1 and M * 4 * R > ws.ws.numel():
        raise ValueError(f"w2a8_linear: split-K workspace too small for {M}x{4 * R}")
    per = cdiv(cdiv(K, split), cfg["BK"]) * cfg["BK"]
    n_tiles = cdiv(M, cfg["BM"]) * cdiv(R, cfg["BR"])
    if split > 1 and n_tiles > ws.cnt.numel():
        raise ValueError("w2a8_linear: too many tiles for the split-K counters")
    grid = (n_tiles, split)
    _gemm_dot[grid](x_q, s_x, w, gammas, out, ws.ws, ws.cnt, M, K, R, P1, P2, x_q.stride(0),
                    out.stride(0), per, ITERS=per // cfg["BK"], GROUP_M=8,
                    PDL=PDL, INTERP=INTERPRET, **cfg, **pdl)
    return out
