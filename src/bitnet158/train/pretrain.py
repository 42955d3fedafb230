"""``bitnet158 pretrain RECIPE``: ternary pretraining with the two-stage recipe, resumable, 1..N processes.

    bitnet158 pretrain recipes/tiny-cpu.toml --out runs/tiny
    bitnet158 pretrain recipes/tiny-cpu.toml --out runs/tiny --resume          # after a crash / kill
    bitnet158 pretrain recipes/embedded-pretrain.toml --set train.steps=2000 --device cuda
    torchrun --nproc_per_node=8 -m bitnet158.cli pretrain RECIPE --parallel fsdp

Builds the model of the recipe (``model.linear = "linear"`` swaps every BitLinear for a plain
``nn.Linear``: the full-precision baseline), AdamW with per-step LR / weight decay from the
recipe's schedule (norms exempt from decay), a mixture sampler whose weights switch at the
schedule's stage boundary, and runs :class:`bitnet158.train.loop.Trainer`. ``model.fused = true``
(``--fused``) swaps in the fused BitLinear blocks and the fused head loss (docs/fused-training.md);
the loss is computed by the model and its head as one module (:class:`head_loss.HeadLoss`: full
logits, or the fused head), which is what DDP or FSDP2 wrap under ``torchrun``
(:mod:`bitnet158.train.distributed`); without it, one process on the chosen device.
Output: ``OUT/log.jsonl``, ``OUT/loss.png``, ``OUT/checkpoints/``, ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..model import RMSNorm, Transformer, init_weights
from .data import MixtureSampler, TokenShards, val_rows
from .head_loss import unwrap, wrap_head_loss
from .loop import LocalContext, Trainer, find_latest
from .recipe import Recipe


# ---------------------------------------------------------------- model and optimizer

def build_model(recipe: Recipe, vocab_size: int, bos_id: int | None = None,
                eos_id: int | None = None) -> Transformer:
    """The recipe's model in fp32 on the CPU, initialized from ``recipe.seed``.

    Vocabulary size, BOS and EOS come from the data's tokenizer unless the recipe overrides them.
    """
    special = {k: v for k, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id)) if v is not None}
    over = {"vocab_size": vocab_size, **special, **recipe.model.overrides, "dtype": "float32",
            "quantization_mode": "online"}
    cfg = ModelConfig.from_name(recipe.model.size, **over)
    if cfg.vocab_size < vocab_size:
        raise ConfigError(f"model vocab_size={cfg.vocab_size} is smaller than the data's vocabulary ({vocab_size})")
    torch.manual_seed(recipe.seed)
    model = init_weights(Transformer(cfg), std=recipe.model.init_std)
    if recipe.model.linear == "linear":
        make_full_precision(model)
    return model


def make_full_precision(model: Transformer) -> Transformer:
    """Swap every BitLinear for a plain nn.Linear with the same weights (the FP baseline), in place."""
    for name, mod in list(model.projections()):
        lin = nn.Linear(mod.in_features, mod.out_features, bias=False)
        with torch.no_grad():
            lin.weight.copy_(mod.weight)
        parent, child = name.removeprefix("model.").rsplit(".", 1)
        model.model.get_submodule(parent).register_module(child, lin)
    return model


def param_groups(model: nn.Module) -> list[dict]:
    """Decay for matrices (linears, embeddings); none for norm weights."""
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    decay = [p for p in model.parameters() if id(p) not in norms]
    exempt = [p for p in model.parameters() if id(p) in norms]
    return [{"params": decay}, {"params": exempt, "weight_decay_exempt": True}]


def make_optimizer(model: nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    fused = recipe.optim.fused and device.type == "cuda"
    return torch.optim.AdamW(param_groups(model), lr=0.0, betas=tuple(recipe.optim.betas),
                             eps=recipe.optim.eps, weight_decay=0.0, fused=fused or None)


# ---------------------------------------------------------------- batches, loss, eval

class PretrainBatches:
    """Micro-batches of token rows for one rank: the global micro-batch is drawn, this rank's slice kept."""

    def __init__(self, sampler: MixtureSampler, stage_of, micro_batch: int, rank: int, world: int,
                 device: torch.device):
        self.sampler, self.stage_of = sampler, stage_of
        self.n, self.rank, self.world, self.device = micro_batch, rank, world, device

    def next_batch(self, step: int) -> torch.Tensor:
        lo = self.rank * self.n
        rows = self.sampler.next_rows(self.n * self.world, self.stage_of(step), rows=(lo, lo + self.n))
        t = torch.from_numpy(rows)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def lm_loss(model, batch: torch.Tensor):
    """Next-token cross-entropy (mean over tokens) on rows [B, T+1] through the model's
    :class:`head_loss.HeadLoss` (full logits, or the fused head with ``model.fused``)."""
    x, y = batch[:, :-1], batch[:, 1:]
    return model(x, y), {"tokens": y.numel()}


def make_eval_fn(rows: np.ndarray, micro_batch: int, ctx):
    """Mean validation CE over ``rows`` [N, T+1], split over ranks, reduced."""
    mine = rows[ctx.rank::ctx.world]

    def eval_fn(model) -> dict:
        tot = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for i in range(0, len(mine), micro_batch):
            b = torch.from_numpy(mine[i:i + micro_batch]).to(ctx.device)
            ce = model(b[:, :-1], b[:, 1:], reduction="sum")               # through HeadLoss
            tot[0] += ce.double()
            tot[1] += b[:, 1:].numel()
        tot = ctx.all_reduce_sum(tot)
        v = (tot[0] / tot[1].clamp(min=1)).item()
        return {"val_loss": v, "val_ppl": float(np.exp(min(v, 50)))}

    return eval_fn


