"""Fused decode GEMV: (residual add +) RMSNorm + int8 quantization recomputed in the W2A8 prologue.

The unfused decode step runs a norm+quant kernel before every projection; here each GEMV program
recomputes the norm and the quantization of its activation row itself (the row is 2560 or 6912
elements, read from L2 by every program: cheap), so a layer is 5 kernels instead of 9:

    QKV(x + d, input_layernorm) -> attention (partials + merge) -> O(attn_sub_norm)
    -> gate|up(x + d, post_attention_layernorm) -> down(relu(g)^2 * u, ffn_sub_norm)

Prologue modes (``MODE``), all with the numerics of :mod:`.norm_quant` (bf16 rounding at the
reference's points, ``1/sqrt`` rounded correctly, ``127 * (1 / amax)``, half-to-even):

- 0: the row ``a`` itself (attention output, or the embedding row on the first layer);
- 1: ``h = a + d`` in the model dtype; the programs of the first row block store ``h`` to
  ``h_out`` (a different buffer from ``a``: the other programs still read ``a``);
- 2: ``h = relu(g)^2 * u`` of a fused gate/up row ``a = [g | u]``.

``GATHER``: ``a``'s row ``m`` is row ``tok[m]`` of a table (the embedding lookup of the first
layer folds into its QKV and gate/up prologues). The quantized row is packed four int8 to an
int32 in registers and fed to a ``dp4a`` product as in ``w2a8._gemv_dp4a``, but each 2-bit field
is masked in place (``w & (0x03030303 << 2k)``, bytes read unsigned, the sum shifted right by
``2k`` at the end): 2 instead of 3 integer ops per field and word. The epilogue is
``acc * (gamma_seg / s_x)`` with the same fp32 ops, so outputs are bit-identical to
``norm_quant`` + ``w2a8_linear`` whenever the norm's fp32 sum lands on the same value.

    y = fused_linear(a, norm_w, packed, gammas, segs, mode=1, d=delta, h_out=x2)

Tests: ``tests/kernels/test_triton_decode_layer.py`` (interpreter on CPU, compiled on CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, PDL, cast, gdc_launch_dependents, gdc_wait, rint, rnd
from .w2a8 import _dp4a, _out_cols, seg_bounds

_pdl = dict(launch_pdl=True) if PDL else {}


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _dp4a_u(a, b, c, INTERP: tl.constexpr):
    """c + sum_j a.byte[j] * b.byte[j]: a's bytes unsigned (0..255), b's signed int8."""
    if INTERP:
        return _dp4a(a, b, c, INTERP)         # the interpreter's version reads a's bytes unsigned
    else:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _prologue(a_ptr, d_ptr, h_ptr, nw, arow, m, stride_d, stride_h, K, offs, kmask, store_h, eps,
              MODE: tl.constexpr, STORE_H: tl.constexpr, INTERP: tl.constexpr):
    """One activation row -> (q fp32 [BLOCK] holding int8 values, s fp32 scalar): norm_quant's math."""
    dt = a_ptr.dtype.element_ty
    if MODE == 2:
        g = tl.load(a_ptr + arow + offs, mask=kmask, other=0.0).to(tl.float32)
        u = tl.load(a_ptr + arow + K + offs, mask=kmask, other=0.0).to(tl.float32)
        g = tl.maximum(g, 0.0)
        h = cast(rnd(g * g, dt, INTERP) * u, dt, INTERP)
    else:
        h = tl.load(a_ptr + arow + offs, mask=kmask, other=0.0)
        if MODE == 1:
            d = tl.load(d_ptr + m * stride_d + offs, mask=kmask, other=0.0)
            h = cast(h.to(tl.float32) + d.to(tl.float32), dt, INTERP)
            if STORE_H:
                tl.store(h_ptr + m * stride_h + offs, h, mask=kmask & store_h)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / K
    r = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    y = rnd(nw * rnd(hf * r, dt, INTERP), dt, INTERP)
    amax = tl.max(tl.abs(y), axis=0)
    s = 127.0 * tl.math.div_rn(1.0, tl.maximum(amax, 1e-5))
    q = tl.minimum(tl.maximum(rint(y * s, INTERP), -128.0), 127.0)
    return q, s


