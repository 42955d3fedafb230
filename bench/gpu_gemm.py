"""W2A8 projection GEMMs at 2B4T shapes on a GPU: exactness and a block-shape sweep, one run.

    PYTHONPATH=src python3 bench/gpu_gemm.py --out gemm.json --tuned-out tuned.json

For every fused 2B4T projection (q|k|v, o, gate|up, down) and activation-row count M (8 and 64:
batched decode; 2048: prefill) it times, with CUDA events over CUDA-graph replays:

- the tensor-core kernel :mod:`bitnet158.kernels.triton.gemm_tc` at each candidate block shape
  (every result checked bit-for-bit against an fp32 reference product first);
- the previous kernels: the dp4a GEMV (M = 8) and ``_gemm_dot`` (tensor cores, unpacked tiles
  through shared memory) at their former block shapes;
- from M > 64, :mod:`bitnet158.kernels.triton.gemm_i8` (transient int8 unpack + shared-memory int8
  GEMM) at each of its candidate block shapes, checked the same way, and its unpack alone;
- bf16 ``F.linear`` (cuBLAS) on a dense weight of the same shape, and cuBLAS int8 ``_int_mm``
  on an unpacked int8 weight (what int8 tensor cores give without any unpacking); from M > 64
  also cuBLAS fp8 ``_scaled_mm`` (the vendor's 8-bit tensor-core rate at that shape).

Decode-sized products (M <= 64) rotate over enough weight copies (>= 160 MB) that every call
reads its weights from memory, not L2, as a decode step does. ``--tuned-out`` writes the best
block shape of each (M bucket, R, K) in the form of ``gemm_tc.TUNED``; ``bench/gpu.py --tuned``
loads such a file. Candidate kernels compile in parallel worker processes first. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": ((640, 160, 160), 2560), "o": ((640,), 2560), "gu": ((1728, 1728), 2560),
          "down": ((640,), 6912)}


def candidates(M: int, K: int) -> list[tuple]:
    """(BM, BR, BK, F, SPLIT_K, num_warps, num_stages) to try at this M."""
    out = []
    if M <= 64:
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        long_k = K > 4096
        for f in (4, 2):
            for bk, ns in ((128, 4), (256, 3)):
                for split in ((1, 2, 4) if long_k else (1, 2)):
                    out.append((bm, 64, bk, f, split, 4, ns))
        for bk, ns in ((128, 4), (128, 3), (64, 4)):
            for split in ((1, 2, 4, 8) if long_k else (1, 2, 4)):
                out.append((bm, 64, bk, 1, split, 4, ns))
    else:
        out = [(64, 64, 128, 4, 1, 4, 3), (64, 64, 128, 4, 1, 4, 4), (128, 64, 128, 2, 1, 4, 3),
               (128, 64, 64, 2, 1, 4, 4)]
    return out


def cfg_dict(c: tuple) -> dict:
    bm, br, bk, f, split, nw, ns = c
    return dict(kind="tc", BM=bm, BR=br, BK=bk, F=f, SPLIT_K=split, num_warps=nw, num_stages=ns)


def i8_candidates(M: int) -> list[tuple]:
    """(BM, BN, BK, GROUP_M, num_warps, num_stages[, TMA, NPROG, WS]) of :mod:`gemm_i8` to try
    (prefill-sized M); the 9-field ones load through TMA descriptors (NPROG -1: persistent, one
    program an SM)."""
    if M <= 64:
        return []
    out = [(128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4), (256, 128, 128, 8, 8, 3),
           (128, 128, 64, 8, 4, 5)]
    out += [(128, 256, 128, 8, 8, 3, 1, 0, 0), (128, 256, 64, 8, 8, 4, 1, 0, 0), (256, 128, 128, 8, 8, 3, 1, 0, 0),
            (128, 128, 128, 8, 8, 4, 1, 0, 0), (128, 128, 128, 8, 4, 4, 1, 0, 0), (128, 256, 128, 8, 8, 3, 1, -1, 0),
            (128, 128, 128, 8, 8, 4, 1, -1, 0), (128, 256, 128, 16, 8, 3, 1, 0, 0), (128, 128, 256, 8, 8, 3, 1, 0, 0)]
    if M <= 512:
        out += [(64, 128, 128, 8, 4, 4), (64, 256, 128, 8, 4, 4, 1, 0, 0), (64, 128, 128, 8, 4, 4, 1, 0, 0)]
    return out


def fp8_us(M: int, N: int, K: int, calls: int) -> float | None:
    """cuBLAS fp8 (e4m3) ``_scaled_mm`` at this shape: what 8-bit tensor cores give through the
    vendor library (a ceiling for the int8 kernels; not usable for int8 activations)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return None
    a = torch.randn(M, K, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    try:
        return graph_us([lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)]
                        * calls)
    except Exception as e:  # noqa: BLE001 - a probe: report and go on
        print("fp8 probe failed:", repr(e)[:200], flush=True)
        return None