# ---------------------------------------------------------------- the run

def setup_context(device: str, parallel: str):
    """LocalContext, or a distributed one when started by torchrun (WORLD_SIZE set)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ:
        from .distributed import DistContext
        return DistContext(parallel, device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return LocalContext(device)


def run(recipe: Recipe, out: str | Path | None = None, resume: bool = False, device: str = "auto",
        parallel: str = "ddp") -> dict:
    out = Path(out or recipe.out)
    ctx = setup_context(device, parallel)
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    sources = {n: TokenShards(recipe.resolve(p), "train") for n, p in recipe.data.sources.items()}
    vocab = max(s.vocab_size for s in sources.values())
    val_name = recipe.data.val_source or sorted(sources)[0]
    if val_name not in sources:
        raise ConfigError(f"{recipe.source}: data.val_source={val_name!r} is not a source")
    schedule = recipe.make_schedule()
    sampler = MixtureSampler(sources, recipe.data.stages, recipe.data.seq_len, seed=recipe.seed)

    first = sources[sorted(sources)[0]].index
    model = build_model(recipe, vocab, first.get("bos_id"), first.get("eos_id"))
    cfg = model.config
    if ctx.is_main:
        n_all, n_body = cfg.num_params(), cfg.num_params(embedding=False)
        print(f"model: {recipe.model.size} {recipe.model.linear}, {n_body / 1e6:.2f}M non-embedding "
              f"params ({n_all / 1e6:.2f}M total), vocab {cfg.vocab_size}; world {ctx.world} "
              f"({ctx.mode}) on {ctx.device}", flush=True)
    if recipe.model.fused and recipe.model.linear == "bitlinear":
        from ..kernels.bitlinear_train import use_fused_bitlinear
        use_fused_bitlinear(model)           # class swap only: before checkpointing, FSDP, compile
    if recipe.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.to(ctx.device)
    raw = model
    # the model with its head loss as one module (DDP / FSDP2 under torchrun): both the gradient sync
    # and FSDP2's unsharding of the tied head act inside its forward
    # (model.fused with model.linear = "linear": plain nn.Linear blocks, fused head loss)
    head = "fused" if recipe.model.fused else "full"
    model = wrap_head_loss(ctx, raw, "ce", head=head, reduction="mean", dtype=recipe.train.dtype)
    optimizer = make_optimizer(raw, recipe, ctx.device)                  # after sharding: DTensor params
    batches = PretrainBatches(sampler, schedule.stage, recipe.train.micro_batch, ctx.rank, ctx.world, ctx.device)
    vrows = val_rows(TokenShards(recipe.resolve(recipe.data.sources[val_name]), "val"), recipe.data.seq_len,
                     recipe.data.val_rows)
    config_dict = cfg.to_dict(quantization_mode="online") if recipe.model.linear == "bitlinear" else None
    if config_dict is not None:
        config_dict["torch_dtype"] = "float32"
    tok_dir = recipe.tokenizer or str(recipe.resolve(recipe.data.sources[sorted(sources)[0]]) / "tokenizer")
    trainer = Trainer(model, optimizer, schedule, lm_loss, batches, recipe.train, out, raw_model=raw,
                      eval_fn=make_eval_fn(vrows, recipe.train.micro_batch, ctx), ctx=ctx,
                      config_dict=config_dict,
                      extra_state={"recipe": recipe.to_dict(), "tokenizer": str(Path(tok_dir).resolve())})
    if resume:
        if not trainer.maybe_resume() and ctx.is_main:
            print(f"--resume: no checkpoint in {out}, starting from step 0", flush=True)
    elif find_latest(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    if ctx.is_main:
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1) + "\n")
    if recipe.train.dtype == "bf16" and ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.time()
    summary = trainer.fit()
    summary.update({"name": recipe.name, "linear": recipe.model.linear, "schedule": schedule.kind,
                    "fused": recipe.model.fused, "head": unwrap(model).head,
                    "non_embedding_params": cfg.num_params(embedding=False), "params": cfg.num_params(),
                    "world": ctx.world, "device": str(ctx.device), "wall_s": time.time() - t0,
                    "peak_mem_gb": max((r.get("mem_gb", 0) for r in trainer.history), default=0.0),
                    "tok_s_median": float(np.median([r["tok_s"] for r in trainer.history if "tok_s" in r][1:]
                                                    or [0.0])),
                    "data_epochs": sampler.epochs()})
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if ctx.mode != "single":            # torchrun, also with one process
        ctx.close()
    return summary


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward (saves memory, costs one more forward)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    def call(fwd, *args):
        return checkpoint(fwd, *args, use_reentrant=False)

    for layer in model.model.layers:
        layer.forward = partial(call, layer.forward)


# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe file (.toml or .json)")
    p.add_argument("--out", default=None, help="output folder (default: the recipe's `out`)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"], help="mode under torchrun")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--fused", action="store_true",
                   help="fused BitLinear kernels and fused head loss (same as --set model.fused=true)")


def main(args: argparse.Namespace) -> int:
    recipe = Recipe.from_file(args.recipe, overrides=args.set + (["model.fused=true"] if args.fused else []))
    summary = run(recipe, out=args.out, resume=args.resume, device=args.device, parallel=args.parallel)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    return 0
