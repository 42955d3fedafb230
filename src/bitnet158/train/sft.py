"""``bitnet158 sft RECIPE``: supervised fine-tuning on chat data, loss on assistant tokens only.

    bitnet158 sft recipes/sft-embedded.toml
    bitnet158 sft recipes/sft-embedded.toml --init runs/pretrain --out runs/sft --set data.epochs=2
    bitnet158 sft recipes/sft-embedded.toml --resume                  # after a crash / kill

    from bitnet158.train.sft import run_sft
    summary = run_sft("recipes/sft-embedded.toml", out="runs/sft", device="cpu")

Conversations (``sft_data`` formats: OpenAI messages, ShareGPT, Alpaca, prompt/response) are
rendered with the tokenizer's chat template turn by turn; only assistant content and its
``<|eot_id|>`` are targets. The loss is the **sum** over target tokens (SPEC §5; ``data.loss =
"mean"`` averages instead), through the chunked head (:mod:`.losses`: no [B, T, V] logits), or with
``[model] fused = true`` (``--fused``) the fused BitLinear blocks and the fused head loss (each logits
chunk made once, its gradient made in the forward; docs/fused-training.md). The model and its head
loss are one module (:class:`head_loss.HeadLoss`), what DDP / FSDP2 wrap.
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

Several processes (``torchrun --nproc_per_node=N -m bitnet158.cli sft RECIPE --parallel ddp|fsdp``):
``train.micro_batch`` rows per rank, each rank its slice of the same global micro-batch (N x
micro_batch rows, so N ranks at micro_batch m train exactly as one process at N x m). DDP and FSDP2
average gradients over ranks, so each rank's summed loss is scaled by N (by N / global target tokens
for ``loss = "mean"``): the update is that of the global sum (mean), and the logged loss is the
global one. Validation rows are split over ranks and the sums reduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..tokenizer import Tokenizer
from . import finetune
from .finetune import FinetuneData, FinetuneRecipe, rank_slices
from .head_loss import HeadLoss, unwrap
from .pretrain import enable_activation_checkpointing
from .losses import linear_cross_entropy
from .sft_data import (IGNORE, ChatEncoder, Rows, encode_records, pack_examples, read_records, split_holdout)


@dataclass
class SFTData(FinetuneData):
    seq_len: int = 1024
    epochs: float = 3.0
    loss: str = "sum"
    pack: bool = True
    system: str = ""
    what: ClassVar[str] = "SFT"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("sum", "mean"):
            raise ConfigError(f"data.loss={self.loss!r} is not 'sum' or 'mean'")
        if self.seq_len < 2:
            raise ConfigError("data.seq_len must be >= 2")


# ---------------------------------------------------------------- batches

class SFTBatches:
    """Micro-batches of packed rows, epoch after epoch (re-packed per epoch); resumable by (epoch, pos).

    With ``world`` ranks the global micro-batch of ``micro_batch * world`` rows is drawn and this
    rank's slice kept (the position is the same on every rank). A batch is (tokens, labels,
    segments or None, target tokens of the whole global micro-batch as a 0-d tensor).
    """

    def __init__(self, examples, seq_len: int, micro_batch: int, pad_id: int, seed: int, pack: bool,
                 device: torch.device, rank: int = 0, world: int = 1):
        self.examples, self.seq_len, self.n = examples, seq_len, micro_batch
        self.pad_id, self.seed, self.pack, self.device = pad_id, seed, pack, device
        self.rank, self.world = rank, world
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
        need = self.n * self.world
        while need:
            rows = self.rows(self.epoch)
            k = min(need, len(rows) - self.pos)
            sl = slice(self.pos, self.pos + k)
            take.append((rows.tokens[sl], rows.labels[sl], rows.segments[sl]))
            need -= k
            self.pos += k
            if self.pos >= len(rows):
                self.epoch, self.pos = self.epoch + 1, 0
        t, lab, seg = (np.concatenate(x) for x in zip(*take))
        n_global = torch.tensor(int((lab != IGNORE).sum()))
        lo = self.rank * self.n
        t, lab, seg = (torch.from_numpy(x[lo:lo + self.n]).to(self.device) for x in (t, lab, seg))
        return t, lab, (seg if self.pack else None), n_global

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])


def summed_ce(model, tokens, labels, segments=None, chunk=None) -> torch.Tensor:
    """Summed CE over target tokens: through ``forward`` for a (wrapped) HeadLoss, else hidden + head."""
    if isinstance(unwrap(model), HeadLoss):
        return model(tokens, labels, segments)
    h = model.hidden(tokens, segment_ids=segments)                           # [B, L, D]
    return linear_cross_entropy(h.flatten(0, 1), unwrap(model).head_weight, labels.flatten(),
                                reduction="sum", chunk=chunk)


def make_loss_fn(reduction: str, grad_accum: int, chunk: int | None = None, world: int = 1):
    """Loss of one micro-batch on this rank. DDP / FSDP2 average gradients over ``world`` ranks, hence the
    factor ``world``: the update is that of the global micro-batch's sum (or mean over its targets)."""
    def loss_fn(model, batch):
        tokens, labels, segments = batch[:3]
        n = int((labels != IGNORE).sum())
        n_global = max(int(batch[3]) if len(batch) > 3 else n, 1)      # targets of the global micro-batch
        s = summed_ce(model, tokens, labels, segments, chunk)
        loss = s * world if reduction == "sum" else s * (world / n_global)
        # per-rank shares of the global per-token NLL: their sum over ranks is the global value
        return loss, {"tokens": n, "nll_per_token": s.detach() / n_global / grad_accum}
    return loss_fn


