"""Top-p's draw on a GPU: the nucleus race (the default) against the cut digit by digit and the sort.

    python3 bench/sampler_cut.py --out bench/results/sampler_cut-<date>-<machine>.json

On Gaussian logits of scale 3 and 12 (a wide and a narrow nucleus; temperature 0.8, top-p 0.95)
of 1, 8 and 64 rows of 128256, times the keyed draw (``sampling.keyed_draw``) four ways, each
eager and replayed from a CUDA graph (us a call back to back, CUDA events):

- ``nucleus``: ``rows.race_top_p``, the race's winner tested against the mass above it;
- ``cut``: the same with no candidate round (the cut digit by digit for every row, then the race
  above it);
- ``sort``: the cut by sorting the rows (``sampling.SORTED_CUT``), then the race above it;
- ``mask``: the cut digit by digit, the logits masked and the race over the softmax of what is
  left (``race(sampling_probs(...))``: the draw before the nucleus race).

Each way's ids are checked equal to the nucleus race's (``<rows>_x<scale>_<way>_same_ids``). Then
the batch scheduler's draw of 64 rows (``sampling.next_ids``, the ids read back) with its graphs
on and off, for top-p and temperature only, and the nucleus race's graph at 64 rows for several
launch widths of its rounds (``rows.ROUND_PROGRAMS``). Prints a table, then one JSON line
(``rows<n>_x<scale>_<way>_<eager|graph>_us``, ``next_ids_rows64_<case>_<graph|eager>_us``,
``nucleus_rows64_programs<k>_graph_us``).
"""

from __future__ import annotations

import argparse
import json

import torch

from bitnet158.engine import row_ops, sampling
from bitnet158.engine.sampling import Sampler, SamplingParams

V = 128256
PARAMS = SamplingParams(temperature=0.8, top_p=0.95)


def events_us(f, n: int = 50) -> float:
    for _ in range(5):
        f()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        f()
    e.record()
    torch.cuda.synchronize()
    return round(s.elapsed_time(e) / n * 1e3, 1)


def graph_us(body) -> float:
    """``body`` captured in a CUDA graph (after a warm-up on a side stream), us a replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return events_us(g.replay)


def ways(x: torch.Tensor, state: torch.Tensor) -> dict:
    """The draws of logits x [n, V] with keys state [n, 2], each a function of no arguments."""
    from bitnet158.kernels.triton import rows

    def with_cut(sort: bool, f):
        def run():
            keep, sampling.SORTED_CUT = sampling.SORTED_CUT, sort
            try:
                return f()
            finally:
                sampling.SORTED_CUT = keep
        return run

    def cut_only():
        lg = x / PARAMS.temperature
        return rows.race_top_p(lg, row_ops.softmax(lg), PARAMS.top_p, state, rounds=0)
    return {"nucleus": with_cut(False, lambda: sampling.keyed_draw(x, PARAMS, None, state)),
            "cut": cut_only,
            "sort": with_cut(True, lambda: sampling.keyed_draw(x, PARAMS, None, state)),
            "mask": with_cut(False, lambda: row_ops.race(sampling.sampling_probs(x, PARAMS, None), state))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the JSON line here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sampler_cut: needs a CUDA device")
    from bitnet158.kernels.triton import rows
    out = {"device": torch.cuda.get_device_name()}
    for n in (1, 8, 64):
        for scale in (3.0, 12.0):
            x = torch.randn(n, V, device="cuda") * scale                                    # [n, V]
            state = torch.stack([torch.arange(n) * 7919 + 1, torch.full((n,), 5)], dim=1).cuda()  # [n, 2]
            fs = ways(x, state)
            want = fs["nucleus"]()
            for way, f in fs.items():
                tag = f"rows{n}_x{int(scale)}_{way}"
                out[f"{tag}_same_ids"] = bool(torch.equal(f(), want))
                out[f"{tag}_eager_us"] = events_us(f)
                out[f"{tag}_graph_us"] = graph_us(f)
    x = torch.randn(64, V, device="cuda") * 3
    for case, params in (("top_p", dict(temperature=0.8, top_p=0.95)), ("temperature", dict(temperature=0.8))):
        keep = sampling.GRAPHS
        for graphs, tag in ((True, "graph"), (False, "eager")):
            sampling.GRAPHS = graphs
            many = [Sampler(SamplingParams(seed=i, **params), V, device="cuda") for i in range(64)]
            out[f"next_ids_rows64_{case}_{tag}_us"] = events_us(lambda: sampling.next_ids(many, x).tolist())
        sampling.GRAPHS = keep
    state = torch.stack([torch.arange(64) * 7919 + 1, torch.full((64,), 5)], dim=1).cuda()
    keep = rows.ROUND_PROGRAMS
    for k in (0, 1024, 2048, 4096):
        rows.ROUND_PROGRAMS = k
        out[f"nucleus_rows64_programs{k}_graph_us"] = graph_us(lambda: sampling.keyed_draw(x, PARAMS, None, state))
    rows.ROUND_PROGRAMS = keep
    print(f"{'rows, scale':<14}" + "".join(f"{w + ' eager/graph us':>28}" for w in ("nucleus", "cut", "sort", "mask")))
    for n in (1, 8, 64):
        for scale in (3, 12):
            cells = [f"{out[f'rows{n}_x{scale}_{w}_eager_us']}/{out[f'rows{n}_x{scale}_{w}_graph_us']}"
                     + ("" if out[f"rows{n}_x{scale}_{w}_same_ids"] else " (ids differ)")
                     for w in ("nucleus", "cut", "sort", "mask")]
            print(f"{f'{n}, x{scale}':<14}" + "".join(f"{c:>28}" for c in cells))
    for k, v in out.items():
        if k.startswith(("next_ids", "nucleus_rows64")):
            print(f"{k:<44}{v:>10}")
    line = json.dumps(out)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
