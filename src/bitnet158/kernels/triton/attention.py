"""Triton decode attention over a static KV cache (flash-decoding), with RoPE and the cache write fused.

One decode step of one layer, for B rows each at its own position ``pos[b]``:

1. ``_attn_partial`` — grid (B * Hkv, n_chunks). A program takes one KV head (its GQA group of
   query heads, padded to 16 rows for ``tl.dot``) and one chunk of ``CHUNK`` cache slots. It applies
   RoPE to the group's queries (bf16 rounding after each op, as ``model.apply_rope``); the program
   whose chunk holds ``pos`` also ropes the new key, writes key and value into the cache, and
   reads them back after a barrier. Chunks past ``pos`` exit at once: the grid is fixed for a
   cache of ``max_len`` slots (CUDA graphs) but only ``pos + 1`` slots are read. Output: per chunk
   the normalized partial ``o`` (fp32) and its softmax max / sum.
2. ``_attn_combine`` — grid (B, H). Merges the chunks of one head in one shot and rounds ``o`` to
   the model dtype (what SDPA returns); the last head of a row to finish (a per-row counter, left
   at zero for the next call) applies ``attn_sub_norm`` (RMSNorm over all heads) and quantizes to
   int8 for ``o_proj`` — or stores the normed row (``quant=False``, for a float linear).

The input is the fused q/k/v row ``[B, (H + 2 Hkv) * D]`` from the QKV projection (pre-RoPE).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, PDL, cast, cdiv, gdc_launch_dependents, gdc_wait, next_pow2, rint, rnd, rnd_add

_pdl = dict(launch_pdl=True) if PDL else {}
# warps of the chunk merge (``_attn_combine``), None: chosen per call (``merge_warps``)
COMBINE_WARPS = None
# the partials' first tile loaded before the wait on the QKV projection: slower at both sizes
# measured on an H100 (2026-12-06, one run each way in the same call: batch 1 at ctx 1024, 1.379 ms
# a token with it against 1.321 without; batch 64 at ctx ~1024, 99.9 us a layer against 85.2)
PARTIAL_PREFETCH = False
# rows x heads from which a launch counts as "many programs" for the merge's warps (batch 1: 20,
# batch 64: 1280; the two measured points, the threshold between them is not tuned)
MANY_PROGRAMS = 512


def merge_warps(programs: int, nchp: int) -> int:
    """Warps of ``_attn_combine`` for ``programs`` (rows x heads) merging [nchp, D] tiles. Few
    programs (batch 1: 20) are latency-bound: 8 warps load and reduce a tile fastest. Many (batch
    64: 1280) are throughput-bound, and 8 warps sum the tile across warps through shared memory
    (ncu: 84 % of L1/shared throughput, MIO-bound); one warp sums its columns in registers, up to
    32 chunks (128 fp32 a thread at D = 128; past that one more warp per 32 chunks, so as not to
    spill: reasoning, not measured). H100, batch 64 at ctx ~1024 (32 chunks): 75.0 us a layer on
    1 warp, 77.9 on 2, 84.5 on 8; batch 1, ctx 1024: 1.294 ms a token on 8 warps, 1.448 on 1."""
    if programs < MANY_PROGRAMS:
        return 8
    return max(1, nchp // 32)


@triton.jit
def _rope(x_ptr, offs_row, d, pos, cos_ptr, sin_ptr, mask, D: tl.constexpr, dt: tl.constexpr,
          INTERP: tl.constexpr):
    """Llama rotate_half RoPE of rows x[offs_row + d] at position pos, rounded like torch bf16 ops."""
    half: tl.constexpr = D // 2
    x = tl.load(x_ptr + offs_row + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xr = tl.load(x_ptr + offs_row + ((d + half) % D)[None, :], mask=mask, other=0.0).to(tl.float32)
    sgn = tl.where(d < half, -1.0, 1.0)
    c = rnd(tl.load(cos_ptr + pos * D + d), dt, INTERP)
    s = rnd(tl.load(sin_ptr + pos * D + d), dt, INTERP)
    return rnd(rnd_add(x * c[None, :], dt, INTERP) + rnd_add(xr * sgn[None, :] * s[None, :], dt, INTERP), dt,
               INTERP)


@triton.jit
def _mm(a, b, F32: tl.constexpr):
    """a @ b with fp32 accumulation; F32 for fp32 models and the interpreter (whose dot would
    multiply bf16 bit patterns as integers): exact fp32 products of the upcast operands."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _new_token(qbase, kbase, vbase, sc_s, g, pos, start, d, cos_ptr, sin_ptr, H: tl.constexpr,
               HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
               CHUNK: tl.constexpr, dt: tl.constexpr, INTERP: tl.constexpr):
    """KV head g's part of a row's new token (q|k|v at ``qbase``): the GQA group's roped queries
    qd [GP, D] (rows past GROUP masked: ``hmask``, their ``heads``), the roped key kn and value vn
    [1, D] in the cache dtype, both written into the cache at ``pos`` by the program whose chunk
    (from ``start``) holds it."""
    gi = tl.arange(0, GP)
    hmask = gi < GROUP
    heads = g * GROUP + gi
    q = _rope(qbase, heads[:, None] * D, d, pos, cos_ptr, sin_ptr, hmask[:, None], D, dt, INTERP)
    one = tl.arange(0, 1)
    kn = cast(_rope(qbase, (H * D + g * D + one * 0)[:, None], d, pos, cos_ptr, sin_ptr,
                    (one >= 0)[:, None], D, dt, INTERP), dt, INTERP)                  # [1, D]
    vn = tl.load(qbase + (H + HKV) * D + g * D + one[:, None] * 0 + d[None, :]).to(dt)
    holds = (pos < start + CHUNK) & (one >= 0)[:, None]                                # this chunk has pos
    tl.store(kbase + pos * sc_s + one[:, None] * 0 + d[None, :], kn, mask=holds)
    tl.store(vbase + pos * sc_s + one[:, None] * 0 + d[None, :], vn, mask=holds)
    tl.debug_barrier()
    return cast(q, dt, INTERP), kn, vn, heads, hmask


