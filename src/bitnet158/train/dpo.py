"""``bitnet158 dpo RECIPE``: Direct Preference Optimization against a frozen copy of the starting model.

    bitnet158 dpo recipes/dpo-embedded.toml --init runs/sft --out runs/dpo
    bitnet158 dpo recipes/dpo-embedded.toml --set data.reference=precomputed --set data.beta=0.2

    from bitnet158.train.dpo import run_dpo
    summary = run_dpo("recipes/dpo-embedded.toml", out="runs/dpo", device="cpu")

Loss (sigmoid DPO, SPEC §5): ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` averaged over
pairs, where ``pi``/``ref`` are **summed** log-probs of the completion's assistant tokens (incl.
``<|eot_id|>``) under the policy / the reference. The reference is the starting model with the same
quantized (BitLinear) forward, frozen: ``dpo.reference = "model"`` keeps a copy in eval mode and
runs it on every batch (rewards are exactly 0 at step 0), ``"precomputed"`` runs it once over all
pairs before training and frees it (0 at step 0 up to float rounding; no second model in memory).
Log-probs come from the chunked head (:mod:`.losses`): the [B, T, V] logits never exist at once.
``[model] fused = true`` (``--fused``) runs the policy and the reference copy on the fused BitLinear
blocks (docs/fused-training.md); the log-probs stay chunked (their gradient needs the whole batch's
DPO loss, so each logits chunk is made in the forward and again in the backward), through the same
row kernel as the fused cross-entropy.

Logged per update: loss, ``rewards_chosen`` / ``rewards_rejected`` (beta * log-ratio), ``margin``,
``accuracy`` (share of pairs with the chosen reward higher). Held-out pairs (``data.val_fraction``
or ``data.val_files``) are evaluated before training and at every eval: ``val_reward_margin``,
``val_accuracy``, ``val_loss``; ``summary.json`` holds the first and the last.

Recipe: a fine-tuning recipe (``finetune.py``) with::

    [data]
    files = ["../shared/data/preference/hh-rlhf-harmless-base/test.jsonl"]
    val_files = []            # or hold out val_fraction of the pairs
    val_fraction = 0.05
    max_len = 1024            # tokens per sequence (longer ones are truncated at the end)
    epochs = 2
    max_records = 0
    beta = 0.1
    reference = "model"       # or "precomputed"
    label_smoothing = 0.0

Several processes (``torchrun --nproc_per_node=N -m bitnet158.cli dpo RECIPE --parallel ddp|fsdp``):
``train.micro_batch`` pairs per rank, each rank its slice of the same global micro-batch; the loss
is the mean over a rank's pairs, and DDP / FSDP2 average over ranks (equal pair counts), so the
update is that of the global mean. The reference runs on each rank's own pairs: a plain frozen copy
under DDP, sharded like the policy under FSDP2 (same bf16 forward); ``"precomputed"`` splits the
pairs over ranks once and all-reduces the table, so every rank holds every pair's reference log-probs.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from ..errors import ConfigError
from ..tokenizer import Tokenizer
from . import finetune
from .finetune import FinetuneData, FinetuneRecipe, rank_slices
from .head_loss import HeadLoss, unwrap
from .pretrain import enable_activation_checkpointing
from .losses import dpo_loss, sequence_logprobs
from .dpo_data import Pair, encode_pairs, pad_pairs
from .sft_data import ChatEncoder, read_records, split_holdout


@dataclass
class DPOData(FinetuneData):
    max_len: int = 1024
    epochs: float = 2.0
    # DPO settings live here too so that one [data] table configures the stage
    beta: float = 0.1
    reference: str = "model"             # "model" (frozen copy, on the fly) or "precomputed"
    label_smoothing: float = 0.0
    what: ClassVar[str] = "preference"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference not in ("model", "precomputed"):
            raise ConfigError(f"data.reference={self.reference!r} is not 'model' or 'precomputed'")
        if self.beta <= 0 or self.max_len < 2:
            raise ConfigError("data.beta must be > 0 and data.max_len >= 2")


# ---------------------------------------------------------------- batches

class DPOBatches:
    """Micro-batches of ``micro_batch`` pairs, re-shuffled each epoch; resumable by (epoch, pos).

    With ``world`` ranks the global micro-batch of ``micro_batch * world`` pairs is drawn and this
    rank's slice kept (the position is the same on every rank)."""

    def __init__(self, pairs: list[Pair], micro_batch: int, pad_id: int, seed: int, device: torch.device,
                 rank: int = 0, world: int = 1):
        self.pairs, self.n, self.pad_id, self.seed, self.device = pairs, micro_batch, pad_id, seed, device
        self.rank, self.world = rank, world
        self.epoch, self.pos = 0, 0

    def order(self, epoch: int) -> list[int]:
        o = list(range(len(self.pairs)))
        random.Random(self.seed * 1000003 + epoch).shuffle(o)
        return o

    def next_batch(self, step: int):
        idx: list[int] = []
        need = self.n * self.world
        while len(idx) < need:
            o = self.order(self.epoch)
            k = min(need - len(idx), len(o) - self.pos)
            idx += o[self.pos:self.pos + k]
            self.pos += k
            if self.pos >= len(o):
                self.epoch, self.pos = self.epoch + 1, 0
        lo = self.rank * self.n
        return make_batch(self.pairs, idx[lo:lo + self.n], self.pad_id, self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])