@triton.jit
def _gemv_nq(a_ptr, tok_ptr, d_ptr, h_ptr, nw_ptr, w_ptr, g_ptr, out_ptr,
             M, K, K4, R_total, P1, P2, stride_a, stride_d, stride_h, stride_om, eps,
             MODE: tl.constexpr, GATHER: tl.constexpr, STORE_H: tl.constexpr, BR: tl.constexpr,
             BK4: tl.constexpr, MB: tl.constexpr, PDL: tl.constexpr, INTERP: tl.constexpr):
    """BR packed rows (4*BR outputs) for MB activation rows; the whole K in one tile (K <= 4*BK4).

    Weights and the norm weight are loaded before waiting on the previous kernel.
    """
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < R_total
    k0 = tl.arange(0, BK4)
    w = tl.load(w_ptr + rows[:, None] * K4 + k0[None, :], mask=rmask[:, None] & (k0 < K4)[None, :],
                other=0)                                                                # int32 [BR, BK4]
    offs = tl.arange(0, 4 * BK4)
    kmask = offs < K
    nw = tl.load(nw_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    for mi in range(MB):                # a loop, not unrolled: one row's prologue live at a time
        m = pid_m * MB + mi
        mvalid = m < M
        if GATHER:
            arow = tl.load(tok_ptr + m, mask=mvalid, other=0) * stride_a
        else:
            arow = m * stride_a
        q, s = _prologue(a_ptr, d_ptr, h_ptr, nw, arow, m, stride_d, stride_h, K, offs,
                         kmask & mvalid, pid_r == 0, eps, MODE, STORE_H, INTERP)
        xb, sumx = _pack_row(q, BK4)
        _masked_fields(w, xb, sumx, s, rows, rmask & mvalid, P1, P2, R_total, g_ptr, out_ptr + m * stride_om,
                       INTERP)


@triton.jit
def _pack_row(q, BK4: tl.constexpr):
    """int8 values q (fp32 [4*BK4]) -> (four to an int32, little-endian as ``x_q.view(int32)``:
    [BK4]; their int32 sum)."""
    qi = q.to(tl.int32)
    shifts = tl.arange(0, 4) * 8
    xb = tl.reduce((tl.reshape(qi, (BK4, 4)) & 0xFF) << shifts[None, :], 1, _or)
    return xb, tl.sum(qi, axis=0)


@triton.jit
def _masked_fields(w, xb, sumx, s, rows, rmask, P1, P2, R_total, g_ptr, out_ptr, INTERP: tl.constexpr):
    """The four output fields of packed int32 weights w [BR, BK4] (packed rows ``rows``) times the
    packed int8 row xb [BK4] (sum ``sumx``, scale ``s``), stored at out_ptr[cols] in its dtype."""
    for k in tl.static_range(4):
        # field k masked in place: its bytes are u << 2k (u = w + 1 in 0..2, so <= 128, read
        # unsigned), one LOP instead of shift + and; the sum is exactly 4^k * (x . u)
        if k == 3:
            u = w & -1061109568                             # 0xC0C0C0C0 as an int32
        else:
            u = w & (0x03030303 << (2 * k))
        acc = (tl.sum(_dp4a_u(u, xb[None, :], tl.zeros_like(w), INTERP), axis=1) >> (2 * k)) - sumx
        cols, seg = _out_cols(rows, k, P1, P2, R_total)
        gamma = tl.load(g_ptr + seg)
        y = acc.to(tl.float32) * tl.math.div_rn(gamma, s)
        tl.store(out_ptr + cols, cast(y, out_ptr.dtype.element_ty, INTERP), mask=rmask)


@triton.jit
def _norm_quant_row(h, nw, m, D, offs, mask, q_ptr, s_ptr, stride_q, eps, dt: tl.constexpr,
                    INTERP: tl.constexpr):
    """RMSNorm (weight nw) + absmax int8 quantization of one row h (model-dtype values in fp32)."""
    var = tl.sum(h * h, axis=0) / D
    r = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    y = rnd(nw * rnd(h * r, dt, INTERP), dt, INTERP)
    amax = tl.max(tl.abs(y), axis=0)
    s = 127.0 * tl.math.div_rn(1.0, tl.maximum(amax, 1e-5))
    q = tl.minimum(tl.maximum(rint(y * s, INTERP), -128.0), 127.0)
    tl.store(q_ptr + m * stride_q + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + m, s)


@triton.jit
def _gemv_tail(x_ptr, sx_ptr, w_ptr, g_ptr, out_ptr, M, K4, R_total, P1, P2, stride_xm, stride_om,
               cnt_ptr, res_ptr, stride_res, nw_ptr, q_ptr, s_ptr, stride_q, N, eps,
               TAIL: tl.constexpr, MB: tl.constexpr, BR: tl.constexpr, BK4: tl.constexpr, BT: tl.constexpr,
               PDL: tl.constexpr, INTERP: tl.constexpr):
    """``w2a8._gemv_dp4a`` (all M rows a program, K in one tile), then the last program to finish
    (a counter, left at zero) computes the next projection's input from the whole output row:

    - TAIL 1: ``h = res + out`` (model dtype, stored back to ``res``), RMSNorm, int8 quant;
    - TAIL 2: ``h = relu(g)^2 * u`` of the output row ``[g | u]`` (N = width of g), RMSNorm, quant.

    One kernel instead of GEMV + norm_quant: no kernel boundary, no second launch.
    """
    pid_r = tl.program_id(0)
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < R_total
    k0 = tl.arange(0, BK4)
    kmask = k0 < K4
    w = tl.load(w_ptr + rows[:, None] * K4 + k0[None, :], mask=rmask[:, None] & kmask[None, :], other=0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    ones = tl.full((BK4,), 0x01010101, tl.int32)
    for m in range(MB):                                         # MB == M
        x = tl.load(x_ptr + m * stride_xm + k0, mask=kmask, other=0)                    # int8x4 [BK4]
        sumx = tl.sum(_dp4a(ones, x, tl.zeros_like(x), INTERP), axis=0)
        sx = tl.load(sx_ptr + m)
        _masked_fields(w, x, sumx, sx, rows, rmask, P1, P2, R_total, g_ptr, out_ptr + m * stride_om, INTERP)
    if TAIL != 0:
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr, 1)                        # acq_rel: our outputs are visible
        if done == tl.num_programs(0) - 1:
            tl.debug_barrier()
            offs = tl.arange(0, BT)
            mask = offs < N
            nw = tl.load(nw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dt = out_ptr.dtype.element_ty
            for m in range(MB):
                if TAIL == 1:
                    d = tl.load(out_ptr + m * stride_om + offs, mask=mask, other=0.0, cache_modifier=".cg")
                    xr = tl.load(res_ptr + m * stride_res + offs, mask=mask, other=0.0, cache_modifier=".cg")
                    h = cast(xr.to(tl.float32) + d.to(tl.float32), dt, INTERP)
                    tl.store(res_ptr + m * stride_res + offs, h, mask=mask)
                else:
                    g = tl.load(out_ptr + m * stride_om + offs, mask=mask, other=0.0,
                                cache_modifier=".cg").to(tl.float32)
                    uu = tl.load(out_ptr + m * stride_om + N + offs, mask=mask, other=0.0,
                                 cache_modifier=".cg").to(tl.float32)
                    g = tl.maximum(g, 0.0)
                    h = cast(rnd(g * g, dt, INTERP) * uu, dt, INTERP)
                _norm_quant_row(h.to(tl.float32), nw, m, N, offs, mask, q_ptr, s_ptr, stride_q, eps, dt, INTERP)
            tl.atomic_xchg(cnt_ptr, 0)                          # ready for the next kernel / replay


TAIL_STYLES = ("base", "w8", "fat")


def tail_config(R: int, K: int, style: str = "base", n_sm: int = 132) -> dict:
    """Block shapes of the tail GEMV.

    - ``base``: the unfused GEMV's (2-8 packed rows a program, 4 warps; 8 for K = 6912);
    - ``w8``: the same rows, twice the warps (the tail's full-row tensors take fewer registers
      a thread, so more programs stay resident);
    - ``fat``: at most one program an SM, 16 warps.
    """
    bk4 = triton.next_power_of_2(max(triton.cdiv(K, 4), 1))
    if style == "fat":
        br = 1
        while triton.cdiv(R, br) > n_sm and br < 64:
            br *= 2
        return dict(BR=br, BK4=bk4, num_warps=16)
    if bk4 >= 2048:             # K = 6912 (down): 2 packed rows a program
        br, nw = 2, 8
    else:
        br, nw = (4 if R <= 1024 else 8), 4
    return dict(BR=br, BK4=bk4, num_warps=nw * (2 if style == "w8" else 1))


def linear_tail(x_q: torch.Tensor, s_x: torch.Tensor, w: torch.Tensor, gammas: torch.Tensor,
                seg_rows: tuple[int, ...], cnt: torch.Tensor, *, tail: int = 0,
                res: torch.Tensor | None = None, norm_w: torch.Tensor | None = None, eps: float = 1e-5,
                out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None, style: str = "base"):
    """W2A8 GEMV of int8 rows x_q [M, K] (M <= 8) with an optional tail (see ``_gemv_tail``).

    Returns ``out`` [M, 4R] for ``tail=0``, else ``(out, q [M, N] int8, s [M] fp32)``: the next
    projection's input. ``cnt``: an int32 counter (zero, and left at zero).
    """
    M, K = x_q.shape
    R = w.shape[0]
    if not supported(M, K) or w.shape[1] != K:
        raise ValueError(f"linear_tail: M={M}, K={K}, weight {tuple(w.shape)} outside the decode GEMV")
    if x_q.stride(1) != 1 or x_q.stride(0) % 4 or not w.is_contiguous():
        raise ValueError("linear_tail: int8 rows need unit column stride and a row stride % 4 == 0")
    P1, P2 = seg_bounds(seg_rows, R, "linear_tail")
    out = torch.empty((M, 4 * R), dtype=out_dtype, device=x_q.device)
    N = 4 * R if tail != 2 else 2 * R
    if tail == 1 and (res is None or res.shape[1] != N):
        raise ValueError("linear_tail: tail 1 needs the residual rows res [M, 4R]")
    if tail:
        q = torch.empty((M, N), dtype=torch.int8, device=x_q.device)
        s = torch.empty((M,), dtype=torch.float32, device=x_q.device)
    else:
        q, s = x_q, s_x
    r_ = res if res is not None else out
    nw = norm_w if norm_w is not None else out
    cfg = dict(config or tail_config(R, K, style))
    _gemv_tail[(triton.cdiv(R, cfg["BR"]),)](
        x_q.view(torch.int32), s_x.reshape(-1), w.view(torch.int32), gammas, out, M, K // 4, R, P1, P2,
        x_q.stride(0) // 4, out.stride(0), cnt, r_, r_.stride(0), nw, q, s, q.stride(0), N, eps,
        TAIL=tail, MB=M, BT=triton.next_power_of_2(N), PDL=PDL, INTERP=INTERPRET, **cfg, **_pdl)
    return (out, q, s) if tail else out


MAX_K = 8192        # the whole K of a row in one tile


STYLES = ("wide", "half", "fat")


def fused_config(M: int, R: int, K: int, style: str = "fat", n_sm: int = 132) -> dict:
    """Block shapes at decode sizes; the whole K of a program's rows is one tile.

    - ``wide``: the unfused GEMV's shapes (2-8 packed rows, 4 warps; 160-432 programs);
    - ``half``: the fewest rows a program that keep the grid within 2 programs an SM, 8/16 warps;
    - ``fat``: within 1 program an SM (every program resident at once, so every weight load is
      in flight before the wait on the previous kernel), 8/16 warps.

    The prologue holds the activation row several times in registers, so a program's registers
    do not shrink with its rows: fewer, larger programs keep all of them resident.
    """
    bk4 = triton.next_power_of_2(max(triton.cdiv(K, 4), 1))
    if style == "wide":
        if bk4 >= 2048:         # K = 6912 (down): 2 packed rows a program, 8 warps
            return dict(BR=2, BK4=bk4, MB=M, num_warps=8)
        return dict(BR=4 if R <= 1024 else 8, BK4=bk4, MB=M, num_warps=4)
    per_sm = {"half": 2, "fat": 1}[style]
    br = 1
    while triton.cdiv(R, br) > per_sm * n_sm and br < 64:
        br *= 2
    return dict(BR=br, BK4=bk4, MB=M, num_warps=8 if bk4 <= 1024 else 16)


def supported(M: int, K: int) -> bool:
    return M <= 8 and K % 4 == 0 and K <= MAX_K


def fused_linear(a: torch.Tensor, norm_w: torch.Tensor, w: torch.Tensor, gammas: torch.Tensor,
                 seg_rows: tuple[int, ...], eps: float, *, mode: int = 0, d: torch.Tensor | None = None,
                 h_out: torch.Tensor | None = None, tok: torch.Tensor | None = None, M: int | None = None,
                 out: torch.Tensor | None = None, config: dict | None = None,
                 style: str = "fat") -> torch.Tensor:
    """y [M, 4R] = W2A8(quant(norm(h))) with h from ``mode`` (see the module docstring).

    ``a``: [M, K] rows (mode 0/1), [M, 2K] gate|up rows (mode 2) or, with ``tok`` long [M], a
    table whose rows ``tok`` are gathered; ``norm_w`` [K]; ``w`` packed uint8 [R, K];
    ``d`` [M, K] residual (mode 1) and ``h_out`` [M, K] where ``a + d`` is stored (optional).
    """
    R, K = w.shape
    if M is None:
        M = tok.shape[0] if tok is not None else a.shape[0]
    if not supported(M, K):
        raise ValueError(f"fused_linear: M={M}, K={K} outside the fused GEMV (M <= 8, K % 4 == 0, "
                         f"K <= {MAX_K})")
    width = 2 * K if mode == 2 else K
    if a.shape[-1] != width or a.stride(-1) != 1:
        raise ValueError(f"fused_linear: activations have {a.shape[-1]} columns, mode {mode} needs {width}")
    P1, P2 = seg_bounds(seg_rows, R, "fused_linear")
    if not w.is_contiguous():
        raise ValueError("fused_linear: packed weights must be contiguous")
    if mode == 1 and d is None:
        raise ValueError("fused_linear: mode 1 needs the residual d")
    if out is None:
        out = torch.empty((M, 4 * R), dtype=a.dtype, device=a.device)
    cfg = dict(config or fused_config(M, R, K, style))
    mb = cfg.pop("MB", M)
    d_ = d if d is not None else a
    h_ = h_out if h_out is not None else a
    t_ = tok if tok is not None else a
    grid = (triton.cdiv(R, cfg["BR"]), triton.cdiv(M, mb))
    _gemv_nq[grid](a, t_, d_, h_, norm_w, w.view(torch.int32), gammas, out,
                   M, K, K // 4, R, P1, P2, a.stride(0), d_.stride(0), h_.stride(0), out.stride(0), eps,
                   MODE=mode, GATHER=tok is not None, STORE_H=h_out is not None, MB=mb, PDL=PDL,
                   INTERP=INTERPRET, **cfg, **_pdl)
    return out


__all__ = ["fused_linear", "fused_config", "linear_tail", "tail_config", "TAIL_STYLES", "supported", "MAX_K", "STYLES"]
