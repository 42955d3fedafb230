"""Top-p's cut on a GPU: digit by digit (the row kernels' default) against sorting the row.

    python3 bench/sampler_cut.py --out bench/results/sampler_cut-<date>-<machine>.json

Times, for each way of finding the cut (``sampling.SORTED_CUT``), one sampler's ``next_id`` through
its CUDA graph on one row of 128256 fp32 logits (temperature 0.8, top-p 0.95) and the batch
scheduler's draw of 64 such rows together (``sampling.next_ids``), us a call by CUDA events, on
Gaussian logits of scale 3 and 12 (a wide and a narrow nucleus). The digits are timed before and
after the sort (``_digits`` is the second). Then the ops a cut by sorting rests on, alone, on 1
and 64 rows of Gaussian logits (times 3): ``torch.sort`` (and stable), ``torch.topk`` of 64 to
4096, ``torch.softmax``. Prints a table, then one JSON line
(``sampler_top_p_b1_x<scale>_<how>_us``, ``rows64_top_p_x<scale>_<how>_us``, ``sort_rows<n>_us``,
``sort_stable_rows<n>_us``, ``topk<k>_rows<n>_us``, ``softmax_rows<n>_us``).
"""

from __future__ import annotations

import argparse
import json

import torch

from bitnet158.engine import sampling, sampling_graph
from bitnet158.engine.sampling import Sampler, SamplingParams

V = 128256


def events_us(f, n: int = 200) -> float:
    for _ in range(10):
        f()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        f()
    e.record()
    torch.cuda.synchronize()
    return round(s.elapsed_time(e) / n * 1e3, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the JSON line here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sampler_cut: needs a CUDA device")
    out = {"device": torch.cuda.get_device_name()}
    params = dict(temperature=0.8, top_p=0.95)
    for sort in (False, True, False):
        sampling.SORTED_CUT = sort
        sampling_graph._graphs.clear()                       # graphs captured with this cut
        how = "sort" if sort else "digits"
        for scale in (3.0, 12.0):
            x = torch.randn(V, device="cuda") * scale                                   # [V]
            one = Sampler(SamplingParams(seed=0, **params), V, device="cuda")
            out[f"sampler_top_p_b1_x{int(scale)}_{how}_us"] = events_us(lambda: one.next_id(x))
            xs = torch.randn(64, V, device="cuda") * scale                              # [64, V]
            many = [Sampler(SamplingParams(seed=i, **params), V, device="cuda") for i in range(64)]
            out[f"rows64_top_p_x{int(scale)}_{how}_us"] = events_us(lambda: sampling.next_ids(many, xs), 50)
    sampling.SORTED_CUT = False
    ops = ["sort", "sort_stable", *(f"topk{k}" for k in (64, 256, 1024, 4096)), "softmax"]
    for n in (1, 64):
        x = torch.randn(n, V, device="cuda") * 3                                         # [n, V]
        out[f"sort_rows{n}_us"] = events_us(lambda: torch.sort(x, dim=-1, descending=True), 50)
        out[f"sort_stable_rows{n}_us"] = events_us(lambda: torch.sort(x, dim=-1, descending=True, stable=True), 50)
        for k in (64, 256, 1024, 4096):
            out[f"topk{k}_rows{n}_us"] = events_us(lambda: torch.topk(x, k, dim=-1), 50)
        out[f"softmax_rows{n}_us"] = events_us(lambda: torch.softmax(x, -1), 50)
    print(f"{'case':<22}{'digits us':>11}{'sort us':>10}")
    for case in ("sampler_top_p_b1_x3", "sampler_top_p_b1_x12", "rows64_top_p_x3", "rows64_top_p_x12"):
        print(f"{case:<22}{out[f'{case}_digits_us']:>11}{out[f'{case}_sort_us']:>10}")
    print(f"{'op':<22}{'1 row us':>11}{'64 rows us':>12}")
    for op in ops:
        print(f"{op:<22}{out[f'{op}_rows1_us']:>11}{out[f'{op}_rows64_us']:>12}")
    line = json.dumps(out)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
