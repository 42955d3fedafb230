"""GPU engine benchmark: W2A8 Triton runner vs a bf16 cuBLAS pipeline, random 2B4T shapes, one run.

    PYTHONPATH=src python3 bench/gpu.py --out bench/results/gpu-2026-11-25-h100.json

Both pipelines share everything but the projections: the same static KV cache, the same decode
attention kernel, the same fused norm kernels, one CUDA graph per decode step. The bf16 pipeline
runs every projection as ``F.linear`` on dequantized bf16 weights (``W_t * gamma``; fused q|k|v and
gate|up); the W2A8 pipeline reads the 2-bit weights. Measured (median of repeats, CUDA events):

- copy bandwidth (device-to-device, bytes read + written) and from it the floor of a decode step:
  (packed weights + head + KV bytes at that context) / bandwidth, with a bf16 and an int8 head;
- batch-1 decode ms/token at context 128 / 1024 / 4096 (``runner.decode`` back to back, inputs
  from the host; at 1024 also from the device; where the step's attention span is shorter than
  the cache, W2A8 also with decode spans on and off: ``_spans_ms``, ``_whole_cache_ms``), and
  greedy generation through ``generate`` (128 tokens after a 128-token prompt: tok/s, sampling
  and its synchronization included), and sampled generation the same way (temperature 0.8,
  with and without top-p 0.95), and the sampler's ``next_id`` alone on 128256 logits (greedy,
  temperature, top-p, top-k + top-p: ``sampler_<case>_us`` back to back and ``_host_us`` to issue;
  ``_eager`` with the sampler's CUDA graph off, and sampled generation that way too), and the
  batch scheduler's draw of 64 sampled rows a step, together and one by one
  (``sampler_rows64_<case>_us``, ``_each_us``; top-p's cut by sorting: ``sampler_rows64_top_p_sort_us``),
  and top-p's sort alone on 1 and 64 rows
  (``sort_rows<n>_us``, GPU time);
- batch 8 and 64 decode throughput (rows at staggered positions around 1024);
- a 2048-token prefill (head on the last position only, as the runner returns): eager, the host's
  time to enqueue it, with prefill graphs (``runner.prefill_graphs``: the prompt replays its
  padded shape's graph, input copies included), and the bare graph replay (the GPU's time alone),
  for W2A8 also with the weights unpacked on a side stream ahead of the GEMMs and in line
  (``_graph_unpack_ahead_ms``, ``_graph_unpack_inline_ms``, each twice, alternating);
- the host time of each op of a prefill layer (what the eager prefill waits on);
- the decode attention alone at batch 64 per chunk length, beside its KV bytes' floor;
- resident weight + head bytes and peak memory of each pipeline;
- per-projection decode GEMV time at M=1 beside bf16 ``F.linear``.

Prints a table, then one JSON line. Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def events_ms(fn, iters: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time of ``iters`` back-to-back calls (CUDA events)."""
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / iters)
    return statistics.median(out)