@triton.jit
def _attn_partial(qkv_ptr, stride_qkv, kc_ptr, vc_ptr, sc_b, sc_h, sc_s, rows_ptr, pos_ptr,
                  cos_ptr, sin_ptr, po_ptr, pml_ptr, scale,
                  H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                  GP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, NCH: tl.constexpr,
                  IEEE: tl.constexpr, DYN: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
                  INTERP: tl.constexpr):
    """Grid (B * Hkv, NCH): one (row, KV head, chunk of CHUNK slots) a program; the GQA group's
    roped queries against the chunk's slots up to ``pos`` -> partial output, max and sum. The
    program whose chunk holds ``pos`` ropes the new key and writes k, v into the cache. With
    ``PREFETCH`` the first tile's older slots (< pos, written by earlier steps) are loaded before
    the wait on the previous kernel, and the new slot is taken from registers."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    b = pid // HKV
    g = pid % HKV
    pos = tl.load(pos_ptr + b)                      # host-written before the step: safe pre-wait
    row = tl.load(rows_ptr + b)
    start = c * CHUNK
    dt = kc_ptr.dtype.element_ty
    d = tl.arange(0, D)
    kbase = kc_ptr + row * sc_b + g * sc_h
    vbase = vc_ptr + row * sc_b + g * sc_h
    if start <= pos:                                # chunks past pos exit without waiting
        if PREFETCH:
            n0 = start + tl.arange(0, BLOCK_N)
            k0 = tl.load(kbase + n0[:, None] * sc_s + d[None, :], mask=(n0 < pos)[:, None], other=0.0)
            v0 = tl.load(vbase + n0[:, None] * sc_s + d[None, :], mask=(n0 < pos)[:, None], other=0.0)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        qd, kn, vn, heads, hmask = _new_token(qkv_ptr + b * stride_qkv, kbase, vbase, sc_s, g, pos, start, d,
                                              cos_ptr, sin_ptr, H, HKV, D, GROUP, GP, CHUNK, dt, INTERP)
        m_i = tl.full((GP,), -float("inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        if PREFETCH:                                # tile 0: prefetched; the new slot from registers
            n = start + tl.arange(0, BLOCK_N)
            at = (n == pos)[:, None]
            m_i, l_i, acc = _softmax_step(qd, tl.where(at, kn, k0), tl.where(at, vn, v0), n <= pos, scale,
                                          m_i, l_i, acc, IEEE, INTERP)
        if DYN:     # chunks of several tiles: a run-time trip count instead of a branch per tile
            for it in range(1 if PREFETCH else 0, tl.minimum(CHUNK // BLOCK_N, (pos - start) // BLOCK_N + 1)):
                m_i, l_i, acc = _attn_tile(qd, kbase, vbase, start + it * BLOCK_N, pos, sc_s, d, scale,
                                           m_i, l_i, acc, BLOCK_N, IEEE, INTERP)
        else:
            for it in range(1 if PREFETCH else 0, CHUNK // BLOCK_N):
                if start + it * BLOCK_N <= pos:                 # only the tiles up to pos
                    m_i, l_i, acc = _attn_tile(qd, kbase, vbase, start + it * BLOCK_N, pos, sc_s, d, scale,
                                               m_i, l_i, acc, BLOCK_N, IEEE, INTERP)
        o = acc / l_i[:, None]
        hb = (b * H + heads) * NCH + c                                                # [GP]
        tl.store(po_ptr + hb[:, None] * D + d[None, :], o, mask=hmask[:, None])
        tl.store(pml_ptr + hb * 2, m_i, mask=hmask)
        tl.store(pml_ptr + hb * 2 + 1, l_i, mask=hmask)


@triton.jit
def _attn_tile(qd, kbase, vbase, n0, pos, sc_s, d, scale, m_i, l_i, acc, BLOCK_N: tl.constexpr,
               IEEE: tl.constexpr, INTERP: tl.constexpr):
    """Online softmax over cache slots n0 .. n0+BLOCK_N-1 (those <= pos) for the queries qd [GP, D]."""
    n = n0 + tl.arange(0, BLOCK_N)
    valid = n <= pos
    k = tl.load(kbase + n[:, None] * sc_s + d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(vbase + n[:, None] * sc_s + d[None, :], mask=valid[:, None], other=0.0)
    return _softmax_step(qd, k, v, valid, scale, m_i, l_i, acc, IEEE, INTERP)


@triton.jit
def _softmax_step(qd, k, v, valid, scale, m_i, l_i, acc, IEEE: tl.constexpr, INTERP: tl.constexpr):
    """One online-softmax update: queries qd [GP, D] against keys / values k, v [BLOCK_N, D] (slots
    where ``valid``), running max m_i and sum l_i [GP], accumulator acc [GP, D] -> the updated three."""
    s = _mm(qd, tl.trans(k), IEEE or INTERP)
    s = tl.where(valid[None, :], s * scale, -float("inf"))                          # [GP, BLOCK_N]
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pv = _mm(cast(p, qd.dtype, INTERP), v, IEEE or INTERP)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _attn_combine(po_ptr, pml_ptr, pos_ptr, w_ptr, ob_ptr, cnt_ptr, y_ptr, q_ptr, s_ptr, stride_y,
                  stride_q, eps, H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                  NCH: tl.constexpr, NCHP: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr,
                  INTERP: tl.constexpr, CB: tl.constexpr = 0):
    """Grid (B, H): merge one head's chunks in one shot (``CB`` = 0: a [NCHP, D] tile, padded to
    every chunk of the cache) or ``CB`` live chunks at a time (only the chunks up to pos, with the
    weights of the one-shot merge; the sum runs in another order); the last head of a row to
    finish (a per-row counter) applies attn_sub_norm over the whole row and quantizes it."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    dt = w_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + b)
    nch = pos // CHUNK + 1
    cs = tl.arange(0, NCHP)
    d = tl.arange(0, D)
    cm = cs < nch
    base = (b * H + h) * NCH + cs
    m = tl.load(pml_ptr + base * 2, mask=cm, other=-float("inf"))
    if CB == 0:
        lsum = tl.load(pml_ptr + base * 2 + 1, mask=cm, other=0.0)
        wgt = tl.where(cm, tl.exp(m - tl.max(m, axis=0)) * lsum, 0.0)                   # [NCHP]
        o = tl.load(po_ptr + base[:, None] * D + d[None, :], mask=cm[:, None], other=0.0)  # [NCHP, D]
        o = rnd(tl.sum(wgt[:, None] * o, axis=0) / tl.sum(wgt, axis=0), dt, INTERP)     # SDPA output
    else:
        mx = tl.max(m, axis=0)
        acc = tl.zeros((D,), tl.float32)
        wsum = tl.zeros((CB,), tl.float32)
        for i in range(0, NCHP // CB):
            if i * CB < nch:                                 # only the blocks with live chunks
                cb = i * CB + tl.arange(0, CB)
                bm = cb < nch
                bb = (b * H + h) * NCH + cb
                mb = tl.load(pml_ptr + bb * 2, mask=bm, other=-float("inf"))
                lb = tl.load(pml_ptr + bb * 2 + 1, mask=bm, other=0.0)
                wb = tl.where(bm, tl.exp(mb - mx) * lb, 0.0)                            # [CB]
                ob = tl.load(po_ptr + bb[:, None] * D + d[None, :], mask=bm[:, None], other=0.0)  # [CB, D]
                acc += tl.sum(wb[:, None] * ob, axis=0)
                wsum += wb
        o = rnd(acc / tl.sum(wsum, axis=0), dt, INTERP)                                  # SDPA output
    tl.store(ob_ptr + (b * H + h) * D + d, o)
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + b, 1)                      # acq_rel: our row slice is visible
    if done == H - 1:
        tl.debug_barrier()
        hs = tl.arange(0, HP)
        hmask = hs < H
        idx = hs[:, None] * D + d[None, :]
        orow = tl.load(ob_ptr + b * H * D + idx, mask=hmask[:, None], other=0.0, cache_modifier=".cg")
        var = tl.sum(tl.sum(orow * orow, axis=1), axis=0) / (H * D)
        r = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        wn = tl.load(w_ptr + idx, mask=hmask[:, None], other=0.0).to(tl.float32)
        yrow = rnd(wn * rnd(orow * r, dt, INTERP), dt, INTERP)
        if QUANT:
            amax = tl.max(tl.max(tl.abs(yrow), axis=1), axis=0)
            sq = 127.0 * tl.math.div_rn(1.0, tl.maximum(amax, 1e-5))
            qv = tl.minimum(tl.maximum(rint(yrow * sq, INTERP), -128.0), 127.0)
            tl.store(q_ptr + b * stride_q + idx, qv.to(tl.int8), mask=hmask[:, None])
            tl.store(s_ptr + b, sq)
        else:
            tl.store(y_ptr + b * stride_y + idx, cast(yrow, y_ptr.dtype.element_ty, INTERP), mask=hmask[:, None])
        tl.atomic_xchg(cnt_ptr + b, 0)                       # ready for the next layer / replay


