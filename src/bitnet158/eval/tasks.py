"""Zero-shot multiple-choice tasks from local files, scored by loglikelihood (no generation).

    results = evaluate(model, tokenizer, ["piqa", "copa"], data_dir="../shared/data/eval", limit=200)
    results["copa"] -> {"acc": 0.61, "acc_norm": 0.58, "n": 100, "chance": 0.5, ...}
    lls = loglikelihoods(model, tokenizer, [("Question: ...\\nAnswer:", " yes"), ...])  # [(logp, greedy)]

Data: the llm-foundry (MosaicML Eval Gauntlet) jsonl copies in ``<data_dir>/llm-foundry/``. Prompts
follow lm-evaluation-harness's task definitions so numbers are comparable with published zero-shot
tables: PIQA/ARC/BoolQ as ``"Question: ...\\nAnswer:"`` + ``" <choice>"``, COPA/OBQA as the stem +
``" <choice>"``, SIQA/CSQA as the lettered prompt + ``" A"``..., WinoGrande with partial scoring
(the shared continuation scored after each of the two prefixes), LAMBADA as last-word prediction
(accuracy = every token of the word is the greedy choice; perplexity = exp of minus the mean
per-word log-likelihood).

Metrics: ``acc`` (argmax of the summed continuation log-likelihood) and ``acc_norm`` (argmax of the
log-likelihood divided by the choice's length in characters, lm-eval's length normalization).
Context and continuation are encoded as lm-eval does (whole string encoded, the context's tokens cut
off the front; trailing spaces of the context move to the continuation), with one BOS in front.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import BitNetError


class TaskError(BitNetError, ValueError):
    """A task name is unknown or its data file is missing or malformed."""


@dataclass
class Example:
    contexts: list[str]        # one per choice (multiple choice: the same string repeated)
    continuations: list[str]   # one per choice, with its leading delimiter
    choices: list[str]         # the raw choice strings (lengths for acc_norm)
    gold: int


@dataclass
class TaskSpec:
    file: str
    kind: str                  # "mc" | "schema" | "lambada"
    prefix: str = ""           # appended to the query before the choice (e.g. "\nAnswer:")
    chance: float = 0.5


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa.jsonl", "mc", "\nAnswer:", 0.5),
    "arc_easy": TaskSpec("arc_easy.jsonl", "mc", "\nAnswer:", 0.25),
    "arc_challenge": TaskSpec("arc_challenge.jsonl", "mc", "\nAnswer:", 0.25),
    "winogrande": TaskSpec("winogrande.jsonl", "schema", "", 0.5),
    "boolq": TaskSpec("boolq.jsonl", "mc", "\nAnswer:", 0.5),
    "openbookqa": TaskSpec("openbook_qa.jsonl", "mc", "", 0.25),
    "copa": TaskSpec("copa.jsonl", "mc", "", 0.5),
    "siqa": TaskSpec("siqa.jsonl", "mc", "", 0.5),
    "commonsense_qa": TaskSpec("commonsense_qa.jsonl", "mc", "", 0.25),
    "lambada": TaskSpec("lambada_openai.jsonl", "lambada", "", 0.0),
}
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa", "csqa": "commonsense_qa",
           "lambada_openai": "lambada", "openbook_qa": "openbookqa"}
DEFAULT_TASKS = ["piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "openbookqa", "copa",
                 "siqa", "commonsense_qa", "lambada"]


def task_name(name: str) -> str:
    n = ALIASES.get(name.strip().lower(), name.strip().lower())
    if n not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)} (aliases: {', '.join(ALIASES)})")
    return n


def _examples(spec: TaskSpec, rows: Iterable[dict], where: str) -> list[Example]:
    out = []
    for i, d in enumerate(rows):
        try:
            if spec.kind == "mc":
                ctx = d["query"].strip() + spec.prefix
                ch = [str(c) for c in d["choices"]]
                out.append(Example([ctx] * len(ch), [" " + c for c in ch], ch, int(d["gold"])))
            elif spec.kind == "schema":            # WinoGrande: two prefixes, one continuation
                cont = " " + d["continuation"].strip()
                opts = list(d["context_options"])
                out.append(Example(opts, [cont] * len(opts), [d["continuation"]] * len(opts), int(d["gold"])))
            else:                                  # LAMBADA: one "choice", the last word
                out.append(Example([d["context"].rstrip()], [" " + d["continuation"].strip()],
                                   [d["continuation"].strip()], 0))
        except (KeyError, TypeError, ValueError) as e:
            raise TaskError(f"{where}: record {i + 1} is malformed ({type(e).__name__}: {e})") from None
    return out


def load_task(name: str, data_dir: str | Path, limit: int | None = None) -> list[Example]:
    """Read a task's examples from ``<data_dir>/llm-foundry/<file>`` (or ``<data_dir>/<file>``)."""
    spec = TASKS[task_name(name)]
    data_dir = Path(data_dir)
    path = next((p for p in (data_dir / "llm-foundry" / spec.file, data_dir / spec.file) if p.is_file()), None)
    if path is None:
        raise TaskError(f"task {name!r}: data file {spec.file} not found under {data_dir} "
                        f"(expected {data_dir / 'llm-foundry' / spec.file})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TaskError(f"{path}:{ln}: not valid JSON ({e})") from None
            if limit is not None and len(rows) >= limit:
                break
    return _examples(spec, rows, str(path))


# ---------------------------------------------------------------- loglikelihoods

def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """lm-eval's pairing: trailing spaces of the context move to the continuation; the whole string is
    encoded and the context's tokens cut off, so the continuation tokens are those of the full text."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    return bos + ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihood_ids(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16,
                      max_len: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is the greedy choice) for each id pair.

    Rows are sorted by length (longest first) and right-padded into batches; a pair longer than
    ``max_len + 1`` tokens (default: the model's context) loses context tokens from the left.
    The result for a pair does not depend on the order of ``pairs``.
    """
    max_len = max_len or model.config.max_position_embeddings
    seqs = []
    for ctx, cont in pairs:
        if not cont:
            raise TaskError("loglikelihood: the continuation encodes to no tokens")
        if not ctx:
            raise TaskError("loglikelihood: the context encodes to no tokens (add a BOS)")
        full = (list(ctx) + list(cont))[-(max_len + 1):]
        seqs.append((full, min(len(cont), len(full) - 1)))
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    dev = model.device
    for bi in range(0, len(order), batch_size):
        idx = order[bi:bi + batch_size]
        T = max(len(seqs[i][0]) - 1 for i in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        pos, tgt = [], []
        for r, i in enumerate(idx):
            full, c = seqs[i]
            inp = torch.tensor(full[:-1], dtype=torch.long)
            x[r, :len(inp)] = inp
            pos.append(torch.arange(len(full) - 1 - c, len(full) - 1))   # predicts the c last tokens
            tgt.append(torch.tensor(full[-c:], dtype=torch.long))
        h = model.hidden(x.to(dev))                                          # [B, T, D]
        for r, i in enumerate(idx):
            hs = h[r, pos[r].to(dev)]                                        # [c, D]
            logits = model.logits(hs).float()                                # [c, V]
            lp = torch.log_softmax(logits, dim=-1)
            t = tgt[r].to(dev)
            out[i] = (float(lp.gather(1, t[:, None]).double().sum()),
                      bool((logits.argmax(-1) == t).all()))
        if progress:
            progress(min(bi + batch_size, len(order)), len(order))
    return out  # type: ignore[return-value]


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16,
                   max_len: int | None = None, progress=None) -> list[tuple[float, bool]]:
    """Text (context, continuation) pairs -> [(logprob, is_greedy)], as lm-eval's ``loglikelihood``."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    return loglikelihood_ids(model, pairs, batch_size, max_len, progress)


# ---------------------------------------------------------------- scoring

def score(spec: TaskSpec, examples: list[Example], results: list[tuple[float, bool]]) -> dict:
    """acc / acc_norm (multiple choice) or acc / ppl (LAMBADA) from flat per-choice results."""
    k = 0
    correct = correct_norm = 0
    lls = []
    for ex in examples:
        res = results[k:k + len(ex.continuations)]
        k += len(ex.continuations)
        if spec.kind == "lambada":
            ll, greedy = res[0]
            lls.append(ll)
            correct += greedy
            continue
        ll = [r[0] for r in res]
        norm = [v / max(1, len(c)) for v, c in zip(ll, ex.choices)]
        correct += int(max(range(len(ll)), key=ll.__getitem__) == ex.gold)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == ex.gold)
    n = len(examples)
    if spec.kind == "lambada":
        return {"acc": correct / n if n else float("nan"),
                "ppl": math.exp(-sum(lls) / n) if n else float("nan"), "n": n}
    acc = correct / n if n else float("nan")
    d = {"acc": acc, "acc_norm": correct_norm / n if n else float("nan"), "n": n, "chance": spec.chance}
    d["acc_stderr"] = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")
    return d


def evaluate_task(model, tokenizer, name: str, data_dir: str | Path, limit: int | None = None,
                  batch_size: int = 16, progress=None) -> dict:
    name = task_name(name)
    spec = TASKS[name]
    examples = load_task(name, data_dir, limit)
    requests = [(c, x) for ex in examples for c, x in zip(ex.contexts, ex.continuations)]
    t0 = time.perf_counter()
    results = loglikelihoods(model, tokenizer, requests, batch_size, progress=progress)
    d = score(spec, examples, results)
    d["seconds"] = time.perf_counter() - t0
    return d


def evaluate(model, tokenizer, tasks: list[str], data_dir: str | Path, limit: int | None = None,
             batch_size: int = 16, progress=None) -> dict[str, dict]:
    return {task_name(t): evaluate_task(model, tokenizer, t, data_dir, limit, batch_size, progress)
            for t in tasks}


__all__ = ["TASKS", "DEFAULT_TASKS", "TaskSpec", "TaskError", "Example", "task_name", "load_task",
           "encode_pair", "loglikelihood_ids", "loglikelihoods", "score", "evaluate_task", "evaluate"]
