"""Where a batch-1 GPU decode step spends its time: each kernel's marginal cost inside the step.

    PYTHONPATH=src python3 bench/gpu_breakdown.py --out bench/results/gpu_breakdown-DATE-h100.json

A kernel's time measured alone is not its cost inside a step of ~270 kernels chained by
programmatic dependent launch (each starts while the one before drains, loads its weights, then
waits). So on a random model with exact 2B4T shapes (bf16, CUDA graphs, ctx 1024) this times the
default 9-kernel step, then the same step with one kernel kind issued twice in every layer (the
second call repeats the first one's work on the same inputs), and reports each kind's
marginal cost, (step with it doubled - step) / layers, beside the sum of all of them. Kinds:
``nq_in`` (residual add + input RMSNorm + quant), ``qkv``, ``attn`` (partials + chunk merge +
sub-norm + quant), ``o``, ``nq_post``, ``gu`` (gate|up), ``nq_gate`` (relu^2 gate + sub-norm +
quant), ``down``; and the bf16 head, doubled once a step. Doubling a kernel that adds into the
residual stream changes the numbers, not the work.

``--variants`` also times the step with launch parameters tuned on kernels alone changed inside
the chain: the M = 1 GEMVs with their four fields and ``sum(x)`` in one cross-thread reduction and
one store (``JOINT``: 4 barriers after the wait instead of 14-22 in the sm_90 PTX; the default
since it was timed, so this variant is the step again), with half or twice the default rows a
program or 8 warps; norm + quant on 4 or 16 warps (default 8 at these widths);
the decode attention with 128- or 256-slot chunks (fewer partial programs, fewer chunks to merge;
default 64), or its merge over the live chunks only, 8 or 16 at a time (``merge_block``; default:
one tile padded to every chunk of the cache), or launched for the first N cache slots only
(``attn_spanN``: the partials' grid and the merge's tile cover N slots, as a step captured for
contexts up to N would; N must cover ``--ctx``), or as one kernel (``attn_fused``, ``attn_fused4``:
the fused steps' attention, the merges in the last programs, on 8 or 4 warps; ``attn_fused_spanN``:
on 8 warps over the first N slots), or with its partial programs on 2 or 8 warps (``attn_pw2``,
``attn_pw8``; default 4). Prints a table and one JSON line. Needs CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import events_ms, fill_cache, result_log  # noqa: E402

KINDS = ("nq_in", "qkv", "attn", "o", "nq_post", "gu", "nq_gate", "down", "head")


def step_doubling(r, kind: str | None):
    """The unfused W2A8 decode step of ``r`` (TritonRunner) with kernel ``kind`` issued twice."""
    import torch.nn.functional as F

    def twice(k, fn):
        out = fn()
        return fn() if k == kind else out

    def step(tok, pos, rows):
        x = r.x_buf[:tok.shape[0]]
        x.copy_(F.embedding(tok, r.embed))
        delta = None
        for i, L in enumerate(r.layers):
            q, s = twice("nq_in", lambda: r._nq(x, L["in_norm"], residual=delta,
                                                h_out=x if delta is not None else None))
            qkv = twice("qkv", lambda: r._lin(L["qkv"], q, s))
            q, s = twice("attn", lambda: r.attn(qkv, r.k_cache[i], r.v_cache[i], rows, pos, r.cos, r.sin,
                                                L["attn_norm"], r.eps))
            delta = twice("o", lambda: r._lin(L["o"], q, s))
            q, s = twice("nq_post", lambda: r._nq(x, L["post_norm"], residual=delta, h_out=x))
            gu = twice("gu", lambda: r._lin(L["gu"], q, s))
            q, s = twice("nq_gate", lambda: r._nq(gu, L["ffn_norm"], gated=True))
            delta = twice("down", lambda: r._lin(L["down"], q, s))
        return twice("head", lambda: r._head(x, delta))
    return step


@contextlib.contextmanager
def _setattr(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _gemv(change):
    """pick_config with ``change(cfg)`` applied to the M = 1 GEMV configs."""
    from bitnet158.kernels.triton import w2a8
    orig = w2a8.pick_config

    def pick(M, R, K, *a, **kw):
        cfg = orig(M, R, K, *a, **kw)
        return change(dict(cfg)) if cfg["kind"] == "gemv" else cfg
    return _setattr(w2a8, "pick_config", pick)


def _number(name: str, prefix: str) -> int:
    """The number that ends variant ``name`` after ``prefix`` (``attn_chunk128`` -> 128)."""
    tail = name[len(prefix):]
    if not tail.isdigit():
        raise SystemExit(f"variant {name!r}: expected a number after {prefix!r}")
    return int(tail)


class _OneKernelAttention:
    """``DecodeAttention.fused`` in the place of the two-kernel attention: the partials, then in
    the last chunk program of a KV head the group's merge, in the last KV head's the sub-norm and
    quant of the row."""

    def __init__(self, attn, warps: int, span: int | None = None):
        self.attn, self.warps, self.span = attn, warps, span

    def __call__(self, qkv, k_cache, v_cache, rows, pos, cos, sin, norm_weight, eps):
        _, q, s = self.attn.fused(qkv, k_cache, v_cache, rows, pos, cos, sin, num_warps=self.warps,
                                  norm_weight=norm_weight, eps=eps, span=self.span)
        return q, s


def variant(r, name: str, ctx: int | None = None):
    """A context in which runner ``r``'s step launches with variant ``name``'s parameters (``ctx``:
    the context timed, which a span variant must cover)."""
    from bitnet158.kernels.triton import attention, norm_quant
    for prefix in ("attn_fused_span", "attn_span"):
        if name.startswith(prefix) and ctx is not None and _number(name, prefix) < ctx:
            raise SystemExit(f"variant {name!r}: the span must cover --ctx {ctx} (positions up to {ctx - 1})")
    if name.startswith("nq_w"):
        return _setattr(norm_quant, "_warps", lambda block, w=_number(name, "nq_w"): w)
    if name == "gemv_br_half":
        return _gemv(lambda c: dict(c, BR=max(1, c["BR"] // 2)))
    if name == "gemv_br_double":
        return _gemv(lambda c: dict(c, BR=c["BR"] * 2))
    if name == "gemv_w8":
        return _gemv(lambda c: dict(c, num_warps=8))
    if name == "gemv_joint":
        return _gemv(lambda c: dict(c, JOINT=True))
    if name.startswith("attn_merge"):
        a = r.attn
        return _setattr(r, "attn", attention.DecodeAttention(a.H, a.HKV, a.D, 1, r.max_len, r.device,
                                                             merge_block=_number(name, "attn_merge")))
    if name.startswith("attn_chunk"):
        a = r.attn
        return _setattr(r, "attn", attention.DecodeAttention(a.H, a.HKV, a.D, 1, r.max_len, r.device,
                                                             chunk=_number(name, "attn_chunk")))
    if name.startswith("attn_pw"):
        return _setattr(r.attn, "partial_warps", _number(name, "attn_pw"))
    if name.startswith("attn_fused_span"):
        return _setattr(r, "attn", _OneKernelAttention(r.attn, 8, _number(name, "attn_fused_span")))
    if name.startswith("attn_fused"):
        warps = _number(name, "attn_fused") if name != "attn_fused" else 8
        return _setattr(r, "attn", _OneKernelAttention(r.attn, warps))
    if name.startswith("attn_span"):
        a = r.attn
        return _setattr(r, "attn", attention.DecodeAttention(a.H, a.HKV, a.D, 1, _number(name, "attn_span"),
                                                             r.device, chunk=a.chunk))
    raise SystemExit(f"unknown variant {name!r}")


VARIANTS = ("gemv_joint,nq_w4,nq_w16,gemv_br_half,gemv_br_double,gemv_w8,attn_chunk128,attn_chunk256,"
            "attn_merge8,attn_merge16,attn_fused,attn_fused4,attn_pw2,attn_pw8")


def step_ms(r, step, ctx: int, iters: int) -> float:
    tok = torch.randint(0, r.vocab_size, (1,), device="cuda")
    r.tok_buf[:1].copy_(tok)
    r.pos_buf[:1].fill_(ctx - 1)
    r.rows_buf[:1].fill_(0)
    g, _ = r._capture((r.tok_buf[:1], r.pos_buf[:1], r.rows_buf[:1]), step=step)
    for _ in range(3):
        g.replay()
    return events_ms(g.replay, iters)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="time the whole set this many times (noise)")
    ap.add_argument("--variants", default="", help=f"launch-parameter variants of the step to time "
                    f"(comma-separated, 'a+b' for both; 'all': {VARIANTS})")
    ap.add_argument("--no-doubling", action="store_true", help="only the step and its variants")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_breakdown.py needs a CUDA device", file=sys.stderr)
        return 2
    from bitnet158.kernels.triton.runner import TritonRunner
    from bitnet158.random_model import random_packed_model

    res, save, _ = result_log(args.out)
    model = random_packed_model("2b4t", seed=0, dtype=torch.bfloat16, device="cuda")
    r = TritonRunner(model, batch=1, max_len=4096)
    fill_cache(r)
    n_layers = len(r.layers)
    res.update(ctx=args.ctx, layers=n_layers)
    for rnd in range(args.rounds):
        base = step_ms(r, step_doubling(r, None), args.ctx, args.iters)
        res[f"step_ms_r{rnd}"] = round(base, 4)
        print(f"round {rnd}: step {base:.4f} ms", flush=True)
        for kind in (() if args.no_doubling else KINDS):
            ms = step_ms(r, step_doubling(r, kind), args.ctx, args.iters)
            per = 1 if kind == "head" else n_layers
            res[f"{kind}_doubled_step_ms_r{rnd}"] = round(ms, 4)
            res[f"{kind}_marginal_us_r{rnd}"] = round((ms - base) * 1e3 / per, 2)
        for name in [v for v in (VARIANTS if args.variants == "all" else args.variants).split(",") if v]:
            with contextlib.ExitStack() as stack:
                for part in name.split("+"):            # "a+b": both, applied in that order
                    stack.enter_context(variant(r, part, args.ctx))
                ms = step_ms(r, step_doubling(r, None), args.ctx, args.iters)
            res[f"variant_{name}_step_ms_r{rnd}"] = round(ms, 4)
            res[f"variant_{name}_vs_step_r{rnd}"] = round(ms / base, 3)
            print(f"round {rnd}: {name:16s} {ms:.4f} ms ({ms / base:.3f}x the step)", flush=True)
        save()
    if args.no_doubling:
        print(json.dumps(res))
        return 0
    print(f"{'kernel':10s} " + " ".join(f"{'round ' + str(i):>10s}" for i in range(args.rounds))
          + "   (marginal us a call; head: a step)")
    for kind in KINDS:
        print(f"{kind:10s} " + " ".join(f"{res[f'{kind}_marginal_us_r{i}']:10.2f}" for i in range(args.rounds)))
    for i in range(args.rounds):
        layer = sum(res[f"{k}_marginal_us_r{i}"] for k in KINDS if k != "head")
        res[f"layer_sum_us_r{i}"] = round(layer, 2)
        res[f"sum_ms_r{i}"] = round((layer * n_layers + res[f"head_marginal_us_r{i}"]) / 1e3, 4)
        print(f"round {i}: layer sum {layer:.2f} us, x{n_layers} + head = {res[f'sum_ms_r{i}']:.4f} ms "
              f"against the step's {res[f'step_ms_r{i}']:.4f} ms")
    save()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