def make_eval_fn(rows: Rows, micro_batch: int, pack: bool, ctx, chunk: int | None = None):
    """Mean NLL per target token over ``rows``, split over ranks (same number of batches each), reduced."""
    def eval_fn(model) -> dict:
        tot = torch.zeros(2, dtype=torch.float64, device=ctx.device)      # [NLL sum, targets]
        for lo, hi in rank_slices(len(rows), micro_batch, ctx.rank, ctx.world):
            sl = slice(lo, hi) if hi > lo else slice(0, 1)                   # empty: a throw-away batch
            t = torch.from_numpy(rows.tokens[sl]).to(ctx.device)
            lab = torch.from_numpy(rows.labels[sl]).to(ctx.device)
            seg = torch.from_numpy(rows.segments[sl]).to(ctx.device) if pack else None
            s = summed_ce(model, t, lab, seg, chunk)
            if hi > lo:
                tot[0] += s.double()
                tot[1] += int((lab != IGNORE).sum())
        tot = ctx.all_reduce_sum(tot)
        v = (tot[0] / tot[1].clamp(min=1)).item()
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
            resume: bool = False, device: str = "auto", overrides: list[str] | None = None,
            parallel: str = "ddp") -> dict:
    """Fine-tune ``recipe.init`` on ``recipe.data``; returns the summary (also OUT/summary.json).

    Under torchrun: DDP or FSDP2 (``parallel``), ``train.micro_batch`` rows per rank."""
    s = finetune.begin(recipe, SFTData, out, init, overrides, device, parallel)
    recipe, ctx, dev, mb, ga = s.recipe, s.ctx, s.ctx.device, s.micro_batch, s.grad_accum
    d: SFTData = recipe.data
    train, val, st, sv = load_sft_examples(recipe, s.tok)
    rows0 = pack_examples(train, d.seq_len, s.pad, recipe.seed, d.pack)
    steps = max(1, math.ceil(len(rows0) * d.epochs / (mb * ga * ctx.world)))
    tcfg = recipe.train_config(steps)
    if d.loss == "sum" and "loss_scale" not in recipe.train:
        tcfg.loss_scale = "sum"
    if ctx.is_main:
        print(f"sft: {len(train)} examples ({st['truncated']} truncated, {st['dropped']} without targets), "
              f"{len(rows0)} rows of {d.seq_len} per epoch, {sum(e.n_targets for e in train)} target tokens; "
              f"{len(val)} held out; {tcfg.steps} updates of {mb}x{ga} rows x {ctx.world} ranks "
              f"({ctx.mode}, {s.head} head) on {dev}", flush=True)
    chunk = d.chunk or None
    if tcfg.activation_checkpointing:
        enable_activation_checkpointing(s.model)                         # before DDP / FSDP2
    # the model with its summed head loss (chunked, or fused): DDP / FSDP2 under torchrun
    call = s.head_loss("ce", reduction="sum", chunk=chunk, dtype=tcfg.dtype)
    batches = SFTBatches(train, d.seq_len, mb, s.pad, recipe.seed, d.pack, dev, ctx.rank, ctx.world)
    vrows = pack_examples(val, d.seq_len, s.pad, recipe.seed, d.pack) if val else None
    eval_fn = make_eval_fn(vrows, mb, d.pack, ctx, chunk) if vrows is not None else None
    trainer = finetune.make_trainer(s, "sft", call, tcfg, make_loss_fn(d.loss, tcfg.grad_accum, chunk, ctx.world),
                                    batches, eval_fn, resume)
    summary = trainer.fit()
    summary.update({"stage": "sft", "examples": len(train), "val_examples": len(val),
                    "rows_per_epoch": len(rows0), "epochs": d.epochs, "loss": d.loss,
                    "data_stats": st, "val_data_stats": sv})
    return finetune.finish(s, summary)


# ---------------------------------------------------------------- command line

# the command table's `add_arguments(parser)` and `main(args)` (arguments shared with the other stage)
add_arguments, main = finetune.command(run_sft, recipe_help="fine-tuning recipe (.toml or .json)",
                                     init_help="starting model (overrides the recipe's `init`)",
                                     set_example="data.epochs=2")
