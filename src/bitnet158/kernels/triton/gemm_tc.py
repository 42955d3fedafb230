"""Tensor-core W2A8 GEMM for batched decode and prefill: the 2-bit weights are the register operand.

    cfg = tc_config(M, R, K)
    tc_linear(x_q int8 [M, K], s_x fp32 [M], w uint8 [R, K], gammas, P1, P2, out [M, 4R], cfg, cnt)

(``w2a8.w2a8_linear`` calls it above ``GEMV_MAX_M`` rows and for odd K, segments and counters set up.)

Weights stay in the released Hugging Face layout (uint8 ``[R, K]``, field ``j`` of packed row ``r``
is output row ``j*R + r``, stored ``w + 1``; see :mod:`.w2a8` for the segments of fused q|k|v and
gate|up). The product is computed transposed, ``acc_j [BR, BM] = W_j [BR, BK] @ x^T [BK, BM]``:

- the *weights* are the left operand. On Hopper ``wgmma`` takes its left operand from registers,
  so a packed tile goes global -> shared memory (``cp.async``, ``num_stages`` deep) -> registers
  in the MMA fragment layout (8-bit fragments hold 4 consecutive K of one row per 32-bit
  register, which is exactly 4 packed bytes), and each 32-bit register of 4 packed bytes becomes
  the 4-byte fragment of field ``j`` with 4 integer ops (``_unpack``: shift, mask ``0x03030303``,
  ``+ 0x7F7F7F7F`` and ``^ 0x80808080`` turn the codes ``u in {0, 1, 2}`` of 4 bytes into the
  signed ternary ``u - 1`` without carries between bytes). The unpacked weights never touch
  shared memory, and being signed there is no ``sum(x)`` correction;
- the activations (``x^T``, K-major, as int8 ``wgmma`` needs) are the shared-memory operand. The
  batch / token dimension is the MMA's N (16..64 per program), so batch 8 pads to 16, not 64.

A program takes BR = 64 packed rows (one warpgroup) and F of their 4 fields (F*BR output
rows, one int32 accumulator ``[BR, BM]`` each): F = 4 unpacks each weight tile once for 256
outputs (prefill), F = 1 or 2 gives the small projections of batched decode 4x or 2x the
programs. The fields are constants in each branch of the kernel (``_kloop``), so the shifts stay
immediates of a unary ``inline_asm`` that Triton hoists into the MMA fragment layout. Small
products also split K over programs: each stores its int32 partial tiles into its own slots of a
scratch buffer (plain, coalesced stores: atomics cost more than the product at batch 64), and the
last program of a tile (a per-tile counter) sums them, applies the epilogue and resets the
counter, so a CUDA graph can replay it. The epilogue is the reference's fp32
``acc * (gamma_seg / s_x)`` (correctly rounded division), cast to the output dtype. Integer
results are exact. Block shapes measured best on an H100 are in ``TUNED``; ``tc_config`` falls
back to the rule they follow. ``bench/gpu_gemm.py`` re-measures them.

Under ``TRITON_INTERPRET=1`` (the CPU tests) ``_unpack`` is plain shifts and masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, PDL, cast, cdiv, gdc_launch_dependents, gdc_wait


@triton.jit
def _unpack(w, j: tl.constexpr, INTERP: tl.constexpr):
    """Packed uint8 [..] -> int8 ternary weights (-1, 0, 1) of field j; 4 bytes per instruction group."""
    if INTERP:
        return ((w >> (2 * j)) & 3).to(tl.int8) - 1
    else:
        if j == 0:
            return tl.inline_asm_elementwise(
                "{.reg .b32 t; and.b32 t, $1, 0x03030303; add.u32 t, t, 0x7F7F7F7F; xor.b32 $0, t, 0x80808080;}",
                "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4)
        elif j == 1:
            return tl.inline_asm_elementwise(
                "{.reg .b32 t; shr.b32 t, $1, 2; and.b32 t, t, 0x03030303; add.u32 t, t, 0x7F7F7F7F; "
                "xor.b32 $0, t, 0x80808080;}", "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4)
        elif j == 2:
            return tl.inline_asm_elementwise(
                "{.reg .b32 t; shr.b32 t, $1, 4; and.b32 t, t, 0x03030303; add.u32 t, t, 0x7F7F7F7F; "
                "xor.b32 $0, t, 0x80808080;}", "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(
                "{.reg .b32 t; shr.b32 t, $1, 6; and.b32 t, t, 0x03030303; add.u32 t, t, 0x7F7F7F7F; "
                "xor.b32 $0, t, 0x80808080;}", "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def _cols(rows, j, P1, P2, R_total, r0, BR: tl.constexpr, ALIGNED: tl.constexpr):
    """Output columns [BR] of field j of packed rows ``rows`` and their segment index.

    ALIGNED: the tile's rows (starting at r0) lie in one segment, so the columns are contiguous."""
    if ALIGNED:
        seg = (r0 >= P1).to(tl.int32) + (r0 >= P2).to(tl.int32)
        p0 = tl.where(seg == 0, 0, tl.where(seg == 1, P1, P2))
        p1 = tl.where(seg == 0, P1, tl.where(seg == 1, P2, R_total))
        c0 = 4 * p0 + j * (p1 - p0) + (r0 - p0)
        cols = tl.max_contiguous(tl.multiple_of(c0 + tl.arange(0, BR), 16), BR)
        return cols, seg + tl.zeros((BR,), tl.int32)
    else:
        seg = (rows >= P1).to(tl.int32) + (rows >= P2).to(tl.int32)
        p0 = tl.where(seg == 0, 0, tl.where(seg == 1, P1, P2))
        p1 = tl.where(seg == 0, P1, tl.where(seg == 1, P2, R_total))
        return 4 * p0 + j * (p1 - p0) + (rows - p0), seg


