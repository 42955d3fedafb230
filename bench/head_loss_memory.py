"""Peak memory of the head loss against the number of tokens: full logits vs chunked vs fused (CPU).

    PYTHONPATH=src python bench/head_loss_memory.py --tokens 2048,8192,32768 --vocab 16384 --dim 128 \\
        --json-out bench/results/head_loss_memory-2026-11-25-xeon-2core.json

One summed cross-entropy over N tokens (a third of them ignored, as SFT's prompt tokens are), forward
and backward, hidden [N, D] and head [V, D] fp32 on the CPU, each (variant, N) in its own process:

- ``full``: ``F.cross_entropy`` of the [N, V] logits (pretraining's reference head);
- ``chunked``: ``losses.linear_cross_entropy`` (16 M logits per chunk, recomputed in backward: the
  SFT / DPO reference head);
- ``fused``: ``losses.fused_linear_cross_entropy`` (128 M logits per chunk, made once, the gradient
  made in the forward; the torch row fallback works 16 M logits at a time).

Measured: the growth of the process's peak resident set (``ru_maxrss``) across the loss and its
backward, in MB, after the inputs exist. The value of the loss is printed too (the three agree).
Prints a table, then one JSON line with flat keys ``<variant>_n<N>_peak_mb`` and ``logits_n<N>_mb``
(the size of the fp32 [N, V] logits).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

VARIANTS = ("full", "chunked", "fused")


def measure(variant: str, n: int, vocab: int, dim: int) -> dict:
    """One (variant, N) in this process: peak RSS growth of loss + backward."""
    import resource

    import torch
    import torch.nn.functional as F

    from bitnet158.train import losses

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, dim, generator=g, requires_grad=True)
    w = (torch.randn(vocab, dim, generator=g) * 0.05).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::3] = -100
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss                 # KiB
    if variant == "full":
        loss = F.cross_entropy((h @ w.t()).float(), y, reduction="sum")
    elif variant == "chunked":
        loss = losses.linear_cross_entropy(h, w, y, reduction="sum")
    else:
        loss = losses.fused_linear_cross_entropy(h, w, y, reduction="sum")
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "n": n, "loss": float(loss), "peak_mb": (peak - base) / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="2048,8192,32768", help="comma-separated N")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--max-full-gb", type=float, default=4.0,
                    help="skip `full` where its fp32 logits alone exceed this")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.vocab, args.dim)))
        return 0
    res: dict = {"vocab": args.vocab, "dim": args.dim, "machine": platform.processor() or platform.machine()}
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        logits_mb = n * args.vocab * 4 / 2**20
        res[f"logits_n{n}_mb"] = logits_mb
        for v in args.variants.split(","):
            if v == "full" and logits_mb / 1024 > args.max_full_gb:
                continue
            out = subprocess.run([sys.executable, __file__, "--one", v, str(n), "--vocab", str(args.vocab),
                                  "--dim", str(args.dim)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[f"{v}_n{n}_peak_mb"] = round(r["peak_mb"], 1)
            res[f"{v}_n{n}_loss"] = r["loss"]
            rows.append((v, n, logits_mb, r["peak_mb"], r["loss"]))
    print(f"{'variant':<8} {'tokens':>7} {'logits MB':>10} {'peak MB':>9} {'loss':>14}")
    for v, n, lm, pk, loss in rows:
        print(f"{v:<8} {n:>7} {lm:>10.0f} {pk:>9.0f} {loss:>14.4f}")
    line = json.dumps(res)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