OLD_DOT = {64: dict(kind="dot", BM=16, BR=128, BK=64, SPLIT_K=1, num_warps=4, num_stages=3),
           2048: dict(kind="dot", BM=128, BR=64, BK=128, SPLIT_K=1, num_warps=8, num_stages=3)}


_CACHE: dict = {}


def _inputs(segs, K, M, seed=0):
    key = (segs, K, M, seed)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _make_inputs(segs, K, M, seed)
    return _CACHE[key]


def _make_inputs(segs, K, M, seed):
    from bitnet158 import quant
    g = torch.Generator(device="cpu").manual_seed(seed)
    R = sum(segs)
    w_t = torch.randint(-1, 2, (4 * R, K), generator=g, dtype=torch.int8)
    parts, r0 = [], 0
    for r in segs:                                   # pack each segment in the HF layout
        parts.append(quant.pack_hf(w_t[4 * r0:4 * (r0 + r)]))
        r0 += r
    w = torch.cat(parts).cuda()
    x_q = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8).cuda()
    s = (torch.rand(M, generator=g) * 50 + 1).cuda()
    gam = (torch.rand(len(segs), generator=g) + 0.05).cuda()
    return w, w_t.cuda(), x_q, s, gam


def _warm(jobs):
    """Worker: compile (and run once) each (shape, M, config) so the Triton cache holds it."""
    from bitnet158.kernels.triton.w2a8 import w2a8_linear
    done = 0
    for name, M, cfg in jobs:
        segs, K = SHAPES[name]
        w, _, x_q, s, gam = _inputs(segs, K, M)
        try:
            w2a8_linear(x_q, s, w, gam, segs, config=dict(cfg))
            done += 1
        except Exception as e:  # reported again by the main process
            print("warm failed", name, M, cfg, repr(e)[:200], flush=True)
    torch.cuda.synchronize()
    return done