@triton.jit
def _store(acc, rows, ms, j, M, P1, P2, R_total, r0, sx_ptr, g_ptr, out_ptr, stride_om,
           BR: tl.constexpr, ALIGNED: tl.constexpr, INTERP: tl.constexpr):
    """out[ms, cols_j] = acc [BR, BM] * (gamma_seg / s_x[m]) in out's dtype."""
    cols, seg = _cols(rows, j, P1, P2, R_total, r0, BR, ALIGNED)
    gamma = tl.load(g_ptr + seg)                                       # fp32 [BR]
    sx = tl.load(sx_ptr + ms, mask=ms < M, other=1.0)                  # fp32 [BM]
    y = acc.to(tl.float32) * tl.math.div_rn(gamma[:, None], sx[None, :])
    mask = (rows[:, None] < R_total) & (ms[None, :] < M)
    tl.store(out_ptr + ms[None, :] * stride_om + cols[:, None], cast(y, out_ptr.dtype.element_ty, INTERP),
             mask=mask)


@triton.jit
def _kstep(w_ptrs, x_ptrs, acc0, acc1, acc2, acc3, rmask, mmask, ks, K, J0: tl.constexpr, F: tl.constexpr,
           EVEN: tl.constexpr, INTERP: tl.constexpr):
    """One K tile: packed w [BR, BK], x [BM, BK] -> fields J0 .. J0+F-1 into their accumulators."""
    if EVEN:
        w = tl.load(w_ptrs, mask=rmask[:, None], other=0)
        x = tl.load(x_ptrs, mask=mmask[:, None], other=0)
    else:
        kmask = ks < K
        w = tl.load(w_ptrs, mask=rmask[:, None] & kmask[None, :], other=0)
        x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0)              # 0 past K
    xt = tl.trans(x)                                                                    # [BK, BM]
    acc0 = tl.dot(_unpack(w, J0, INTERP), xt, acc0, out_dtype=tl.int32)
    if F >= 2:
        acc1 = tl.dot(_unpack(w, J0 + 1, INTERP), xt, acc1, out_dtype=tl.int32)
    if F == 4:
        acc2 = tl.dot(_unpack(w, 2, INTERP), xt, acc2, out_dtype=tl.int32)
        acc3 = tl.dot(_unpack(w, 3, INTERP), xt, acc3, out_dtype=tl.int32)
    return acc0, acc1, acc2, acc3


