"""What SFT and DPO share: the recipe file, the starting model, the optimizer, the trainer, the export.

    recipe = FinetuneRecipe.from_file("recipes/sft-embedded.toml", SFTData, overrides=["train.steps=5"])
    model, tok_dir = load_start(recipe.init)              # fp32 BitLinear latents, trainable
    ...                                                   # sft.py / dpo.py build batches and a loss
    export_model(model, out, tok_dir, recipe.export)      # OUT/hf (packed HF folder) [+ OUT/master]

A fine-tuning recipe is a TOML (or JSON) file in the pretraining recipes' format (``recipe.py``:
same ``[schedule]``, ``[optim]`` and ``[train]`` tables, same ``--set section.key=value``
overrides), with these top-level keys instead of ``[model]``:

    name = "sft-tiny"
    seed = 0
    init = "runs/pretrain"            # starting model: HF folder (packed or master) or a training run /
                                      # checkpoint folder (its fp32 master weights)
    tokenizer = "tok/"                # optional: default the init folder's tokenizer (or the run's)
    out = "runs/sft"
    export = ["packed"]               # OUT/hf packed 2-bit HF folder; add "master" for OUT/master (fp32)
    [data] ...                        # SFT or DPO data table (see sft.py / dpo.py)

``train.steps`` may be left out: it is then computed from ``data.epochs``.

Under ``torchrun`` (``--parallel ddp|fsdp``) every rank loads the starting model, the model and its
head loss are wrapped together (:class:`HeadLoss`: DDP's gradient sync and FSDP2's all-gather of the
tied head only act around ``forward``), each rank takes its slice of the same global micro-batch
(``micro_batch`` rows or pairs per rank), rank 0 alone prints and writes logs, checkpoints (gathered
full state: they load in one process and the other way round) and the exported folders.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .loop import TrainConfig
from .losses import linear_cross_entropy, sequence_logprobs
from .recipe import OptimSpec, _build, read_recipe_file
from .schedules import Schedule

EXPORT_LAYOUTS = ("packed", "master")
DEFAULT_SCHEDULE = {"kind": "constant", "warmup_steps": 0, "lr_peak": 1e-4, "wd_peak": 0.0}


@dataclass
class FinetuneRecipe:
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
    source: str | None = None

    @classmethod
    def from_dict(cls, d: dict, data_cls, source: str = "recipe") -> "FinetuneRecipe":
        d = copy.deepcopy(d)
        top = {"name", "init", "data", "schedule", "optim", "train", "seed", "out", "tokenizer", "export"}
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
                    tokenizer=d.get("tokenizer") or None, export=export, source=source)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        Schedule.from_dict(r.schedule, total_steps=100, source=f"{source}: [schedule]")
        return r

    @classmethod
    def from_file(cls, path: str | Path, data_cls, overrides: list[str] | None = None) -> "FinetuneRecipe":
        return cls.from_dict(read_recipe_file(path, overrides), data_cls, source=str(path))

    def resolve(self, p: str | Path) -> Path:
        """A recipe path: as given if it exists from the current directory, else from the recipe's folder."""
        p = Path(p)
        if p.is_absolute() or p.exists() or not self.source:
            return p
        alt = Path(self.source).resolve().parent / p
        return alt if alt.exists() else p

    def train_config(self, steps: int) -> TrainConfig:
        return _build(TrainConfig, {**self.train, "steps": int(self.train.get("steps") or steps)}, "train")

    def make_schedule(self, steps: int) -> Schedule:
        return Schedule.from_dict(self.schedule, total_steps=steps, source=f"{self.source}: [schedule]")

    def to_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "init": self.init, "out": self.out,
                "tokenizer": self.tokenizer, "export": self.export, "data": asdict(self.data),
                "schedule": self.schedule, "optim": asdict(self.optim), "train": self.train}


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


