"""Batch-1 GPU decode: the persistent step (one kernel a layer) vs the unfused step vs bf16.

    PYTHONPATH=src python3 bench/gpu_persistent.py --out bench/results/gpu_persistent-2026-12-06-h100.json

One run on a random model with exact 2B4T shapes (bf16), every step in a CUDA graph (CUDA
events, median of repeats), measuring:

- a grid barrier alone: a kernel of one program an SM that passes 256 barriers (``_grid_sync``),
  polling with acquire loads from every thread, with atomics, and from one thread a program;
- the persistent layer's stages 0..s in one launch (s = 0..4), 30 layers in a graph: what each
  stage adds (``--stage-variants``);
- the persistent step's logits against the unfused step's on the same cache (relative L2, argmax),
  for every variant of ``--check-variants``;
- ms/token at batch 1, context 128 / 1024 / 4096: the unfused step (9 kernels a layer), the
  persistent step in block-shape variants (``--variants``; ``decode_persistent.DEFAULT_CONFIG``
  first), the bf16 cuBLAS pipeline; the int8 head on the best persistent variant;
- with ``--tied``: the unfused and persistent steps with every layer computing with layer 0's
  weights (all L2-resident), an upper bound for prefetching weights into L2;
- the bytes/bandwidth floor (device-to-device copy bandwidth measured in the same run).

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
from gpu import copy_bandwidth_gbs, events_ms, fill_cache, record_b1, result_log  # noqa: E402

VARIANTS = {
    "default": {},
    "spin0": dict(SPIN=0),
    "w16": dict(num_warps=16),
    "split": dict(split=True),
    "split_w4": dict(split=True, num_warps=4),
    "w4": dict(num_warps=4),
    "gu8_down8": dict(BR_GU=8, BR_DOWN=8),
    "gu32": dict(BR_GU=32),
    "spin2": dict(SPIN=2),
    "pf1": dict(PREFETCH=1),
    "pf2": dict(PREFETCH=2),
    "pf2_spin2": dict(PREFETCH=2, SPIN=2),
    "pf2_w16": dict(PREFETCH=2, num_warps=16),
}


def tie_layers(r) -> None:
    """Every layer of runner r computes with layer 0's projections: the weights a step reads (17 MB
    at 2B4T shapes) then stay in L2, which bounds what prefetching weights into L2 can gain."""
    for L in r.layers[1:]:
        for k in ("qkv", "o", "gu", "down"):
            L[k] = r.layers[0][k]


def barrier_us(spin: int, n: int = 256) -> float:
    """Microseconds a grid barrier costs: one program an SM passing n barriers in one kernel."""
    from bitnet158.kernels.triton.common import sm_count
    from bitnet158.kernels.triton.decode_persistent import _sync_chain

    nprog = sm_count("cuda")
    bar = torch.zeros(1, dtype=torch.int32, device="cuda")

    def run(k):
        bar.zero_()
        _sync_chain[(nprog,)](bar, N=k, NPROG=nprog, SPIN=spin, num_warps=8)
    run(n)
    run(1)
    t_n = events_ms(lambda: run(n), 20)
    t_1 = events_ms(lambda: run(1), 20)
    return (t_n - t_1) / (n - 1) * 1e3


def stage_table(r, res: dict, key: str) -> None:
    """Microseconds a layer for its stages 0..s in one launch (s = 0..4), all layers in a graph:
    the increments are each stage's cost including the barrier before it."""
    step = r._persistent
    rows = torch.zeros(1, dtype=torch.int32, device="cuda")
    pos = torch.full((1,), 1023, dtype=torch.int32, device="cuda")
    x0 = r.x_buf[0]
    for last in range(5):
        @torch.inference_mode()
        def run(last=last):
            for i in range(len(r.layers)):
                step.layer(i, x0, rows, pos, has_d=i > 0, stages=(0, last))
            step.bar.zero_()
        run()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        us = events_ms(g.replay, 50) * 1e3 / len(r.layers)
        res[f"{key}_stages0to{last}_us_per_layer"] = round(us, 2)
        print(f"[{key}] stages 0..{last}: {us:.2f} us a layer", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"persistent block shapes ({', '.join(VARIANTS)})")
    ap.add_argument("--ctxs", default="128,1024,4096", help="decode contexts")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 pipeline")
    ap.add_argument("--bf16-ctxs", default="128,1024,4096", help="decode contexts of the bf16 pipeline")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage table")
    ap.add_argument("--stage-variants", default="default,w16", help="variants of the per-stage table")
    ap.add_argument("--check-variants", default="default", help="variants checked against the unfused step")
    ap.add_argument("--tied", action="store_true", help="also time steps on L2-resident (tied) weights")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_persistent.py needs a CUDA device", file=sys.stderr)
        return 2
    unknown = [v for a in (args.variants, args.stage_variants, args.check_variants) for v in a.split(",")
               if v and v not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown} (--variants, --stage-variants, --check-variants); "
              f"known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2

    from bitnet158.kernels.triton.decode_persistent import PersistentStep
    from bitnet158.kernels.triton.runner import TritonRunner
    from bitnet158.random_model import random_packed_model

    t0 = time.time()
    res, save, guard = result_log(args.out)

    bw = copy_bandwidth_gbs()
    res["copy_bw_gb_s"] = round(bw, 1)
    for spin in (0, 1, 2):
        guard(f"barrier_spin{spin}", lambda spin=spin: res.update(
            {f"grid_barrier_spin{spin}_us": round(barrier_us(spin), 3)}))
    print(f"copy {bw:.0f} GB/s, grid barrier {res.get('grid_barrier_spin1_us')} us "
          f"({res.get('grid_barrier_spin0_us')} us polling with atomics, "
          f"{res.get('grid_barrier_spin2_us')} us from one thread)", flush=True)
    model = random_packed_model("2b4t", seed=0, dtype=torch.bfloat16, device="cuda")
    cfg = model.config
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    ctxs = [int(c) for c in args.ctxs.split(",")]

    def runner(config=None, tied=False, **kw):
        torch.cuda.empty_cache()
        r = TritonRunner(model, batch=1, max_len=4096, **kw)
        if tied:
            tie_layers(r)
        if config is not None:
            r._persistent = PersistentStep(r, config=config)
        fill_cache(r)
        return r

    def check(v):
        tok = torch.randint(0, cfg.vocab_size, (1,), device="cuda")
        pos = torch.tensor([1023], device="cuda")
        a = runner(step="unfused").decode(tok, pos)
        b = runner(step="persistent", config=VARIANTS[v]).decode(tok, pos)
        key = "check_persistent" if v == "default" else f"check_persistent_{v}"
        res[f"{key}_vs_unfused_rel_l2"] = float((b - a).norm() / a.norm())
        res[f"{key}_vs_unfused_argmax_equal"] = bool(torch.equal(a.argmax(-1), b.argmax(-1)))
        print(f"persistent {v} vs unfused:", res[f"{key}_vs_unfused_rel_l2"],
              res[f"{key}_vs_unfused_argmax_equal"], flush=True)
    for v in [v for v in args.check_variants.split(",") if v]:
        guard(f"check_{v}", lambda v=v: check(v))

    wb = None

    def step(key, ctx_list, **kw):
        nonlocal wb
        r = runner(**kw)
        wb = wb or r.weight_bytes()
        record_b1(res, r, key, ctx_list)
        del r

    guard("unfused", lambda: step("unfused", ctxs, step="unfused"))

    names = [v for v in args.variants.split(",") if v]
    for v in names:
        guard(f"persistent_{v}", lambda v=v: step(f"persistent_{v}", ctxs if v == names[0] else [1024],
                                                  step="persistent", config=VARIANTS[v]))
    if args.tied:
        guard("tied_unfused", lambda: step("tied_unfused", [1024], step="unfused", tied=True))
        for v in ("default", "w16"):
            guard(f"tied_persistent_{v}", lambda v=v: step(f"tied_persistent_{v}", [1024], step="persistent",
                                                        config=VARIANTS[v], tied=True))
    if not args.no_bf16:
        guard("bf16", lambda: step("bf16", [int(c) for c in args.bf16_ctxs.split(",")], linear="bf16"))

    def stages(name, config):
        r = runner(step="persistent", config=config)
        r.decode(torch.zeros(1, dtype=torch.long, device="cuda"), torch.tensor([1023], device="cuda"))
        stage_table(r, res, name)
        del r
    if not args.no_stages:
        for name in [v for v in args.stage_variants.split(",") if v]:
            guard(f"stages_{name}", lambda name=name: stages(f"persistent_{name}", VARIANTS[name]))
    best = min(names, key=lambda v: res.get(f"decode_b1_ctx1024_persistent_{v}_ms", 1e9))
    res["persistent_best"] = best
    guard("persistent_int8head", lambda: step("persistent_int8head", [1024], step="persistent",
                                              config=VARIANTS[best], int8_head=True))
    for ctx in ctxs:
        k = f"decode_b1_ctx{ctx}"
        if wb is not None:
            nbytes = wb["linear"] + wb["head"] + kv_tok * ctx
            res[f"floor_b1_ctx{ctx}_ms"] = round(nbytes / (bw * 1e9) * 1e3, 4)
        p = res.get(f"{k}_persistent_{names[0]}_ms") if names else None
        if p and f"{k}_bf16_ms" in res:
            res[f"{k}_persistent_vs_bf16_speedup"] = round(res[f"{k}_bf16_ms"] / p, 2)
        if p and f"{k}_unfused_ms" in res:
            res[f"{k}_persistent_vs_unfused_speedup"] = round(res[f"{k}_unfused_ms"] / p, 2)
            res[f"{k}_persistent_tok_s"] = round(1e3 / p, 1)
    res["bench_s"] = round(time.time() - t0, 1)
    save()
    print()
    print(f"{'ms/token, batch 1':24s} {'ctx':>5s} {'unfused':>9s} {'persistent':>11s} {'bf16':>9s} {'floor':>7s}")
    for ctx in ctxs:
        k = f"decode_b1_ctx{ctx}"
        print(f"{'':24s} {ctx:5d} {res.get(k + '_unfused_ms', 0):9.4f} "
              f"{res.get(f'{k}_persistent_{names[0]}_ms', 0) if names else 0:11.4f} "
              f"{res.get(k + '_bf16_ms', 0):9.4f} {res.get(f'floor_b1_ctx{ctx}_ms', 0):7.4f}")
    for v in names + ["int8head"]:
        print(f"{'persistent ' + v + ', ctx 1024':30s} {res.get(f'decode_b1_ctx1024_persistent_{v}_ms', 0):9.4f}")
    for v in ("unfused", "persistent_default", "persistent_w16"):
        if f"decode_b1_ctx1024_tied_{v}_ms" in res:
            print(f"{'tied weights, ' + v:30s} {res[f'decode_b1_ctx1024_tied_{v}_ms']:9.4f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