@triton.jit
def _kloop(w_ptrs, x_ptrs, rmask, mmask, ks0, K, ITERS, ITERS_C: tl.constexpr, J0: tl.constexpr,
           F: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr,
           INTERP: tl.constexpr):
    """The K loop for fields J0 .. J0+F-1 (constants): four int32 accumulators [BR, BM], the last
    4-F of them unused (zero). Packed w [BR, BK] and x [BM, BK] tiles stream through shared memory
    (``num_stages`` deep); each w tile is unpacked in registers once per field."""
    acc0 = tl.zeros((BR, BM), tl.int32)
    acc1 = tl.zeros((BR, BM), tl.int32)
    acc2 = tl.zeros((BR, BM), tl.int32)
    acc3 = tl.zeros((BR, BM), tl.int32)
    if INTERP:      # the interpreter needs a Python int as loop bound
        for it in range(0, ITERS_C):
            acc0, acc1, acc2, acc3 = _kstep(w_ptrs + it * BK, x_ptrs + it * BK, acc0, acc1, acc2, acc3, rmask,
                                            mmask, ks0 + it * BK, K, J0, F, EVEN, INTERP)
    else:
        for it in range(0, ITERS):
            acc0, acc1, acc2, acc3 = _kstep(w_ptrs + it * BK, x_ptrs + it * BK, acc0, acc1, acc2, acc3, rmask,
                                            mmask, ks0 + it * BK, K, J0, F, EVEN, INTERP)
    return acc0, acc1, acc2, acc3


@triton.jit
def _partial(acc, ws_ptr, slot, BR: tl.constexpr, BM: tl.constexpr):
    """Store an int32 [BR, BM] partial tile into workspace slot ``slot`` (plain, coalesced)."""
    rr = tl.arange(0, BR)
    mm = tl.arange(0, BM)
    tl.store(ws_ptr + slot * (BR * BM) + rr[:, None] * BM + mm[None, :], acc)


@triton.jit
def _reduce(ws_ptr, slot0, stride, n, BR: tl.constexpr, BM: tl.constexpr, N_C: tl.constexpr,
            INTERP: tl.constexpr):
    """Sum of n partial tiles at slots slot0 + i*stride, read from L2 (.cg: written by other SMs).
    N_C: n as a constant, for the interpreter's loop bound."""
    rr = tl.arange(0, BR)
    mm = tl.arange(0, BM)
    offs = rr[:, None] * BM + mm[None, :]
    tot = tl.zeros((BR, BM), tl.int32)
    if INTERP:
        for i in range(0, N_C):
            tot += tl.load(ws_ptr + (slot0 + i * stride) * (BR * BM) + offs)
    else:
        for i in range(0, n):
            tot += tl.load(ws_ptr + (slot0 + i * stride) * (BR * BM) + offs, cache_modifier=".cg")
    return tot


@triton.jit
def _finish(acc0, acc1, acc2, acc3, j0, rows, ms, M, P1, P2, R_total, r0, sx_ptr, g_ptr, out_ptr,
            stride_om, F: tl.constexpr, BR: tl.constexpr, ALIGNED: tl.constexpr, INTERP: tl.constexpr):
    _store(acc0, rows, ms, j0, M, P1, P2, R_total, r0, sx_ptr, g_ptr, out_ptr, stride_om, BR, ALIGNED, INTERP)
    if F >= 2:
        _store(acc1, rows, ms, j0 + 1, M, P1, P2, R_total, r0, sx_ptr, g_ptr, out_ptr, stride_om, BR, ALIGNED,
               INTERP)
    if F == 4:
        _store(acc2, rows, ms, 2, M, P1, P2, R_total, r0, sx_ptr, g_ptr, out_ptr, stride_om, BR, ALIGNED, INTERP)
        _store(acc3, rows, ms, 3, M, P1, P2, R_total, r0, sx_ptr, g_ptr, out_ptr, stride_om, BR, ALIGNED, INTERP)


