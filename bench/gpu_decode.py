"""Batch-1 GPU decode latency: fused (5 kernels a layer) vs unfused (9) W2A8 step vs the bf16 pipeline.

    PYTHONPATH=src python3 bench/gpu_decode.py --out bench/results/gpu_decode-2026-11-25-h100.json

One run on a random model with exact 2B4T shapes (bf16), all in CUDA graphs (median of repeats,
CUDA events), measuring:

- whole decode steps at batch 1, context 128 / 1024 / 4096: the unfused W2A8 step, the fused step
  in each block-shape style of ``decode_layer.fused_config`` (and 4 vs 8 warps of the fused
  attention), the int8 head (one-tile kernel and split-tile shapes), and the bf16 cuBLAS pipeline of ``bench/gpu.py`` (same graph, cache,
  attention, norms; bf16 projections); batch 2 and 8 steps fused vs unfused;
- the bytes/bandwidth floor of a step (device-to-device copy bandwidth measured in the same run);
- a chain of 152 empty PDL kernels in one graph (the latency of a kernel boundary alone);
- each decode projection alone at M = 1 (32 back-to-back in a graph, 8 weight copies so L2 does
  not serve them): norm_quant + W2A8 GEMV against the fused GEMV;
- the fused step's logits against the unfused step's (same cache), relative L2 and argmax.

Prints a table, then one JSON line. Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import copy_bandwidth_gbs, decode_ms, events_ms, fill_cache  # noqa: E402


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
    """Each decode projection at M = 1: norm_quant + W2A8 GEMV (unfused) vs the fused GEMV."""
    from bitnet158.kernels.triton import decode_layer as dl
    from bitnet158.kernels.triton.norm_quant import norm_quant
    from bitnet158.kernels.triton.w2a8 import w2a8_linear
    shapes = {"qkv": ((640, 160, 160), 2560, 1), "o": ((640,), 2560, 0), "gu": ((1728, 1728), 2560, 1),
              "down": ((640,), 6912, 2)}
    for name, (segs, K, mode) in shapes.items():
        R = sum(segs)
        n_copies = 8
        ws = [torch.randint(0, 256, (R, K), dtype=torch.uint8, device="cuda") & 0x55 for _ in range(n_copies)]
        g = torch.rand(len(segs), device="cuda") + 0.5
        a = torch.randn(1, 2 * K if mode == 2 else K, device="cuda").bfloat16()
        d = torch.randn(1, K, device="cuda").bfloat16()
        h = torch.empty(1, K, device="cuda", dtype=torch.bfloat16)
        nw = torch.rand(K, device="cuda").bfloat16() + 0.5
        out = torch.empty(1, 4 * R, dtype=torch.bfloat16, device="cuda")
        i = [0]

        def unfused():
            i[0] = (i[0] + 1) % n_copies
            kw = dict(residual=d, h_out=h) if mode == 1 else dict(gated=mode == 2)
            q, s = norm_quant(a, nw, 1e-5, **kw)
            w2a8_linear(q, s, ws[i[0]], g, segs, out=out)

        res[f"proj_{name}_unfused_us"] = round(graph_us(unfused, 4 * n_copies), 2)
        for style in dl.STYLES:
            def fused(style=style):
                i[0] = (i[0] + 1) % n_copies
                dl.fused_linear(a, nw, ws[i[0]], g, segs, 1e-5, mode=mode, d=d if mode == 1 else None,
                                h_out=h if mode == 1 else None, out=out, style=style)
            res[f"proj_{name}_fused_{style}_us"] = round(graph_us(fused, 4 * n_copies), 2)
        res[f"proj_{name}_floor_us"] = round(R * K / (res["copy_bw_gb_s"] * 1e3), 2)
        ws.clear()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--quick", action="store_true", help="ctx 1024 only, fewer variants")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_decode.py needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from bitnet158.kernels.triton import decode_layer as dl, head as head_mod
    from bitnet158.kernels.triton.runner import TritonRunner
    from bitnet158.random_model import random_packed_model

    t_start = time.time()
    res: dict = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                 "torch": torch.__version__, "triton": triton.__version__}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    def guard(name, fn):
        try:
            fn()
        except Exception as e:       # keep every other number
            res[f"{name}_error"] = repr(e)[:300]
            print(f"{name} failed: {e!r}"[:400], flush=True)
        save()

    bw = copy_bandwidth_gbs()
    res["copy_bw_gb_s"] = round(bw, 1)
    print(f"copy {bw:.0f} GB/s", flush=True)
    model = random_packed_model("2b4t", seed=0, dtype=torch.bfloat16, device="cuda")
    cfg = model.config
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    ctxs = [1024] if args.quick else [128, 1024, 4096]

    def runner(**kw):
        torch.cuda.empty_cache()
        style, aw = kw.pop("style", "fat"), kw.pop("attn_warps", 8)
        head_mod.HEAD_CONFIG = kw.pop("head_config", None)       # read when the graph is captured
        r = TritonRunner(model, batch=kw.pop("batch", 1), max_len=4096, **kw)
        r.fused_style, r.attn_warps = style, aw
        fill_cache(r)
        return r

    # correctness: fused vs unfused logits on the same cache, one step at ctx 1024
    def check():
        tok = torch.randint(0, cfg.vocab_size, (1,), device="cuda")
        pos = torch.tensor([1023], device="cuda")
        outs = {}
        for fused in (False, True):
            r = runner(fused=fused)
            outs[fused] = r.decode(tok, pos)
            res[f"check_{'fused' if fused else 'unfused'}_uses_fused"] = r._use_fused(1)
            del r
        a, b = outs[False], outs[True]
        res["check_fused_vs_unfused_rel_l2"] = float((b - a).norm() / a.norm())
        res["check_fused_vs_unfused_argmax_equal"] = bool(torch.equal(a.argmax(-1), b.argmax(-1)))
        print(f"fused vs unfused logits: rel L2 {res['check_fused_vs_unfused_rel_l2']:.3e}", flush=True)
    guard("check", check)

    wb = None

    def step(key, ctx_list, **kw):
        nonlocal wb
        r = runner(**kw)
        wb = wb or r.weight_bytes()
        for ctx in ctx_list:
            ms = decode_ms(r, [ctx - 1], iters=100)
            res[f"decode_b1_ctx{ctx}_{key}_ms"] = round(ms, 4)
            print(f"[{key}] decode b1 ctx {ctx}: {ms:.4f} ms", flush=True)
        del r

    guard("unfused", lambda: step("unfused", ctxs, fused=False))
    styles = ["fat"] if args.quick else list(dl.STYLES)
    for st in styles:
        guard(f"fused_{st}", lambda st=st: step(f"fused_{st}", [1024], style=st))
    best = min(styles, key=lambda st: res.get(f"decode_b1_ctx1024_fused_{st}_ms", 1e9))
    res["fused_best_style"] = best
    guard("fused_attn4", lambda: step("fused_attn4", [1024], style=best, attn_warps=4))
    aw = 4 if res.get("decode_b1_ctx1024_fused_attn4_ms", 1e9) < res.get(f"decode_b1_ctx1024_fused_{best}_ms", 1e9) else 8
    res["fused_best_attn_warps"] = aw
    guard("fused", lambda: step("fused", ctxs, style=best, attn_warps=aw))
    guard("bf16", lambda: step("bf16", ctxs, linear="bf16"))
    head_cfgs = {"": None, "_split16": (16, 8), "_split32": (32, 8), "_split8": (8, 4)}
    for hk, hc in head_cfgs.items():
        guard("fused_int8head" + hk, lambda hk=hk, hc=hc: step("fused_int8head" + hk, [1024], style=best,
                                                                attn_warps=aw, int8_head=True, head_config=hc))
    hbest = min(head_cfgs, key=lambda hk: res.get(f"decode_b1_ctx1024_fused_int8head{hk}_ms", 1e9))
    res["int8_head_best_config"] = head_cfgs[hbest]
    if hbest:
        res["decode_b1_ctx1024_fused_int8head_best_ms"] = res[f"decode_b1_ctx1024_fused_int8head{hbest}_ms"]
    guard("unfused_int8head", lambda: step("unfused_int8head", [1024], fused=False, int8_head=True))
    if wb is not None:
        for ctx in ctxs:
            nbytes = wb["linear"] + wb["head"] + kv_tok * ctx
            res[f"floor_b1_ctx{ctx}_ms"] = round(nbytes / (bw * 1e9) * 1e3, 4)
            res[f"floor_b1_ctx{ctx}_int8_head_ms"] = round((nbytes - wb["head"] / 2) / (bw * 1e9) * 1e3, 4)

    def batched():
        for B in (2, 8):
            for fused in (False, True):
                torch.cuda.empty_cache()
                r = TritonRunner(model, batch=B, max_len=1280, fused=fused)
                r.fused_style, r.attn_warps = best, aw
                fill_cache(r)
                pos = [1023 - (37 * b) % 256 for b in range(B)]
                ms = decode_ms(r, pos, iters=30)
                key = f"decode_b{B}_{'fused' if fused else 'unfused'}"
                res[key + "_ms"] = round(ms, 4)
                res[key + "_tok_s"] = round(B / ms * 1e3, 1)
                print(f"[{key}] {ms:.4f} ms/step", flush=True)
                del r
    if not args.quick:
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
    for st in styles:
        print(f"{'fused style ' + st + ', ctx 1024':30s} {res.get(f'decode_b1_ctx1024_fused_{st}_ms', 0):9.4f}")
    for key in ["fused_attn4", "unfused_int8head"] + ["fused_int8head" + hk for hk in head_cfgs]:
        print(f"{key + ', ctx 1024':30s} {res.get(f'decode_b1_ctx1024_{key}_ms', 0):9.4f}")
    for B in (2, 8):
        print(f"{'decode batch %d (ms/step)' % B:30s} {res.get(f'decode_b{B}_unfused_ms', 0):9.4f} "
              f"{res.get(f'decode_b{B}_fused_ms', 0):9.4f}")
    for name in ("qkv", "o", "gu", "down"):
        print(f"{'proj ' + name + ' (us)':30s} {res.get(f'proj_{name}_unfused_us', 0):9.2f} " +
              " ".join(f"{res.get(f'proj_{name}_fused_{st}_us', 0):7.2f}" for st in dl.STYLES) +
              f"  floor {res.get(f'proj_{name}_floor_us', 0):.2f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
