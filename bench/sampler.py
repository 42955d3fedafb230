"""Time of the next-token sampler a token, on the CPU (or a GPU), at the 2B4T vocabulary.

    python3 bench/sampler.py                                  # CPU, V = 128256
    python3 bench/sampler.py --out bench/results/sampler-2026-12-07-epyc-2core.json
    python3 bench/sampler.py --profile --device cuda         # per-op table of one sampled token

``Sampler.next_id`` on random logits ``N(0, scale^2)`` (scale 2: flat, the nucleus runs past the
top candidates; 4 and 8: peaked, as a trained model's usually are) with the embedded default
model's generation config (temperature 0.7, top-p 0.9, repetition penalty 1.15), beside the same
sampler with the top-p candidates off (the full sort of every logit) and the greedy argmax. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from bitnet158.engine import sampling
from bitnet158.engine.sampling import Sampler, SamplingParams

PARAMS = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.15)
SCALES = (2.0, 4.0, 8.0)


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def per_token_ms(params: SamplingParams, logits: list[torch.Tensor], device: str) -> float:
    """Mean ms of one ``next_id`` over ``logits`` (the id read back, as generation does)."""
    s = Sampler(params, logits[0].shape[-1], prompt_ids=range(50), device=device)
    int(s.next_id(logits[0]))
    t0 = time.perf_counter()
    for x in logits:
        int(s.next_id(x))
    return (time.perf_counter() - t0) / len(logits) * 1e3


def profile(vocab: int, device: str, calls: int = 20) -> int:
    """Per-op device and host time of ``calls`` eager sampled tokens (the CUDA graph off)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    keep, sampling.GRAPHS = sampling.GRAPHS, False
    try:
        logits = (torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 4).to(device)
        s = Sampler(SamplingParams(seed=0, temperature=0.8, top_p=0.95), vocab, device=device)
        for _ in range(3):
            s.next_id(logits)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(calls):
                s.next_id(logits)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        key = "device_time_total" if device.startswith("cuda") else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))
    finally:
        sampling.GRAPHS = keep
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokens", type=int, default=30, help="logits rows timed per case")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--profile", action="store_true", help="print the per-op table (torch.profiler) of "
                    "the eager sampler with top-p on --device, then exit")
    args = ap.parse_args(argv)
    if args.profile:
        return profile(args.vocab, args.device)
    if args.vocab < 2 or args.tokens < 1:
        ap.error(f"--vocab must be >= 2 and --tokens >= 1 (got {args.vocab}, {args.tokens})")
    res = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
           "threads": torch.get_num_threads(), "vocab": args.vocab, "torch": torch.__version__}
    candidates = sampling.TOP_P_CANDIDATES
    print(f"{'logits':12s} {'top-p (ms)':>11s} {'full sort (ms)':>15s} {'greedy (ms)':>12s}")
    for scale in SCALES:
        g = torch.Generator().manual_seed(0)
        logits = [(torch.randn(args.vocab, generator=g) * scale).to(args.device) for _ in range(args.tokens)]
        sampled = SamplingParams(seed=0, **PARAMS)
        key = f"scale{scale:g}"
        res[f"top_p_ms_{key}"] = round(per_token_ms(sampled, logits, args.device), 3)
        sampling.TOP_P_CANDIDATES = 1 << 62
        try:
            res[f"top_p_full_sort_ms_{key}"] = round(per_token_ms(sampled, logits, args.device), 3)
        finally:
            sampling.TOP_P_CANDIDATES = candidates
        res[f"greedy_ms_{key}"] = round(per_token_ms(SamplingParams(), logits, args.device), 3)
        res[f"top_p_speedup_{key}"] = round(res[f"top_p_full_sort_ms_{key}"] / res[f"top_p_ms_{key}"], 2)
        print(f"N(0, {scale:g}^2)   {res[f'top_p_ms_{key}']:11.3f} {res[f'top_p_full_sort_ms_{key}']:15.3f} "
              f"{res[f'greedy_ms_{key}']:12.3f}")
    line = json.dumps(res)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