def make_batch(pairs: list[Pair], idx: list[int], pad_id: int, device: torch.device):
    tokens, labels = pad_pairs([pairs[i] for i in idx], pad_id)
    return (torch.from_numpy(tokens).to(device), torch.from_numpy(labels).to(device),
            torch.tensor(idx, dtype=torch.long))


def policy_logps(model, tokens, labels, chunk=None) -> torch.Tensor:
    """Summed completion log-probs [2P] of rows tokens/labels [2P, L] (chunked head): through ``forward``
    for a (wrapped) HeadLoss, else hidden + head."""
    if isinstance(unwrap(model), HeadLoss):
        return model(tokens, labels)
    h = model.hidden(tokens)                                              # [2P, L, D]
    return sequence_logprobs(h, unwrap(model).head_weight, labels, chunk=chunk)


@torch.no_grad()
def reference_table(ref, pairs: list[Pair], micro_batch: int, pad_id: int, device, amp_dtype, chunk=None,
                    ctx=None) -> torch.Tensor:
    """Reference log-probs [n_pairs, 2] (chosen, rejected), computed once.

    With ``ctx`` of several ranks the pairs are split over them and the table all-reduced: every rank
    ends with the whole table."""
    rank, world = (ctx.rank, ctx.world) if ctx is not None else (0, 1)
    out = torch.zeros(len(pairs), 2, dtype=torch.float32, device=device if world > 1 else "cpu")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_dtype == "bf16")
    for lo, hi in rank_slices(len(pairs), micro_batch, rank, world):
        idx = list(range(lo, hi)) or [0]                  # past the end: a throw-away batch (keeps collectives even)
        t, lab, _ = make_batch(pairs, idx, pad_id, device)
        with amp:
            lp = policy_logps(ref, t, lab, chunk).float().to(out.device)
        if hi > lo:
            P = len(idx)
            out[idx, 0], out[idx, 1] = lp[:P], lp[P:]
    if world > 1:
        out = ctx.all_reduce_sum(out).cpu()
    return out


def make_loss_fn(beta: float, smoothing: float, grad_accum: int, ref_model=None, ref_table=None, chunk=None,
                 world: int = 1):
    """Mean DPO loss over this rank's pairs (DDP / FSDP2 average over ranks: the global mean); metrics are
    this rank's share of the global mean (divided by ``world``), so their sum over ranks is the global one."""
    def loss_fn(model, batch):
        tokens, labels, idx = batch
        P = len(idx)
        lp = policy_logps(model, tokens, labels, chunk)                    # [2P]
        if ref_model is not None:
            with torch.no_grad():
                rlp = policy_logps(ref_model, tokens, labels, chunk)
            rc, rr = rlp[:P], rlp[P:]
        else:
            r = ref_table[idx].to(lp.device)
            rc, rr = r[:, 0], r[:, 1]
        loss, s = dpo_loss(lp[:P], lp[P:], rc, rr, beta, smoothing)
        metrics = {k if k != "margins" else "margin": v.mean() / (grad_accum * world) for k, v in s.items()}
        metrics["tokens"] = int((labels != -100).sum())
        metrics["pairs"] = P
        return loss, metrics
    return loss_fn


def make_eval_fn(pairs: list[Pair], ref: torch.Tensor, beta: float, micro_batch: int, pad_id: int, device,
                 chunk=None, ctx=None):
    """Mean DPO loss, reward margin, accuracy and rewards over held-out pairs (reference precomputed),
    split over the ranks of ``ctx`` (same number of batches each) and reduced."""
    keys = ("val_loss", "val_reward_margin", "val_accuracy", "val_rewards_chosen", "val_rewards_rejected")
    rank, world = (ctx.rank, ctx.world) if ctx is not None else (0, 1)

    def eval_fn(model) -> dict:
        acc = torch.zeros(len(keys), dtype=torch.float64, device=device)
        for lo, hi in rank_slices(len(pairs), micro_batch, rank, world):
            idx = list(range(lo, hi)) or [0]              # past the end: a throw-away batch
            t, lab, _ = make_batch(pairs, idx, pad_id, device)
            lp = policy_logps(model, t, lab, chunk).float()
            if hi == lo:
                continue
            P = len(idx)
            r = ref[idx].to(lp.device)
            loss, st = dpo_loss(lp[:P], lp[P:], r[:, 0], r[:, 1], beta)
            acc += torch.stack([loss.detach() * P, st["margins"].sum(), st["accuracy"].sum(),
                                st["rewards_chosen"].sum(), st["rewards_rejected"].sum()]).double()
        if world > 1:
            acc = ctx.all_reduce_sum(acc)
        return {k: v / max(len(pairs), 1) for k, v in zip(keys, acc.tolist())}
    return eval_fn


