"""Continuous batching throughput: aggregate decode speed of the server's batch engine vs. concurrency.

    python3 bench/serve_batch.py                                  # random 2B4T shapes, CPU, 1/2/4 clients
    python3 bench/serve_batch.py --device cuda --concurrency 1,4,16,32 --gen-tokens 64 --save
    python3 bench/serve_batch.py --model path/to/folder          # a real model folder
    python3 bench/serve_batch.py --device cuda --concurrency 8,64 --sampling greedy,top_p,top_p_rows
    python3 bench/serve_batch.py --device cuda --concurrency 64 --sampling greedy,greedy_sync,top_p,top_p_sync
    python3 bench/serve_batch.py --device cuda --concurrency 8,64 --sampling greedy,greedy_together

Drives :class:`bitnet158.engine.batch.BatchEngine` (what ``bitnet158 serve`` runs behind HTTP) with
``c`` requests submitted at once on a runner of ``c`` rows (one runner a concurrency, warmed up
with the timed shapes first, as a running server's is): each request has its own random
``--prompt-tokens`` prompt (``--prompt-spread s``: of a length drawn from prompt-tokens +- s each
run, so the timed prompts' padded shapes need not be the warm-up's, as a server meets them) and
decodes ``--gen-tokens`` tokens (end-of-text ignored). Reported per
concurrency: wall time, aggregate tokens/s (all requests), per-request tokens/s, time to first
token (median / max, including the wait for the other prompts' prefills) and ms per decode step.
``--sampling`` picks how the requests sample: ``greedy``; ``top_p`` (temperature 0.8, top-p 0.95,
a seed per request: the rows drawn together, ``sampling.next_ids``); ``top_p_rows`` (the same,
each row drawn by its own sampler in turn, as before the batched draw); ``top_p_sort`` (drawn
together, top-p's cut found by sorting the rows, ``sampling.SORTED_CUT``); any of them with ``_sync``
(``greedy_sync``): the engine with ``queued=False``, each step's tokens handed out before the next
step is queued (on a GPU the engine queues a step before it hands out the previous one's); any of
them with ``_together`` (``greedy_together``): the prompts admitted together share prefill calls
(``prefill_together=True``) instead of one call each (the engine's default; the 2026-12-07 results
name it the other way round: ``_alone`` one call each, the plain modes shared). Prints a table, then one
JSON line (keys ``c<clients>_<quantity>`` for greedy, ``c<clients>_<sampling>_<quantity>``
otherwise); ``--save`` writes ``bench/results/serve_batch-<date>-<machine>.json``, ``--out`` a
given path. No HTTP: the server adds per-token JSON/SSE work on top; this isolates the engine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from bitnet158.engine import SamplingParams, make_runner, sampling, sampling_graph
from bitnet158.engine.batch import BatchEngine

SAMPLING = {"greedy": dict(), "top_p": dict(temperature=0.8, top_p=0.95), "top_p_rows": dict(temperature=0.8, top_p=0.95)}
SAMPLING["top_p_sort"] = SAMPLING["top_p"]
SAMPLING.update({f"{k}{x}": v for k, v in list(SAMPLING.items()) for x in ("_sync", "_together", "_sync_together")})


def build_model(args):
    if args.model:
        from bitnet158.checkpoint import load
        return load(args.model, device=args.device)
    from bitnet158.random_model import random_packed_model
    return random_packed_model("2b4t", seed=0, device=args.device)


def run_level(runner, model, c: int, prompt_tokens: int, gen_tokens: int, seed: int,
              mode: str = "greedy", spread: int = 0) -> dict:
    sampling.BATCH_DRAW = not mode.startswith("top_p_rows")
    sort = mode.startswith("top_p_sort")
    if sort != sampling.SORTED_CUT:                 # the sampler's graphs keep the cut they were captured with
        sampling_graph._graphs.clear()
    sampling.SORTED_CUT = sort
    eng = BatchEngine(runner, max_queue=c, queued=False if "_sync" in mode else None,
                      prefill_together="_together" in mode).start()
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    lens = torch.randint(max(1, prompt_tokens - spread), prompt_tokens + spread + 1, (c,), generator=g).tolist()
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]
    params = [SamplingParams(max_new_tokens=gen_tokens, stop_ids=frozenset(),     # no early stop
                             seed=(seed * 1000 + i) if SAMPLING[mode] else None, **SAMPLING[mode])
              for i in range(c)]
    first, done, counts = [None] * c, [threading.Event() for _ in range(c)], [0] * c
    toks = [[] for _ in range(c)]
    steps0 = eng.steps
    t0 = time.perf_counter()

    def on_token(i):
        def f(tok):
            if first[i] is None:
                first[i] = time.perf_counter() - t0
            counts[i] += 1
            toks[i].append(tok)
        return f

    for i, p in enumerate(prompts):
        eng.submit(p, params[i], on_token(i), lambda r, e, i=i: done[i].set())
    for ev in done:
        ev.wait(3600)
    wall = time.perf_counter() - t0
    steps = eng.steps - steps0
    eng.stop()
    total = sum(counts)
    ttft = [f for f in first if f is not None]
    decode_s = wall - max(ttft)              # after the last first token every row is decoding
    return {"concurrency": c, "sampling": mode, "tokens_out": toks, "wall_s": wall, "tokens": total, "agg_tok_s": total / wall,
            "per_request_tok_s": gen_tokens / wall, "ttft_median_s": statistics.median(ttft),
            "ttft_max_s": max(ttft), "decode_steps": steps,
            "step_ms": 1e3 * decode_s / max(1, gen_tokens - 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: random 2B4T shapes in memory)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--prompt-spread", type=int, default=0, help="prompt lengths uniform in prompt-tokens "
                    "+- this, drawn anew each run (the warm-up's shapes are not the timed run's)")
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--sampling", default="greedy", help="comma list of " + ", ".join(SAMPLING))
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--out", default=None, help="write the JSON line here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    levels = [int(x) for x in args.concurrency.split(",")]
    modes = args.sampling.split(",")
    bad = [m for m in modes if m not in SAMPLING]
    if bad:
        ap.error(f"--sampling: unknown {bad}; choose from {', '.join(SAMPLING)}")
    run_level(make_runner(model, batch=1, max_len=16, backend=args.backend), model, 1, 8, 2, 123)   # warm-up
    runners = {c: make_runner(model, batch=c, max_len=args.prompt_tokens + args.prompt_spread + args.gen_tokens + 1,
                              backend=args.backend)
               for c in levels}
    for c in levels:   # at each batch, prompt length and cache length: kernels compile, graphs are captured
        for m in modes:
            for rep in range(2):                   # a prefill graph is captured when its shape comes again
                run_level(runners[c], model, c, args.prompt_tokens, 3, 124 + rep, m, args.prompt_spread)
    rows = [run_level(runners[c], model, c, args.prompt_tokens, args.gen_tokens, c, m, args.prompt_spread)
            for c in levels for m in modes]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"batch engine on {dev} ({args.device}, backend {args.backend}, {torch.get_num_threads()} threads), "
          f"prompt {args.prompt_tokens} +- {args.prompt_spread}, gen {args.gen_tokens}")
    print(f"{'clients':>8}{'sampling':>14}{'wall s':>9}{'agg tok/s':>11}{'req tok/s':>11}{'ttft p50':>10}{'ttft max':>10}"
          f"{'step ms':>9}")
    for r in rows:
        print(f"{r['concurrency']:>8}{r['sampling']:>14}{r['wall_s']:>9.2f}{r['agg_tok_s']:>11.2f}{r['per_request_tok_s']:>11.2f}"
              f"{r['ttft_median_s']:>10.3f}{r['ttft_max_s']:>10.3f}{r['step_ms']:>9.2f}")
    out = {"device": dev, "backend": args.backend, "threads": torch.get_num_threads(),
           "model": args.model or "random-2b4t", "prompt_tokens": args.prompt_tokens,
           "prompt_spread": args.prompt_spread,
           "gen_tokens": args.gen_tokens}
    for r in rows:
        c = r["concurrency"] if r["sampling"] == "greedy" else f"{r['concurrency']}_{r['sampling']}"
        out.update({f"c{c}_agg_tok_s": r["agg_tok_s"], f"c{c}_req_tok_s": r["per_request_tok_s"],
                    f"c{c}_ttft_p50_s": r["ttft_median_s"], f"c{c}_ttft_max_s": r["ttft_max_s"],
                    f"c{c}_step_ms": r["step_ms"]})
    for c in levels:                 # the batched draw gives every request the ids of the row-by-row one
        got = {r["sampling"]: r["tokens_out"] for r in rows if r["concurrency"] == c}
        for other in ("top_p_rows", "top_p_sort"):
            if "top_p" in got and other in got:
                same = got["top_p"] == got[other]
                out[f"c{c}_top_p_same_tokens_as_{other[6:]}"] = same
                print(f"{c} clients: top_p tokens {'==' if same else '!='} {other} tokens")
        for x in ("_sync", "_together"):    # queued steps, shared prefill calls: the same tokens
            for m in [m for m in got if m + x in got]:
                out[f"c{c}_{m}_same_tokens_as{x}"] = got[m] == got[m + x]
                print(f"{c} clients: {m} tokens {'==' if got[m] == got[m + x] else '!='} {m}{x} tokens")
    line = json.dumps(out)
    print(line)
    if args.save or args.out:
        machine = "gpu-" + dev.split()[-1].lower() if args.device.startswith("cuda") else platform.node()
        day = datetime.date.today().isoformat()
        path = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"serve_batch-{day}-{machine}.json"
        path.write_text(line + "\n")


if __name__ == "__main__":
    main()
