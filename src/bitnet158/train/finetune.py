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
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .loop import TrainConfig
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


def begin(recipe: FinetuneRecipe, device: str):
    """Seed every RNG, pick the device, load the starting model and its tokenizer.

    Returns (model, tokenizer, tokenizer folder, device); the model is not moved yet.
    """
    import random

    import numpy as np

    from ..tokenizer import Tokenizer

    dev = pick_device(device)
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model, tok_dir = load_start(recipe.resolve(recipe.init),
                                recipe.resolve(recipe.tokenizer) if recipe.tokenizer else None)
    tok = Tokenizer.from_pretrained(tok_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tok_dir} has {tok.vocab_size} tokens > the model's vocab_size "
                          f"{model.config.vocab_size}")
    return model, tok, tok_dir, dev


def resume_or_start(trainer, out: Path, resume: bool, recipe: FinetuneRecipe) -> None:
    """Resume from OUT's latest checkpoint, or refuse to overwrite one; then record the recipe."""
    from .loop import find_latest

    if resume:
        if not trainer.maybe_resume():
            print(f"--resume: no checkpoint in {out}, starting from step 0", flush=True)
    elif find_latest(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    write_json(out / "recipe.json", recipe.to_dict())


# ---------------------------------------------------------------- command line (sft, dpo)

def add_arguments(p: argparse.ArgumentParser, recipe_help: str, init_help: str, set_example: str) -> None:
    """The arguments `bitnet158 sft` and `bitnet158 dpo` share."""
    p.add_argument("recipe", help=recipe_help)
    p.add_argument("--init", default=None, help=init_help)
    p.add_argument("--out", default=None, help="output folder (default: the recipe's `out`)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe value, e.g. --set {set_example} (repeatable)")


def run_command(run, args: argparse.Namespace) -> int:
    """Run ``run_sft``/``run_dpo`` from parsed arguments; print the flat summary as one JSON line."""
    summary = run(args.recipe, out=args.out, init=args.init, resume=args.resume, device=args.device,
                  overrides=args.set)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    return 0
