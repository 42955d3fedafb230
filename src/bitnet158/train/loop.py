"""The training loop shared by pretraining, SFT and DPO: step, eval, log, atomic exact-resume checkpoints.

    trainer = Trainer(model, optimizer, schedule, loss_fn, batches, TrainConfig(steps=1000), out_dir,
                      eval_fn=eval_fn, config_dict=cfg.to_dict(quantization_mode="online"))
    trainer.maybe_resume()          # picks up out_dir/checkpoints/latest if there is one
    trainer.fit()

How another training job plugs in:

- ``loss_fn(model, batch) -> (loss, metrics)``: ``loss`` a scalar tensor for one micro-batch (the
  trainer runs it under autocast and calls ``backward``); ``metrics`` a dict of floats/0-d tensors
  summed over micro-batches and ranks for the log (give ``"tokens"`` to get tokens/s). With
  ``TrainConfig.loss_scale="mean"`` each micro-batch loss is divided by ``grad_accum`` (mean-type
  losses); with ``"sum"`` it is not (summed-token SFT losses). Call the model through
  ``model(...)``, ``model.hidden(...)`` or ``model.logits(...)``: under FSDP2 those three are the
  registered forward methods.
- ``batches``: an object with ``next_batch(step) -> batch`` (one micro-batch of *this* rank; ``step``
  is the update index, for stage switching), ``state_dict() -> dict`` (JSON-able) and
  ``load_state_dict(dict)``. Its state is saved in every checkpoint, so a resumed run sees the same
  batches.
- ``eval_fn(model) -> dict`` (optional): run every ``eval_every`` updates and at the end, under
  ``torch.no_grad()`` with the model in eval mode; its values go to the log (e.g. ``val_loss``).
- ``ctx``: :class:`LocalContext` (one process) or ``distributed.DistContext`` (torchrun: DDP or
  FSDP2); it owns gradient sync, reductions and full state dicts.

Checkpoints (``out_dir/checkpoints/step-NNNNNNNN/``) hold ``config.json`` + ``model.safetensors``
(fp32 master weights with checkpoint names: an "online" HF folder), ``optimizer.safetensors`` +
``optimizer.json``, ``rng-<rank>.safetensors`` / ``.json`` and ``trainer_state.json`` (step, data
position, metrics). They are written to a hidden temporary folder, fsynced and renamed into place
(``os.replace``), then ``latest`` is replaced atomically: a kill at any moment leaves the previous
checkpoint intact. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import BitNetError

CKPT_DIR = "checkpoints"
LATEST = "latest"


class TrainingError(BitNetError, RuntimeError):
    """Training cannot go on (non-finite loss, unusable checkpoint, ...)."""


@dataclass
class TrainConfig:
    steps: int                           # optimizer updates in the whole run
    micro_batch: int = 8                 # rows per micro-batch per process
    grad_accum: int = 1                  # micro-batches per update
    clip: float = 1.0                    # max global grad norm (0: off)
    dtype: str = "bf16"                  # autocast dtype: "bf16" or "fp32" (no autocast)
    compile: bool = False                # torch.compile the model (falls back to eager on failure)
    activation_checkpointing: bool = False
    deterministic: bool = False          # torch's deterministic algorithms (GPU runs repeat bitwise; slower)
    log_every: int = 1
    eval_every: int = 0                  # 0: only at the end
    ckpt_every: int = 0                  # 0: only at the end
    keep_checkpoints: int = 2
    loss_scale: str = "mean"             # "mean": loss / grad_accum; "sum": as is
    plot: bool = True                    # loss-curve PNG (needs matplotlib)
    tensorboard: bool = False            # TensorBoard event files under out_dir/tb
    wandb_project: str | None = None     # W&B run in this project (needs wandb)
    quiet: bool = False

    def __post_init__(self) -> None:
        from ..errors import ConfigError
        if self.steps <= 0 or self.micro_batch <= 0 or self.grad_accum <= 0:
            raise ConfigError("train.steps, train.micro_batch and train.grad_accum must be positive")
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"train.dtype={self.dtype!r} is not 'bf16' or 'fp32'")
        if self.loss_scale not in ("mean", "sum"):
            raise ConfigError(f"train.loss_scale={self.loss_scale!r} is not 'mean' or 'sum'")


# ---------------------------------------------------------------- process context

class LocalContext:
    """One process, no torch.distributed: the default context."""

    rank, world, local_rank = 0, 1, 0
    mode = "single"

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync_grads(self, model, sync: bool):
        return contextlib.nullcontext()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def full_state(self, model, optimizer) -> tuple[dict, dict]:
        """(model state dict, optimizer state keyed by parameter name), full tensors on CPU."""
        msd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return msd, optim_state_by_name(model, optimizer)

    def load_full_state(self, model, optimizer, msd: dict, osd: dict | None) -> None:
        missing, unexpected = model.load_state_dict(msd, strict=False)
        if missing or unexpected:
            raise TrainingError(f"checkpoint does not fit the model: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
        if osd is not None:
            optimizer.load_state_dict(optim_state_from_names(model, optimizer, osd))


def optim_state_by_name(model, optimizer) -> dict:
    """torch optimizer state dict with parameter names instead of integer ids."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    state = {order[i]: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
             for i, s in sd["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def optim_state_from_names(model, optimizer, osd: dict) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    pos = {n: i for i, n in enumerate(order)}
    state = {pos[n]: s for n, s in osd["state"].items()}
    groups = [{**g, "params": [pos[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- file helpers

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def _flatten_optim(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": osd["param_groups"], "scalars": {}}
    for name, s in osd["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{name}/{k}"] = v
            else:
                meta["scalars"][f"{name}/{k}"] = v
    return tensors, meta


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def find_latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out_dir/checkpoints`` (or ``None``)."""
    root = Path(out_dir) / CKPT_DIR
    ptr = root / LATEST
    if ptr.is_file():
        cand = root / ptr.read_text().strip()
        if (cand / "trainer_state.json").is_file():
            return cand
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return kb / 2**20


def use_deterministic() -> None:
    """Deterministic algorithms only, so that two runs of one seed repeat each other on a GPU (kernels that
    accumulate with atomics otherwise add fp32 terms in a different order each run, and ternary training
    amplifies the difference). Strict: in warn-only mode torch keeps the fast non-deterministic backward of
    flash and memory-efficient attention and may pick cuDNN attention, whose backward has no deterministic
    version; strict mode selects the deterministic attention backward, and an op without a deterministic
    version stops the run with torch's error naming it. cuBLAS needs a fixed workspace, set before its first
    handle."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


# ---------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, model, optimizer, schedule, loss_fn: Callable, batches, cfg: TrainConfig,
                 out_dir: str | Path, *, raw_model=None, eval_fn: Callable | None = None,
                 ctx: LocalContext | None = None, config_dict: dict | None = None,
                 extra_state: dict | None = None):
        self.model = model                       # what is called (maybe wrapped / compiled)
        self.raw_model = raw_model if raw_model is not None else model   # what is saved
        self.optimizer, self.schedule, self.loss_fn = optimizer, schedule, loss_fn
        self.batches, self.cfg, self.eval_fn = batches, cfg, eval_fn
        self.out = Path(out_dir)
        self.ctx = ctx or LocalContext(next(self.raw_model.parameters()).device)
        self.config_dict = config_dict
        self.extra_state = extra_state or {}
        self.step = 0                            # updates done
        self.tokens_seen = 0
        self.history: list[dict] = []            # this process's log records
        if cfg.deterministic:
            use_deterministic()
        self._compiled_ok = not cfg.compile
        self._call_model = model
        if cfg.compile:
            self._call_model = torch.compile(model)
        self._sinks: list = []
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / CKPT_DIR).mkdir(exist_ok=True)
            for tmp in (self.out / CKPT_DIR).glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)   # leftovers of a killed save
        self.ctx.barrier()

    # ------------------------------------------------------------------ logging
    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    def _open_sinks(self) -> None:
        if not self.ctx.is_main:
            return
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._sinks.append(("tb", SummaryWriter(str(self.out / "tb"))))
            except ImportError:
                self._print("tensorboard is not installed: TensorBoard sink off")
        if self.cfg.wandb_project:
            try:
                import wandb
                self._sinks.append(("wandb", wandb.init(project=self.cfg.wandb_project, dir=str(self.out),
                                                        resume="allow")))
            except ImportError:
                self._print("wandb is not installed: W&B sink off")

    def _print(self, msg: str) -> None:
        if self.ctx.is_main and not self.cfg.quiet:
            print(msg, flush=True)

    def _record(self, rec: dict) -> None:
        self.history.append(rec)
        if not self.ctx.is_main:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for kind, sink in self._sinks:
            nums = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
            if kind == "tb":
                for k, v in nums.items():
                    sink.add_scalar(k, v, rec["step"])
            else:
                sink.log(nums, step=rec["step"])

    # ------------------------------------------------------------------ one update
    def _forward_backward(self, batch, last: bool):
        cfg = self.cfg
        dev = self.ctx.device
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
        with self.ctx.sync_grads(self.model, last), amp:
            loss, metrics = self.loss_fn(self._call_model, batch)
        scaled = loss / cfg.grad_accum if cfg.loss_scale == "mean" else loss
        scaled.backward()
        return scaled.detach(), metrics

    def train_step(self, s: int) -> dict:
        cfg = self.cfg
        lr, wd = self.schedule.apply(self.optimizer, s)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.ctx.device, dtype=torch.float32)
        sums: dict[str, torch.Tensor] = {}
        for m in range(cfg.grad_accum):
            batch = self.batches.next_batch(s)
            try:
                loss, metrics = self._forward_backward(batch, m == cfg.grad_accum - 1)
            except Exception as e:  # torch.compile failed on the first micro-batch: go eager
                if self._compiled_ok or m > 0:
                    raise
                self._print(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running eager")
                self._call_model = self.model
                self.optimizer.zero_grad(set_to_none=True)
                loss, metrics = self._forward_backward(batch, m == cfg.grad_accum - 1)
            self._compiled_ok = True
            total += loss.float()
            for k, v in metrics.items():
                v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                sums[k] = sums.get(k, 0) + v.to(self.ctx.device)
        gnorm = None
        if cfg.clip > 0:
            params = [p for p in self.raw_model.parameters() if p.grad is not None]
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            if hasattr(gnorm, "full_tensor"):
                gnorm = gnorm.full_tensor()
        self.optimizer.step()
        # one reduction for loss and metrics: [loss, metric...]
        keys = sorted(sums)
        packed = torch.stack([total] + [sums[k].reshape(()) for k in keys])
        packed = self.ctx.all_reduce_sum(packed)
        vals = packed.tolist()
        loss_v = vals[0] / self.ctx.world
        if not math.isfinite(loss_v):
            raise TrainingError(f"loss is {loss_v} at update {s + 1}: lower the LR or check the data")
        dt = time.perf_counter() - t0
        rec = {"step": s + 1, "loss": loss_v, "lr": lr, "wd": wd, "stage": self.schedule.stage(s)}
        for k, v in zip(keys, vals[1:]):
            rec[k] = v
        if "tokens" in rec:
            self.tokens_seen += int(rec["tokens"])
            rec["tok_s"] = rec["tokens"] / dt
        if gnorm is not None:
            rec["grad_norm"] = float(gnorm)
        rec["tokens_seen"] = self.tokens_seen
        rec["time_s"] = dt
        rec["mem_gb"] = peak_memory_gb(self.ctx.device)
        return rec

    def evaluate(self) -> dict:
        if self.eval_fn is None:
            return {}
        self.raw_model.eval()
        amp = torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bf16")
        with torch.no_grad(), amp:
            out = self.eval_fn(self.model)
        self.raw_model.train()
        return {k: float(v) for k, v in out.items()}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        self._open_sinks()
        self.raw_model.train()
        start = time.time()
        last_eval: dict = {}
        for s in range(self.step, cfg.steps):
            rec = self.train_step(s)
            self.step = s + 1
            if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                self._print(f"step {self.step}/{cfg.steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
                            f"wd {rec['wd']:.4f} | tok/s {rec.get('tok_s', 0):.0f} | "
                            f"mem {rec['mem_gb']:.2f}GB")
            self._record(rec)
            end = self.step == cfg.steps
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or end:
                last_eval = self.evaluate()
                if last_eval:
                    self._record({"step": self.step, **last_eval})
                    self._print(f"eval step {self.step} | " +
                                " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or end:
                self.save()
        for kind, sink in self._sinks:
            sink.close() if kind == "tb" else sink.finish()
        if self.ctx.is_main and cfg.plot:
            plot_log(self.log_path, self.out / "loss.png")
        train_recs = [r for r in self.history if "loss" in r]
        return {"steps": self.step, "tokens": self.tokens_seen, "wall_s": time.time() - start,
                "final_loss": train_recs[-1]["loss"] if train_recs else None, **last_eval}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write checkpoint ``step-NNNNNNNN`` atomically; return its folder."""
        root = self.out / CKPT_DIR
        name = f"step-{self.step:08d}"
        tmp = root / f".tmp-{name}"
        msd, osd = self.ctx.full_state(self.raw_model, self.optimizer)   # collective under FSDP
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.ctx.barrier()
        rt, rm = rng_state()
        _save_tensors(tmp / f"rng-{self.ctx.rank}.safetensors", rt)
        _write_json(tmp / f"rng-{self.ctx.rank}.json", rm)
        self.ctx.barrier()
        if self.ctx.is_main:
            if self.config_dict is not None:
                _write_json(tmp / "config.json", self.config_dict)
            _save_tensors(tmp / "model.safetensors", msd)
            ot, om = _flatten_optim(osd)
            _save_tensors(tmp / "optimizer.safetensors", ot)
            _write_json(tmp / "optimizer.json", om)
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "world": self.ctx.world,
                     "data": self.batches.state_dict(), "schedule": self.schedule.to_dict(),
                     "train": asdict(self.cfg), **self.extra_state}
            _write_json(tmp / "trainer_state.json", state)   # written last: marks the folder complete
            for f in tmp.iterdir():
                _fsync(f)
            _fsync(tmp)
            final = root / name
            if final.exists():  # a rerun of the same step: move the old one out of the way first
                old = root / f".tmp-old-{name}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _fsync(root)
            atomic_write_text(root / LATEST, name + "\n")
            self._prune(root)
        self.ctx.barrier()
        return root / name

    def _prune(self, root: Path) -> None:
        keep = max(self.cfg.keep_checkpoints, 1)
        done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file())
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)

    def load(self, ckpt: str | Path, load_optimizer: bool = True) -> None:
        """Restore model, optimizer, data position, step and RNG from a checkpoint folder."""
        ckpt = Path(ckpt)
        st_path = ckpt / "trainer_state.json"
        if not st_path.is_file():
            raise TrainingError(f"{ckpt}: not a complete training checkpoint (no trainer_state.json)")
        state = json.loads(st_path.read_text())
        msd = load_file(str(ckpt / "model.safetensors"))
        osd = None
        if load_optimizer:
            osd = _unflatten_optim(load_file(str(ckpt / "optimizer.safetensors")),
                                   json.loads((ckpt / "optimizer.json").read_text()))
        self.ctx.load_full_state(self.raw_model, self.optimizer, msd, osd)
        self.batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        rank_file = ckpt / f"rng-{self.ctx.rank}.safetensors"
        if not rank_file.is_file():
            rank_file = ckpt / "rng-0.safetensors"
        set_rng_state(load_file(str(rank_file)), json.loads(rank_file.with_suffix(".json").read_text()))
        if self.ctx.is_main and self.log_path.is_file():
            # drop log records written after this checkpoint (they will be redone)
            keep = [ln for ln in self.log_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            atomic_write_text(self.log_path, "".join(k + "\n" for k in keep))
        self.ctx.barrier()
        self._print(f"resumed from {ckpt} at step {self.step}")

    def maybe_resume(self) -> bool:
        ckpt = find_latest(self.out)
        if ckpt is None:
            return False
        self.load(ckpt)
        return True


# ---------------------------------------------------------------- plots

def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_log(log_path: str | Path, png: str | Path, title: str | None = None) -> bool:
    """Loss curve (train, smoothed, and validation) with the LR on a second axis. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss-curve PNG (pip install 'bitnet158[train]')",
              file=sys.stderr)
        return False
    recs = read_log(log_path)
    tr = [r for r in recs if "loss" in r]
    va = [r for r in recs if "val_loss" in r]
    if not tr:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = np.array([r["step"] for r in tr])
    loss = np.array([r["loss"] for r in tr])
    ax.plot(steps, loss, alpha=0.3, lw=0.8, label="train")
    if len(loss) > 20:
        k = max(len(loss) // 50, 2)
        sm = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], sm, lw=1.5, label=f"train (mean of {k})")
    if va:
        ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="validation")
    ax.set_xlabel("update")
    ax.set_ylabel("loss (nats/token)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in tr], color="gray", lw=0.8, ls="--", label="lr")
    ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.set_title(title or Path(log_path).parent.name)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True
