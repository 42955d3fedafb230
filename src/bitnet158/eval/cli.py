"""``bitnet158 eval``: perplexity and zero-shot multiple-choice tasks of a model.

    bitnet158 eval ppl MODEL --data ../shared/data/wikitext-2/raw/wiki.test.raw --ctx 1024 --stride 512
    bitnet158 eval tasks MODEL --tasks piqa,copa,arc_easy --limit 500
    bitnet158 eval tasks MODEL                      # all local tasks (PIQA, ARC-E/C, WinoGrande, BoolQ,
                                                    # OBQA, COPA, SIQA, CSQA, LAMBADA)

Prints a table, then one JSON line with every number (``--out FILE`` also writes it to a file).
Task data defaults to ``../shared/data/eval`` (or ``$BITNET158_DATA/eval``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import BitNetError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="{ppl,tasks}", required=True)
    for name, help_ in (("ppl", "sliding-window perplexity of a text file"),
                        ("tasks", "zero-shot multiple-choice accuracy on local task files")):
        q = sub.add_parser(name, help=help_, description=help_)
        q.add_argument("model", help="model folder")
        q.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
        q.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's)")
        q.add_argument("--device", default="cpu")
        q.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
        q.add_argument("--out", default=None, help="also write the JSON result to this file")
        if name == "ppl":
            q.add_argument("--data", required=True, help="UTF-8 text file (e.g. wikitext-2 wiki.test.raw)")
            q.add_argument("--ctx", type=int, default=None, help="input tokens per window (default: "
                           "min(1024, the model's context))")
            q.add_argument("--stride", type=int, default=None, help="new tokens scored per window "
                           "(default ctx/2; = ctx for disjoint windows)")
            q.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
            q.add_argument("--no-bos", action="store_true", help="do not put BOS in front of the text")
        else:
            q.add_argument("--tasks", default=None, help="comma-separated (default: all local tasks)")
            q.add_argument("--limit", type=int, default=None, help="first N examples of each task")
            q.add_argument("--data-dir", default=None, help="folder with llm-foundry/*.jsonl "
                           "(default ../shared/data/eval)")


def _load(args):
    import torch

    from ..checkpoint import load, resolve
    from ..tokenizer import Tokenizer
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve(args.model)
    t0 = time.perf_counter()
    model = load(folder, dtype=args.dtype, device=args.device)
    return folder, model, Tokenizer.from_pretrained(folder), time.perf_counter() - t0


def _progress(label: str):
    if not sys.stderr.isatty():
        return None
    return lambda done, total: print(f"\r{label}: {done}/{total}", end="" if done < total else "\n",
                                     file=sys.stderr, flush=True)


def _emit(result: dict, out: str | None) -> None:
    line = json.dumps(result)
    print(line)
    if out:
        Path(out).write_text(line + "\n")


def run_ppl(args) -> int:
    from .perplexity import perplexity_text, read_text
    data = Path(args.data)
    if not data.is_file():
        raise BitNetError(f"--data {data}: file not found")
    folder, model, tok, load_s = _load(args)
    ctx = args.ctx or min(1024, model.config.max_position_embeddings)
    r = perplexity_text(model, tok, read_text(data), ctx=ctx, stride=args.stride,
                        batch_size=args.batch_size, max_tokens=args.max_tokens, add_bos=not args.no_bos,
                        progress=_progress("windows"))
    d = {"model": str(folder), "data": str(data), **r.to_dict(), "load_s": load_s}
    print(f"{'file':<28}{'tokens':>9}{'ctx':>6}{'stride':>8}{'ppl':>11}{'word ppl':>11}{'bits/byte':>11}")
    print(f"{data.name:<28}{r.tokens:>9}{r.ctx:>6}{r.stride:>8}{r.ppl:>11.4g}{r.word_ppl or 0:>11.4g}"
          f"{r.bits_per_byte or 0:>11.4f}")
    _emit(d, args.out)
    return 0


def run_tasks(args) -> int:
    from . import default_data_dir
    from .tasks import DEFAULT_TASKS, evaluate_task, task_name
    names = [task_name(t) for t in args.tasks.split(",") if t.strip()] if args.tasks else DEFAULT_TASKS
    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        root = default_data_dir()
        if root is None:
            raise BitNetError("no task data: pass --data-dir (a folder holding llm-foundry/*.jsonl)")
        data_dir = root / "eval"
    folder, model, tok, load_s = _load(args)
    results = {}
    print(f"{'task':<16}{'n':>6}{'acc':>9}{'acc_norm':>10}{'chance':>8}{'ppl':>10}{'s':>8}")
    for name in names:
        r = evaluate_task(model, tok, name, data_dir, args.limit, args.batch_size, _progress(name))
        results[name] = r
        print(f"{name:<16}{r['n']:>6}{r['acc']:>9.4f}"
              f"{r.get('acc_norm', float('nan')):>10.4f}{r.get('chance', float('nan')):>8.2f}"
              f"{r.get('ppl', float('nan')):>10.4g}{r['seconds']:>8.1f}", flush=True)
    flat = {"model": str(folder), "limit": args.limit, "load_s": load_s}
    for name, r in results.items():
        for k, v in r.items():
            flat[f"{name}_{k}"] = v
    _emit(flat, args.out)
    return 0


def main(args: argparse.Namespace) -> int:
    return run_ppl(args) if args.eval_command == "ppl" else run_tasks(args)
