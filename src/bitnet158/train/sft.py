"""``bitnet158 sft RECIPE``: supervised fine-tuning on chat data, loss on assistant tokens only.

    bitnet158 sft recipes/sft-embedded.toml
    bitnet158 sft recipes/sft-embedded.toml --init runs/pretrain --out runs/sft --set data.epochs=2
    bitnet158 sft recipes/sft-embedded.toml --resume                  # after a crash / kill

    from bitnet158.train.sft import run_sft
    summary = run_sft("recipes/sft-embedded.toml", out="runs/sft", device="cpu")

Conversations (``sft_data`` formats: OpenAI messages, ShareGPT, Alpaca, prompt/response) are
rendered with the tokenizer's chat template turn by turn; only assistant content and its
``<|eot_id|>`` are targets. The loss is the **sum** over target tokens (SPEC §5; ``data.loss =
"mean"`` averages instead), through the chunked head (:mod:`.losses`: no [B, T, V] logits).
Examples are packed into rows of ``data.seq_len`` tokens, each example its own attention segment
(positions restart, nothing attends across examples); ``data.pack = false`` gives one per row.
Each epoch re-shuffles and re-packs. Held-out conversations (``data.val_fraction`` or
``data.val_files``) give ``val_loss`` (mean NLL per target token).

The recipe is a fine-tuning recipe (``finetune.py``) with this ``[data]`` table::

    [data]
    files = ["../shared/data/sft/fastchat-dummy/dummy_conversation.json"]   # .json / .jsonl
    val_files = []            # or hold out val_fraction of the records
    val_fraction = 0.05
    seq_len = 1024            # tokens per packed row (longer conversations are truncated)
    epochs = 3
    loss = "sum"              # or "mean"
    pack = true
    max_records = 0           # per file; 0: all
    system = ""               # system prompt added to conversations without one

Output: ``OUT/checkpoints/`` (resumable), ``OUT/log.jsonl``, ``OUT/loss.png``, ``OUT/hf`` (packed HF
folder with the tokenizer; loads in bitnet158 and transformers), ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..tokenizer import Tokenizer
from . import finetune
from .finetune import FinetuneRecipe, config_dict, export_model, make_optimizer, write_json
from .loop import Trainer
from .losses import linear_cross_entropy
from .sft_data import (ChatEncoder, Rows, encode_records, pack_examples, read_records, split_holdout)


@dataclass
class SFTData:
    files: list = field(default_factory=list)
    val_files: list = field(default_factory=list)
    val_fraction: float = 0.05
    seq_len: int = 1024
    epochs: float = 3.0
    loss: str = "sum"
    pack: bool = True
    max_records: int = 0
    system: str = ""
    chunk: int = 0                       # head-loss rows per chunk (0: automatic)

    def __post_init__(self) -> None:
        if isinstance(self.files, str):
            self.files = [self.files]
        if isinstance(self.val_files, str):
            self.val_files = [self.val_files]
        if not self.files:
            raise ConfigError("[data] files names no SFT data file")
        if self.loss not in ("sum", "mean"):
            raise ConfigError(f"data.loss={self.loss!r} is not 'sum' or 'mean'")
        if self.seq_len < 2 or self.epochs <= 0:
            raise ConfigError("data.seq_len must be >= 2 and data.epochs > 0")


# ---------------------------------------------------------------- batches

class SFTBatches:
    """Micro-batches of packed rows, epoch after epoch (re-packed per epoch); resumable by (epoch, pos)."""

    def __init__(self, examples, seq_len: int, micro_batch: int, pad_id: int, seed: int, pack: bool,
                 device: torch.device):
        self.examples, self.seq_len, self.n = examples, seq_len, micro_batch
        self.pad_id, self.seed, self.pack, self.device = pad_id, seed, pack, device
        self.epoch, self.pos = 0, 0
        self._rows: Rows | None = None
        self._rows_epoch = -1

    def rows(self, epoch: int) -> Rows:
        if self._rows_epoch != epoch:
            self._rows = pack_examples(self.examples, self.seq_len, self.pad_id, self.seed + epoch, self.pack)
            self._rows_epoch = epoch
        return self._rows

    def next_batch(self, step: int):
        take: list[tuple[np.ndarray, ...]] = []
        need = self.n
        while need:
            rows = self.rows(self.epoch)
            k = min(need, len(rows) - self.pos)
            sl = slice(self.pos, self.pos + k)
            take.append((rows.tokens[sl], rows.labels[sl], rows.segments[sl]))
            need -= k
            self.pos += k
            if self.pos >= len(rows):
                self.epoch, self.pos = self.epoch + 1, 0
        t, lab, seg = (torch.from_numpy(np.concatenate(x)).to(self.device) for x in zip(*take))
        return t, lab, (seg if self.pack else None)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])


def _unwrap(model):
    m = getattr(model, "_orig_mod", model)
    return getattr(m, "module", m)


def make_loss_fn(reduction: str, grad_accum: int, chunk: int | None = None):
    def loss_fn(model, batch):
        tokens, labels, segments = batch
        h = model.hidden(tokens, segment_ids=segments)                       # [B, L, D]
        loss = linear_cross_entropy(h.flatten(0, 1), _unwrap(model).head_weight, labels.flatten(),
                                    reduction=reduction, chunk=chunk)
        n = int((labels != -100).sum())
        per_tok = loss.detach() / (max(n, 1) if reduction == "sum" else 1)
        return loss, {"tokens": n, "nll_per_token": per_tok / grad_accum}
    return loss_fn


def make_eval_fn(rows: Rows, micro_batch: int, pack: bool, device: torch.device, chunk: int | None = None):
    def eval_fn(model) -> dict:
        tot, n = 0.0, 0
        for i in range(0, len(rows), micro_batch):
            t = torch.from_numpy(rows.tokens[i:i + micro_batch]).to(device)
            lab = torch.from_numpy(rows.labels[i:i + micro_batch]).to(device)
            seg = torch.from_numpy(rows.segments[i:i + micro_batch]).to(device) if pack else None
            h = model.hidden(t, segment_ids=seg)
            tot += linear_cross_entropy(h.flatten(0, 1), _unwrap(model).head_weight, lab.flatten(),
                                        reduction="sum", chunk=chunk).item()
            n += int((lab != -100).sum())
        v = tot / max(n, 1)
        return {"val_loss": v, "val_ppl": float(math.exp(min(v, 50)))}
    return eval_fn


# ---------------------------------------------------------------- the run

def load_sft_examples(recipe: FinetuneRecipe, tok: Tokenizer):
    d: SFTData = recipe.data
    enc = ChatEncoder(tok)
    system = d.system or None
    recs, val_recs = [], []
    for f in d.files:
        r = read_records(recipe.resolve(f))
        if d.max_records:
            r = r[:d.max_records]
        recs += [(str(f), i, x) for i, x in enumerate(r)]
    for f in d.val_files:
        val_recs += [(str(f), i, x) for i, x in enumerate(read_records(recipe.resolve(f)))]
    if not d.val_files:
        recs, val_recs = split_holdout(recs, d.val_fraction, recipe.seed, max_items=1000)

    def encode(items):
        exs, stats = [], {"records": 0, "truncated": 0, "dropped": 0}
        for f, i, x in items:
            e, s = encode_records([x], enc, d.seq_len, f"{f}[{i}]", system)
            exs += e
            for k in stats:
                stats[k] += s[k]
        return exs, stats

    train, st = encode(recs)
    val, sv = encode(val_recs)
    if not train:
        raise ConfigError(f"{recipe.source}: no usable SFT example in {d.files}")
    return train, val, st, sv


def run_sft(recipe: FinetuneRecipe | str | Path, out: str | Path | None = None, init: str | None = None,
            resume: bool = False, device: str = "auto", overrides: list[str] | None = None) -> dict:
    """Fine-tune ``recipe.init`` on ``recipe.data``; returns the summary (also OUT/summary.json)."""
    if not isinstance(recipe, FinetuneRecipe):
        recipe = FinetuneRecipe.from_file(recipe, SFTData, overrides)
    if init:
        recipe.init = str(init)
    d: SFTData = recipe.data
    out = Path(out or recipe.out)
    model, tok, tok_dir, dev = finetune.begin(recipe, device)
    train, val, st, sv = load_sft_examples(recipe, tok)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    mb = int(recipe.train.get("micro_batch", 8))
    ga = int(recipe.train.get("grad_accum", 1))
    rows0 = pack_examples(train, d.seq_len, pad, recipe.seed, d.pack)
    steps = max(1, math.ceil(len(rows0) * d.epochs / (mb * ga)))
    tcfg = recipe.train_config(steps)
    if d.loss == "sum" and "loss_scale" not in recipe.train:
        tcfg.loss_scale = "sum"
    schedule = recipe.make_schedule(tcfg.steps)
    print(f"sft: {len(train)} examples ({st['truncated']} truncated, {st['dropped']} without targets), "
          f"{len(rows0)} rows of {d.seq_len} per epoch, {sum(e.n_targets for e in train)} target tokens; "
          f"{len(val)} held out; {tcfg.steps} updates of {mb}x{ga} rows on {dev}", flush=True)
    model.to(dev)
    optimizer = make_optimizer(model, recipe, dev)
    batches = SFTBatches(train, d.seq_len, mb, pad, recipe.seed, d.pack, dev)
    chunk = d.chunk or None
    vrows = pack_examples(val, d.seq_len, pad, recipe.seed, d.pack) if val else None
    trainer = Trainer(model, optimizer, schedule, make_loss_fn(d.loss, tcfg.grad_accum, chunk), batches, tcfg,
                      out, eval_fn=make_eval_fn(vrows, mb, d.pack, dev, chunk) if vrows is not None else None,
                      config_dict=config_dict(model),
                      extra_state={"recipe": recipe.to_dict(), "tokenizer": str(Path(tok_dir).resolve()),
                                   "stage": "sft"})
    finetune.resume_or_start(trainer, out, resume, recipe)
    summary = trainer.fit()
    summary.update({"name": recipe.name, "stage": "sft", "examples": len(train), "val_examples": len(val),
                    "rows_per_epoch": len(rows0), "epochs": d.epochs, "loss": d.loss,
                    "data_stats": st, "val_data_stats": sv, "device": str(dev)})
    summary["export"] = export_model(model, out, tok_dir, recipe.export)
    write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    finetune.add_arguments(p, recipe_help="fine-tuning recipe (.toml or .json)",
                           init_help="starting model (overrides the recipe's `init`)",
                           set_example="data.epochs=2")


def main(args: argparse.Namespace) -> int:
    return finetune.run_command(run_sft, args)