class HeadLoss(nn.Module):
    """The model and its head loss as one module: what DDP / FSDP2 wrap for fine-tuning.

    ``kind="sft"``: ``forward(tokens, labels, segments)`` -> summed CE over target tokens (scalar);
    ``kind="logps"``: ``forward(tokens, labels)`` -> summed target log-probs per row [B] (DPO).
    The chunked head reads the tied head weight: under FSDP2 it is only unsharded inside the root's
    forward, and DDP only syncs the gradients of what ran through ``forward``.
    """

    def __init__(self, net: nn.Module, kind: str, chunk: int | None = None):
        super().__init__()
        if kind not in ("sft", "logps"):
            raise ValueError(f"HeadLoss kind {kind!r} is not 'sft' or 'logps'")
        self.net, self.kind, self.chunk = net, kind, chunk

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor | None = None):
        h = self.net.hidden(tokens, segment_ids=segments)                  # [B, T, D]
        if self.kind == "sft":
            return linear_cross_entropy(h.flatten(0, 1), self.net.head_weight, labels.flatten(),
                                        reduction="sum", chunk=self.chunk)
        return sequence_logprobs(h, self.net.head_weight, labels, chunk=self.chunk)


def unwrap(model):
    """The module under torch.compile / DDP wrappers (FSDP2 modules are their own module)."""
    m = getattr(model, "_orig_mod", model)
    return getattr(m, "module", m)


def wrap(ctx, net: nn.Module, kind: str, chunk: int | None, dtype: str, frozen: bool = False):
    """``HeadLoss(net)`` wrapped for ``ctx``: DDP / FSDP2 (per block, then root) under torchrun, as is alone."""
    mod = HeadLoss(net, kind, chunk)
    if ctx.world == 1:
        return mod
    if frozen:
        return ctx.wrap_frozen(mod, mixed_precision=dtype == "bf16", blocks=net.model.layers)
    return ctx.wrap(mod, mixed_precision=dtype == "bf16", blocks=net.model.layers, methods=())


def rank_slices(n: int, per_rank: int, rank: int, world: int):
    """(lo, hi) item ranges of this rank, one per global micro-batch of ``per_rank * world`` items.

    Every rank gets the same number of ranges, so the collectives inside a sharded forward stay
    matched; a rank past the end gets an empty range (it runs a throw-away batch, see callers).
    """
    for s in range(0, n, per_rank * world):
        lo = min(n, s + rank * per_rank)
        yield lo, min(n, lo + per_rank)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(device)


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


def begin(recipe: FinetuneRecipe, device: str, parallel: str = "ddp"):
    """Seed every RNG, set up the process context, load the starting model and its tokenizer.

    Returns (model, tokenizer, tokenizer folder, context); ``context.device`` is the device (under
    torchrun: this rank's); the model is not moved yet.
    """
    import random

    import numpy as np

    from ..tokenizer import Tokenizer
    from .pretrain import setup_context

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
    return model, tok, tok_dir, ctx


def finish(ctx, net: nn.Module, out: Path, tok_dir, layouts: list[str], summary: dict) -> dict:
    """Export the final model and write OUT/summary.json (rank 0); close the process group."""
    paths: dict = {}
    if ctx.world > 1 and ctx.mode == "fsdp" and layouts:
        msd = ctx.full_model_state(net)                    # collective: every rank takes part
        if ctx.is_main:
            from ..model import Transformer
            full = Transformer(net.config)
            missing, unexpected = full.load_state_dict(msd, strict=False)
            if unexpected or any(k in dict(full.named_parameters()) for k in missing):
                raise CheckpointError(f"gathered state does not fit the model: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
            paths = export_model(full, out, tok_dir, layouts)
    elif ctx.is_main:
        paths = export_model(net, out, tok_dir, layouts)
    summary["export"] = paths
    summary["world"], summary["parallel"] = ctx.world, ctx.mode
    if ctx.is_main:
        write_json(out / "summary.json", summary)
    if ctx.world > 1:
        ctx.close()
    return summary


def resume_or_start(trainer, out: Path, resume: bool, recipe: FinetuneRecipe) -> None:
    """Resume from OUT's latest checkpoint, or refuse to overwrite one; then record the recipe."""
    from .loop import find_latest

    if resume:
        if not trainer.maybe_resume() and trainer.ctx.is_main:
            print(f"--resume: no checkpoint in {out}, starting from step 0", flush=True)
    elif find_latest(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    if trainer.ctx.is_main:
        write_json(out / "recipe.json", recipe.to_dict())


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


def run_command(run, args: argparse.Namespace) -> int:
    """Run ``run_sft``/``run_dpo`` from parsed arguments; rank 0 prints the flat summary as one JSON line."""
    import os
    summary = run(args.recipe, out=args.out, init=args.init, resume=args.resume, device=args.device,
                  overrides=args.set, parallel=args.parallel)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    return 0