def result_log(out: str | None):
    """-> (res, save, guard) for a benchmark's results: ``res`` starts with the device, date and
    versions; ``save()`` writes it as JSON to ``out`` (if given); ``guard(name, fn)`` runs fn,
    records a failure as ``res[name + "_error"]`` (keeping every other number) and saves."""
    import triton
    res: dict = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                 "torch": torch.__version__, "triton": triton.__version__}

    def save():
        if out:
            with open(out, "w") as f:
                json.dump(res, f, indent=1)

    def guard(name, fn):
        try:
            fn()
        except Exception as e:       # keep every other number
            res[f"{name}_error"] = repr(e)[:300]
            print(f"{name} failed: {e!r}"[:400], flush=True)
        save()
    return res, save, guard


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = events_ms(lambda: dst.copy_(src), 10)
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def fill_cache(runner, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    for k, v in zip(runner.k_cache, runner.v_cache):
        k.normal_(0, 1, generator=g)
        v.normal_(0, 1, generator=g)


def load_table(path: str, key: str | None = None) -> dict:
    """Block shapes written by bench/gpu_gemm.py ({"M,R,K": [...]}, or under ``key`` of its --out
    JSON) -> {(M bucket, R, K): tuple}, the form of the kernels' TUNED tables."""
    with open(path) as f:
        table = json.load(f)
    if key is not None:
        if key not in table:
            raise SystemExit(f"{path}: no {key!r} table (write it with bench/gpu_gemm.py --out)")
        table = table[key]
    return {tuple(int(v) for v in k.split(",")): tuple(c) for k, c in table.items()}


def decode_ms(runner, pos_list, iters=50, where="cpu") -> float:
    """ms a ``runner.decode`` call, back to back; tokens and positions on the host (as generation
    passes them: no device wait) or, ``where="cuda"``, on the device (one wait a call to check them)."""
    n = len(pos_list)
    tok = torch.randint(0, runner.vocab_size, (n,), device=where)
    pos = torch.tensor(pos_list, device=where)
    runner.decode(tok, pos)                               # capture (first call for this row count)
    return events_ms(lambda: runner.decode(tok, pos), iters)


def generate_tok_s(runner, prompt_len=128, new=128, **sampling) -> float:
    """Generation through ``generate`` at batch 1, greedy unless ``sampling`` says otherwise
    (temperature, top_k, top_p, ...): decode steps a second, the sampler's work and its one
    synchronization a token included (the prefill excluded)."""
    from bitnet158.engine.generate import generate
    prompt = torch.randint(0, runner.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
    sampling = dict(dict(temperature=0.0), **sampling)
    best = 0.0
    for _ in range(3):                                    # the first run captures the graph
        g = generate(runner, prompt.tolist(), max_new_tokens=new, stop_ids=(), seed=0, **sampling)
        g.run()
        best = max(best, g.decode_tok_s)
    return best


SAMPLER_CASES = {"greedy": dict(temperature=0.0), "temperature": dict(temperature=0.8),
                 "top_p": dict(temperature=0.8, top_p=0.95), "top_k_top_p": dict(temperature=0.8, top_k=50, top_p=0.95)}


def sampler_us(vocab: int, iters: int = 200, **params) -> tuple[float, float]:
    """One ``Sampler.next_id`` on random fp32 logits [vocab] on the GPU: (us a call back to back by
    CUDA events, us of host time to issue a call). Near each other: the host's launches bound it."""
    import time
    from bitnet158.engine.sampling import Sampler, SamplingParams
    s = Sampler(SamplingParams(seed=0, **params), vocab, device="cuda")
    logits = torch.randn(vocab, device="cuda") * 3
    for _ in range(10):
        s.next_id(logits)
    gpu = events_ms(lambda: s.next_id(logits), iters) * 1e3
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(40):                 # few enough calls that the launch queue never fills
        s.next_id(logits)
    host = (time.perf_counter() - t0) / 40 * 1e6
    torch.cuda.synchronize()
    return gpu, host


def sampler_rows_us(vocab: int, rows: int = 64, iters: int = 20, together: bool = True,
                    sort: bool = False, **params) -> float:
    """The batch scheduler's draw of ``rows`` sampled rows of fp32 logits [rows, vocab]: us a step
    back to back (host and GPU), all rows together (``sampling.next_ids``) or each by its own
    sampler in turn (its graph from the second call on); ``sort``: top-p's cut by sorting the
    rows (``sampling.SORTED_CUT``) rather than digit by digit."""
    import time
    from bitnet158.engine import sampling
    from bitnet158.engine.sampling import Sampler, SamplingParams
    ss = [Sampler(SamplingParams(seed=i, **params), vocab, device="cuda") for i in range(rows)]
    logits = torch.randn(rows, vocab, device="cuda") * 3
    keep, sampling.BATCH_DRAW = sampling.BATCH_DRAW, together
    keep_cut, sampling.SORTED_CUT = sampling.SORTED_CUT, sort
    try:
        for _ in range(3):
            sampling.next_ids(ss, logits)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            sampling.next_ids(ss, logits).tolist()        # the scheduler reads the ids every step
        return (time.perf_counter() - t0) / iters * 1e6
    finally:
        sampling.BATCH_DRAW, sampling.SORTED_CUT = keep, keep_cut


def record_b1(res: dict, runner, key: str, ctxs, iters=100) -> None:
    """Batch-1 ms/token of runner at each context -> res[f"decode_b1_ctx{ctx}_{key}_ms"] (printed)."""
    for ctx in ctxs:
        ms = decode_ms(runner, [ctx - 1], iters=iters)
        res[f"decode_b1_ctx{ctx}_{key}_ms"] = round(ms, 4)
        print(f"[{key}] decode b1 ctx {ctx}: {ms:.4f} ms", flush=True)


def prefill_ms(runner, T=2048) -> tuple[float, float, float]:
    """A T-token prefill: (eager ms by CUDA events, host ms to enqueue it, ms with prefill graphs
    on). Eager time near the host time and above the graph replay's: the eager prefill waits on
    Python and launches, not on the GPU."""
    tok = torch.randint(0, runner.vocab_size, (1, T), device="cuda")
    pos = torch.arange(T, device="cuda")[None]
    default = runner.prefill_graphs
    runner.prefill_graphs = True
    runner.prefill(tok, pos)                              # eager the first time
    runner.prefill(tok, pos)                              # captures its graph
    with_graphs = events_ms(lambda: runner.prefill(tok, pos), 1, repeats=5)
    runner.prefill_graphs = False
    runner.prefill(tok, pos)
    eager = events_ms(lambda: runner.prefill(tok, pos), 1, repeats=5)
    host = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.prefill(tok, pos)
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    runner.prefill_graphs = default
    return eager, statistics.median(host), with_graphs


def prefill_host_us(runner, res: dict, mode: str, T=2048, n=20):
    """Host time (us) to enqueue each op of a prefill layer at T tokens, n calls back to back
    without synchronizing (the GPU runs behind): where the eager prefill's host time goes."""
    import torch.nn.functional as F

    from bitnet158.kernels.triton.attention import rope_cache_write
    L = runner.layers[0]
    H, HKV, D = runner.H, runner.HKV, runner.D
    x = torch.randn(T, runner.cfg.hidden_size, device="cuda", dtype=runner.dtype)
    d = torch.randn_like(x)
    q, s = runner._nq(x, L["in_norm"])
    qkv = runner._lin(L["qkv"], q, s)
    pos = torch.arange(T, device="cuda", dtype=torch.int32)
    rows = torch.zeros(1, device="cuda", dtype=torch.int32)
    qr, kr = rope_cache_write(qkv, runner.k_cache[0], runner.v_cache[0], rows, pos, runner.cos, runner.sin,
                              H, HKV, D)
    qh = qr.view(1, T, H, D).transpose(1, 2)
    kh = kr.view(1, T, HKV, D).transpose(1, 2)
    vh = qkv.view(1, T, -1)[..., (H + HKV) * D:].view(1, T, HKV, D).transpose(1, 2)
    ops = {
        "norm_quant": lambda: runner._nq(x, L["post_norm"], residual=d, h_out=d),
        "linear_qkv": lambda: runner._lin(L["qkv"], q, s),
        "rope_cache": lambda: rope_cache_write(qkv, runner.k_cache[0], runner.v_cache[0], rows, pos, runner.cos,
                                               runner.sin, H, HKV, D),
        "sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True),
        "views": lambda: qkv.view(1, T, -1)[..., (H + HKV) * D:].view(1, T, HKV, D).transpose(1, 2),
    }
    for name, fn in ops.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        us = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        res[f"prefill_host_{name}_{mode}_us"] = round(us, 1)
    print(f"[{mode}] prefill host us a call: " + ", ".join(
        f"{k} {res[f'prefill_host_{k}_{mode}_us']}" for k in ops), flush=True)


def prefill_graph_ms(runner, T=2048) -> float:
    """The same prefill's device work replayed from a CUDA graph: the GPU's time alone."""
    tok = torch.randint(0, runner.vocab_size, (1, T), device="cuda")
    pos = torch.arange(T, device="cuda")[None]
    rows = torch.arange(1, device="cuda")
    g, _ = runner._capture((tok, pos, rows, True, T), runner._prefill)
    graph = events_ms(g.replay, 1, repeats=5)
    del g
    return graph


def attention_variant(spec: str) -> tuple[str, bool, int, dict]:
    """'64' (chunk), '128x128' (chunk x tile), 'f64' (the one-kernel `fused` attention), '64w2'
    (the chunk merge on 2 warps) -> (key, fused, chunk, DecodeAttention keywords)."""
    m = re.fullmatch(r"(f?)(\d+)(?:x(\d+))?(?:w(\d+))?", spec)
    if m is None:
        raise SystemExit(f"--attention-chunks: cannot read {spec!r} (e.g. 64, 128x128, 64w1, f64)")
    fused, chunk, tile, warps = bool(m[1]), m[2], m[3], m[4]
    key = ("fused_" if fused else "") + f"chunk{chunk}" + (f"_bn{tile}" if tile else "") + \
        (f"_w{warps}" if warps else "")
    kw = ({"block_n": int(tile)} if tile else {}) | ({"combine_warps": int(warps)} if warps else {})
    return key, fused, int(chunk), kw


def attention_table(res: dict, model, bw: float, chunks="64,128,256"):
    """Decode attention alone at batch 64, rows at ~1024 (partials + combine + sub-norm + quant),
    per variant (see ``attention_variant``): us a layer (30 calls on the 30 layers' caches in one
    graph) and GB/s of the KV bytes read (positions 0..pos of 5 KV heads, keys and values)."""
    from bitnet158.kernels.triton.attention import DecodeAttention
    from bitnet158.kernels.triton.runner import TritonRunner
    B, S = 64, 1280
    r = TritonRunner(model, batch=B, max_len=S)
    fill_cache(r)
    cfg = model.config
    H, HKV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pos = torch.tensor([1023 - (37 * b) % 256 for b in range(B)], device="cuda", dtype=torch.int32)
    rows = torch.arange(B, device="cuda", dtype=torch.int32)
    qkv = torch.randn(B, (H + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
    w = r.layers[0]["attn_norm"]
    kv_bytes = int((pos.long() + 1).sum()) * HKV * D * 2 * 2
    res["attn_b64_kv_floor_us"] = round(kv_bytes / (bw * 1e9) * 1e6, 1)
    ref = None
    for spec in chunks.split(","):
        key, fused, chunk, kw = attention_variant(spec)
        att = DecodeAttention(H, HKV, D, B, S, "cuda", chunk=chunk, **kw)

        def calls(att=att, fused=fused):
            for i in range(len(r.layers)):
                if fused:
                    out = att.fused(qkv, r.k_cache[i], r.v_cache[i], rows, pos, r.cos, r.sin,
                                    norm_weight=w, eps=r.eps)[1:]
                else:
                    out = att(qkv, r.k_cache[i], r.v_cache[i], rows, pos, r.cos, r.sin, w, r.eps)
            return out
        q, s = calls()
        ref = (q, s) if ref is None else ref
        res[f"attn_b64_{key}_same_q"] = bool(torch.equal(q, ref[0]) and torch.equal(s, ref[1]))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            calls()
        us = events_ms(g.replay, 5) * 1e3 / len(r.layers)
        res[f"attn_b64_{key}_us"] = round(us, 1)
        res[f"attn_b64_{key}_gb_s"] = round(kv_bytes / (us * 1e-6) / 1e9, 1)
        print(f"attention b64 {key}: {us:.1f} us a layer ({kv_bytes / us / 1e3:.0f} GB/s)", flush=True)
        del g, att
    res["attn_b64_default_chunk"] = r.attn.chunk
    del r


def gemv_table(res: dict, sweep: dict | None = None):
    """Decode projections at M=1: W2A8 kernel vs bf16 F.linear, in microseconds and GB/s."""

    from bitnet158 import quant
    from bitnet158.kernels.triton.w2a8 import w2a8_linear
    shapes = {"qkv": ((640, 160, 160), 2560), "o": ((640,), 2560), "gu": ((1728, 1728), 2560),
              "down": ((640,), 6912)}
    for name, (segs, K) in shapes.items():
        R = sum(segs)
        # several weight copies so that repeated calls are not served from L2 (50 MB)
        n_copies = 8
        ws = [torch.randint(0, 256, (R, K), dtype=torch.uint8, device="cuda") & 0x55 for _ in range(n_copies)]
        wd = [torch.randn(4 * R, K, dtype=torch.bfloat16, device="cuda") for _ in range(n_copies)]
        x = torch.randn(1, K, device="cuda")
        xq, s = quant.act_quant(x)
        g = torch.ones(len(segs), device="cuda")
        xb = x.bfloat16()
        out = torch.empty(1, 4 * R, dtype=torch.bfloat16, device="cuda")
        i = [0]

        def w2():
            i[0] = (i[0] + 1) % n_copies
            w2a8_linear(xq, s, ws[i[0]], g, segs, out=out)

        def bf():
            i[0] = (i[0] + 1) % n_copies
            F.linear(xb, wd[i[0]])

        def graph_us(f):
            f()
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                for _ in range(n_copies * 4):
                    f()
            return events_ms(gr.replay, 5) * 1e3 / (n_copies * 4)

        for f, key, nbytes in ((w2, "w2a8", R * K), (bf, "bf16", 8 * R * K)):
            us = graph_us(f)
            res[f"gemv_{name}_{key}_us"] = round(us, 2)
            res[f"gemv_{name}_{key}_gb_s"] = round(nbytes / (us * 1e-6) / 1e9, 1)
        if sweep is not None:          # other block shapes of the dp4a GEMV
            k4p = triton.next_power_of_2(K // 4)
            for br in (2, 4, 8, 16):
                for bk4 in (256, 512, k4p):
                    for nw in (4, 8):
                        if bk4 > k4p or br * bk4 > 16384:
                            continue
                        cfg = dict(kind="gemv", BR=br, BK4=bk4, MB=1, num_warps=nw)

                        def w3(cfg=cfg):
                            i[0] = (i[0] + 1) % n_copies
                            w2a8_linear(xq, s, ws[i[0]], g, segs, out=out, config=cfg)
                        try:
                            sweep[f"{name}_br{br}_bk{bk4}_w{nw}"] = round(graph_us(w3), 2)
                        except Exception as e:
                            sweep[f"{name}_br{br}_bk{bk4}_w{nw}"] = repr(e)[:100]
        del ws, wd


def profile_decode(model, path, batch=1, ctx=1024, linear="w2a8", prefill=None):
    """Kernel table (CUDA time per kernel) of eager decode steps (and a 2048-token prefill), to see
    where a step goes. Rows sit at staggered positions around ``ctx`` as in the timed runs."""
    from torch.profiler import ProfilerActivity, profile

    from bitnet158.kernels.triton.runner import TritonRunner
    r = TritonRunner(model, batch=batch, max_len=4096 if batch == 1 else 1280, graphs=False, linear=linear)
    fill_cache(r)
    tok = torch.randint(0, r.vocab_size, (batch,), device="cuda")
    pos = torch.tensor([ctx - 1 - (37 * b) % 256 for b in range(batch)], device="cuda")
    ptok = torch.randint(0, r.vocab_size, (1, 2048), device="cuda")
    ppos = torch.arange(2048, device="cuda")[None]
    prefill = batch == 1 if prefill is None else prefill
    rp = [r if batch == 1 else None]          # the prefill needs 2048 cache slots: a batch-1 runner

    def run_prefill():
        if rp[0] is None:
            rp[0] = TritonRunner(model, batch=1, max_len=4096, graphs=False, linear=linear)
        rp[0].prefill(ptok, ppos)
    for name, fn, n in ((f"{linear} decode", lambda: r.decode(tok, pos), 5),
                        (f"{linear} prefill 2048", run_prefill, 1)):
        if not prefill and "prefill" in name:
            continue
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60)
        with open(path, "a") as f:
            f.write(f"{name} batch {batch if 'decode' in name else 1} ctx {ctx}, {n} calls\n{table}\n")
    del r, rp


def dot_sweep(sweep: dict):
    """Tensor-core W2A8 kernel block shapes at M = 64 and 2048 (gate|up shape), vs the int8 cuBLAS path."""
    from bitnet158.kernels.triton.w2a8 import w2a8_linear
    segs, K = (1728, 1728), 2560
    R = sum(segs)
    w = torch.randint(0, 256, (R, K), dtype=torch.uint8, device="cuda") & 0x55
    g = torch.ones(2, device="cuda")
    for M in (64, 2048):
        xq = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
        s = torch.rand(M, device="cuda") + 1
        out = torch.empty(M, 4 * R, dtype=torch.bfloat16, device="cuda")
        cands = [dict(kind="intmm")]
        for bm in ((16, 32, 64) if M == 64 else (64, 128, 256)):
            for br, bk in ((32, 128), (64, 128), (64, 64), (128, 64), (32, 256)):
                for nw in (4, 8):
                    for sk in ((1, 2) if M == 64 else (1,)):
                        cands.append(dict(kind="dot", BM=bm, BR=br, BK=bk, SPLIT_K=sk, num_warps=nw, num_stages=3))
        for cfg in cands:
            key = f"dot_M{M}_" + "_".join(f"{k}{v}" for k, v in cfg.items() if k != "kind") if cfg["kind"] == "dot" \
                else f"intmm_M{M}"
            try:
                f = lambda cfg=cfg: w2a8_linear(xq, s, w, g, segs, out=out, config=dict(cfg))  # noqa: E731
                f()
                sweep[key] = round(events_ms(f, 5) * 1e3, 1)
            except Exception as e:
                sweep[key] = repr(e)[:80]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--quick", action="store_true", help="fewer cases (smoke run)")
    ap.add_argument("--sweep", default=None, help="also time GEMV block shapes; write them here")
    ap.add_argument("--profile", default=None, help="write a per-kernel profile of decode steps here")
    ap.add_argument("--profile-only", action="store_true", help="only the profile (set BITNET158_PDL=0 "
                    "for per-kernel times: with PDL a kernel's time includes its wait)")
    ap.add_argument("--profile-batches", default="1,64", help="decode batch sizes to profile")
    ap.add_argument("--profile-bf16", action="store_true", help="also profile the bf16 pipeline")
    ap.add_argument("--tuned", default=None, help="tensor-core block shapes (bench/gpu_gemm.py "
                    "--tuned-out) to use instead of the built-in table")
    ap.add_argument("--i8-tuned", default=None, help="int8 GEMM block shapes: a bench/gpu_gemm.py --out "
                    "JSON (its i8_tuned) to use instead of the built-in table")
    ap.add_argument("--i8-min-m", type=int, default=None, help="rows from which projections use the "
                    "unpack + int8 GEMM kernel (gemm_i8) instead of the built-in threshold")
    ap.add_argument("--batched-only", action="store_true", help="only prefill and batch 8 / 64 decode")
    ap.add_argument("--batches", default="8,64", help="batched decode sizes")
    ap.add_argument("--b8-gemv-rows", default="", help="batch 8 also on the dp4a GEMV at these rows a "
                    "program, e.g. 1,2,4 (decode_b8_w2a8_gemv_rows<n>_ms)")
    ap.add_argument("--modes", default="w2a8,bf16", help="pipelines to time (w2a8, bf16)")
    ap.add_argument("--b8-other", action="store_true", help="batch 8 also on the other kernel (dp4a GEMV)")
    ap.add_argument("--no-gemv", action="store_true", help="skip the per-projection M=1 table")
    ap.add_argument("--no-attention", action="store_true", help="skip the batch-64 attention table")
    ap.add_argument("--attention-only", action="store_true", help="only the batch-64 attention table "
                    "(e.g. under ncu)")
    ap.add_argument("--combine-warps", type=int, default=None, help="warps of the decode attention's "
                    "chunk merge in every runner (attention.COMBINE_WARPS; default: by program count)")
    ap.add_argument("--attn-prefetch", type=int, choices=(0, 1), default=None, help="decode attention "
                    "partials load their first tile before the wait (attention.PARTIAL_PREFETCH; "
                    "default: off)")
    ap.add_argument("--attention-chunks", default="64,128,256", help="attention table variants: "
                    "chunk length, CHUNKxTILE, then wN for the merge's warps; f-prefixed for the one-kernel "
                    "attention (e.g. 64, 128x128, 64w1, f64)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device", file=sys.stderr)
        return 2

    from bitnet158.kernels.triton.runner import TritonRunner
    from bitnet158.random_model import random_packed_model

    res, save, _ = result_log(args.out)
    if args.tuned:
        from bitnet158.kernels.triton import gemm_tc
        gemm_tc.TUNED.clear()
        gemm_tc.TUNED.update(load_table(args.tuned))
        res["tuned"] = args.tuned
    if args.i8_tuned:
        from bitnet158.kernels.triton import gemm_i8
        gemm_i8.TUNED.clear()
        gemm_i8.TUNED.update(load_table(args.i8_tuned, "i8_tuned"))
        res["i8_tuned"] = args.i8_tuned
    from bitnet158.kernels.triton import w2a8
    if args.i8_min_m is not None:
        w2a8.I8_MIN_M = args.i8_min_m
    res["i8_min_m"] = w2a8.I8_MIN_M if w2a8.I8_MIN_M < 1 << 40 else None      # None: off
    from bitnet158.kernels.triton import attention
    if args.combine_warps is not None:
        attention.COMBINE_WARPS = args.combine_warps
    if args.attn_prefetch is not None:
        attention.PARTIAL_PREFETCH = bool(args.attn_prefetch)
    res["combine_warps"] = attention.COMBINE_WARPS or "auto"
    res["attn_prefetch"] = attention.PARTIAL_PREFETCH

    bw = copy_bandwidth_gbs()
    res["copy_bw_gb_s"] = round(bw, 1)
    t0 = time.time()
    model = random_packed_model("2b4t", seed=0, dtype=torch.bfloat16, device="cuda")
    cfg = model.config
    res["model_build_s"] = round(time.time() - t0, 1)
    if args.profile:
        for lin in ("w2a8", "bf16") if args.profile_bf16 else ("w2a8",):
            bs = [int(b) for b in args.profile_batches.split(",") if b]
            for b in bs:
                try:
                    profile_decode(model, args.profile, batch=b, linear=lin, prefill=b == bs[0])
                except Exception as e:
                    print("profile failed:", repr(e)[:300])
        if args.profile_only:
            return 0
    if args.attention_only:
        attention_table(res, model, bw, args.attention_chunks)
        save()
        print(json.dumps(res))
        return 0
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2    # bytes / position
    ctxs = [128, 1024, 4096] if not args.quick else [1024]
    if args.batched_only:
        ctxs = []
    for mode in args.modes.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        r = TritonRunner(model, batch=1, max_len=4096, linear=mode)
        wb = r.weight_bytes()
        res[f"{mode}_linear_gb"] = round(wb["linear"] / 1e9, 3)
        res[f"{mode}_weights_head_gb"] = round((wb["linear"] + wb["head"]) / 1e9, 3)
        fill_cache(r)
        for ctx in ctxs:
            ms = decode_ms(r, [ctx - 1], iters=100)
            res[f"decode_b1_ctx{ctx}_{mode}_ms"] = round(ms, 4)
            if mode == "w2a8":
                nbytes = wb["linear"] + wb["head"] + kv_tok * ctx
                res[f"floor_b1_ctx{ctx}_ms"] = round(nbytes / (bw * 1e9) * 1e3, 4)
                res[f"floor_b1_ctx{ctx}_int8_head_ms"] = round((nbytes - wb["head"] / 2) / (bw * 1e9) * 1e3, 4)
            print(f"[{mode}] decode b1 ctx {ctx}: {ms:.3f} ms", flush=True)
            if mode == "w2a8":         # attention spans on and off where a span is shorter than the cache
                default, r.decode_spans = r.decode_spans, True
                for key, on in ((("spans", True), ("whole_cache", False)) if r._span(1, ctx - 1) else ()):
                    r.decode_spans = on
                    ms = res[f"decode_b1_ctx{ctx}_w2a8_{key}_ms"] = round(decode_ms(r, [ctx - 1], iters=100), 4)
                    print(f"[{mode}] decode b1 ctx {ctx}, attention {key}: {ms:.3f} ms", flush=True)
                r.decode_spans = default
            save()
        if ctxs:
            res[f"decode_b1_ctx1024_{mode}_device_inputs_ms"] = round(decode_ms(r, [1023], 100, "cuda"), 4)
            res[f"tg128_b1_{mode}_tok_s"] = round(generate_tok_s(r), 1)
            res[f"tg128_b1_{mode}_sampled_tok_s"] = round(generate_tok_s(r, temperature=0.8, top_p=0.95), 1)
            res[f"tg128_b1_{mode}_temperature_tok_s"] = round(generate_tok_s(r, temperature=0.8), 1)
            if mode == "w2a8":                 # the sampler alone (the same for both pipelines)
                from bitnet158.engine import sampling
                keep = sampling.GRAPHS
                for graphs, tag in ((True, ""), (False, "_eager")):      # replayed graph / eager ops
                    sampling.GRAPHS = graphs
                    for case, params in SAMPLER_CASES.items():
                        gpu, host = sampler_us(r.vocab_size, **params)
                        res[f"sampler_{case}{tag}_us"] = round(gpu, 1)
                        res[f"sampler_{case}{tag}_host_us"] = round(host, 1)
                        print(f"sampler {case}{tag}: {gpu:.1f} us a call back to back, {host:.1f} us of host "
                              "time", flush=True)
                    if not graphs:
                        res["tg128_b1_w2a8_sampled_eager_sampler_tok_s"] = round(
                            generate_tok_s(r, temperature=0.8, top_p=0.95), 1)
                sampling.GRAPHS = keep
                for case in ("temperature", "top_p"):        # 64 sampled rows of the batch scheduler
                    for together, sort, tag in ((True, False, ""), (False, False, "_each"), (True, True, "_sort")):
                        if sort and case != "top_p":
                            continue
                        us = sampler_rows_us(r.vocab_size, together=together, sort=sort, **SAMPLER_CASES[case])
                        res[f"sampler_rows64_{case}{tag}_us"] = round(us, 1)
                        how = {"": "together", "_each": "one by one", "_sort": "together, cut by sorting"}[tag]
                        print(f"sampler, 64 rows, {case}, {how}: {us:.0f} us a step", flush=True)
                for n in (1, 64):               # top-p's sort alone, the GPU's time (its largest op)
                    x = torch.randn(n, r.vocab_size, device="cuda") * 3
                    us = 1e3 * events_ms(lambda: torch.sort(x, dim=-1, descending=True), 20)
                    res[f"sort_rows{n}_us"] = round(us, 1)
                    print(f"torch.sort of [{n}, {r.vocab_size}] fp32 logits: {us:.1f} us", flush=True)
            print(f"[{mode}] decode b1 ctx 1024, inputs on the device: "
                  f"{res[f'decode_b1_ctx1024_{mode}_device_inputs_ms']:.3f} ms; greedy generation "
                  f"(128 after 128): {res[f'tg128_b1_{mode}_tok_s']:.0f} tok/s, sampled (temperature 0.8, "
                  f"top-p 0.95): {res[f'tg128_b1_{mode}_sampled_tok_s']:.0f} tok/s", flush=True)
            save()
        if mode == "w2a8" and ctxs:        # the optional int8 head, same cache length
            del r
            r = TritonRunner(model, batch=1, max_len=4096, linear=mode, int8_head=True)
            fill_cache(r)
            for ctx in ctxs:
                res[f"decode_b1_ctx{ctx}_w2a8_int8head_ms"] = round(decode_ms(r, [ctx - 1], iters=100), 4)
            wq = r.weight_bytes()
            res["w2a8_int8head_weights_head_gb"] = round((wq["linear"] + wq["head"]) / 1e9, 3)
            print(f"[w2a8 int8 head] decode b1 ctx 1024: {res['decode_b1_ctx1024_w2a8_int8head_ms']:.3f} ms")
            del r
            r = TritonRunner(model, batch=1, max_len=4096, linear=mode)
        eager, host, with_graphs = prefill_ms(r)
        res[f"peak_mem_b1_{mode}_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        graph = prefill_graph_ms(r)
        if mode == "w2a8":          # the weights' unpack on a side stream ahead of the GEMMs, and in line
            default = r.unpack_ahead
            for again in ("", "_again"):            # alternating, twice
                for on, name in ((True, "unpack_ahead"), (False, "unpack_inline")):
                    r.unpack_ahead = on
                    res[f"prefill2048_w2a8_graph_{name}{again}_ms"] = round(prefill_graph_ms(r), 2)
            r.unpack_ahead = default
            print("[w2a8] prefill 2048 graph, unpack ahead / in line: "
                  f"{res['prefill2048_w2a8_graph_unpack_ahead_ms']} / {res['prefill2048_w2a8_graph_unpack_inline_ms']}"
                  f" ms (again {res['prefill2048_w2a8_graph_unpack_ahead_again_ms']} / "
                  f"{res['prefill2048_w2a8_graph_unpack_inline_again_ms']})", flush=True)
        prefill_host_us(r, res, mode)
        res[f"prefill2048_{mode}_ms"] = round(eager, 2)
        res[f"prefill2048_{mode}_host_ms"] = round(host, 2)
        res[f"prefill2048_{mode}_with_graphs_ms"] = round(with_graphs, 2)
        res[f"prefill2048_{mode}_graph_ms"] = round(graph, 2)
        print(f"[{mode}] prefill 2048: {eager:.2f} ms (host {host:.2f} ms to enqueue; with prefill "
              f"graphs {with_graphs:.2f} ms; bare graph replay {graph:.2f} ms)", flush=True)
        del r
        save()
        for B in ([int(b) for b in args.batches.split(",") if b] if not args.quick else [8]):
            torch.cuda.empty_cache()
            r = TritonRunner(model, batch=B, max_len=1280, linear=mode)
            fill_cache(r)
            pos = [1023 - (37 * b) % 256 for b in range(B)]              # staggered positions
            ms = decode_ms(r, pos, iters=30)
            res[f"decode_b{B}_{mode}_ms"] = round(ms, 4)
            if mode == "w2a8" and B == 8 and args.b8_other:    # the other kernel at 8 rows: dp4a GEMV or tensor cores
                from bitnet158.kernels.triton import w2a8 as _w
                other = "tc" if _w.GEMV_MAX_M >= 8 else "gemv"
                keep, _w.GEMV_MAX_M = _w.GEMV_MAX_M, (4 if other == "tc" else 8)
                r2 = TritonRunner(model, batch=B, max_len=1280, linear=mode)
                fill_cache(r2)
                res[f"decode_b8_w2a8_{other}_ms"] = round(decode_ms(r2, pos, iters=30), 4)
                _w.GEMV_MAX_M = keep
                del r2
            if mode == "w2a8" and B == 8:
                from bitnet158.kernels.triton import w2a8 as _w
                for mb in [int(v) for v in args.b8_gemv_rows.split(",") if v]:   # GEMV, mb rows a program
                    keep, _w.GEMV_MAX_M, _w.GEMV_ROWS = (_w.GEMV_MAX_M, _w.GEMV_ROWS), 8, mb
                    r2 = TritonRunner(model, batch=B, max_len=1280, linear=mode)
                    fill_cache(r2)
                    res[f"decode_b8_w2a8_gemv_rows{mb}_ms"] = round(decode_ms(r2, pos, iters=30), 4)
                    _w.GEMV_MAX_M, _w.GEMV_ROWS = keep
                    print(f"[w2a8] decode b8, dp4a GEMV at {mb} rows a program: "
                          f"{res[f'decode_b8_w2a8_gemv_rows{mb}_ms']:.3f} ms/step", flush=True)
                    del r2
            res[f"decode_b{B}_{mode}_tok_s"] = round(B / ms * 1e3, 1)
            print(f"[{mode}] decode b{B}: {ms:.3f} ms/step, {B / ms * 1e3:.0f} tok/s", flush=True)
            if B == 64:                   # short context: projections weigh more than the KV reads
                ms = decode_ms(r, [127 - (37 * b) % 64 for b in range(B)], iters=30)
                res[f"decode_b64_ctx128_{mode}_ms"] = round(ms, 4)
                print(f"[{mode}] decode b64 ctx ~128: {ms:.3f} ms/step", flush=True)
            del r
            save()
    for k in ["decode_b1_ctx128", "decode_b1_ctx1024", "decode_b1_ctx4096", "prefill2048"]:
        if f"{k}_w2a8_ms" in res and f"{k}_bf16_ms" in res:
            res[f"{k}_speedup"] = round(res[f"{k}_bf16_ms"] / res[f"{k}_w2a8_ms"], 2)
    for k in ("graph", "with_graphs"):
        if f"prefill2048_w2a8_{k}_ms" in res and f"prefill2048_bf16_{k}_ms" in res:
            res[f"prefill2048_{k}_speedup"] = round(res[f"prefill2048_bf16_{k}_ms"] / res[f"prefill2048_w2a8_{k}_ms"], 2)
    if "decode_b64_ctx128_w2a8_ms" in res and "decode_b64_ctx128_bf16_ms" in res:
        res["decode_b64_ctx128_speedup"] = round(res["decode_b64_ctx128_bf16_ms"] / res["decode_b64_ctx128_w2a8_ms"], 2)
    for B in (8, 64):
        if f"decode_b{B}_w2a8_tok_s" in res and f"decode_b{B}_bf16_tok_s" in res:
            res[f"decode_b{B}_speedup"] = round(res[f"decode_b{B}_w2a8_tok_s"] / res[f"decode_b{B}_bf16_tok_s"], 2)
    if "decode_b1_ctx1024_w2a8_ms" in res:
        res["decode_b1_ctx1024_w2a8_tok_s"] = round(1e3 / res["decode_b1_ctx1024_w2a8_ms"], 1)
    save()
    sweep = {} if args.sweep else None
    if sweep is not None:
        try:
            dot_sweep(sweep)
        except Exception as e:
            sweep["dot_error"] = repr(e)[:200]
    if not args.no_attention:
        try:
            attention_table(res, model, bw, args.attention_chunks)
        except Exception as e:  # extra; keep the main numbers
            res["attention_error"] = repr(e)[:200]
        save()
    try:
        if not args.batched_only and not args.no_gemv:
            gemv_table(res, sweep)
    except Exception as e:  # the table is extra; keep the main numbers
        res["gemv_error"] = repr(e)[:200]
    save()
    if args.sweep:
        with open(args.sweep, "w") as f:
            json.dump(sweep, f, indent=0)
    print()
    print(f"{'quantity':34s} {'W2A8':>10s} {'bf16':>10s} {'speedup':>8s} {'floor':>8s}")
    for ctx in ctxs:
        k = f"decode_b1_ctx{ctx}"
        print(f"{k + ' (ms)':34s} {res.get(k + '_w2a8_ms', 0):10.3f} {res.get(k + '_bf16_ms', 0):10.3f} "
              f"{res.get(k + '_speedup', 0):8.2f} {res.get(f'floor_b1_ctx{ctx}_ms', 0):8.3f}")
    for B in (8, 64):
        k = f"decode_b{B}"
        if k + "_w2a8_tok_s" in res:
            print(f"{k + ' (tok/s)':34s} {res[k + '_w2a8_tok_s']:10.0f} {res.get(k + '_bf16_tok_s', 0):10.0f} "
                  f"{res.get(k + '_speedup', 0):8.2f}")
    print(f"{'prefill2048 (ms)':34s} {res.get('prefill2048_w2a8_ms', 0):10.2f} "
          f"{res.get('prefill2048_bf16_ms', 0):10.2f} {res.get('prefill2048_speedup', 0):8.2f}")
    for k in ("host", "with_graphs", "graph"):
        print(f"{'prefill2048, ' + k + ' (ms)':34s} {res.get(f'prefill2048_w2a8_{k}_ms', 0):10.2f} "
              f"{res.get(f'prefill2048_bf16_{k}_ms', 0):10.2f} {res.get(f'prefill2048_{k}_speedup', 0):8.2f}")
    for k in res:
        if k.startswith("attn_b64_chunk") or k.startswith("attn_b64_fused"):
            if k.endswith("_us"):
                print(f"{'attention b64, ' + k[9:-3] + ' (us/layer)':34s} {res[k]:10.1f} "
                      f"{'':10s} {'':8s} {res['attn_b64_kv_floor_us']:8.1f}")
    print(f"{'weights+head resident (GB)':34s} {res.get('w2a8_weights_head_gb', 0):10.3f} "
          f"{res.get('bf16_weights_head_gb', 0):10.3f}")
    if "decode_b1_ctx1024_w2a8_int8head_ms" in res:
        print(f"{'decode_b1_ctx1024, int8 head (ms)':34s} {res['decode_b1_ctx1024_w2a8_int8head_ms']:10.3f} "
              f"{'':10s} {'':8s} {res['floor_b1_ctx1024_int8_head_ms']:8.3f}")
    print(f"{'copy bandwidth (GB/s)':34s} {bw:10.0f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
