"""Training step time and peak memory: bf16 nn.Linear vs reference BitLinear vs fused BitLinear.

    PYTHONPATH=src python bench/train_step.py --sizes 125m,350m --batch 8 --seq 2048 \\
        --data .carry/gutenberg --loss-steps 200 --json-out /tmp/train_step.json

One process, one GPU, the same batch for every variant (bf16 autocast, fp32 master weights,
torch's fused AdamW, no activation checkpointing, eager):

- ``bf16``: ``nn.Linear`` projections, head + ``F.cross_entropy`` on the full logits (what
  ``pretrain`` runs for ``model.linear = "linear"``): the baseline;
- ``bf16_fused_ce``: the same with the fused head loss (``losses.fused_linear_cross_entropy``);
- ``reference``: ``layers.BitLinear`` (fake-quant torch ops), full-logits cross-entropy;
- ``fused``: ``use_fused_bitlinear`` (RMSNorm + int8 quant kernel, int8 GEMM, STE backward) and the
  fused head loss; ``fused_plain_ce`` the fused layers with the full-logits loss;
  ``fused_cublas_fwd`` the fused path with the forward product on cuBLAS bf16 instead of Triton int8.

Per variant: median step time over ``--steps`` timed steps after ``--warmup`` (CUDA events around
each whole step: forward, backward, optimizer), and peak allocated memory over the timed steps.
Then ``--loss-steps`` steps of the reference and the fused path from the same initial weights on the
same batches (Gutenberg shards if ``--data`` is given, else random tokens): the max relative
difference of the loss over the curve. ``--compile-check`` also compiles a fused model
(``torch.compile``, inductor) and compares its loss and gradients with eager.

Prints a table, then one JSON line (flat keys).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from bitnet158.config import ModelConfig  # noqa: E402
from bitnet158.kernels import bitlinear_train as bt  # noqa: E402
from bitnet158.model import Transformer, init_weights  # noqa: E402
from bitnet158.train.losses import fused_linear_cross_entropy  # noqa: E402
from bitnet158.train.pretrain import make_full_precision, param_groups  # noqa: E402

VARIANTS = ("bf16", "bf16_fused_ce", "reference", "fused", "fused_plain_ce", "fused_cublas_fwd")


def build(size: str, variant: str, seed: int = 0, **over) -> Transformer:
    cfg = ModelConfig.from_name(size, dtype="float32", quantization_mode="online", **over)
    torch.manual_seed(seed)
    model = init_weights(Transformer(cfg), std=0.02)
    if variant.startswith("bf16"):
        make_full_precision(model)
    elif variant.startswith("fused"):
        bt.use_fused_bitlinear(model)
    return model.cuda()


def loss_fn(variant: str):
    fused_ce = variant in ("bf16_fused_ce", "fused", "fused_cublas_fwd")

    def f(model, batch):
        x, y = batch[:, :-1], batch[:, 1:]
        if fused_ce:
            h = model.hidden(x)
            return fused_linear_cross_entropy(h.flatten(0, 1), model.head_weight, y.reshape(-1))
        logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    return f


def make_opt(model, lr=1.5e-3):
    groups = param_groups(model)
    groups[0]["weight_decay"], groups[1]["weight_decay"] = 0.1, 0.0
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def step(model, opt, lf, batch) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = lf(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def time_variant(size, variant, batch, warmup, steps) -> dict:
    bt.GEMM = "bf16" if variant == "fused_cublas_fwd" else "triton"
    model = build(size, variant)
    opt = make_opt(model)
    lf = loss_fn(variant)
    for _ in range(warmup):
        step(model, opt, lf, batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times, losses = [], []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        losses.append(step(model, opt, lf, batch))
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    ms = [a.elapsed_time(b) for a, b in times]
    out = {"step_ms": float(np.median(ms)), "step_ms_min": float(np.min(ms)),
           "step_ms_max": float(np.max(ms)),
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
           "state_mem_gb": base / 2**30, "loss_last": float(losses[-1])}
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    bt.GEMM = "triton"
    return out


def batches_from(data: str | None, n: int, B: int, T: int, vocab: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    if data:
        from bitnet158.train.data import TokenShards
        sh = TokenShards(data, "train")
        nw = sh.num_windows(T)
        for _ in range(n):
            yield torch.from_numpy(sh.windows(rng.integers(0, nw, B), T)).cuda()
    else:
        for _ in range(n):
            yield torch.from_numpy(rng.integers(0, vocab, (B, T + 1))).cuda()


def loss_curves(size, B, T, steps, data) -> dict:
    curves = {}
    for variant in ("reference", "fused"):
        model = build(size, variant)
        opt = make_opt(model)
        lf = loss_fn(variant)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
        ls = []
        for batch in batches_from(data, steps, B, T, model.config.vocab_size):
            ls.append(step(model, opt, lf, batch))
            sched.step()
        curves[variant] = [float(v) for v in torch.stack(ls).cpu()]
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    r, f = np.array(curves["reference"]), np.array(curves["fused"])
    rel = np.abs(f - r) / np.abs(r)
    k = max(1, steps // 10)
    return {"loss_steps": steps, "loss_max_rel_diff": float(rel.max()),
            "loss_mean_rel_diff": float(rel.mean()),
            "loss_last10pct_max_rel_diff": float(rel[-k:].max()),
            "loss_ref_first": float(r[0]), "loss_ref_last": float(r[-1]),
            "loss_fused_last": float(f[-1]), "curve_reference": curves["reference"],
            "curve_fused": curves["fused"]}


def kernel_checks() -> dict:
    """GPU parity of the kernels with the torch reference (integers exactly)."""
    from bitnet158 import quant
    from bitnet158.kernels.norm_bitlinear import _rms_quant_torch
    from bitnet158.kernels.triton import bitlinear_train as tk
    from bitnet158.kernels.triton import norm_quant_train as nq
    from bitnet158.train.losses import ce_rows
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for (M, N, K) in ((4096, 2304, 768), (333, 100, 2816), (4096, 1024, 2816)):
        xq = torch.randint(-128, 128, (M, K), device="cuda", generator=g, dtype=torch.int8)
        wt = torch.randint(-1, 2, (N, K), device="cuda", generator=g, dtype=torch.int8)
        y = tk.int8_linear(xq, torch.ones(M, device="cuda"), wt, torch.ones((), device="cuda"))
        ref = (xq.double() @ wt.double().t())
        out[f"gemm_exact_{M}x{N}x{K}"] = bool(torch.equal(y.double(), ref))
    w = torch.randn(2304, 768, device="cuda", generator=g) * 0.02
    q1, g1 = tk.ternarize(w)
    q0, g0 = quant.ternarize(w)
    out["ternarize_mismatch"] = int((q1 != q0).sum())
    out["gamma_rel"] = float((g1 - g0).abs() / g0)
    x = torch.randn(4096, 768, device="cuda", generator=g)
    nw = torch.rand(768, device="cuda", generator=g) + 0.5
    a, s, r = nq.rms_quant(x, nw, 1e-5)
    a0, s0, r0 = _rms_quant_torch(x, nw, 1e-5)
    out["rms_quant_int_mismatch"] = int((a != a0).sum())
    out["rms_quant_max_int_diff"] = int((a.int() - a0.int()).abs().max())
    z = torch.randn(512, 32768, device="cuda", generator=g).to(torch.bfloat16) * 3
    lab = torch.randint(0, 32768, (512,), device="cuda", generator=g)
    nll = ce_rows(z.clone(), lab, write_grad=False)
    nll0 = F.cross_entropy(z.float(), lab, reduction="none")
    out["ce_rows_rel"] = float((nll - nll0).abs().max() / nll0.abs().max())
    return out


def compile_check(B=4, T=512, layers=2) -> dict:
    """torch.compile (inductor) of a fused 125m-wide model (``layers`` blocks, to keep the compile
    short): loss and gradients vs eager on one batch, graph breaks counted."""
    torch._dynamo.reset()
    model = build("125m", "fused", num_hidden_layers=layers)
    batch = next(batches_from(None, 1, B, T, model.config.vocab_size))
    lf = loss_fn("fused")

    def run(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lf(m, batch)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    le, ge = run(model)
    t0 = time.time()
    cm = torch.compile(model)
    cm.hidden = torch.compile(model.hidden)
    from torch._dynamo.utils import counters
    counters.clear()
    lc, gc_ = run(cm)
    t_compile = time.time() - t0
    lc2, _ = run(cm)
    rel = max(float((gc_[n] - ge[n]).norm() / ge[n].norm().clamp(min=1e-30)) for n in ge)
    breaks = sum(counters["graph_break"].values())
    return {"compile_ok": True, "compile_s": t_compile, "compile_layers": layers, "compile_batch": B,
            "compile_seq": T, "compile_loss_eager": le,
            "compile_loss_compiled": lc, "compile_loss_rel": abs(lc - le) / abs(le),
            "compile_grad_max_rel_norm": rel, "compile_graph_breaks": int(breaks)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="125m,350m")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--loss-steps", type=int, default=200)
    ap.add_argument("--loss-size", default="125m")
    ap.add_argument("--data", default=None, help="token shard folder for the loss curves")
    ap.add_argument("--compile-check", action="store_true")
    ap.add_argument("--no-checks", action="store_true", help="skip the kernel parity checks")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass
    t0 = time.time()

    def save():
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")

    try:
        if not args.no_checks:
            res.update({f"check_{k}": v for k, v in kernel_checks().items()})
    except Exception:
        res["check_error"] = traceback.format_exc()[-2000:]
    print({k: v for k, v in res.items() if k.startswith("check")}, flush=True)
    batch0 = {}
    sizes = [s for s in args.sizes.split(",") if s]
    for size in sizes:
        vocab = ModelConfig.from_name(size).vocab_size
        batch = next(batches_from(None, 1, args.batch, args.seq, vocab, seed=123))
        for v in args.variants.split(","):
            try:
                r = time_variant(size, v, batch, args.warmup, args.steps)
            except Exception:
                res[f"{size}_{v}_error"] = traceback.format_exc()[-2000:]
                print(res[f"{size}_{v}_error"], flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            for k, val in r.items():
                res[f"{size}_{v}_{k}"] = val
            print(f"{size:5s} {v:17s} step {r['step_ms']:8.2f} ms (min {r['step_ms_min']:.2f})  "
                  f"peak {r['peak_mem_gb']:6.2f} GB  loss {r['loss_last']:.4f}  [{time.time() - t0:.0f}s]",
                  flush=True)
            save()
        base = res.get(f"{size}_bf16_step_ms")
        for v in args.variants.split(","):
            if base and f"{size}_{v}_step_ms" in res:
                res[f"{size}_{v}_step_vs_bf16"] = res[f"{size}_{v}_step_ms"] / base
                res[f"{size}_{v}_mem_vs_bf16"] = (res[f"{size}_{v}_peak_mem_gb"]
                                                  / res[f"{size}_bf16_peak_mem_gb"])
        batch0[size] = batch
    save()
    if args.loss_steps:
        try:
            lc = loss_curves(args.loss_size, args.batch, args.seq, args.loss_steps, args.data)
            res.update({f"{args.loss_size}_{k}": v for k, v in lc.items()})
            res["loss_data"] = "gutenberg shards" if args.data else "random tokens"
        except Exception:
            res["loss_error"] = traceback.format_exc()[-2000:]
            print(res["loss_error"], flush=True)
        save()
    if args.compile_check:
        try:
            res.update(compile_check())
        except Exception:
            res["compile_ok"] = False
            res["compile_error"] = traceback.format_exc()[-3000:]
            print(res["compile_error"], flush=True)
        save()
    res["wall_s"] = time.time() - t0
    print()
    print(f"{'size':5s} {'variant':17s} {'step_ms':>9s} {'x bf16':>7s} {'peak_GB':>8s} {'x bf16':>7s}")
    for size in sizes:
        for v in args.variants.split(","):
            k = f"{size}_{v}"
            if f"{k}_step_ms" in res:
                print(f"{size:5s} {v:17s} {res[k + '_step_ms']:9.2f} {res.get(k + '_step_vs_bf16', 0):7.3f} "
                      f"{res[k + '_peak_mem_gb']:8.2f} {res.get(k + '_mem_vs_bf16', 0):7.3f}")
    ls = f"{args.loss_size}_loss_max_rel_diff"
    if ls in res:
        print(f"loss curves ({args.loss_steps} steps, {res['loss_data']}): max rel diff "
              f"{res[ls]:.4%}, last {res[args.loss_size + '_loss_ref_last']:.4f} (ref) vs "
              f"{res[args.loss_size + '_loss_fused_last']:.4f} (fused)")
    flat = {k: v for k, v in res.items() if not isinstance(v, list) and not k.endswith("_error")}
    save()
    print(json.dumps(flat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