@triton.jit
def _chunk_merge(qbase, kbase, vbase, sc_s, g, c, pos, start, d, k0, v0, cos_ptr, sin_ptr, po_ptr, pml_ptr,
                 cnt_ptr, o_ptr, hb0, scale, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                 GROUP: tl.constexpr, GP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                 NCH: tl.constexpr, NCHP: tl.constexpr, dt: tl.constexpr, IEEE: tl.constexpr,
                 INTERP: tl.constexpr):
    """Chunk c (slots from ``start``) of KV head g for one row (q|k|v at ``qbase``, heads from
    ``hb0`` in the partial buffers): the partial output, max and sum of its GQA group's heads, with
    the first tile's older slots k0, v0 [BLOCK_N, D] already loaded; then the last active chunk of
    the (row, KV head) to finish (the counter ``cnt_ptr``, left at zero) merges the group's
    heads into o_ptr[head * D + d] in o's dtype (what SDPA returns). Returns whether this
    program merged."""
    qd, kn, vn, heads, hmask = _new_token(qbase, kbase, vbase, sc_s, g, pos, start, d, cos_ptr, sin_ptr,
                                          H, HKV, D, GROUP, GP, CHUNK, dt, INTERP)
    m_i = tl.full((GP,), -float("inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for it in range(0, CHUNK // BLOCK_N):
        if start + it * BLOCK_N <= pos:                     # only the tiles up to pos
            n = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = n <= pos
            if it == 0:                                     # prefetched; the new slot from registers
                at = (n == pos)[:, None]
                k = tl.where(at, kn, k0)
                v = tl.where(at, vn, v0)
            else:
                k = tl.load(kbase + n[:, None] * sc_s + d[None, :], mask=valid[:, None], other=0.0)
                v = tl.load(vbase + n[:, None] * sc_s + d[None, :], mask=valid[:, None], other=0.0)
            m_i, l_i, acc = _softmax_step(qd, k, v, valid, scale, m_i, l_i, acc, IEEE, INTERP)
    o = acc / l_i[:, None]
    hb = (hb0 + heads) * NCH + c                                                       # [GP]
    tl.store(po_ptr + hb[:, None] * D + d[None, :], o, mask=hmask[:, None])
    tl.store(pml_ptr + hb * 2, m_i, mask=hmask)
    tl.store(pml_ptr + hb * 2 + 1, l_i, mask=hmask)
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr, 1)                        # acq_rel: our partials are visible
    merged = done == pos // CHUNK                           # the last active chunk merges
    if merged:
        tl.debug_barrier()
        cs = tl.arange(0, NCHP)
        cm = cs < pos // CHUNK + 1
        for j in tl.static_range(GROUP):
            base = (hb0 + g * GROUP + j) * NCH + cs
            mj = tl.load(pml_ptr + base * 2, mask=cm, other=-float("inf"), cache_modifier=".cg")
            lj = tl.load(pml_ptr + base * 2 + 1, mask=cm, other=0.0, cache_modifier=".cg")
            wgt = tl.where(cm, tl.exp(mj - tl.max(mj, axis=0)) * lj, 0.0)              # [NCHP]
            oj = tl.load(po_ptr + base[:, None] * D + d[None, :], mask=cm[:, None], other=0.0,
                         cache_modifier=".cg")                                          # [NCHP, D]
            oj = tl.sum(wgt[:, None] * oj, axis=0) / tl.sum(wgt, axis=0)
            tl.store(o_ptr + (g * GROUP + j) * D + d, cast(oj, o_ptr.dtype.element_ty, INTERP))
        tl.atomic_xchg(cnt_ptr, 0)                          # ready for the next layer / replay
    return merged


@triton.jit
def _attn_fused(qkv_ptr, stride_qkv, kc_ptr, vc_ptr, sc_b, sc_h, sc_s, rows_ptr, pos_ptr,
                cos_ptr, sin_ptr, po_ptr, pml_ptr, cnt_ptr, o_ptr, stride_o, scale,
                w_ptr, rcnt_ptr, q_ptr, s_ptr, stride_q, eps,
                H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                GP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, NCH: tl.constexpr,
                NCHP: tl.constexpr, HP: tl.constexpr, QUANT: tl.constexpr, IEEE: tl.constexpr,
                PDL: tl.constexpr, INTERP: tl.constexpr):
    """Partials and merge in one kernel: grid (B * Hkv, NCH) as ``_attn_partial``; the last chunk
    of a (row, KV head) to finish (a counter, left at zero) merges the group's heads and stores
    the attention output ``o`` [B, H*D] in the model dtype. With ``QUANT`` the last KV head of a
    row to finish (a second counter) applies attn_sub_norm to the row and quantizes it for
    o_proj, as ``_attn_combine`` does. The first tile's cached keys/values (slots < pos, written by
    earlier steps) are loaded before the wait on the previous kernel."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    b = pid // HKV
    g = pid % HKV
    pos = tl.load(pos_ptr + b)                      # host-written before the step: safe pre-wait
    row = tl.load(rows_ptr + b)
    start = c * CHUNK
    dt = kc_ptr.dtype.element_ty
    d = tl.arange(0, D)
    kbase = kc_ptr + row * sc_b + g * sc_h
    vbase = vc_ptr + row * sc_b + g * sc_h
    if start <= pos:                                # chunks past pos exit without waiting
        n0 = start + tl.arange(0, BLOCK_N)
        old = (n0 < pos)[:, None]
        k0 = tl.load(kbase + n0[:, None] * sc_s + d[None, :], mask=old, other=0.0)
        v0 = tl.load(vbase + n0[:, None] * sc_s + d[None, :], mask=old, other=0.0)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        merged = _chunk_merge(qkv_ptr + b * stride_qkv, kbase, vbase, sc_s, g, c, pos, start, d, k0, v0, cos_ptr,
                              sin_ptr, po_ptr, pml_ptr, cnt_ptr + pid, o_ptr + b * stride_o, b * H, scale,
                              H, HKV, D, GROUP, GP, CHUNK, BLOCK_N, NCH, NCHP, dt, IEEE, INTERP)
        if merged:
            if QUANT:
                tl.debug_barrier()
                done2 = tl.atomic_add(rcnt_ptr + b, 1)          # acq_rel: our heads of o are visible
                if done2 == HKV - 1:
                    tl.debug_barrier()
                    hs = tl.arange(0, HP)
                    hm = hs < H
                    idx = hs[:, None] * D + d[None, :]
                    orow = tl.load(o_ptr + b * stride_o + idx, mask=hm[:, None], other=0.0,
                                   cache_modifier=".cg").to(tl.float32)
                    var = tl.sum(tl.sum(orow * orow, axis=1), axis=0) / (H * D)
                    r = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
                    wn = tl.load(w_ptr + idx, mask=hm[:, None], other=0.0).to(tl.float32)
                    yrow = rnd(wn * rnd(orow * r, dt, INTERP), dt, INTERP)
                    amax = tl.max(tl.max(tl.abs(yrow), axis=1), axis=0)
                    sq = 127.0 * tl.math.div_rn(1.0, tl.maximum(amax, 1e-5))
                    qv = tl.minimum(tl.maximum(rint(yrow * sq, INTERP), -128.0), 127.0)
                    tl.store(q_ptr + b * stride_q + idx, qv.to(tl.int8), mask=hm[:, None])
                    tl.store(s_ptr + b, sq)
                    tl.atomic_xchg(rcnt_ptr + b, 0)


@triton.jit
def _rope_cache(qkv_ptr, stride_qkv, q_ptr, k_ptr, kc_ptr, vc_ptr, sc_b, sc_h, sc_s, rows_ptr, pos_ptr,
                cos_ptr, sin_ptr, T, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HP: tl.constexpr,
                HKVP: tl.constexpr, PDL: tl.constexpr, INTERP: tl.constexpr):
    """Prefill: one program per token ``i`` (row ``i // T``): RoPE of its H query and HKV key heads
    (bf16 rounding after each op, as ``model.apply_rope``) into q [N, H*D] and k [N, HKV*D], and
    its roped key and value written into the caches at (rows[i // T], pos[i])."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    i = tl.program_id(0)
    pos = tl.load(pos_ptr + i)
    row = tl.load(rows_ptr + i // T)
    dt = kc_ptr.dtype.element_ty
    d = tl.arange(0, D)
    qbase = qkv_ptr + i * stride_qkv
    hs = tl.arange(0, HP)
    hm = (hs < H)[:, None]
    q = _rope(qbase, hs[:, None] * D, d, pos, cos_ptr, sin_ptr, hm, D, dt, INTERP)         # [HP, D]
    tl.store(q_ptr + i * H * D + hs[:, None] * D + d[None, :], cast(q, dt, INTERP), mask=hm)
    gs = tl.arange(0, HKVP)
    gm = (gs < HKV)[:, None]
    k = cast(_rope(qbase, (H + gs)[:, None] * D, d, pos, cos_ptr, sin_ptr, gm, D, dt, INTERP), dt, INTERP)
    v = tl.load(qbase + (H + HKV + gs)[:, None] * D + d[None, :], mask=gm, other=0.0)   # [HKVP, D]
    tl.store(k_ptr + i * HKV * D + gs[:, None] * D + d[None, :], k, mask=gm)
    slot = row * sc_b + gs[:, None] * sc_h + pos * sc_s + d[None, :]
    tl.store(kc_ptr + slot, k, mask=gm)
    tl.store(vc_ptr + slot, v.to(dt), mask=gm)


def rope_cache_write(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                     pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int,
                     head_dim: int):
    """Prefill RoPE and cache write in one kernel (instead of ~12 torch ops a layer).

    qkv [B*T, (H+2Hkv)D] (unit column stride), caches [rows, Hkv, S, D], rows int32 [B], pos int32
    [B*T] (row-major over [B, T]), cos/sin fp32 [P, D] -> (q [B*T, H*D], k [B*T, Hkv*D]) roped, in
    the caches' dtype; the roped keys and the values are also written at cache[rows[b], :, pos].
    """
    N = qkv.shape[0]
    T = N // rows.shape[0]
    if k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride() or qkv.stride(1) != 1:
        raise ValueError("rope_cache_write: caches must share strides; unit stride on the last dim")
    q = torch.empty((N, n_heads * head_dim), dtype=k_cache.dtype, device=qkv.device)
    k = torch.empty((N, n_kv * head_dim), dtype=k_cache.dtype, device=qkv.device)
    _rope_cache[(N,)](qkv, qkv.stride(0), q, k, k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
                      k_cache.stride(2), rows, pos, cos, sin, T, H=n_heads, HKV=n_kv, D=head_dim,
                      HP=next_pow2(n_heads), HKVP=next_pow2(n_kv), PDL=PDL, INTERP=INTERPRET, num_warps=4,
                      **_pdl)
    return q, k


class DecodeAttention:
    """Buffers and launch parameters for one model shape, batch and cache length.

    ``CHUNK`` cache slots per program (64..256, up to 64 chunks per cache): Hkv * ceil((pos+1)/CHUNK)
    programs per row, each reading only the tiles up to ``pos``, ``BLOCK_N`` slots at a time.
    """

    def __init__(self, n_heads: int, n_kv: int, head_dim: int, batch: int, max_len: int, device,
                 chunk: int | None = None, block_n: int = 64, combine_warps: int | None = None,
                 prefetch: bool | None = None, merge_block: int = 0):
        if head_dim & (head_dim - 1):
            raise ValueError(f"decode attention: head_dim={head_dim} must be a power of two")
        self.H, self.HKV, self.D = n_heads, n_kv, head_dim
        self.group = n_heads // n_kv
        if chunk is None:   # 64..256 slots a chunk, up to 64 chunks (one 64-slot tile up to 4096)
            chunk = min(256, max(64, next_pow2(cdiv(max_len, 64))))
        self.chunk = max(16, min(chunk, next_pow2(max_len)))
        self.block_n = max(16, min(block_n, self.chunk))      # tl.dot needs K >= 16
        self.nch = cdiv(max_len, self.chunk)
        self.combine_warps = COMBINE_WARPS if combine_warps is None else combine_warps   # None: per call
        self.prefetch = PARTIAL_PREFETCH if prefetch is None else prefetch
        self.partial_warps = 4           # warps of a partial program ([16, D] queries, 64-slot tiles)
        # live chunks the merge takes at a time; 0 (or as many as the cache has): all in one tile
        if merge_block < 0 or merge_block & (merge_block - 1):
            raise ValueError(f"decode attention: merge_block={merge_block} must be 0 or a power of two")
        self.merge_block = merge_block if merge_block < next_pow2(self.nch) else 0
        self.po = torch.empty((batch, n_heads, self.nch, head_dim), dtype=torch.float32, device=device)
        self.pml = torch.empty((batch, n_heads, self.nch, 2), dtype=torch.float32, device=device)
        self.ob = torch.empty((batch, n_heads * head_dim), dtype=torch.float32, device=device)
        self.cnt = torch.zeros(batch, dtype=torch.int32, device=device)   # left zeroed by each call
        self.gcnt = torch.zeros(batch * n_kv, dtype=torch.int32, device=device)   # fused kernel's

    def chunks(self, span: int | None) -> int:
        """Chunks a call launches for positions below ``span`` (None: every chunk of the cache)."""
        return self.nch if span is None else max(1, min(self.nch, cdiv(span, self.chunk)))

    def __call__(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 rows: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 norm_weight: torch.Tensor, eps: float, quant: bool = True, y_out=None, q_out=None,
                 s_out=None, span: int | None = None):
        """qkv [B, (H+2Hkv)D]; caches [rows, Hkv, S, D]; rows, pos int32 [B]; cos/sin fp32 [P, D].
        ``span``: every ``pos`` is below it (the caller's promise), so only the chunks up to it are
        launched and merged (a [next_pow2(chunks), D] merge tile instead of one padded to the cache).

        Returns (q int8 [B, H*D], s fp32 [B]) or, with ``quant=False``, y [B, H*D].
        """
        B = qkv.shape[0]
        nch = self.chunks(span)
        nchp = next_pow2(nch)
        cb = self.merge_block if self.merge_block < nchp else 0
        HD = self.H * self.D
        if k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
            raise ValueError("decode attention: caches must share strides, unit stride on head_dim")
        ieee = k_cache.dtype == torch.float32
        _attn_partial[(B * self.HKV, nch)](
            qkv, qkv.stride(0), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), rows, pos, cos, sin, self.po, self.pml, self.D ** -0.5,
            H=self.H, HKV=self.HKV, D=self.D, GROUP=self.group, GP=max(16, next_pow2(self.group)),
            CHUNK=self.chunk, BLOCK_N=self.block_n, NCH=self.nch, IEEE=ieee,
            DYN=self.chunk > self.block_n and not INTERPRET,
            PREFETCH=self.prefetch,
            PDL=PDL, INTERP=INTERPRET, num_warps=self.partial_warps, **_pdl)
        if quant:
            q_out = q_out if q_out is not None else torch.empty((B, HD), dtype=torch.int8, device=qkv.device)
            s_out = s_out if s_out is not None else torch.empty((B,), dtype=torch.float32, device=qkv.device)
            y_out = q_out
        else:
            y_out = y_out if y_out is not None else torch.empty((B, HD), dtype=qkv.dtype, device=qkv.device)
            q_out, s_out = y_out, y_out
        _attn_combine[(B, self.H)](
            self.po, self.pml, pos, norm_weight, self.ob, self.cnt, y_out, q_out, s_out, y_out.stride(0),
            q_out.stride(0), eps,
            H=self.H, HP=next_pow2(self.H), D=self.D, CHUNK=self.chunk, NCH=self.nch,
            NCHP=nchp, QUANT=quant, PDL=PDL, INTERP=INTERPRET, CB=cb,
            num_warps=self.combine_warps or merge_warps(B * self.H, cb or nchp),
            **_pdl)
        return (q_out, s_out) if quant else y_out

    def fused(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
              pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None,
              num_warps: int = 8, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
              span: int | None = None):
        """One kernel: qkv [B, (H+2Hkv)D] -> attention output o [B, H*D] in the caches' dtype
        (before attn_sub_norm); with ``norm_weight``: (o, q int8 [B, H*D], s fp32 [B]), the row
        normed and quantized for o_proj. Same cache write, chunking and ``span`` as ``__call__``."""
        B = qkv.shape[0]
        nch = self.chunks(span)
        if k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
            raise ValueError("decode attention: caches must share strides, unit stride on head_dim")
        out = out if out is not None else torch.empty((B, self.H * self.D), dtype=k_cache.dtype,
                                                      device=qkv.device)
        quant = norm_weight is not None
        if quant:
            q = torch.empty((B, self.H * self.D), dtype=torch.int8, device=qkv.device)
            s = torch.empty((B,), dtype=torch.float32, device=qkv.device)
        else:
            q, s = out, out
        _attn_fused[(B * self.HKV, nch)](
            qkv, qkv.stride(0), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), rows, pos, cos, sin, self.po, self.pml, self.gcnt, out, out.stride(0),
            self.D ** -0.5, norm_weight if quant else out, self.cnt, q, s, q.stride(0), eps,
            H=self.H, HKV=self.HKV, D=self.D, GROUP=self.group,
            GP=max(16, next_pow2(self.group)), CHUNK=self.chunk, BLOCK_N=self.block_n,
            NCH=self.nch, NCHP=next_pow2(nch), HP=next_pow2(self.H),
            QUANT=quant, IEEE=k_cache.dtype == torch.float32, PDL=PDL, INTERP=INTERPRET,
            num_warps=num_warps, **_pdl)
        return (out, q, s) if quant else out