@triton.jit(do_not_specialize=["M", "ITERS"])
def _gemm_tc(x_ptr, sx_ptr, w_ptr, g_ptr, out_ptr, ws_ptr, cnt_ptr,
             M, K, R_total, P1, P2, stride_xm, stride_om, K_PER_SPLIT, ITERS,
             BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, F: tl.constexpr, SPLIT_K: tl.constexpr,
             ALIGNED: tl.constexpr, EVEN: tl.constexpr, ITERS_C: tl.constexpr, NK_C: tl.constexpr,
             PDL: tl.constexpr, INTERP: tl.constexpr):
    """Tile of BR packed rows x F of their 4 fields (F*BR outputs) x BM activation rows, over the
    K range pid_k of the grid's second axis.

    EVEN: K_PER_SPLIT * splits == K (no K masks needed). SPLIT_K is 1 or "more than one" (the
    split count is the grid's second axis); ITERS = K_PER_SPLIT / BK is a run-time value, so the
    split count and K need no recompilation (ITERS_C, NK_C: the loop counts as constants, for the
    interpreter only). Split-K: each program stores its partial tiles into its own workspace
    slots; the last program of a tile (a counter) sums them, applies the epilogue and resets the
    counter, so a CUDA graph replays it.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_k = tl.num_programs(1)
    n_m = tl.cdiv(M, BM)
    NF: tl.constexpr = 4 // F
    pid_m = pid % n_m                       # programs that share a weight tile run together
    pid_f = (pid // n_m) % NF
    pid_r = pid // (n_m * NF)
    j0 = pid_f * F
    r0 = pid_r * BR
    rows = r0 + tl.arange(0, BR)
    ms = pid_m * BM + tl.arange(0, BM)
    rmask = rows < R_total
    mmask = ms < M
    k_lo = pid_k * K_PER_SPLIT                      # K_PER_SPLIT is a multiple of BK
    offs_k = tl.arange(0, BK)
    w_ptrs = w_ptr + rows[:, None] * K + (k_lo + offs_k)[None, :]                      # [BR, BK]
    x_ptrs = x_ptr + ms[:, None] * stride_xm + (k_lo + offs_k)[None, :]                # [BM, BK]
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    ks0 = k_lo + offs_k
    # the fields are constants in each branch (the unpack shifts are immediates)
    if F == 4:
        acc0, acc1, acc2, acc3 = _kloop(w_ptrs, x_ptrs, rmask, mmask, ks0, K, ITERS, ITERS_C, 0, 4, BR, BM, BK,
                                        EVEN, INTERP)
    elif F == 2:
        if pid_f == 0:
            acc0, acc1, acc2, acc3 = _kloop(w_ptrs, x_ptrs, rmask, mmask, ks0, K, ITERS, ITERS_C, 0, 2, BR, BM,
                                            BK, EVEN, INTERP)
        else:
            acc0, acc1, acc2, acc3 = _kloop(w_ptrs, x_ptrs, rmask, mmask, ks0, K, ITERS, ITERS_C, 2, 2, BR, BM,
                                            BK, EVEN, INTERP)
    else:
        if pid_f == 0:
            acc0, acc1, acc2, acc3 = _kloop(w_ptrs, x_ptrs, rmask, mmask, ks0, K, ITERS, ITERS_C, 0, 1, BR, BM,
                                            BK, EVEN, INTERP)
        elif pid_f == 1:
            acc0, acc1, acc2, acc3 = _kloop(w_ptrs, x_ptrs, rmask, mmask, ks0, K, ITERS, ITERS_C, 1, 1, BR, BM,
                                            BK, EVEN, INTERP)
        elif pid_f == 2:
            acc0, acc1, acc2, acc3 = _kloop(w_ptrs, x_ptrs, rmask, mmask, ks0, K, ITERS, ITERS_C, 2, 1, BR, BM,
                                            BK, EVEN, INTERP)
        else:
            acc0, acc1, acc2, acc3 = _kloop(w_ptrs, x_ptrs, rmask, mmask, ks0, K, ITERS, ITERS_C, 3, 1, BR, BM,
                                            BK, EVEN, INTERP)
    if SPLIT_K > 1:
        base = pid * n_k * F                # slot of (tile, split i, field f): base + i * F + f
        _partial(acc0, ws_ptr, base + pid_k * F, BR, BM)
        if F >= 2:
            _partial(acc1, ws_ptr, base + pid_k * F + 1, BR, BM)
        if F == 4:
            _partial(acc2, ws_ptr, base + pid_k * F + 2, BR, BM)
            _partial(acc3, ws_ptr, base + pid_k * F + 3, BR, BM)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid, 1)          # acq_rel: our partials are visible
        if done == n_k - 1:                             # the last program of this tile finishes it
            tl.debug_barrier()
            t0 = _reduce(ws_ptr, base, F, n_k, BR, BM, NK_C, INTERP)
            t1 = t0
            t2 = t0
            t3 = t0
            if F >= 2:
                t1 = _reduce(ws_ptr, base + 1, F, n_k, BR, BM, NK_C, INTERP)
            if F == 4:
                t2 = _reduce(ws_ptr, base + 2, F, n_k, BR, BM, NK_C, INTERP)
                t3 = _reduce(ws_ptr, base + 3, F, n_k, BR, BM, NK_C, INTERP)
            _finish(t0, t1, t2, t3, j0, rows, ms, M, P1, P2, R_total, r0, sx_ptr, g_ptr, out_ptr, stride_om,
                    F, BR, ALIGNED, INTERP)
            tl.atomic_xchg(cnt_ptr + pid, 0)
    else:
        _finish(acc0, acc1, acc2, acc3, j0, rows, ms, M, P1, P2, R_total, r0, sx_ptr, g_ptr, out_ptr, stride_om,
                F, BR, ALIGNED, INTERP)


# ---------------------------------------------------------------- host side

# Block shapes measured best on an H100 at 2B4T shapes (``bench/gpu_gemm.py``, 2026-11-25), keyed by
# (activation-row bucket, packed rows R, K): (BM, BR, BK, F, SPLIT_K, num_warps, num_stages).
# Batch-64 decode: one field a program and split-K (a projection's tiles would fill only 10-54
# SMs otherwise), e.g. q|k|v 9.2 us, o 8.7, gate|up 11.4, down 12.3 (bf16 cuBLAS: 9.5, 8.0, 29.2,
# 16.5). 2048-token prefill: all four fields a program (each weight tile unpacked once for 256
# output rows), at about bf16 cuBLAS speed: 52.6, 45.7, 186.9, 101.5 us (bf16: 56.3, 37.0,
# 191.2, 91.3).
TUNED: dict = {
    (64, 960, 2560): (64, 64, 128, 1, 4, 4, 4),
    (64, 640, 2560): (64, 64, 128, 1, 4, 4, 4),
    (64, 3456, 2560): (64, 64, 128, 1, 1, 4, 4),
    (64, 640, 6912): (64, 64, 128, 1, 4, 4, 4),
    (2048, 960, 2560): (128, 64, 64, 2, 1, 4, 4),
    (2048, 640, 2560): (64, 64, 128, 4, 1, 4, 3),
    (2048, 3456, 2560): (64, 64, 128, 4, 1, 4, 3),
    (2048, 640, 6912): (64, 64, 128, 4, 1, 4, 3),
}


def m_bucket(M: int) -> int:
    """Row-count bucket of the tuning table: 16, 32, 64, 128, 256, 512 or 2048 (anything larger)."""
    for b in (16, 32, 64, 128, 256, 512):
        if M <= b:
            return b
    return 2048


def tc_config(M: int, R: int, K: int, n_sm: int = 132) -> dict:
    """Block shapes for an [M, K] x [4R, K] product on the tensor-core kernel.

    The tuned table first. Otherwise (the rule the table follows): 64 packed rows a program (one
    warpgroup), BM activation rows (16..64); all four fields a program while the tiles alone fill
    the SMs, else 2 or 1 of them; then split K in powers of two until about one program per SM
    (split partials cost int32 stores of 4*64*BM per packed row, so the split stays small).
    """
    t = TUNED.get((m_bucket(M), R, K))
    if t is not None:
        bm, br, bk, f, split, nw, ns = t
        return dict(kind="tc", BM=bm, BR=br, BK=bk, F=f, SPLIT_K=split, num_warps=nw, num_stages=ns)
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    bk = 128
    tiles = cdiv(R, 64) * cdiv(M, bm)
    f = 4
    while f > 1 and tiles * (4 // f) < n_sm:
        f //= 2
    progs = tiles * (4 // f)
    split = 1
    while progs * split < n_sm and cdiv(K, bk) // (split * 2) >= 2:
        split *= 2
    return dict(kind="tc", BM=bm, BR=64, BK=bk, F=f, SPLIT_K=split, num_warps=4,
                num_stages=3 if f == 4 else 4)


_SCRATCH: dict = {}


def _scratch(device, numel: int) -> torch.Tensor:
    """Per-device int32 split-K partials (grown on demand, outside graph capture: the runner's
    warm-up step runs every shape first)."""
    key = str(device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1 << 20), dtype=torch.int32, device=device)
        _SCRATCH[key] = buf
    return buf


def tc_linear(x_q, s_x, w, gammas, P1: int, P2: int, out, cfg: dict, cnt, pdl: bool = PDL):
    """Launch ``_gemm_tc``: out [M, 4R] = (x_q [M, K] @ W_t^T) * gamma_seg / s_x (see module doc).

    ``cnt`` int32 [>= tiles]: zeroed split-K counters (left zeroed).
    """
    M, K = x_q.shape
    R = w.shape[0]
    cfg = dict(cfg)
    cfg.pop("kind", None)
    cfg.setdefault("F", 4)
    br, bm, bk, f, split = cfg["BR"], cfg["BM"], cfg["BK"], cfg["F"], cfg["SPLIT_K"]
    if f not in (1, 2, 4):
        raise ValueError(f"w2a8_linear: F={f} fields a program is not 1, 2 or 4")
    per = cdiv(cdiv(K, split), bk) * bk
    split = cdiv(K, per)                 # no empty K ranges
    cfg["SPLIT_K"] = min(split, 2)              # the kernel only tells 1 from "several"
    n_tiles = cdiv(R, br) * (4 // f) * cdiv(M, bm)
    ws = cnt
    if split > 1:
        if n_tiles > cnt.numel():
            raise ValueError("w2a8_linear: too many tiles for the split-K counters")
        ws = _scratch(x_q.device, n_tiles * split * f * br * bm)
    segs_aligned = all(p % br == 0 for p in (P1, P2) if p < R)
    kw = dict(launch_pdl=True) if pdl else {}
    _gemm_tc[(n_tiles, split)](x_q, s_x, w, gammas, out, ws, cnt, M, K, R, P1, P2, x_q.stride(0),
                               out.stride(0), per, per // bk, ALIGNED=segs_aligned,
                               EVEN=per * split == K, ITERS_C=per // bk if INTERPRET else 0,
                               NK_C=split if INTERPRET else 0, PDL=pdl, INTERP=INTERPRET, **cfg, **kw)
    return out


__all__ = ["TUNED", "m_bucket", "tc_config", "tc_linear"]
