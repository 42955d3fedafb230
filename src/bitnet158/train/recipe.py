"""Pretraining recipes are files: TOML (or JSON) read into dataclasses, with dotted overrides.

    recipe = Recipe.from_file("recipes/embedded-pretrain.toml", overrides=["train.steps=100"])

A recipe file::

    name = "tiny-cpu"
    seed = 0
    out = "runs/tiny-cpu"                  # output folder (checkpoints, log, loss.png)

    [model]
    size = "tiny"                          # a named size of ModelConfig
    linear = "bitlinear"                   # or "linear": the full-precision baseline
    fused = false                          # fused BitLinear kernels + fused head loss (docs/fused-training.md)
    [model.overrides]                      # any ModelConfig field; vocab_size defaults to the data's
    num_hidden_layers = 2

    [data]
    seq_len = 128
    val_source = "books"                   # whose val split is the validation set (default: first)
    val_rows = 64
    [data.sources]                         # name -> shard folder built by `bitnet158 data`
    books = "shards/books"
    [[data.stages]]                        # stage-1 mixture
    books = 1.0
    [[data.stages]]                        # stage-2 mixture (switches at the schedule boundary)
    books = 1.0

    [schedule]                             # bitnet158.train.schedules.Schedule (total_steps = train.steps)
    kind = "two_stage"
    lr_peak = 1.5e-3
    lr_peak2 = 1e-3

    [optim]
    betas = [0.9, 0.95]

    [train]                                # bitnet158.train.loop.TrainConfig
    steps = 1000
    micro_batch = 8

Relative paths are read from the current directory, and failing that from the recipe's folder.
Overrides are ``section.key=value`` with a TOML value (``train.steps=10``, ``model.linear="linear"``).
"""

from __future__ import annotations

import copy
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .loop import TrainConfig
from .schedules import Schedule


def _build(cls, d: dict, section: str):
    if not isinstance(d, dict):
        raise ConfigError(f"recipe [{section}] must be a table")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"recipe [{section}]: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ConfigError(f"recipe [{section}]: {e}") from None


@dataclass
class ModelSpec:
    size: str = "tiny"
    linear: str = "bitlinear"            # "bitlinear" (ternary) or "linear" (full-precision baseline)
    overrides: dict = field(default_factory=dict)
    init_std: float = 0.02
    fused: bool = False                  # fused BitLinear block kernels + fused head loss

    def __post_init__(self) -> None:
        if self.linear not in ("bitlinear", "linear"):
            raise ConfigError(f"recipe model.linear={self.linear!r} is not 'bitlinear' or 'linear'")
        if not isinstance(self.fused, bool):   # `--set model.fused=no` arrives as the string "no"
            raise ConfigError(f"recipe model.fused={self.fused!r} is not true or false")


@dataclass
class DataSpec:
    sources: dict = field(default_factory=dict)       # name -> shard folder
    stages: list = field(default_factory=list)        # [{name: weight}, ...] per schedule stage
    seq_len: int = 1024
    val_source: str | None = None
    val_rows: int = 256

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("recipe [data.sources] names no shard folder")
        if self.seq_len <= 0:
            raise ConfigError(f"recipe data.seq_len={self.seq_len} must be positive")


@dataclass
class OptimSpec:
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    fused: bool = False                  # torch's fused AdamW (CUDA)


class RecipePaths:
    """``resolve`` for recipes read from a file (``self.source``): pretraining and fine-tuning recipes."""

    source: str | None

    def resolve(self, p: str | Path) -> Path:
        """A path of the recipe: as given if it exists from the current directory, else from the recipe's folder."""
        p = Path(p)
        if p.is_absolute() or p.exists() or not self.source:
            return p
        alt = Path(self.source).resolve().parent / p
        return alt if alt.exists() else p


@dataclass
class Recipe(RecipePaths):
    name: str
    model: ModelSpec
    data: DataSpec
    schedule: dict
    optim: OptimSpec
    train: TrainConfig
    seed: int = 0
    out: str = "runs/pretrain"
    tokenizer: str | None = None         # for export; default: the first source's tokenizer copy
    source: str | None = None            # the file it was read from

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe") -> "Recipe":
        d = copy.deepcopy(d)
        top = {"name", "model", "data", "schedule", "optim", "train", "seed", "out", "tokenizer"}
        unknown = sorted(set(d) - top)
        if unknown:
            raise ConfigError(f"{source}: unknown top-level field(s) {', '.join(unknown)}")
        if "train" not in d or "steps" not in d["train"]:
            raise ConfigError(f"{source}: [train] steps is required")
        try:
            train = _build(TrainConfig, d.get("train", {}), "train")
            r = cls(name=d.get("name", Path(source).stem), model=_build(ModelSpec, d.get("model", {}), "model"),
                    data=_build(DataSpec, d.get("data", {}), "data"), schedule=d.get("schedule", {}),
                    optim=_build(OptimSpec, d.get("optim", {}), "optim"), train=train,
                    seed=int(d.get("seed", 0)), out=d.get("out", "runs/pretrain"),
                    tokenizer=d.get("tokenizer"), source=source)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        r.make_schedule()  # validate now, not after the model is built
        return r

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None) -> "Recipe":
        return cls.from_dict(read_recipe_file(path, overrides), source=str(path))

    def make_schedule(self) -> Schedule:
        return Schedule.from_dict(self.schedule, total_steps=self.train.steps, source=f"{self.source}: [schedule]")

    def to_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "out": self.out, "tokenizer": self.tokenizer,
                "model": asdict(self.model), "data": asdict(self.data), "schedule": self.schedule,
                "optim": asdict(self.optim), "train": asdict(self.train)}


def apply_override(d: dict, item: str) -> None:
    """``a.b.c=value`` (a TOML value; bare words are taken as strings) into nested dict ``d``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.strip().split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a table")
    cur[parts[-1]] = value


def read_recipe_file(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A recipe file (.toml, or .json) as a dict with ``--set KEY=VALUE`` overrides applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        d = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse ({e})") from None
    for o in overrides or []:
        apply_override(d, o)
    return d
