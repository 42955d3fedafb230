"""Batch-1 GPU decode latency: the fused W2A8 decode steps vs the unfused one vs the bf16 pipeline.

    PYTHONPATH=src python3 bench/gpu_decode.py --out bench/results/gpu_decode-2026-11-25-h100.json

One run on a random model with exact 2B4T shapes (bf16), all in CUDA graphs (median of repeats,
CUDA events), measuring:

- whole decode steps at batch 1, context 128 / 1024 / 4096: the unfused step (9 kernels a layer)
  and the "tail" step (5 kernels a layer, norm + quant in the last program of the kernel before:
  ``TritonRunner(step="tail")``) in several block-shape styles of ``decode_layer.tail_config`` and
  4 / 8 warps of the one-kernel attention; the int8 head (one-tile and split-tile kernels); the
  bf16 cuBLAS pipeline of ``bench/gpu.py`` (same graph, cache, attention, norms; bf16
  projections); with ``--batched`` batch 2 and 8 steps, tail vs unfused;
- the bytes/bandwidth floor of a step (device-to-device copy bandwidth measured in the same run);
- a chain of 152 empty kernels in one graph, with and without programmatic dependent launch (the
  cost of a kernel boundary alone);
- each decode projection alone at M = 1 with the norm + quant after it (32 back-to-back in a
  graph, 8 weight copies so L2 does not serve them): GEMV + norm_quant against the tail GEMV;
- every step's logits against the unfused step's (same cache), relative L2 and argmax.

The "prologue" step (``step="prologue"``: every GEMV program recomputes the norm of its input
row) is only checked here; it was measured slower than the unfused step (see docs/gpu-engine.md).
Prints a table, then one JSON line. Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import copy_bandwidth_gbs, decode_ms, events_ms, fill_cache, record_b1, result_log  # noqa: E402


def graph_us(f, n: int) -> float:
    """Mean microseconds of f() captured n times back to back in one graph."""
    f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            f()
    return events_ms(g.replay, 10) * 1e3 / n


try:
    import triton
    import triton.language as tl

    from bitnet158.kernels.triton.common import PDL, gdc_launch_dependents, gdc_wait

    @triton.jit
    def _nop(x_ptr, USE_PDL: tl.constexpr):
        if USE_PDL:
            gdc_launch_dependents()
            gdc_wait()
        i = tl.program_id(0)
        tl.store(x_ptr + i, tl.load(x_ptr + i) + 1)
except ImportError:  # pragma: no cover - main() reports the missing GPU stack
    PDL = False


def empty_chain_us(n_kernels: int = 152) -> dict:
    """A graph of n trivial kernels (132 programs each, PDL as the engine launches them)."""
    x = torch.zeros(132, dtype=torch.int32, device="cuda")
    out = {}
    for pdl in ((True, False) if PDL else (False,)):
        kw = dict(launch_pdl=True) if pdl else {}
        us = graph_us(lambda: _nop[(132,)](x, USE_PDL=pdl, **kw), n_kernels)
        out[f"empty_kernel_{'pdl' if pdl else 'nopdl'}_us"] = round(us, 3)
    return out


def projection_table(res: dict):
    """Each decode projection at M = 1 with the norm + quant that follows it: W2A8 GEMV then a
    norm_quant kernel (unfused) vs one tail GEMV (each tail style); qkv has no norm after it."""
    from bitnet158 import quant
    from bitnet158.kernels.triton import decode_layer as dl
    from bitnet158.kernels.triton.norm_quant import norm_quant
    from bitnet158.kernels.triton.w2a8 import w2a8_linear
    shapes = {"qkv": ((640, 160, 160), 2560, 0), "o": ((640,), 2560, 1), "gu": ((1728, 1728), 2560, 2),
              "down": ((640,), 6912, 1)}
    cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
    for name, (segs, K, tail) in shapes.items():
        R = sum(segs)
        N = 4 * R if tail != 2 else 2 * R
        n_copies = 8
        ws = [torch.randint(0, 256, (R, K), dtype=torch.uint8, device="cuda") & 0x55 for _ in range(n_copies)]
        g = torch.rand(len(segs), device="cuda") + 0.5
        xq, sx = quant.act_quant(torch.randn(1, K, device="cuda"))
        res_row = torch.randn(1, N, device="cuda").bfloat16()
        nw = torch.rand(N, device="cuda").bfloat16() + 0.5
        i = [0]

        def unfused():
            i[0] = (i[0] + 1) % n_copies
            y = w2a8_linear(xq, sx, ws[i[0]], g, segs)
            if tail == 1:
                norm_quant(res_row, nw, 1e-5, residual=y, h_out=res_row)
            elif tail == 2:
                norm_quant(y, nw, 1e-5, gated=True)

        res[f"proj_{name}_unfused_us"] = round(graph_us(unfused, 4 * n_copies), 2)
        for style in dl.TAIL_STYLES:
            def fused(style=style):
                i[0] = (i[0] + 1) % n_copies
                dl.linear_tail(xq, sx, ws[i[0]], g, segs, cnt, tail=tail, res=res_row if tail == 1 else None,
                               norm_w=nw, style=style)
            res[f"proj_{name}_tail_{style}_us"] = round(graph_us(fused, 4 * n_copies), 2)
        res[f"proj_{name}_floor_us"] = round(R * K / (res["copy_bw_gb_s"] * 1e3), 2)
        ws.clear()


def unfused_only(res, step, save, ctxs, bw, kv_tok, wbf) -> int:
    """The default (unfused) step: w2a8 vs masked-field GEMVs, bf16 vs int8 head kernels."""
    def guard(name, fn):
        try:
            fn()
        except Exception as e:
            res[f"{name}_error"] = repr(e)[:300]
            print(f"{name} failed: {e!r}"[:400], flush=True)
        save()
    for g in ("w2a8", "masked"):
        guard(f"unfused_{g}", lambda g=g: step(f"unfused_{g}", ctxs, step="unfused", gemv=g))
    best = min(("w2a8", "masked"), key=lambda g: res.get(f"decode_b1_ctx1024_unfused_{g}_ms", 1e9))
    res["unfused_best_gemv"] = best
    for hk, hc in {"": None, "_split8": (8, 4)}.items():
        guard("unfused_int8head" + hk, lambda hk=hk, hc=hc: step(
            "unfused_int8head" + hk, [1024], step="unfused", gemv=best, int8_head=True, head_config=hc))
    wb = wbf()
    if wb is not None:
        for ctx in ctxs:
            nbytes = wb["linear"] + wb["head"] + kv_tok * ctx
            res[f"floor_b1_ctx{ctx}_ms"] = round(nbytes / (bw * 1e9) * 1e3, 4)
            res[f"floor_b1_ctx{ctx}_int8_head_ms"] = round((nbytes - wb["head"] / 2) / (bw * 1e9) * 1e3, 4)
    save()
    print(json.dumps(res))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--quick", action="store_true", help="ctx 1024 only, fewer variants")
    ap.add_argument("--batched", action="store_true", help="also batch 2 and 8 steps, tail vs unfused")
    ap.add_argument("--unfused-only", action="store_true", help="only the unfused step: its two GEMV "
                    "kernels and the int8 head kernels, ctx 128 / 1024 / 4096")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_decode.py needs a CUDA device", file=sys.stderr)
        return 2

    from bitnet158.kernels.triton import decode_layer as dl, head as head_mod, runner as tail_mod
    from bitnet158.kernels.triton.runner import TritonRunner
    from bitnet158.random_model import random_packed_model

    t_start = time.time()
    res, save, guard = result_log(args.out)

    bw = copy_bandwidth_gbs()
    res["copy_bw_gb_s"] = round(bw, 1)
    print(f"copy {bw:.0f} GB/s", flush=True)
    model = random_packed_model("2b4t", seed=0, dtype=torch.bfloat16, device="cuda")
    cfg = model.config
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    ctxs = [1024] if args.quick else [128, 1024, 4096]

    def runner(**kw):
        torch.cuda.empty_cache()
        aw = kw.pop("attn_warps", None)
        kw_gemv = kw.pop("gemv", None)
        tail_styles = kw.pop("tail_styles", None)
        head_mod.HEAD_CONFIG = kw.pop("head_config", None)       # read when the graph is captured
        r = TritonRunner(model, batch=kw.pop("batch", 1), max_len=4096, **kw)
        r.attn_warps = aw or r.attn_warps
        r.gemv = kw_gemv or r.gemv
        r.tail_styles = tail_styles or r.tail_styles
        fill_cache(r)
        return r

    # correctness: each step's logits against the unfused step's, same cache, one step at ctx 1024
    def check():
        tok = torch.randint(0, cfg.vocab_size, (1,), device="cuda")
        pos = torch.tensor([1023], device="cuda")
        outs = {}
        for st in ("unfused", "tail", "prologue"):
            r = runner(step=st)
            res[f"check_{st}_kind"] = r._step_kind(1)
            outs[st] = r.decode(tok, pos)
            del r
        a = outs["unfused"]
        for st in ("tail", "prologue"):
            res[f"check_{st}_vs_unfused_rel_l2"] = float((outs[st] - a).norm() / a.norm())
            res[f"check_{st}_vs_unfused_argmax_equal"] = bool(torch.equal(a.argmax(-1), outs[st].argmax(-1)))
        print("logits vs the unfused step:", {k: v for k, v in res.items() if k.startswith("check")}, flush=True)
    if not args.unfused_only:
        guard("check", check)

    wb = None

    def step(key, ctx_list, **kw):
        nonlocal wb
        r = runner(**kw)
        wb = wb or r.weight_bytes()
        record_b1(res, r, key, ctx_list)
        del r

    if args.unfused_only:
        return unfused_only(res, step, save, ctxs, bw, kv_tok, lambda: wb)
    guard("unfused", lambda: step("unfused", ctxs, step="unfused"))
    variants = {"mixed": None, "w8": dict.fromkeys(("qkv", "o", "gu", "down"), "w8"),
                "fat": dict.fromkeys(("qkv", "o", "gu", "down"), "fat")}
    if args.quick:
        variants = {"mixed": None}
    for vk, vs in variants.items():
        guard(f"tail_{vk}", lambda vk=vk, vs=vs: step(f"tail_{vk}", [1024], step="tail", tail_styles=vs))
    best = min(variants, key=lambda vk: res.get(f"decode_b1_ctx1024_tail_{vk}_ms", 1e9))
    res["tail_best_styles"] = variants[best] or dict(tail_mod.TAIL_STYLES)
    bs = variants[best]
    guard("tail_attn8", lambda: step("tail_attn8", [1024], step="tail", tail_styles=bs, attn_warps=8))
    aw = 8 if res.get("decode_b1_ctx1024_tail_attn8_ms", 1e9) < res.get(f"decode_b1_ctx1024_tail_{best}_ms", 1e9) else 4
    res["tail_best_attn_warps"] = aw
    guard("fused", lambda: step("fused", ctxs, step="tail", tail_styles=bs, attn_warps=aw))
    guard("bf16", lambda: step("bf16", ctxs, linear="bf16"))
    head_cfgs = {"": None, "_split16": (16, 8), "_split8": (8, 4)}
    for hk, hc in head_cfgs.items():
        guard("fused_int8head" + hk, lambda hk=hk, hc=hc: step("fused_int8head" + hk, [1024], step="tail",
                                                                tail_styles=bs, attn_warps=aw, int8_head=True,
                                                                head_config=hc))
    hbest = min(head_cfgs, key=lambda hk: res.get(f"decode_b1_ctx1024_fused_int8head{hk}_ms", 1e9))
    res["int8_head_best_config"] = head_cfgs[hbest]
    res["decode_b1_ctx1024_fused_int8head_best_ms"] = res.get(f"decode_b1_ctx1024_fused_int8head{hbest}_ms")
    if wb is not None:
        for ctx in ctxs:
            nbytes = wb["linear"] + wb["head"] + kv_tok * ctx
            res[f"floor_b1_ctx{ctx}_ms"] = round(nbytes / (bw * 1e9) * 1e3, 4)
            res[f"floor_b1_ctx{ctx}_int8_head_ms"] = round((nbytes - wb["head"] / 2) / (bw * 1e9) * 1e3, 4)

    def batched():
        for B in (2, 8):
            for fused in (False, True):
                torch.cuda.empty_cache()
                r = TritonRunner(model, batch=B, max_len=1280, step="tail" if fused else "unfused")
                r.fused_max_rows, r.attn_warps = 8, aw
                r.tail_styles = bs or r.tail_styles
                fill_cache(r)
                pos = [1023 - (37 * b) % 256 for b in range(B)]
                ms = decode_ms(r, pos, iters=30)
                key = f"decode_b{B}_{'fused' if fused else 'unfused'}"
                res[key + "_ms"] = round(ms, 4)
                res[key + "_tok_s"] = round(B / ms * 1e3, 1)
                print(f"[{key}] {ms:.4f} ms/step", flush=True)
                del r
    if args.batched:
        guard("batched", batched)
    guard("proj", lambda: projection_table(res))
    guard("empty_chain", lambda: res.update(empty_chain_us()))
    for ctx in ctxs:
        k = f"decode_b1_ctx{ctx}"
        if f"{k}_fused_ms" in res and f"{k}_bf16_ms" in res:
            res[f"{k}_fused_vs_bf16_speedup"] = round(res[f"{k}_bf16_ms"] / res[f"{k}_fused_ms"], 2)
            res[f"{k}_fused_tok_s"] = round(1e3 / res[f"{k}_fused_ms"], 1)
        if f"{k}_fused_ms" in res and f"{k}_unfused_ms" in res:
            res[f"{k}_fused_vs_unfused_speedup"] = round(res[f"{k}_unfused_ms"] / res[f"{k}_fused_ms"], 2)
    res["bench_s"] = round(time.time() - t_start, 1)
    save()
    print()
    print(f"{'decode batch 1 (ms/token)':30s} {'ctx':>5s} {'unfused':>9s} {'fused':>9s} {'bf16':>9s} "
          f"{'floor':>7s} {'floor i8':>8s}")
    for ctx in ctxs:
        k = f"decode_b1_ctx{ctx}"
        print(f"{'':30s} {ctx:5d} {res.get(k + '_unfused_ms', 0):9.4f} {res.get(k + '_fused_ms', 0):9.4f} "
              f"{res.get(k + '_bf16_ms', 0):9.4f} {res.get(f'floor_b1_ctx{ctx}_ms', 0):7.4f} "
              f"{res.get(f'floor_b1_ctx{ctx}_int8_head_ms', 0):8.4f}")
    for vk in variants:
        print(f"{'tail styles ' + vk + ', ctx 1024':30s} {res.get(f'decode_b1_ctx1024_tail_{vk}_ms', 0):9.4f}")
    for key in ["tail_attn8"] + ["fused_int8head" + hk for hk in head_cfgs]:
        print(f"{key + ', ctx 1024':30s} {res.get(f'decode_b1_ctx1024_{key}_ms', 0):9.4f}")
    for B in (2, 8):
        print(f"{'decode batch %d (ms/step)' % B:30s} {res.get(f'decode_b{B}_unfused_ms', 0):9.4f} "
              f"{res.get(f'decode_b{B}_fused_ms', 0):9.4f}")
    for name in ("qkv", "o", "gu", "down"):
        print(f"{'proj ' + name + ' (us)':30s} {res.get(f'proj_{name}_unfused_us', 0):9.2f} " +
              " ".join(f"{res.get(f'proj_{name}_tail_{st}_us', 0):7.2f}" for st in dl.TAIL_STYLES) +
              f"  floor {res.get(f'proj_{name}_floor_us', 0):.2f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
