"""Learning-rate and weight-decay schedules of the BitNet b1.58 recipe, set per step on the optimizer.

    sched = Schedule(total_steps=10_000, warmup_steps=375, lr_peak=1.5e-3, lr_peak2=1e-3)
    lr, wd = sched.apply(optimizer, step)          # writes every param group's lr / weight_decay

``kind="two_stage"`` (the 2B4T recipe, SPEC §5):

- LR, stage 1: linear warmup to ``lr_peak``, then a cosine planned over the whole run (down to
  ``lr_peak * lr_min_ratio`` at the last step) — truncated at the boundary
  ``stage2_fraction * total_steps``.
- LR, stage 2 ("cooldown"): an abrupt drop to ``lr_peak2`` (lower than where stage 1 stopped),
  then a second cosine from ``lr_peak2`` to ``lr_final`` (~0) at the last step.
- WD, stage 1: a cosine planned over the whole run that starts at its peak ``wd_peak`` (0.1);
  stage 2: exactly 0.

``kind="one_stage"`` (the comparison): warmup then one cosine from ``lr_peak`` to ``lr_final``,
constant weight decay ``wd_peak`` (``wd_cosine=True``: the two-stage stage-1 weight-decay cosine over
the whole run instead, with no stage-2 zero). ``kind="constant"``: warmup then ``lr_peak``, weight decay
``wd_peak`` (used by fine-tuning recipes).

Steps count optimizer updates from 0; ``lr(step)`` is the value used for update ``step``.
Param groups with ``weight_decay_exempt=True`` (norms) always get weight decay 0; a group may scale
its LR with ``lr_scale``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ConfigError

KINDS = ("two_stage", "one_stage", "constant")


def _cosine(frac: float, start: float, end: float) -> float:
    """Cosine from ``start`` (frac 0) to ``end`` (frac 1); frac is clamped to [0, 1]."""
    frac = min(max(frac, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class Schedule:
    total_steps: int
    warmup_steps: int = 375
    kind: str = "two_stage"
    lr_peak: float = 1.5e-3          # stage-1 peak (one-stage: the only peak)
    lr_peak2: float = 1e-3           # stage-2 peak (two-stage only)
    lr_min_ratio: float = 0.1        # stage-1 cosine lands at lr_peak * this at the last step
    lr_final: float = 0.0            # LR at the last step of the run
    stage2_fraction: float = 0.5     # where the abrupt drop happens, as a fraction of total_steps
    wd_peak: float = 0.1             # stage-1 weight-decay peak (one-stage/constant: constant WD)
    wd_min_ratio: float = 0.0        # stage-1 WD cosine lands at wd_peak * this at the last step
    wd_cosine: bool = False          # one_stage: WD follows the stage-1 cosine (else constant)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"schedule.kind={self.kind!r} is not one of {KINDS}")
        if not isinstance(self.total_steps, int) or self.total_steps <= 0:
            raise ConfigError(f"schedule total_steps must be a positive integer, got {self.total_steps!r}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.total_steps:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps} must be in [0, total_steps="
                              f"{self.total_steps})")
        for name in ("lr_peak", "lr_peak2", "lr_final", "wd_peak", "lr_min_ratio", "wd_min_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"schedule.{name}={getattr(self, name)} must be >= 0")
        if self.kind == "two_stage":
            if not 0.0 < self.stage2_fraction < 1.0:
                raise ConfigError(f"schedule.stage2_fraction={self.stage2_fraction} must be in (0, 1)")
            if self.boundary <= self.warmup_steps:
                raise ConfigError(f"schedule: the stage boundary (step {self.boundary}) must come after "
                                  f"warmup_steps={self.warmup_steps}")
            end1 = self._stage1_lr(self.boundary - 1)
            if self.lr_peak2 > end1:
                raise ConfigError(
                    f"schedule.lr_peak2={self.lr_peak2:g} is above the stage-1 LR at the boundary "
                    f"({end1:g}): the cooldown must be a drop (lower lr_peak2 or raise lr_min_ratio)")

    # ------------------------------------------------------------------ structure
    @property
    def boundary(self) -> int:
        """First step of stage 2 (``total_steps`` for schedules without a second stage)."""
        if self.kind != "two_stage":
            return self.total_steps
        return int(round(self.stage2_fraction * self.total_steps))

    def stage(self, step: int) -> int:
        """1 or 2: which stage update ``step`` belongs to (data mixtures switch with it)."""
        return 2 if step >= self.boundary else 1

    # ------------------------------------------------------------------ values
    def _warmup(self, step: int, peak: float) -> float | None:
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        return None

    def _stage1_lr(self, step: int) -> float:
        w = self._warmup(step, self.lr_peak)
        if w is not None:
            return w
        span = max(self.total_steps - 1 - self.warmup_steps, 1)
        return _cosine((step - self.warmup_steps) / span, self.lr_peak, self.lr_peak * self.lr_min_ratio)

    def lr(self, step: int) -> float:
        if self.kind == "constant":
            w = self._warmup(step, self.lr_peak)
            return self.lr_peak if w is None else w
        if self.kind == "one_stage":
            w = self._warmup(step, self.lr_peak)
            if w is not None:
                return w
            span = max(self.total_steps - 1 - self.warmup_steps, 1)
            return _cosine((step - self.warmup_steps) / span, self.lr_peak, self.lr_final)
        if step < self.boundary:
            return self._stage1_lr(step)
        span = max(self.total_steps - 1 - self.boundary, 1)
        return _cosine((step - self.boundary) / span, self.lr_peak2, self.lr_final)

    def wd(self, step: int) -> float:
        if self.kind == "constant" or (self.kind == "one_stage" and not self.wd_cosine):
            return self.wd_peak
        if step >= self.boundary:
            return 0.0
        return _cosine(step / max(self.total_steps - 1, 1), self.wd_peak, self.wd_peak * self.wd_min_ratio)

    def apply(self, optimizer, step: int) -> tuple[float, float]:
        """Set ``lr`` and ``weight_decay`` of every param group for update ``step``; return both."""
        lr, wd = self.lr(step), self.wd(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
            g["weight_decay"] = 0.0 if g.get("weight_decay_exempt", False) else wd
        return lr, wd

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, total_steps: int | None = None, source: str = "schedule") -> "Schedule":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        kw = dict(d)
        if total_steps is not None:
            kw.setdefault("total_steps", total_steps)
        if "total_steps" not in kw:
            raise ConfigError(f"{source}: total_steps is missing")
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
