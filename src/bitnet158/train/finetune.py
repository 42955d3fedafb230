"""What SFT and DPO share: the recipe file, the starting model, the optimizer, the trainer, the export.

    s = begin("recipes/sft-embedded.toml", SFTData, overrides=["train.steps=5"], device="cpu")
    call = s.head_loss("ce", reduction="sum", dtype="fp32")  # the model + its head loss (DDP / FSDP2)
    trainer = make_trainer(s, "sft", call, tcfg, loss_fn, batches, eval_fn, resume=False)
    finish(s, trainer.fit())                              # OUT/hf (packed HF folder) [+ OUT/master]

A fine-tuning recipe is a TOML (or JSON) file in the pretraining recipes' format (``recipe.py``:
same ``[schedule]``, ``[optim]`` and ``[train]`` tables, same ``--set section.key=value``
overrides), with these top-level keys instead of the pretraining ``[model]`` table:

    name = "sft-tiny"
    seed = 0
    init = "runs/pretrain"            # starting model: HF folder (packed or master) or a training run /
                                      # checkpoint folder (its fp32 master weights)
    tokenizer = "tok/"                # optional: default the init folder's tokenizer (or the run's)
    out = "runs/sft"
    export = ["packed"]               # OUT/hf packed 2-bit HF folder; add "master" for OUT/master (fp32)
    [model]
    fused = false                     # fused BitLinear blocks + fused head (--fused; docs/fused-training.md)
    [data] ...                        # SFT or DPO data table (see sft.py / dpo.py)

``train.steps`` may be left out: it is then computed from ``data.epochs``.

Under ``torchrun`` (``--parallel ddp|fsdp``) every rank loads the starting model, the model and its
head loss are wrapped together (:class:`head_loss.HeadLoss`: DDP's gradient sync and FSDP2's
all-gather of the tied head only act around ``forward``), each rank takes its slice of the same global micro-batch
(``micro_batch`` rows or pairs per rank), rank 0 alone prints and writes logs, checkpoints (gathered
full state: they load in one process and the other way round) and the exported folders.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .head_loss import wrap_head_loss
from .loop import Trainer, TrainConfig
from .recipe import OptimSpec, RecipePaths, _build, read_recipe_file
from .schedules import Schedule

EXPORT_LAYOUTS = ("packed", "master")
DEFAULT_SCHEDULE = {"kind": "constant", "warmup_steps": 0, "lr_peak": 1e-4, "wd_peak": 0.0}


@dataclass
class FinetuneData:
    """The ``[data]`` fields SFT (``sft.SFTData``) and DPO (``dpo.DPOData``) share."""
    files: list = field(default_factory=list)
    val_files: list = field(default_factory=list)     # or hold out val_fraction of the records
    val_fraction: float = 0.05
    epochs: float = 1.0
    max_records: int = 0                 # per file; 0: all
    chunk: int = 0                       # head rows per chunk (0: automatic)
    what: ClassVar[str] = "training"     # for the error messages

    def __post_init__(self) -> None:
        if isinstance(self.files, str):
            self.files = [self.files]
        if isinstance(self.val_files, str):
            self.val_files = [self.val_files]
        if not self.files:
            raise ConfigError(f"[data] files names no {self.what} data file")
        if self.epochs <= 0:
            raise ConfigError(f"data.epochs={self.epochs} must be > 0")


@dataclass
class FinetuneModel:
    fused: bool = False                  # fused BitLinear blocks + fused head loss (SFT) / row kernel (DPO)

    def __post_init__(self) -> None:
        if not isinstance(self.fused, bool):   # `--set model.fused=no` arrives as the string "no"
            raise ConfigError(f"model.fused={self.fused!r} is not true or false")


@dataclass
class FinetuneRecipe(RecipePaths):
    name: str
    init: str
    data: Any
    schedule: dict
    optim: OptimSpec
    train: dict                          # TrainConfig fields; ``steps`` may be missing (from epochs)
    seed: int = 0
    out: str = "runs/finetune"
    tokenizer: str | None = None
    export: list = field(default_factory=lambda: ["packed"])
    model: FinetuneModel = field(default_factory=FinetuneModel)
    source: str | None = None

    @classmethod
    def from_dict(cls, d: dict, data_cls, source: str = "recipe") -> "FinetuneRecipe":
        d = copy.deepcopy(d)
        top = {"name", "init", "model", "data", "schedule", "optim", "train", "seed", "out", "tokenizer",
               "export"}
        unknown = sorted(set(d) - top)
        if unknown:
            raise ConfigError(f"{source}: unknown top-level field(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(top))}")
        if not d.get("init"):
            raise ConfigError(f"{source}: `init` (the starting model folder) is required")
        export = d.get("export", ["packed"])
        export = [export] if isinstance(export, str) else list(export)
        bad = [e for e in export if e not in EXPORT_LAYOUTS]
        if bad:
            raise ConfigError(f"{source}: export={bad} is not a subset of {list(EXPORT_LAYOUTS)}")
        try:
            train = dict(d.get("train", {}))
            TrainConfig(**{**train, "steps": train.get("steps") or 1})   # validate the fields now
        except TypeError as e:
            raise ConfigError(f"{source}: recipe [train]: {e}") from None
        try:
            r = cls(name=d.get("name", Path(source).stem), init=str(d["init"]),
                    data=_build(data_cls, d.get("data", {}), "data"),
                    schedule={**DEFAULT_SCHEDULE, **d.get("schedule", {})},
                    optim=_build(OptimSpec, d.get("optim", {}), "optim"), train=train,
                    seed=int(d.get("seed", 0)), out=d.get("out", "runs/finetune"),
                    tokenizer=d.get("tokenizer") or None, export=export,
                    model=_build(FinetuneModel, d.get("model", {}), "model"), source=source)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        Schedule.from_dict(r.schedule, total_steps=100, source=f"{source}: [schedule]")
        return r

    @classmethod
    def from_file(cls, path: str | Path, data_cls, overrides: list[str] | None = None) -> "FinetuneRecipe":
        return cls.from_dict(read_recipe_file(path, overrides), data_cls, source=str(path))

    def train_config(self, steps: int) -> TrainConfig:
        return _build(TrainConfig, {**self.train, "steps": int(self.train.get("steps") or steps)}, "train")

    def make_schedule(self, steps: int) -> Schedule:
        return Schedule.from_dict(self.schedule, total_steps=steps, source=f"{self.source}: [schedule]")

    def to_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "init": self.init, "out": self.out,
                "tokenizer": self.tokenizer, "export": self.export, "model": asdict(self.model),
                "data": asdict(self.data), "schedule": self.schedule, "optim": asdict(self.optim),
                "train": self.train}


# ---------------------------------------------------------------- the starting model

def _is_training_folder(p: Path) -> bool:
    return (p / "trainer_state.json").is_file() or (p / "checkpoints").is_dir()


def load_start(init: str | Path, tokenizer: str | Path | None = None) -> tuple[torch.nn.Module, Path]:
    """(trainable fp32 BitLinear model in train mode, tokenizer folder) of a starting point.

    ``init``: a training run / checkpoint folder (fp32 master latents; the tokenizer it recorded),
    or a Hugging Face folder: master (online) latents as stored, packed files as latents
    ``W_t * gamma`` (their ternarization is the file's weights again).
    """
    p = Path(init)
    tok_dir: Path | None = Path(tokenizer) if tokenizer else None
    if _is_training_folder(p):
        from .export import load_training_checkpoint
        model, state = load_training_checkpoint(p)
        if tok_dir is None and state.get("tokenizer"):
            tok_dir = Path(state["tokenizer"])
    else:
        from .. import checkpoint
        if not p.exists():
            raise CheckpointError(f"{p}: starting model folder not found")
        model = checkpoint.load(p, dtype="float32", packed=False)
        if tok_dir is None and (p / "tokenizer.json").is_file():
            tok_dir = p
    if tok_dir is None or not (tok_dir / "tokenizer.json").is_file():
        raise ConfigError(f"no tokenizer for {p}: set `tokenizer` in the recipe (a folder with tokenizer.json)")
    model.float().requires_grad_(True).train()
    return model, tok_dir


def config_dict(model) -> dict:
    """config.json of the training checkpoints: fp32 master latents ("online")."""
    cfg = model.config.replace(dtype="float32", linear_class="autobitlinear")
    d = cfg.to_dict(quantization_mode="online")
    d["torch_dtype"] = "float32"
    return d


def make_optimizer(model, recipe: FinetuneRecipe, device: torch.device) -> torch.optim.Optimizer:
    from .pretrain import make_optimizer as _make
    return _make(model, recipe, device)


def rank_slices(n: int, per_rank: int, rank: int, world: int):
    """(lo, hi) item ranges of this rank, one per global micro-batch of ``per_rank * world`` items.

    Every rank gets the same number of ranges, so the collectives inside a sharded forward stay
    matched; a rank past the end gets an empty range (it runs a throw-away batch, see callers).
    """
    for s in range(0, n, per_rank * world):
        lo = min(n, s + rank * per_rank)
        yield lo, min(n, lo + per_rank)


def export_model(model, out: str | Path, tok_dir: str | Path, layouts: list[str]) -> dict[str, str]:
    """OUT/hf (packed 2-bit HF folder, bf16 embeddings) and optionally OUT/master (fp32 latents)."""
    from .. import checkpoint
    out = Path(out)
    paths = {}
    was = model.training
    model.eval()
    with torch.no_grad():
        if "packed" in layouts:
            paths["packed"] = str(checkpoint.save(model, out / "hf", layout="packed", tokenizer_dir=tok_dir,
                                                  dtype="bfloat16"))
        if "master" in layouts:
            paths["master"] = str(checkpoint.save(model, out / "master", layout="master",
                                                  tokenizer_dir=tok_dir, dtype="float32"))
    model.train(was)
    return paths


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


@dataclass
class Start:
    """What an SFT or DPO run starts from (:func:`begin`): the model is on ``ctx.device``, fused if asked."""
    recipe: FinetuneRecipe
    out: Path
    model: nn.Module                     # the trainable Transformer (fp32 latents), not wrapped
    tok: Any
    tok_dir: Path
    ctx: Any                             # loop.LocalContext or distributed.DistContext
    pad: int                             # padding token id
    micro_batch: int                     # rows / pairs per rank
    grad_accum: int

    @property
    def head(self) -> str:
        return "fused" if self.recipe.model.fused else "chunked"

    def head_loss(self, kind: str, reduction: str = "sum", chunk: int | None = None, dtype: str = "fp32",
                  net: nn.Module | None = None, frozen: bool = False) -> nn.Module:
        """``net`` (default: the model) with its head loss (:class:`head_loss.HeadLoss`), wrapped for DDP /
        FSDP2 under torchrun; the head is the fused one with ``model.fused``, else the chunked one."""
        return wrap_head_loss(self.ctx, self.model if net is None else net, kind, self.head, reduction, chunk,
                              dtype, frozen)


def begin(recipe: FinetuneRecipe | str | Path, data_cls, out: str | Path | None = None, init: str | None = None,
          overrides: list[str] | None = None, device: str = "auto", parallel: str = "ddp") -> Start:
    """Read the recipe (``init`` overrides its starting model), seed every RNG, set up the process
    context, load the starting model and its tokenizer, swap in the fused classes (``model.fused``) and
    move the model to the context's device (under torchrun: this rank's)."""
    import random

    import numpy as np

    from ..tokenizer import Tokenizer
    from .pretrain import setup_context

    if not isinstance(recipe, FinetuneRecipe):
        recipe = FinetuneRecipe.from_file(recipe, data_cls, overrides)
    if init:
        recipe.init = str(init)
    ctx = setup_context(device, parallel)
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model, tok_dir = load_start(recipe.resolve(recipe.init),
                                recipe.resolve(recipe.tokenizer) if recipe.tokenizer else None)
    tok = Tokenizer.from_pretrained(tok_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tok_dir} has {tok.vocab_size} tokens > the model's vocab_size "
                          f"{model.config.vocab_size}")
    if recipe.model.fused:
        from ..kernels.bitlinear_train import use_fused_bitlinear
        if use_fused_bitlinear(model) == 0:      # class swap only: before DDP / FSDP2 and the reference copy
            raise ConfigError(f"{recipe.source}: model.fused = true, but {recipe.init} has no BitLinear layer")
    model.to(ctx.device)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    return Start(recipe, Path(out or recipe.out), model, tok, Path(tok_dir), ctx, pad,
                 int(recipe.train.get("micro_batch", 8)), int(recipe.train.get("grad_accum", 1)))


def make_trainer(s: Start, stage: str, call: nn.Module, tcfg: TrainConfig, loss_fn, batches, eval_fn,
                 resume: bool) -> Trainer:
    """The optimizer (after sharding: DTensor parameters) and the Trainer of ``call`` (the wrapped head
    loss); resumed from OUT's latest checkpoint with ``resume``, else refusing to overwrite one; the
    recipe is recorded in OUT/recipe.json."""
    from .loop import find_latest

    net, out = s.model, s.out
    optimizer = make_optimizer(net, s.recipe, s.ctx.device)
    trainer = Trainer(call, optimizer, s.recipe.make_schedule(tcfg.steps), loss_fn, batches, tcfg, out,
                      raw_model=net, ctx=s.ctx, eval_fn=eval_fn, config_dict=config_dict(net),
                      extra_state={"recipe": s.recipe.to_dict(), "tokenizer": str(s.tok_dir.resolve()),
                                   "stage": stage})
    if resume:
        if not trainer.maybe_resume() and s.ctx.is_main:
            print(f"--resume: no checkpoint in {out}, starting from step 0", flush=True)
    elif find_latest(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    if s.ctx.is_main:
        write_json(out / "recipe.json", s.recipe.to_dict())
    return trainer


def finish(s: Start, summary: dict) -> dict:
    """Export the final model and write OUT/summary.json (rank 0); close the process group."""
    ctx, net, out, layouts = s.ctx, s.model, s.out, s.recipe.export
    paths: dict = {}
    if ctx.mode == "fsdp" and layouts:                  # also one torchrun process: DTensor params
        msd = ctx.full_model_state(net)                    # collective: every rank takes part
        if ctx.is_main:
            from ..model import Transformer
            full = Transformer(net.config)
            missing, unexpected = full.load_state_dict(msd, strict=False)
            if unexpected or any(k in dict(full.named_parameters()) for k in missing):
                raise CheckpointError(f"gathered state does not fit the model: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
            paths = export_model(full, out, s.tok_dir, layouts)
    elif ctx.is_main:
        paths = export_model(net, out, s.tok_dir, layouts)
    summary.update({"name": s.recipe.name, "fused": s.recipe.model.fused, "head": s.head,
                    "device": str(ctx.device), "export": paths, "world": ctx.world, "parallel": ctx.mode})
    if ctx.is_main:
        write_json(out / "summary.json", summary)
    if ctx.mode != "single":
        ctx.close()
    return summary


# ---------------------------------------------------------------- command line (sft, dpo)

def add_arguments(p: argparse.ArgumentParser, recipe_help: str, init_help: str, set_example: str) -> None:
    """The arguments `bitnet158 sft` and `bitnet158 dpo` share."""
    p.add_argument("recipe", help=recipe_help)
    p.add_argument("--init", default=None, help=init_help)
    p.add_argument("--out", default=None, help="output folder (default: the recipe's `out`)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"], help="mode under torchrun")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe value, e.g. --set {set_example} (repeatable)")
    p.add_argument("--fused", action="store_true",
                   help="fused BitLinear kernels and fused head (same as --set model.fused=true)")


def command(run, recipe_help: str, init_help: str, set_example: str):
    """``(add_arguments, main)`` of `bitnet158 sft` / `bitnet158 dpo` for ``run`` (``run_sft`` / ``run_dpo``):
    ``main`` runs it from parsed arguments and rank 0 prints the flat summary as one JSON line."""
    def add(p: argparse.ArgumentParser) -> None:
        add_arguments(p, recipe_help, init_help, set_example)

    def main(args: argparse.Namespace) -> int:
        import os
        summary = run(args.recipe, out=args.out, init=args.init, resume=args.resume, device=args.device,
                      overrides=args.set + (["model.fused=true"] if args.fused else []), parallel=args.parallel)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
        return 0

    return add, main
