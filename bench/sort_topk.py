"""torch.sort against torch.topk on fp32 logits rows of the 2B4T vocabulary, on a GPU.

    python3 bench/sort_topk.py --out bench/results/sort_topk-<date>-<machine>.json

What top-p's cut costs by a full sort against looking among the top k first, on 1 and 64 rows of
[n, 128256] Gaussian logits (times 3): us a call, CUDA events over 50 back-to-back calls after 5
warm-up calls. Prints a table, then one JSON line (``sort_rows<n>_us``, ``sort_stable_rows<n>_us``,
``topk<k>_rows<n>_us``, ``softmax_rows<n>_us``).
"""

from __future__ import annotations

import argparse
import json

import torch


def events_us(f, reps: int = 50) -> float:
    for _ in range(5):
        f()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(reps):
        f()
    e.record()
    torch.cuda.synchronize()
    return round(s.elapsed_time(e) / reps * 1e3, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--out", default=None, help="write the JSON line here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sort_topk: needs a CUDA device")
    out = {"device": torch.cuda.get_device_name(), "vocab": args.vocab}
    for n in (1, 64):
        x = torch.randn(n, args.vocab, device="cuda") * 3                 # [n, V]
        out[f"sort_rows{n}_us"] = events_us(lambda: torch.sort(x, dim=-1, descending=True))
        out[f"sort_stable_rows{n}_us"] = events_us(lambda: torch.sort(x, dim=-1, descending=True, stable=True))
        for k in (64, 256, 1024, 4096):
            out[f"topk{k}_rows{n}_us"] = events_us(lambda: torch.topk(x, k, dim=-1))
        out[f"softmax_rows{n}_us"] = events_us(lambda: torch.softmax(x, -1))
    print(f"{'op':<24}{'1 row us':>10}{'64 rows us':>12}")
    for op in ["sort", "sort_stable", *(f"topk{k}" for k in (64, 256, 1024, 4096)), "softmax"]:
        print(f"{op:<24}{out[f'{op}_rows1_us']:>10}{out[f'{op}_rows64_us']:>12}")
    line = json.dumps(out)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
