"""Compile every Triton kernel of the GPU engine without a GPU (frontend, LLVM, ptxas).

    python3 -m bitnet158.kernels.triton.compile_check              # sm_90 (H100), one line a kernel
    python3 -m bitnet158.kernels.triton.compile_check --arch 80    # A100; 89: L4 / RTX 40xx

The interpreter (``TRITON_INTERPRET=1``, used by the CPU tests) runs kernels as Python and misses
errors that only the compiler sees (e.g. a variable re-bound to another shape inside an ``if``).
This compiles the kernels at their 2B4T launch shapes for one target, with programmatic dependent
launch only where the engine uses it (sm_90 and newer), and checks each kernel's shared memory
against what a block may use on that architecture (a launch would fail with ``OutOfResources``).
Exit code 1 on error.
"""

from __future__ import annotations

import argparse
import os
import sys

# shared memory a block may opt into, by compute capability (CUDA programming guide, bytes)
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bitnet158.kernels.triton.compile_check")
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT),
                    help="compute capability to compile for, as major*10 + minor (default 90)")
    arch = ap.parse_args(argv).arch
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import (attention, bitlinear_train, decode_layer, decode_persistent, gemm_i8, gemm_tc, head,
                   norm_quant, rows, w2a8)

    target = GPUTarget("cuda", arch, 32)
    pdl = arch >= 90  # griddepcontrol is sm_90+; the engine launches without it below (common.PDL)
    errors = 0

    def comp(fn, types: dict, consts: dict, **opts):
        nonlocal errors
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
        cst = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        if "PDL" in consts:
            consts = {**consts, "PDL": pdl}
            cst = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst), target=target, options=opts)
            regs = f" ({k.n_regs} registers, {k.n_spills} spilled)" if getattr(k, "n_regs", None) else ""
            smem = k.metadata.shared
            if smem > SMEM_LIMIT[arch]:
                raise RuntimeError(f"needs {smem} bytes of shared memory, sm_{arch} has {SMEM_LIMIT[arch]}")
            print(f"ok    {fn.__name__} {consts}{regs}, {smem} B shared")
        except Exception as e:  # report every kernel, then fail
            errors += 1
            print(f"ERROR {fn.__name__} {consts}\n{e}")

    P = lambda t: "*" + t  # noqa: E731
    bf, f32, i8, i32 = "bf16", "fp32", "i8", "i32"
    for quant, cb in ((True, 0), (False, 0), (True, 16)):
        comp(attention._attn_combine, dict(po_ptr=P(f32), pml_ptr=P(f32), pos_ptr=P(i32), w_ptr=P(bf),
                                           ob_ptr=P(f32), cnt_ptr=P(i32), y_ptr=P(bf), q_ptr=P(i8),
                                           s_ptr=P(f32), eps=f32),
             dict(H=20, HP=32, D=128, CHUNK=64, NCH=64, NCHP=64, QUANT=quant, PDL=True, INTERP=False, CB=cb),
             num_warps=8)
    for dt, ieee, chunk in ((bf, False, 64), (f32, True, 64), (bf, False, 128), (bf, False, 256)):
        comp(attention._attn_partial, dict(qkv_ptr=P(dt), kc_ptr=P(dt), vc_ptr=P(dt), rows_ptr=P(i32),
                                           pos_ptr=P(i32), cos_ptr=P(f32), sin_ptr=P(f32), po_ptr=P(f32),
                                           pml_ptr=P(f32), scale=f32),
             dict(H=20, HKV=5, D=128, GROUP=4, GP=16, CHUNK=chunk, BLOCK_N=64, NCH=4096 // chunk, IEEE=ieee,
                  DYN=chunk > 64, PREFETCH=True, PDL=True, INTERP=False), num_warps=4)
    for dt in (bf, f32):
        comp(attention._rope_cache, dict(qkv_ptr=P(dt), q_ptr=P(dt), k_ptr=P(dt), kc_ptr=P(dt), vc_ptr=P(dt),
                                         rows_ptr=P(i32), pos_ptr=P(i32), cos_ptr=P(f32), sin_ptr=P(f32)),
             dict(H=20, HKV=5, D=128, HP=32, HKVP=8, PDL=True, INTERP=False), num_warps=4)
    for mode, quant in ((0, True), (1, True), (2, True), (1, False)):
        comp(norm_quant._norm_quant_kernel, dict(x_ptr=P(bf), d_ptr=P(bf), h_ptr=P(bf), w_ptr=P(bf),
                                                 y_ptr=P(bf), q_ptr=P(i8), s_ptr=P(f32), eps=f32),
             dict(MODE=mode, BLOCK=8192 if mode == 2 else 4096, NORM=True, STORE_Y=not quant, QUANT=quant,
                  PDL=True, INTERP=False), num_warps=8)
    for M, R, K in ((1, 960, 2560), (1, 3456, 2560), (1, 640, 6912), (w2a8.GEMV_MAX_M, 640, 6912)):
        cfg = w2a8.pick_config(M, R, K)
        cfg.pop("kind")
        cfg.pop("JOINT")
        nw = cfg.pop("num_warps")
        for joint in (False, True):
            comp(w2a8._gemv_dp4a, dict(x_ptr=P(i32), sx_ptr=P(f32), w_ptr=P(i32), g_ptr=P(f32), out_ptr=P(bf)),
                 dict(ITERS=triton.cdiv(K // 4, cfg["BK4"]), PDL=True, INTERP=False, JOINT=joint, **cfg),
                 num_warps=nw)
    tc_types = dict(x_ptr=P(i8), sx_ptr=P(f32), w_ptr=P("u8"), g_ptr=P(f32), out_ptr=P(bf), ws_ptr=P(i32),
                    cnt_ptr=P(i32))
    for M, R, K in ((8, 960, 2560), (64, 640, 6912), (64, 3456, 2560), (2048, 3456, 2560), (2048, 960, 2560)):
        cfg = gemm_tc.tc_config(M, R, K)
        cfg.pop("kind")
        nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
        cfg["SPLIT_K"] = min(cfg["SPLIT_K"], 2)
        comp(gemm_tc._gemm_tc, tc_types, dict(ALIGNED=R != 960, EVEN=True, ITERS_C=0, NK_C=0, PDL=True, INTERP=False,
                                              **cfg),
             num_warps=nw, num_stages=ns)
    for M in (64, 2048):
        cfg = dict(kind="dot", BM=16, BR=128, BK=64, SPLIT_K=1, num_warps=4, num_stages=3) if M == 64 else \
            dict(kind="dot", BM=128, BR=64, BK=128, SPLIT_K=1, num_warps=8, num_stages=3)
        cfg.pop("kind")
        nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
        comp(w2a8._gemm_dot, dict(x_ptr=P(i8), sx_ptr=P(f32), w_ptr=P("u8"), g_ptr=P(f32), out_ptr=P(bf),
                                  ws_ptr=P(i32), cnt_ptr=P(i32)),
             dict(ITERS=2560 // cfg["BK"], GROUP_M=8, PDL=True, INTERP=False, **cfg), num_warps=nw, num_stages=ns)
    comp(w2a8._gemm_dot, dict(x_ptr=P(i8), sx_ptr=P(f32), w_ptr=P("u8"), g_ptr=P(f32), out_ptr=P(bf),
                              ws_ptr=P(i32), cnt_ptr=P(i32)),
         dict(BM=16, BR=32, BK=128, SPLIT_K=4, ITERS=5, GROUP_M=8, PDL=True, INTERP=False), num_warps=4)
    for quant in (True, False):
        comp(attention._attn_fused, dict(qkv_ptr=P(bf), kc_ptr=P(bf), vc_ptr=P(bf), rows_ptr=P(i32),
                                         pos_ptr=P(i32), cos_ptr=P(f32), sin_ptr=P(f32), po_ptr=P(f32),
                                         pml_ptr=P(f32), cnt_ptr=P(i32), o_ptr=P(bf), scale=f32,
                                         w_ptr=P(bf), rcnt_ptr=P(i32), q_ptr=P(i8), s_ptr=P(f32), eps=f32),
             dict(H=20, HKV=5, D=128, GROUP=4, GP=16, CHUNK=64, BLOCK_N=64, NCH=64, NCHP=64, HP=32,
                  QUANT=quant, IEEE=False, PDL=True, INTERP=False), num_warps=4)
    for tail, K, R in ((0, 2560, 960), (1, 2560, 640), (2, 2560, 3456), (1, 6912, 640)):
        cfg = decode_layer.tail_config(R, K)
        nw = cfg.pop("num_warps")
        N = 4 * R if tail != 2 else 2 * R
        comp(decode_layer._gemv_tail, dict(x_ptr=P(i32), sx_ptr=P(f32), w_ptr=P(i32), g_ptr=P(f32),
                                           out_ptr=P(bf), cnt_ptr=P(i32), res_ptr=P(bf), nw_ptr=P(bf),
                                           q_ptr=P(i8), s_ptr=P(f32), eps=f32),
             dict(TAIL=tail, MB=1, BT=triton.next_power_of_2(N), PDL=True, INTERP=False, **cfg), num_warps=nw)
    for mode, K, R, gather in ((1, 2560, 960, False), (0, 2560, 960, True), (0, 2560, 640, False),
                               (1, 2560, 3456, True), (2, 6912, 640, False)):
        cfg = decode_layer.fused_config(1, R, K)
        nw = cfg.pop("num_warps")
        comp(decode_layer._gemv_nq, dict(a_ptr=P(bf), tok_ptr=P("i64"), d_ptr=P(bf), h_ptr=P(bf),
                                         nw_ptr=P(bf), w_ptr=P(i32), g_ptr=P(f32), out_ptr=P(bf), eps=f32),
             dict(MODE=mode, GATHER=gather, STORE_H=mode == 1, PDL=True, INTERP=False, **cfg), num_warps=nw)
    bf_ptrs = ("x0", "x1", "d", "qkv", "o", "gu", "nin", "nattn", "npost", "nffn", "kc", "vc")
    layer_types = {f"{n}_ptr": P(bf) for n in bf_ptrs}
    layer_types.update({f"{n}_ptr": P(i32) for n in ("wqkv", "wo", "wgu", "wd", "rows", "pos", "gcnt", "bar",
                                                     "pfq", "pfo", "pfgu", "pfd")})
    layer_types.update({f"{n}_ptr": P(f32) for n in ("gqkv", "go", "ggu", "gd", "cos", "sin", "po", "pml")})
    layer_types.update(scale=f32, eps=f32)
    cfg = decode_persistent.DEFAULT_CONFIG
    variants = [(True, cfg["SPIN"], cfg["PREFETCH"]), (False, cfg["SPIN"], cfg["PREFETCH"])]
    variants += [(True, 2, 1), (True, 1, 2)] if arch >= 90 else []  # L2 bulk prefetch: sm_90 only
    for has_d, spin, prefetch in variants:
        comp(decode_persistent._layer, layer_types,
             dict(HID=2560, FFN=6912, H=20, HKV=5, D=128, GROUP=4, GP=16, CHUNK=64, BLOCK_N=64, NCH=64, NCHP=64,
                  ITEMS=3, BR_QKV=cfg["BR_QKV"], BR_O=cfg["BR_O"], BR_GU=cfg["BR_GU"], BR_DOWN=cfg["BR_DOWN"],
                  T_QKV=1, T_O=1, T_GU=2, T_DOWN=2, BKH=1024, BKF=2048, NPROG=132, SPIN=spin, PREFETCH=prefetch,
                  PF_N=32 * cfg["num_warps"], HAS_D=has_d, FIRST=0, LAST=4,
                  IEEE=False, PDL=True, INTERP=False), num_warps=cfg["num_warps"])
    for spin in (0, 1, 2):
        comp(decode_persistent._sync_chain, dict(bar_ptr=P(i32)), dict(N=4, NPROG=132, SPIN=spin), num_warps=8)
    comp(head._head_kernel, dict(x_ptr=P(bf), w_ptr=P(i8), ws_ptr=P(f32), out_ptr=P(f32)),
         dict(MB=1, BV=4, BD=4096, PDL=True), num_warps=8)
    comp(head._head_split, dict(x_ptr=P(bf), w_ptr=P(i8), ws_ptr=P(f32), out_ptr=P(f32)),
         dict(MB=1, BV=8, BD1=2048, BD2=512, PDL=True), num_warps=4)
    comp(gemm_i8._unpack_i8, dict(w_ptr=P("u8"), out_ptr=P(i8)), dict(BR=32, BK=256), num_warps=4)
    i8_types = dict(x_ptr=P(i8), w_ptr=P(i8), sx_ptr=P(f32), g_ptr=P(f32), out_ptr=P(bf))
    for (bm, bn, bk, gm, nw, ns), even, g_mode in ((gemm_i8.DEFAULT, True, 2), (gemm_i8.DEFAULT, False, 2),
                                                   ((128, 256, 128, 8, 8, 3), True, 2), (gemm_i8.DEFAULT, True, 1)):
        comp(bitlinear_train._i8_gemm_scaled, i8_types, dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, G_MODE=g_mode,
                                                             EVEN_K=even, K_ITERS=0, INTERP=False),
             num_warps=nw, num_stages=ns)
    for bm, bn, bk, nw, ns, nprog in ((128, 256, 128, 8, 3, 0), (128, 128, 128, 8, 4, 132)):
        comp(gemm_i8._i8_gemm_desc, dict(x_desc=f"tensordesc<i8[{bm}, {bk}]>", w_desc=f"tensordesc<i8[{bn}, {bk}]>",
                                         sx_ptr=P(f32), g_ptr=P(f32), out_ptr=P(bf)),
             dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, NPROG=nprog, WS=False, K_ITERS=0, TILES=0, INTERP=False),
             num_warps=nw, num_stages=ns)
    comp(w2a8._scale_rows, dict(acc_ptr=P(i32), sx_ptr=P(f32), g_ptr=P(f32), out_ptr=P(bf)),
         dict(BM=16, BN=256, INTERP=False), num_warps=4)
    blk, nbp = dict(BLOCK=rows.BLOCK), dict(BLOCK=rows.BLOCK, NBP=128)      # the sampler's row kernels
    comp(rows._softmax_part, dict(x_ptr=P(f32), pm_ptr=P(f32), ps_ptr=P(f32)), blk, num_warps=rows.WARPS)
    comp(rows._softmax_out, dict(x_ptr=P(f32), pm_ptr=P(f32), ps_ptr=P(f32), out_ptr=P(f32)), nbp,
         num_warps=rows.WARPS)
    comp(rows._argmax_part, dict(x_ptr=P(f32), pv_ptr=P(f32), pi_ptr=P(i32)), blk, num_warps=rows.WARPS)
    comp(rows._race_part, dict(p_ptr=P(f32), st_ptr=P("i64"), pv_ptr=P(f32), pi_ptr=P(i32)), blk,
         num_warps=rows.WARPS)
    comp(rows._argmax_fold, dict(pv_ptr=P(f32), pi_ptr=P(i32), out_ptr=P("i64")), dict(NBP=128),
         num_warps=rows.WARPS)
    comp(rows._chunk_sum, dict(x_ptr=P(f32), cs_ptr=P(f32)), blk, num_warps=rows.WARPS)
    comp(rows._first_reaching, dict(x_ptr=P(f32), cs_ptr=P(f32), out_ptr=P("i64"), p=f32), nbp, num_warps=rows.WARPS)
    cut = dict(x_ptr=P(f32), p_ptr=P(f32), st_ptr=P("i64"), dn_ptr=P(i32), pm_ptr=P(f32), pc_ptr=P(i32),
               a_ptr=P(f32), last_ptr=P(f32), cnt_ptr=P(i32), p=f32)
    for shift in (28, 0):
        comp(rows._cut_round, cut, dict(BLOCK=rows.BLOCK, NBP=128, SHIFT=shift, CPP=4), num_warps=rows.WARPS)
    nucleus = dict(x_ptr=P(f32), p_ptr=P(f32), st_ptr=P("i64"), cand_ptr=P("i64"), dn_ptr=P(i32), last_ptr=P(f32),
                   pm_ptr=P(f32), pv_ptr=P(f32), pi_ptr=P(i32), cnt_ptr=P(i32), out_ptr=P("i64"), p=f32)
    for floor in (False, True):
        comp(rows._nucleus_round, nucleus, dict(BLOCK=rows.BLOCK, NBP=128, FLOOR=floor, CPP=4),
             num_warps=rows.WARPS)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
