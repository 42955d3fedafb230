"""Load time, resident memory, prefill and decode speed of a random model with exact 2B4T shapes.

    python3 bench/load_and_generate.py                      # torch reference runner, 2 threads, bf16
    python3 bench/load_and_generate.py --backend auto --decode-tokens 64 --save   # fastest engine

Builds a packed model with random ternary weights directly in memory (no latent float weights, no
download), then times a 128-token prefill and greedy decoding through the generation engine with
the chosen runner. Prints a table, then one JSON line; ``--save`` writes it to
``bench/results/load_and_generate-2026-11-25-<machine>.json``. Memory is read from
/proc/self/status (VmRSS now, VmHWM peak). ``tg_weight_gb_s`` is the bytes of the stored model a
token must read (packed ternary weights + head) times the decode rate: a bandwidth-bound engine
approaches the machine's read bandwidth (SPEC §6).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bitnet158.config import ModelConfig
from bitnet158.engine import SamplingParams, generate, make_runner
from bitnet158.model import Transformer

ROOT = Path(__file__).resolve().parent


def proc_status_gb(key: str) -> float:
    """VmRSS / VmHWM of this process in GB (from /proc; 0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_family_model() -> str:
    """'family/model' from /proc/cpuinfo (e.g. '6/167'), '' where unknown."""
    fam = model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu family") and not fam:
                fam = line.split(":")[1].strip()
            if line.startswith("model\t") and not model:
                model = line.split(":")[1].strip()
    except OSError:
        pass
    return f"{fam}/{model}" if fam else ""


def machine_name() -> str:
    """Short machine tag for the results file, as the other benches name it: 'xeon-2core'."""
    words = [w.lower() for w in cpu_name().replace("(R)", "").replace("(TM)", "").split()]
    brand = next((w for w in words if w in ("xeon", "epyc", "ryzen", "core", "neoverse")),
                 words[0] if words else platform.machine())
    return f"{brand}-{os.cpu_count()}core"


def build_random_packed(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A packed 2B4T-shaped model with random ternary weights, never holding float latents."""
    try:
        from bitnet158.random_model import random_packed_model
    except ImportError:
        random_packed_model = None
    if random_packed_model is not None:
        return random_packed_model(cfg, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg, packed=True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith("proj.weight"):               # uint8 [out/4, in]: 4 fields in {0, 1, 2}
                for r in range(0, t.shape[0], 256):
                    f = torch.randint(0, 4, (4, *t[r:r + 256].shape), generator=g, dtype=torch.uint8)
                    f[f == 3] = 1                            # P(0) = P(2) = 1/4, P(1) = 1/2 (w = 0)
                    t[r:r + 256] = f[0] | f[1] << 2 | f[2] << 4 | f[3] << 6
            elif name.endswith("weight_scale"):
                t.fill_(0.02)
        for name, p in model.named_parameters():            # embeddings and norms in `dtype`;
            if name.endswith("norm.weight"):                   # packed scales stay fp32
                p.data = torch.ones(p.shape, dtype=dtype)
            else:
                p.data = torch.empty(p.shape, dtype=dtype).normal_(0.0, 0.02, generator=g)
        from bitnet158.model import rope_tables
        model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings,
                                                     cfg.rope_theta)
    return model.eval().requires_grad_(False)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def weight_bytes(model: Transformer) -> tuple[int, int]:
    """(packed ternary bytes, head bytes) read per decoded token."""
    packed = sum(m.weight.numel() for _, m in model.projections())
    head = model.head_weight.numel() * model.head_weight.element_size()
    return packed, head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="torch", help="runner: torch (reference), auto, cpu, ...")
    ap.add_argument("--kernel", default="reference", choices=["reference", "auto"],
                    help="ternary-linear kernel under the torch runner: the plain-torch reference "
                         "(the baseline) or the best registered one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="cut decoding short (fewer tokens) if it would take longer than this")
    ap.add_argument("--save", action="store_true", help="write the JSON to bench/results/")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from bitnet158 import kernels
    if args.kernel == "reference":
        kernels._BACKENDS.clear()       # projections use bitnet158.kernels.reference (quant.py math)
    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig.from_name("2b4t")
    rss0 = proc_status_gb("VmRSS")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    t0 = time.perf_counter()
    model = build_random_packed(cfg, dtype)
    build_s = time.perf_counter() - t0
    log(f"built the random 2B4T model in {build_s:.1f} s")
    rss_model = proc_status_gb("VmRSS")
    packed_b, head_b = weight_bytes(model)

    P, N = args.prefill_tokens, args.decode_tokens
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (P,), generator=g).tolist()
    t0 = time.perf_counter()
    runner = make_runner(model, batch=1, max_len=P + N + 16, backend=args.backend)
    # warm-up: the first call lets the kernel backend build its weight layout (timed apart)
    runner.prefill(torch.tensor([prompt[:8]]), torch.arange(8)[None])
    prepare_s = time.perf_counter() - t0
    log(f"runner ready in {prepare_s:.1f} s")
    rss_ready = proc_status_gb("VmRSS")

    t0 = time.perf_counter()
    runner.prefill(torch.tensor([prompt]), torch.arange(P)[None])
    pp_s = time.perf_counter() - t0
    log(f"prefill of {P} tokens: {pp_s:.1f} s")

    # time one decode step to fit the token count into the budget
    t0 = time.perf_counter()
    runner.decode(torch.tensor([5]), torch.tensor([P]))
    step_s = time.perf_counter() - t0
    n_dec = max(3, min(N, int(args.budget_s / max(step_s, 1e-6))))
    log(f"decode step {step_s:.2f} s: timing {n_dec} tokens")
    gen = generate(runner, prompt, SamplingParams(max_new_tokens=n_dec + 1, stop_ids=[]))
    gen.run()
    tg = gen.decode_tok_s
    steps = gen.decode_steps

    res = {
        "bench": "load_and_generate",
        "model": "random-2b4t-packed",
        "backend": getattr(runner, "name", type(runner).__name__),
        "kernel": kernels.select(torch.zeros(1, cfg.hidden_size, dtype=dtype)).name,
        "dtype": args.dtype,
        "threads": args.threads,
        "cpu": cpu_name(),
        "cpu_family_model": cpu_family_model(),
        "machine": machine_name(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        # CPU time this process got / (wall time x threads): < 1 when other processes share the cores
        "cpu_share": round((time.process_time() - cpu0) / ((time.perf_counter() - wall0) * args.threads), 3),
        "build_s": round(build_s, 3),
        "prepare_s": round(prepare_s, 3),
        "rss_model_gb": round(rss_model - rss0, 3),
        "rss_gb": round(proc_status_gb("VmRSS"), 3),
        "rss_ready_gb": round(rss_ready, 3),
        "peak_rss_gb": round(proc_status_gb("VmHWM"), 3),
        "packed_weights_gb": round(packed_b / 1e9, 3),
        "head_gb": round(head_b / 1e9, 3),
        "pp_tokens": P,
        f"pp{P}_s": round(pp_s, 3),
        f"pp{P}_tok_s": round(P / pp_s, 3),
        "tg_tokens": steps,
        "tg_tok_s": round(tg, 3),
        "tg_ms_per_token": round(1000 / tg, 1) if tg else math.inf,
        "tg_weight_gb_s": round((packed_b + head_b) * tg / 1e9, 3),
        "first_token_s": round(gen.prefill_s, 3),
    }
    rows = [("model build (load) time", f"{build_s:.2f} s"),
            ("runner prepare + warm-up", f"{prepare_s:.2f} s"),
            ("RSS: model / ready / end / peak",
             f"{res['rss_model_gb']:.2f} / {rss_ready:.2f} / {res['rss_gb']:.2f} / {res['peak_rss_gb']:.2f} GB"),
            ("weights read per token", f"{packed_b / 1e9:.3f} GB packed + {head_b / 1e9:.3f} GB head"),
            (f"prefill {P} tokens", f"{pp_s:.2f} s = {P / pp_s:.2f} tok/s"),
            (f"decode {steps} tokens", f"{tg:.3f} tok/s = {res['tg_ms_per_token']} ms/token"),
            ("decode weight bandwidth", f"{res['tg_weight_gb_s']:.2f} GB/s"),
            ("runner / kernel / threads / dtype",
             f"{res['backend']} / {res['kernel']} / {args.threads} / {args.dtype}"),
            ("cpu", f"{res['cpu']} (load avg {res['load_avg_1m']}, "
                    f"this process got {100 * res['cpu_share']:.0f}% of {args.threads} cores)")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    line = json.dumps(res)
    if args.save:
        out = ROOT / "results" / f"load_and_generate-2026-11-25-{res['machine']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