# ---------------------------------------------------------------- the run

def load_pairs(recipe: FinetuneRecipe, tok: Tokenizer):
    d: DPOData = recipe.data
    enc = ChatEncoder(tok)
    train, val, stats = [], [], {}
    for f in d.files:
        recs = read_records(recipe.resolve(f))
        if d.max_records:
            recs = recs[:d.max_records]
        p, s = encode_pairs(recs, enc, d.max_len, str(f))
        train += p
        stats[str(f)] = s
    for f in d.val_files:
        p, s = encode_pairs(read_records(recipe.resolve(f)), enc, d.max_len, str(f))
        val += p
        stats[str(f)] = s
    if not d.val_files:
        train, val = split_holdout(train, d.val_fraction, recipe.seed, max_items=500)
    if not train:
        raise ConfigError(f"{recipe.source}: no usable preference pair in {d.files}")
    return train, val, stats


def run_dpo(recipe: FinetuneRecipe | str | Path, out: str | Path | None = None, init: str | None = None,
            resume: bool = False, device: str = "auto", overrides: list[str] | None = None,
            parallel: str = "ddp") -> dict:
    """DPO of ``recipe.init`` on ``recipe.data``; returns the summary (also OUT/summary.json).

    Under torchrun: DDP or FSDP2 (``parallel``), ``train.micro_batch`` pairs per rank."""
    s = finetune.begin(recipe, DPOData, out, init, overrides, device, parallel)
    recipe, ctx, dev, mb, ga, pad = s.recipe, s.ctx, s.ctx.device, s.micro_batch, s.grad_accum, s.pad
    d: DPOData = recipe.data
    train, val, stats = load_pairs(recipe, s.tok)
    steps = max(1, math.ceil(len(train) * d.epochs / (mb * ga * ctx.world)))
    tcfg = recipe.train_config(steps)
    if ctx.is_main:
        print(f"dpo: {len(train)} pairs, {len(val)} held out; beta {d.beta}, reference {d.reference}; "
              f"{tcfg.steps} updates of {mb}x{ga} pairs x {ctx.world} ranks ({ctx.mode}, {s.head} blocks "
              f"and head) on {dev}", flush=True)
    chunk = d.chunk or None
    # the reference: a frozen copy with the same forward (fused classes too; sharded like the policy
    # under FSDP2), so the rewards are 0 at step 0
    ref = s.head_loss("logps", chunk=chunk, dtype=tcfg.dtype, frozen=True,
                      net=copy.deepcopy(s.model).eval().requires_grad_(False))
    ref_val = reference_table(ref, val, mb, pad, dev, tcfg.dtype, chunk, ctx) if val else None
    ref_train = None
    if d.reference == "precomputed":
        ref_train = reference_table(ref, train, mb, pad, dev, tcfg.dtype, chunk, ctx)
        del ref
        ref = None
    if tcfg.activation_checkpointing:
        enable_activation_checkpointing(s.model)     # the policy only, before DDP / FSDP2
    call = s.head_loss("logps", chunk=chunk, dtype=tcfg.dtype)             # DDP / FSDP2 under torchrun
    batches = DPOBatches(train, mb, pad, recipe.seed, dev, ctx.rank, ctx.world)
    eval_fn = make_eval_fn(val, ref_val, d.beta, mb, pad, dev, chunk, ctx) if val else None
    loss_fn = make_loss_fn(d.beta, d.label_smoothing, tcfg.grad_accum, ref, ref_train, chunk, ctx.world)
    trainer = finetune.make_trainer(s, "dpo", call, tcfg, loss_fn, batches, eval_fn, resume)
    start = trainer.evaluate() if eval_fn is not None and trainer.step == 0 else {}
    summary = trainer.fit()
    hist = [r for r in trainer.history if "margin" in r]
    summary.update({"stage": "dpo", "pairs": len(train), "val_pairs": len(val), "beta": d.beta,
                    "reference": d.reference, "data_stats": stats, "start": start,
                    "first_step": {k: hist[0][k] for k in ("loss", "margin", "rewards_chosen", "accuracy")}
                    if hist else {}})
    return finetune.finish(s, summary)


# ---------------------------------------------------------------- command line

# the command table's `add_arguments(parser)` and `main(args)` (arguments shared with the other stage)
add_arguments, main = finetune.command(run_dpo, recipe_help="fine-tuning recipe (.toml or .json) with DPO data",
                                     init_help="starting model = reference (overrides the recipe's `init`)",
                                     set_example="data.beta=0.2")