def graph_us(fn_list, reps: int = 7) -> float:
    """Median time of one call (us) over replays of a graph that calls each fn in turn."""
    for f in fn_list[:2]:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_list:
            f()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fn_list))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tuned-out", default=None)
    ap.add_argument("--ms", default="64,2048")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--i8-only", action="store_true", help="only the gemm_i8 kernels (and cuBLAS): skip the "
                    "tensor-core kernel's sweep and the former kernels")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_gemm.py needs a CUDA device", file=sys.stderr)
        return 2
    from bitnet158.kernels.triton import gemm_i8, gemm_tc, w2a8
    from bitnet158.kernels.triton.gemm_i8 import i8_dict
    from bitnet158.kernels.triton.w2a8 import w2a8_linear
    Ms = [int(m) for m in args.ms.split(",")]
    res: dict = {"device": torch.cuda.get_device_name()}
    jobs = []
    for M in Ms:
        for name, (segs, K) in SHAPES.items():
            for c in ([] if args.i8_only else candidates(M, K)):
                jobs.append((name, M, cfg_dict(c)))
            for c in i8_candidates(M):
                jobs.append((name, M, i8_dict(c)))
            if M in OLD_DOT and not args.i8_only:
                jobs.append((name, M, OLD_DOT[M]))
    t0 = time.time()
    n = max(1, min(args.workers, len(jobs)))
    with mp.get_context("spawn").Pool(n) as pool:
        done = sum(pool.map(_warm, [jobs[i::n] for i in range(n)]))
    res["compile_s"] = round(time.time() - t0, 1)
    print(f"compiled {done}/{len(jobs)} kernels in {res['compile_s']} s", flush=True)

    bad, best, tuned, i8_tuned = [], {}, {}, {}
    for M in Ms:
        for name, (segs, K) in SHAPES.items():
            R = sum(segs)
            w, w_t, x_q, s, gam = _inputs(segs, K, M)
            acc = x_q.float() @ w_t.float().t()                               # exact: |acc| < 2^24
            ref_int = acc
            gcol = torch.cat([gam[i].expand(4 * r) for i, r in enumerate(segs)])
            ref = (acc * (gcol[None, :] / s[:, None])).to(torch.bfloat16)
            nbytes = R * K
            copies = 1 if M > 64 else max(2, -(-160_000_000 // nbytes))
            ws = [w] + [w.clone() for _ in range(copies - 1)]
            out = torch.empty(M, 4 * R, dtype=torch.bfloat16, device="cuda")
            calls = max(32, copies) if M <= 64 else 10
            tag = f"M{M}_{name}"

            def run(cfg):
                return [lambda i=i, cfg=cfg: w2a8_linear(x_q, s, ws[i % copies], gam, segs, out=out,
                                                         config=dict(cfg)) for i in range(calls)]

            def sweep(prefix, cands, to_cfg):
                """Each candidate block shape checked bit for bit against ``ref``, then timed -> {c: us}."""
                times = {}
                for c in cands:
                    key = f"{prefix}_" + "_".join(str(v) for v in c)
                    try:
                        out.fill_(float("nan"))
                        y = w2a8_linear(x_q, s, w, gam, segs, out=out, config=to_cfg(c))
                        if not torch.equal(y, ref):
                            bad.append(key)
                            continue
                        times[c] = graph_us(run(to_cfg(c)))
                        res[key] = round(times[c], 2)
                    except Exception as e:
                        res[key] = repr(e)[:120]
                return times
            # bf16 cuBLAS on dense weights, int8 cuBLAS on unpacked weights
            wd = [torch.randn(4 * R, K, dtype=torch.bfloat16, device="cuda")
                  for _ in range(1 if M > 64 else max(2, -(-160_000_000 // (8 * nbytes))))]
            xb = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            res[f"bf16_{tag}_us"] = round(graph_us([lambda i=i: F.linear(xb, wd[i % len(wd)])
                                                    for i in range(calls)]), 2)
            if M > 16:
                w8 = w_t.contiguous()
                res[f"intmm_{tag}_us"] = round(graph_us([lambda: torch._int_mm(x_q, w8.t())] * 10), 2)
            if M > 64:
                t8 = fp8_us(M, 4 * R, K, 10)
                if t8 is not None:
                    res[f"fp8_{tag}_us"] = round(t8, 2)
            olds = [("gemv", dict(w2a8.pick_config(1, R, K), MB=M))] if M <= 8 else []
            if M in OLD_DOT and not args.i8_only:
                olds.append(("dot", OLD_DOT[M]))
            for oname, cfg in olds:
                try:
                    y = w2a8_linear(x_q, s, w, gam, segs, out=out, config=dict(cfg))
                    if not torch.equal(y, ref):
                        bad.append(f"{oname}_{tag}")
                    res[f"{oname}_{tag}_us"] = round(graph_us(run(cfg)), 2)
                except Exception as e:
                    res[f"{oname}_{tag}_us"] = repr(e)[:120]
            # the tensor-core kernel: exact integers once, then every candidate bit-exact and timed
            y_int = w2a8_linear(x_q, torch.ones_like(s), w, torch.ones_like(gam), segs, out_dtype=torch.float32)
            if not torch.equal(y_int, ref_int):
                bad.append(f"tc_int_{tag}")
            times = sweep(f"tc_{tag}", [] if args.i8_only else candidates(M, K), cfg_dict)
            if times:
                c = min(times, key=times.get)
                best[tag] = (c, round(times[c], 2))
                tuned[f"{gemm_tc.m_bucket(M)},{R},{K}"] = list(c)
                res[f"best_{tag}_us"] = round(times[c], 2)
                res[f"best_{tag}_cfg"] = "_".join(str(v) for v in c)
                res[f"best_{tag}_gb_s"] = round(nbytes / (times[c] * 1e-6) / 1e9, 1)
                print(f"{tag:10s} best {c} {times[c]:8.2f} us   bf16 {res[f'bf16_{tag}_us']:8.2f}   "
                      + "  ".join(f"{o} {res.get(f'{o}_{tag}_us')}" for o in ("gemv", "dot", "intmm")
                                  if f"{o}_{tag}_us" in res), flush=True)
            # the unpack + shared-memory int8 GEMM kernel (prefill sizes), timed whole; the unpack alone too
            times8 = sweep(f"i8_{tag}", i8_candidates(M), i8_dict)
            if times8:
                c = min(times8, key=times8.get)
                i8_tuned[f"{gemm_tc.m_bucket(M)},{4 * R},{K}"] = list(c)
                res[f"best_i8_{tag}_us"] = round(times8[c], 2)
                res[f"best_i8_{tag}_cfg"] = "_".join(str(v) for v in c)
                P1, P2 = w2a8.seg_bounds(segs, R, "bench")
                w8 = gemm_i8.unpack_i8(w, P1, P2)
                res[f"unpack_{tag}_us"] = round(graph_us([lambda: gemm_i8.unpack_i8(w, P1, P2, out=w8)] * calls), 2)
                res[f"i8_vs_bf16_{tag}_speedup"] = round(res[f"bf16_{tag}_us"] / times8[c], 2)
                print(f"{tag:10s} i8 best {c} {times8[c]:8.2f} us (unpack {res[f'unpack_{tag}_us']} us)   "
                      f"bf16 {res[f'bf16_{tag}_us']:8.2f}   fp8 cuBLAS {res.get(f'fp8_{tag}_us')}", flush=True)
            del ws, wd
            torch.cuda.empty_cache()
    res["inexact"] = bad
    res["tuned"] = tuned
    res["i8_tuned"] = i8_tuned
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=0)
    if args.tuned_out:
        with open(args.tuned_out, "w") as f:
            json.dump(tuned, f)
    print("inexact:", bad)
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("best_", "bf16_", "compile", "unpack_",
                                                                         "i8_vs", "fp8_"))}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
