"""Host time of the batch engine's decode step: the scheduler's own work, with a runner that costs nothing.

    python3 bench/batch_host.py                        # 64 rows, greedy and top-p, queued and in order
    python3 bench/batch_host.py --rows 8,64 --vocab 1000 --steps 200

A stub runner returns a fixed ``[b, vocab]`` logits tensor at once, so a step's time is the host's:
building the step's inputs, sampling (greedy: one argmax; top-p: the samplers on this CPU, which a
GPU would run on the device), reading the ids and handing them to the requests. On a GPU the
queued engine hides this time behind the device's step as long as it is shorter. Prints a table,
then one JSON line (``host_ms_per_step_b<rows>_<sampling>_<queued|sync>``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from bitnet158.engine import SamplingParams
from bitnet158.engine.batch import BatchEngine


class StubRunner:
    """The runner interface the batch engine uses; every call returns the same logits at once."""

    def __init__(self, batch: int, vocab: int, max_len: int = 4096):
        self.batch, self.vocab_size, self.max_len = batch, vocab, max_len
        self.device = torch.device("cpu")
        self.logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))   # [b, V]

    def prefill(self, tokens, pos, rows=None):
        return self.logits[:tokens.shape[0]]

    def decode(self, tokens, pos, rows=None):
        return self.logits[:tokens.shape[0]]


def host_ms(rows: int, vocab: int, steps: int, sampling: str, queued: bool) -> float:
    eng = BatchEngine(StubRunner(rows, vocab), max_queue=rows, queued=queued).start()
    extra = {} if sampling == "greedy" else dict(temperature=0.8, top_p=0.95)
    done = [threading.Event() for _ in range(rows)]
    t0 = time.perf_counter()
    for i in range(rows):
        sp = SamplingParams(max_new_tokens=steps + 1, stop_ids=frozenset(), seed=i if extra else None, **extra)
        eng.submit([0, i + 1], sp, lambda tok: None, lambda reason, error, i=i: done[i].set())
    for ev in done:
        ev.wait(3600)
    ms = 1e3 * (time.perf_counter() - t0) / max(1, eng.steps)
    eng.stop()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="64")
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sampling", default="greedy,top_p")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"vocab": args.vocab, "steps": args.steps}
    print(f"{'rows':>6}{'sampling':>10}{'queued ms':>11}{'sync ms':>9}")
    for b in [int(x) for x in args.rows.split(",")]:
        for s in args.sampling.split(","):
            q, y = host_ms(b, args.vocab, args.steps, s, True), host_ms(b, args.vocab, args.steps, s, False)
            out[f"host_ms_per_step_b{b}_{s}_queued"] = round(q, 3)
            out[f"host_ms_per_step_b{b}_{s}_sync"] = round(y, 3)
            print(f"{b:>6}{s:>10}{q:>11.3f}{y:>9.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
