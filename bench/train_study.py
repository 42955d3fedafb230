"""Training study on one GPU: ternary two-stage vs one-stage vs full precision, several seeds, same tokens.

    PYTHONPATH=src python bench/train_study.py --data .carry/gutenberg --work /tmp/study --out out \\
        --arms ternary_two_stage,ternary_one_stage,fp_two_stage_lr1.5e-3 --seeds 0,1,2 --steps 900 \\
        --set train.micro_batch=16 --set train.grad_accum=2 --deadline-s 520 --name train_study-DATE-h100

Arms (recipes/, with the per-arm overrides of ``ARMS`` below); every arm runs every seed, and a seed
fixes both the initial weights and the data order, so seed ``s`` of every arm sees the same tokens in
the same order from the same start (per-seed pairs):

- ``ternary_two_stage``: ``embedded-pretrain.toml`` with the stage-1 cosine planned to 0
  (``schedule.lr_min_ratio=0``) — SPEC §5: peak 3e-3, abrupt drop at half the updates (from ~1.5e-3) into
  a cosine from 1e-3 to 0; weight decay a cosine from 0.1, exactly 0 in stage 2;
- ``ternary_one_stage``: ``study-ternary-one-stage.toml`` — the same peak (3e-3), one cosine to the same
  final LR (0), and the same weight-decay cosine from 0.1 without the stage-2 zero;
- ``fp_two_stage_lr*``: ``study-fp-two-stage.toml`` — nn.Linear projections, everything else as the
  ternary two-stage run, at its own peak LR (a small scan: the best mean is "the" FP baseline).
- ``ternary_{two,one}_stage_lr1.5e-3`` / ``_lr6e-3`` / ``_lr1.2e-2``: the two ternary schedules at other
  peaks (the two-stage stage-2 peak at 1/3 of stage 1's, as at 3e-3). Each schedule is then compared at its own tuned
  peak (``two_stage_tuned_minus_one_stage_tuned``, the arm with the lowest mean), as the FP baseline is.

``--merge EARLIER.json`` adds the runs of an earlier call (same updates and tokens per update) to the
report, so a scan can span several device calls; a seed's pair holds across calls.

Stage 1 of the two-stage runs is exactly the first half of the one-stage run (same LR and weight decay at
every update), as in the published ablation, where the two-stage run departs from the plain schedule only
at the midpoint (the LR drop and weight decay 0). Seed ``s`` of both ternary arms is then the same run up
to the boundary, and the paired difference after the cooldown measures the stage-2 change alone; the
validation loss at the boundary (``at_boundary_*`` keys) shows how far the two copies had drifted apart
(GPU non-determinism) before it. ``--steps`` is a multiple of 12: validation every ``steps / 12`` updates,
one of them at the boundary.

Phases, all within ``--deadline-s``:

1. main: one run of each model kind starts first (it compiles with a cold inductor cache, ~80 s on an
   H100); once both train, every other run starts at once (warm cache) and all share the GPU as
   separate processes. ``--steps 0`` sizes the runs from the per-kind tokens/s of one process alone
   (``--tok-s-ternary`` / ``--tok-s-fp``: the GPU is time-sliced, so the fleet needs the sum of the
   runs' GPU-seconds) times ``--margin``. A monitor projects the end from the measured progress; if the
   runs would overrun the deadline it stops every run of the highest seed still going (one seed fewer,
   reported as dropped) instead of letting every run be cut before its cooldown;
2. probes: each model kind alone on the GPU for ``--probe-steps`` updates (warm compile cache) if the
   time is left: tokens/s and peak memory of a process that has the GPU to itself;
3. report: final validation loss after the cooldown of every run; mean ± std per arm, per-seed pairs
   and paired differences with a t-based 95 % interval; a plot, a results JSON, and a tarball of every
   run's log and summary.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# arm -> (recipe, overrides). LR pairs keep the ternary stage-2/stage-1 peak ratio (1/3). Two-stage arms plan
# their stage-1 cosine to 0, so that stage 1 is the first half of the one-stage cosine (STAGE1).
STAGE1 = ["schedule.lr_min_ratio=0.0"]
ARMS = {
    "ternary_two_stage": ("recipes/embedded-pretrain.toml", STAGE1),
    "ternary_one_stage": ("recipes/study-ternary-one-stage.toml", []),
    "fp_two_stage_lr3e-3": ("recipes/study-fp-two-stage.toml",
                            STAGE1 + ["schedule.lr_peak=3e-3", "schedule.lr_peak2=1e-3"]),
    "fp_two_stage_lr1.5e-3": ("recipes/study-fp-two-stage.toml",
                              STAGE1 + ["schedule.lr_peak=1.5e-3", "schedule.lr_peak2=5e-4"]),
    "fp_two_stage_lr5e-4": ("recipes/study-fp-two-stage.toml",
                            STAGE1 + ["schedule.lr_peak=5e-4", "schedule.lr_peak2=1.667e-4"]),
    "fp_one_stage_lr1.5e-3": ("recipes/study-fp-one-stage-lr1.5e-3.toml", []),
}
# the peak-LR scan of the ternary schedules: both arms at each peak, the two-stage one with its stage-2 peak at
# 1/3 of it, as at 3e-3 (the unsuffixed arms). Below and above 3e-3: SPEC §5 puts ternary peaks at ~6x the
# full-precision baseline's, and the best FP peak here is 1.5e-3.
for _lr in ("1.5e-3", "6e-3", "1.2e-2"):
    ARMS[f"ternary_two_stage_lr{_lr}"] = ("recipes/embedded-pretrain.toml",
                                          STAGE1 + [f"schedule.lr_peak={_lr}", f"schedule.lr_peak2={float(_lr) / 3:.6g}"])
    ARMS[f"ternary_one_stage_lr{_lr}"] = ("recipes/study-ternary-one-stage.toml", [f"schedule.lr_peak={_lr}"])
DEFAULT_ARMS = "ternary_two_stage,ternary_one_stage,fp_two_stage_lr3e-3,fp_two_stage_lr1.5e-3"
T_CRIT_95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306,
             10: 2.262}   # two-sided t, df = n-1


def kind(arm: str) -> str:
    return "ternary" if arm.startswith("ternary") else "fp"


def schedule_of(arm: str) -> str:
    return "one_stage" if "one_stage" in arm else "two_stage"


def peak_lr(arm: str) -> float:
    """The arm's stage-1 peak LR: its override, else its recipe's."""
    import tomllib
    recipe, sets = ARMS[arm]
    for s in sets:
        if s.startswith("schedule.lr_peak="):
            return float(s.split("=", 1)[1])
    return float(tomllib.loads((REPO / recipe).read_text())["schedule"]["lr_peak"])


def key(arm: str) -> str:
    """An arm's name as a flat JSON key part."""
    return arm.replace(".", "_").replace("-", "_")


def launch(recipe: str, out: Path, sets: list[str], log: Path, device: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bitnet158.cli", "pretrain", str(REPO / recipe), "--out", str(out),
           "--device", device]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


def read_log(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def wait_all(procs: dict, deadline: float) -> dict:
    codes: dict = {}
    while len(codes) < len(procs):
        for k, p in procs.items():
            if k not in codes and p.poll() is not None:
                codes[k] = p.returncode
        if time.time() > deadline:
            for k, p in procs.items():
                if k not in codes:
                    p.kill()
                    codes[k] = "killed at deadline"
            break
        time.sleep(1)
    return codes


def wait_training(proc: subprocess.Popen, run_dir: Path, until: float) -> None:
    """Until ``run_dir`` logs its first update (compiled: the cache is filled), it exits, or ``until``."""
    while time.time() < until and proc.poll() is None:
        if any("loss" in r for r in read_log(run_dir / "log.jsonl")):
            return
        time.sleep(1)


def stats(xs: list[float]) -> dict:
    """mean, sample std, and the half-width of a 95 % t interval of the mean."""
    n = len(xs)
    m = statistics.fmean(xs)
    sd = statistics.stdev(xs) if n > 1 else 0.0
    half = T_CRIT_95.get(n, 2.0) * sd / n ** 0.5 if n > 1 else float("nan")
    return {"mean": round(m, 4), "std": round(sd, 4), "ci95": round(half, 4), "n": n}


def plot(curves: dict, arms: list[str], seeds: list[int], final: dict, common: dict, step: int | None,
         png: Path) -> None:
    """Left: validation curves (mean over seeds, min..max band). Right: per-seed values at the end (filled)
    and at the last step every run reached (hollow), mean ± std beside them."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, arm in enumerate(arms):
        cs = [sorted(curves.get(f"{arm}_s{s}", {}).items()) for s in seeds]
        cs = [c for c in cs if c]
        if not cs:
            continue
        n = min(len(c) for c in cs)
        x = [st for st, _ in cs[0][:n]]
        y = np.array([[v for _, v in c[:n]] for c in cs])
        a1.plot(x, y.mean(0), marker="o", ms=3, label=f"{arm} ({len(cs)} seeds)", color=f"C{i % 10}",
                ls="-" if kind(arm) == "fp" or schedule_of(arm) == "two_stage" else "--")
        a1.fill_between(x, y.min(0), y.max(0), alpha=0.2, color=f"C{i % 10}")
        for off, vals, filled in ((-0.12, [final[arm].get(s) for s in seeds], True),
                                  (0.12, [common.get(arm, {}).get(s) for s in seeds], False)):
            vals = [v for v in vals if v is not None]
            if not vals:
                continue
            a2.scatter([i + off] * len(vals), vals, s=22, color=f"C{i % 10}" if filled else "none",
                       edgecolors=f"C{i % 10}")
            if len(vals) > 1:
                a2.errorbar([i + off + 0.06], [np.mean(vals)], yerr=[np.std(vals, ddof=1)], fmt="_",
                            color=f"C{i % 10}", capsize=4)
    lows = [v for d in (final, common) for a in d for v in d[a].values() if v is not None]
    if lows:
        a1.set_ylim(min(lows) - 0.05, min(lows) + 1.5)
    a1.set_xlabel("update"), a1.set_ylabel("validation loss (nats/token, held-out books)")
    a1.set_title("validation loss: mean over seeds (band: min..max)")
    a1.legend(fontsize=8)
    a2.set_xticks(range(len(arms)), [a.replace("_", "\n", 1) for a in arms], fontsize=8)
    a2.set_ylabel("validation loss")
    a2.set_title("per seed: at the end (filled)" + (f", at update {step} (hollow)" if step else "") +
                 "; bars: mean ± std", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def progress(work: Path, names) -> dict:
    """Last logged update of each run in ``names`` (0 before its first)."""
    out = {}
    for n in names:
        tr = [r for r in read_log(work / n / "log.jsonl") if "loss" in r]
        out[n] = tr[-1]["step"] if tr else 0
    return out


def run_fleet(procs: dict, runs: dict, work: Path, steps: int, gpu_s_per_step: dict, run_deadline: float,
              t0: float) -> tuple[dict, list]:
    """Wait for every run; every ~15 s project the end from the measured progress (GPU-seconds of work done
    per second, from the per-kind cost) and, if two projections in a row end past ``run_deadline``, stop
    all runs of the highest seed still going. Returns (exit codes, dropped seeds)."""
    codes: dict = {}
    dropped: list = []
    last_t, last_p = None, None
    overruns = 0                                          # consecutive projections past the deadline
    while len(codes) < len(procs):
        for k, p in procs.items():
            if k not in codes and p.poll() is not None:
                codes[k] = p.returncode
        now = time.time()
        if now > run_deadline:
            for k, p in procs.items():
                if k not in codes:
                    p.kill()
                    codes[k] = "killed at deadline"
            break
        live = [k for k in procs if k not in codes]
        if live and (last_t is None or now - last_t >= 15):
            prog = progress(work, procs)
            if all(prog[k] >= 5 for k in live):          # every live run trains: its compile is done
                if last_p is not None:
                    done = sum((prog[k] - last_p[k]) * gpu_s_per_step[kind(runs[k][0])] for k in procs)
                    rate = done / (now - last_t)          # GPU-seconds of planned work per second (~1)
                    left = sum((steps - prog[k]) * gpu_s_per_step[kind(runs[k][0])] for k in live)
                    end = now + left / max(rate, 1e-3) + 5
                    print(f"t={now - t0:.0f}s: work rate {rate:.2f}, projected end t={end - t0:.0f}s "
                          f"(runs stop at t={run_deadline - t0:.0f}s)", flush=True)
                    seeds_live = sorted({runs[k][1] for k in live})
                    overruns = overruns + 1 if end > run_deadline - 5 else 0
                    if overruns >= 2 and len(seeds_live) > 1:     # two in a row: not an eval's dip
                        overruns = 0
                        s = seeds_live[-1]
                        print(f"projected overrun: stopping every run of seed {s}", flush=True)
                        for k in live:
                            if runs[k][1] == s:
                                procs[k].kill()
                                codes[k] = f"dropped (seed {s}) to let the other seeds finish"
                        dropped.append(s)
                last_t, last_p = now, prog
            else:
                last_t, last_p = None, None
        time.sleep(1)
    return codes, dropped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="shard folder of the corpus (bitnet158 data)")
    ap.add_argument("--work", default="/tmp/study", help="run folders (checkpoints are large)")
    ap.add_argument("--out", required=True, help="results JSON, plot, logs tarball")
    ap.add_argument("--steps", type=int, default=0, help="updates per run (all runs alike); 0: sized to end "
                    "inside --deadline-s from --tok-s-ternary / --tok-s-fp, --startup-s and --margin")
    ap.add_argument("--tok-s-ternary", type=float, default=6.0e5, help="tokens/s of one ternary process alone "
                    "at the study's micro-batch (H100: 674k at 32 x 1024; less at 8 x 1024)")
    ap.add_argument("--tok-s-fp", type=float, default=1.05e6, help="the same for a full-precision process "
                    "(H100: ~1.2M at 16 x 1024, from a 2-way share)")
    ap.add_argument("--startup-s", type=float, default=90, help="first compile with a cold cache (~80 s)")
    ap.add_argument("--margin", type=float, default=0.8, help="fraction of the free GPU time planned for")
    ap.add_argument("--arms", default=DEFAULT_ARMS, help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--probe-steps", type=int, default=40, help="0: no alone probes (run only if time is left)")
    ap.add_argument("--deadline-s", type=float, default=450, help="kill runs still going after this")
    ap.add_argument("--report-s", type=float, default=25, help="time kept after the runs for the report")
    ap.add_argument("--name", default="train_study", help="results file stem (dated, the card named)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    ap.add_argument("--merge", action="append", default=[], metavar="JSON",
                    help="an earlier call's results JSON (same --steps and tokens per update): its runs join the "
                         "report and the comparisons (seed pairs hold across calls); repeatable")
    ap.add_argument("--report-only", action="store_true", help="no runs: report the run folders under --work "
                    "(those without summary.json count as stopped early); keeps device/timing keys of an "
                    "existing OUT/NAME.json")
    args = ap.parse_args()
    t0 = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    arms = args.arms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    for a in arms:
        if a not in ARMS:
            ap.error(f"--arms: unknown arm {a!r}; known: {', '.join(ARMS)}")
    data = [f"data.sources.gutenberg={Path(args.data).resolve()}", *args.set]
    import tomllib

    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rec = tomllib.loads((REPO / ARMS["ternary_two_stage"][0]).read_text())
    over = dict(x.split("=", 1) for x in args.set)
    mb = int(over.get("train.micro_batch", rec["train"]["micro_batch"]))
    accum = int(over.get("train.grad_accum", rec["train"]["grad_accum"]))
    seq = int(over.get("data.seq_len", rec["data"]["seq_len"]))
    tokens_per_step = mb * accum * seq
    # GPU-seconds one update of each kind costs (the GPU is time-sliced between processes: the fleet's
    # wall time is the sum of its runs' GPU time)
    gpu_s_per_step = {"ternary": tokens_per_step / args.tok_s_ternary, "fp": tokens_per_step / args.tok_s_fp}
    run_deadline = args.deadline_s - args.report_s
    steps = args.steps
    if not steps:   # every run of every seed ends before the deadline, with a margin
        per_step = sum(gpu_s_per_step[kind(a)] for a in arms) * len(seeds)
        steps = max(12, int(args.margin * (run_deadline - args.startup_s) / per_step) // 12 * 12)
    if steps % 12:
        ap.error(f"--steps {steps}: use a multiple of 12 (a validation at the stage boundary)")
    warmup = max(1, round(0.04 * steps))
    common = data + [f"train.steps={steps}", f"schedule.warmup_steps={warmup}",
                     f"train.eval_every={steps // 12}", "train.log_every=50", "train.plot=false"]
    runs = {f"{a}_s{s}": (a, s) for s in seeds for a in arms}      # seed-major: seed s of every arm together
    earlier = load_earlier(args.merge, steps, tokens_per_step)
    if args.report_only:
        old = read_json(out / f"{args.name}.json")
        res = {k: old[k] for k in ("device", "torch", "main_phase_s", "start_s", "command", "dropped_seeds")
               if k in old}
        codes = {r: 0 if (work / r / "summary.json").is_file() else "stopped before the end" for r in runs}
        res.update(report(work, out, args.name, runs, codes, {}, steps, warmup, tokens_per_step, mb, accum,
                          earlier))
        (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({k: v for k, v in res.items() if not k.endswith("_val_curve")}))
        return 0
    plan = sum(gpu_s_per_step[kind(a)] for a in arms) * len(seeds) * steps
    print(f"{len(runs)} runs ({len(arms)} arms x seeds {seeds}) x {steps} updates x {tokens_per_step} tokens "
          f"(warmup {warmup}) on {dev}; planned GPU work {plan:.0f}s + startup {args.startup_s:.0f}s, "
          f"runs stop at {run_deadline:.0f}s", flush=True)

    # 1) main: the first run of each model kind compiles alone, then everything else starts
    procs: dict = {}
    first = {}
    for name, (arm, s) in runs.items():
        first.setdefault(kind(arm), name)
    start_at: dict = {}

    def start(name: str) -> None:
        arm, s = runs[name]
        recipe, sets = ARMS[arm]
        start_at[name] = time.time() - t0
        procs[name] = launch(recipe, work / name, common + sets + [f"seed={s}"], work / f"{name}.log", args.device)

    for name in first.values():
        start(name)
    for name in first.values():
        wait_training(procs[name], work / name, t0 + min(180, args.deadline_s / 3))
    print(f"compiled in {time.time() - t0:.0f}s; starting the other {len(runs) - len(first)} runs", flush=True)
    for name in runs:
        if name not in procs:
            start(name)
    codes, dropped = run_fleet(procs, runs, work, steps, gpu_s_per_step, t0 + run_deadline, t0)
    main_s = time.time() - t0
    for n, c in codes.items():
        if c != 0:
            print(f"{n}: exit {c}\n" + (work / f"{n}.log").read_text()[-1500:], flush=True)

    # 2) probes: each model kind alone (compile cache warm), if the time is left
    probe: dict = {}
    for k, name in first.items() if args.probe_steps else []:
        if time.time() - t0 > run_deadline - 40:
            print(f"probe {k}: skipped (deadline)", flush=True)
            continue
        arm, _ = runs[name]
        recipe, sets = ARMS[arm]
        d = work / f"probe_{k}"
        p = launch(recipe, d, data + sets + [f"train.steps={args.probe_steps}", "schedule.warmup_steps=1",
                                             "train.eval_every=0", "data.val_rows=8", "train.log_every=10",
                                             "train.plot=false", "train.keep_checkpoints=1"],
                   work / f"probe_{k}.log", args.device)
        wait_all({k: p}, t0 + run_deadline)
        probe[k] = read_json(d / "summary.json")
        print(f"probe {k}: {probe[k].get('tok_s_median', 0):.0f} tok/s alone, "
              f"{probe[k].get('peak_mem_gb', 0):.2f} GB", flush=True)

    # 3) report
    res: dict = {"device": dev, "torch": torch.__version__, "main_phase_s": round(main_s, 1),
                 "start_s": {n: round(v, 1) for n, v in start_at.items()}, "dropped_seeds": dropped,
                 "planned_gpu_work_s": round(plan, 1),
                 "assumed_tok_s_alone": {"ternary": args.tok_s_ternary, "fp": args.tok_s_fp}}
    res.update(report(work, out, args.name, runs, codes, probe, steps, warmup, tokens_per_step, mb, accum,
                      earlier))
    res["total_s"] = round(time.time() - t0, 1)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_val_curve")}))
    return 0


def compare(vals: dict, arms: list[str], seeds: list[int], prefix: str) -> dict:
    """Per-arm mean/std/ci95 of ``vals[arm][seed]`` and per-seed paired differences; keys start with prefix.

    Pairs: two-stage - one-stage at each ternary peak LR (``two_stage_minus_one_stage``, suffixed with the
    peak for the scan's arms); each schedule at its tuned peak (the arm with the lowest mean over complete
    seeds), ``two_stage_tuned_minus_one_stage_tuned``; the ternary two-stage arm (tuned) - the tuned FP arm.
    The targets are judged on the tuned pairs (at a single peak LR they are the plain pairs)."""
    res: dict = {}
    ok = {a: [vals[a][s] for s in seeds if vals[a].get(s) is not None] for a in arms}
    for a in arms:
        res[f"{prefix}{key(a)}_val_loss_per_seed"] = [None if vals[a].get(s) is None else round(vals[a][s], 4)
                                                      for s in seeds]
        if ok[a]:
            for sk, sv in stats(ok[a]).items():
                res[f"{prefix}{key(a)}_val_loss_{sk}"] = sv
    complete = [a for a in arms if ok[a] and len(ok[a]) == len(seeds)]

    def tuned(pick) -> str | None:            # the complete arm of that group with the lowest mean
        group = [a for a in complete if pick(a)]
        return min(group, key=lambda a: statistics.fmean(ok[a])) if group else None

    best_fp = tuned(lambda a: kind(a) == "fp")
    best_two = tuned(lambda a: kind(a) == "ternary" and schedule_of(a) == "two_stage")
    best_one = tuned(lambda a: kind(a) == "ternary" and schedule_of(a) == "one_stage")
    res[prefix + "fp_tuned_arm"] = best_fp
    res[prefix + "ternary_two_stage_tuned_arm"] = best_two
    res[prefix + "ternary_one_stage_tuned_arm"] = best_one

    def paired(a: str, b: str, name: str) -> None:
        d = [vals[a][s] - vals[b][s] for s in seeds if vals[a].get(s) is not None and vals[b].get(s) is not None]
        if d:
            res[f"{prefix}{name}_nats_per_seed"] = [round(x, 4) for x in d]
            for sk, sv in stats(d).items():
                res[f"{prefix}{name}_nats_{sk}"] = sv

    ternary = [a for a in arms if kind(a) == "ternary"]
    for a in ternary:                                   # the schedules at each peak LR
        if schedule_of(a) != "two_stage":
            continue
        for b in ternary:
            if schedule_of(b) == "one_stage" and peak_lr(b) == peak_lr(a):
                suffix = a.removeprefix("ternary_two_stage")
                paired(a, b, "two_stage_minus_one_stage" + key(suffix))
    if best_two and best_one:
        paired(best_two, best_one, "two_stage_tuned_minus_one_stage_tuned")
    if best_fp and best_two:
        paired(best_two, best_fp, "ternary_minus_fp_tuned")
    if best_fp and best_one:
        paired(best_one, best_fp, "ternary_one_stage_minus_fp_tuned")
    for a in complete:
        if kind(a) == "fp" and a != best_fp and best_two:
            paired(best_two, a, f"ternary_minus_{key(a)}")
    # the targets, over the complete seed pairs (>= 3): on the mean, and with 95 % confidence (the whole
    # t interval of the mean paired difference on the right side)
    for name, target, tname in (("ternary_minus_fp_tuned", 0.08, "target_ternary_minus_fp_le_0_08"),
                                ("two_stage_tuned_minus_one_stage_tuned", 0.0, "target_two_stage_better")):
        if prefix == "at_boundary_":                      # before the cooldown: no target applies
            break
        if res.get(f"{prefix}{name}_nats_n", 0) >= 3:
            m, h = res[f"{prefix}{name}_nats_mean"], res[f"{prefix}{name}_nats_ci95"]
            res[f"{prefix}{name}_nats_ci95_low"] = round(m - h, 4)
            res[f"{prefix}{name}_nats_ci95_high"] = round(m + h, 4)
            res[f"{prefix}{tname}_met"] = m <= target if target else m < 0
            res[f"{prefix}{tname}_met_at_95"] = m + h <= target if target else m + h < 0
            res[f"{prefix}{tname}_refuted_at_95"] = m - h > target if target else m - h > 0
    return res


def load_earlier(paths: list[str], steps: int, tokens_per_step: int) -> dict:
    """Runs of earlier study calls from their results JSONs (same updates and tokens per update):
    run -> dict(arm, seed, final, curve, source). The seed pairs hold across calls (a seed fixes the initial
    weights and the data order); GPU non-determinism separates any two runs, within a call or not."""
    out: dict = {}
    for p in map(Path, paths):
        try:
            old = read_json(p)
        except ValueError as e:
            raise SystemExit(f"--merge {p}: not valid JSON ({e})") from None
        if not old or "arms" not in old:
            raise SystemExit(f"--merge {p}: not a results JSON of this study")
        if (old.get("steps"), old.get("tokens_per_step")) != (steps, tokens_per_step):
            raise SystemExit(f"--merge {p}: {old.get('steps')} updates x {old.get('tokens_per_step')} tokens, "
                             f"this study {steps} x {tokens_per_step}: not comparable")
        for arm in old["arms"]:
            if arm not in ARMS:
                raise SystemExit(f"--merge {p}: arm {arm!r} is not one of this script's arms")
            finals = old.get(f"{key(arm)}_val_loss_per_seed") or []
            for i, s in enumerate(old["seeds"]):
                run = f"{arm}_s{s}"
                out[run] = dict(arm=arm, seed=s, final=finals[i] if i < len(finals) else None,
                                curve={st: v for st, v in old.get(f"{key(run)}_val_curve", [])}, source=p.name)
    return out


def report(work: Path, out: Path, name: str, runs: dict, codes: dict, probe: dict, steps: int, warmup: int,
           tokens_per_step: int, mb: int, accum: int, earlier: dict | None = None) -> dict:
    """Table, plot, logs tarball and the results dict of the runs under ``work`` (and of ``earlier`` runs
    from other calls' results, :func:`load_earlier`, which this call did not run again)."""
    earlier = {r: e for r, e in (earlier or {}).items() if r not in runs}
    arms = list(dict.fromkeys([e["arm"] for e in earlier.values()] + [a for a, _ in runs.values()]))
    seeds = sorted({s for _, s in runs.values()} | {e["seed"] for e in earlier.values()})
    res: dict = {"arms": arms, "seeds": seeds, "steps": steps, "warmup_steps": warmup,
                 "tokens_per_step": tokens_per_step, "micro_batch": mb, "grad_accum": accum,
                 "tokens_per_run": steps * tokens_per_step, "concurrent_runs": len(runs)}
    if earlier:
        res["earlier_runs"] = {r: e["source"] for r, e in earlier.items()}
    final: dict = {a: {} for a in arms}
    curves: dict = {}
    for r, e in earlier.items():
        final[e["arm"]][e["seed"]] = e["final"]
        curves[r] = e["curve"]
    tok: dict = {"ternary": [], "fp": []}
    mem: dict = {"ternary": [], "fp": []}
    print(f"\n{'run':<28}{'status':>12}{'val loss':>10}{'updates':>9}{'tok/s shared':>14}{'peak GB':>9}")
    for run, (arm, s) in runs.items():
        sm = read_json(work / run / "summary.json")
        log = read_log(work / run / "log.jsonl")
        tr = [r for r in log if "loss" in r]
        curves[run] = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
        done = codes.get(run) == 0 and bool(sm)
        final[arm][s] = sm.get("val_loss") if done else None
        if tr:
            tok[kind(arm)].append(statistics.median(r["tok_s"] for r in tr[1:] or tr))
            mem[kind(arm)].append(max(r["mem_gb"] for r in tr))
        if sm:
            res["data_epochs"] = round(sm.get("data_epochs", {}).get("gutenberg", 0), 3)
            res["non_embedding_params"] = sm.get("non_embedding_params")
        status = "done" if done else f"stopped@{tr[-1]['step'] if tr else 0}"
        print(f"{run:<28}{status:>12}{final[arm][s] or float('nan'):>10.4f}{tr[-1]['step'] if tr else 0:>9}"
              f"{tok[kind(arm)][-1] if tr else 0:>14.0f}{mem[kind(arm)][-1] if tr else 0:>9.2f}")
    for r, e in earlier.items():
        print(f"{r:<28}{'earlier':>12}{e['final'] or float('nan'):>10.4f}{steps:>9}{'':>14}{'':>9}  {e['source']}")
    res["runs_complete"] = sum(codes.get(r) == 0 for r in runs)
    res["runs_incomplete"] = {r: str(c) for r, c in codes.items() if c != 0}
    for k in ("ternary", "fp"):
        if tok[k]:
            res[f"{k}_tok_s_shared_median"] = round(statistics.median(tok[k]))
            res[f"{k}_peak_mem_gb"] = round(max(mem[k]), 2)
        if k in probe:
            res[f"{k}_tok_s_alone"] = round(probe[k].get("tok_s_median", 0))
            res[f"{k}_peak_mem_gb_alone"] = round(probe[k].get("peak_mem_gb", 0), 2)
    res.update(compare(final, arms, seeds, ""))
    # the last validation step every run reached: a like-for-like comparison even if some runs stopped early
    common = set.intersection(*(set(c) for c in curves.values() if c)) if any(curves.values()) else set()
    if common:
        k = max(common)
        res["common_eval_step"] = k
        res.update(compare({a: {s: curves.get(f"{a}_s{s}", {}).get(k) for s in seeds} for a in arms}, arms, seeds,
                           f"at_step_{k}_"))
    for run in curves:
        res[f"{key(run)}_val_curve"] = [[st, round(v, 4)] for st, v in curves[run].items()]
    b = steps // 2                                        # the stage boundary (validation before update b)
    if all(b in c for c in curves.values() if c):
        res["boundary_step"] = b
        res.update(compare({a: {s: curves.get(f"{a}_s{s}", {}).get(b) for s in seeds} for a in arms}, arms, seeds,
                           "at_boundary_"))
    k = res.get("common_eval_step")
    at = {a: {s: curves.get(f"{a}_s{s}", {}).get(k) for s in seeds} for a in arms} if k else {}
    plot(curves, arms, seeds, final, at, k, out / f"{name}.png")
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tf:
        for run in list(runs) + [f"probe_{k}" for k in probe]:
            for f in ("log.jsonl", "summary.json", "recipe.json"):
                if (work / run / f).is_file():
                    tf.add(work / run / f, arcname=f"{run}/{f}")
            if (work / f"{run}.log").is_file():
                tf.add(work / f"{run}.log", arcname=f"{run}.stdout.log")
            elif (work / f"{run}.stdout.log").is_file():
                tf.add(work / f"{run}.stdout.log", arcname=f"{run}.stdout.log")
    for pre in [""] + ([f"at_step_{res['common_eval_step']}_"] if "common_eval_step" in res else []):
        print(f"{pre or 'final: '}" + "  ".join(
            f"{a} {res.get(pre + key(a) + '_val_loss_mean')} ± {res.get(pre + key(a) + '_val_loss_std')}"
            for a in arms))
    return res

if __name__ == "__main__":
    sys.exit(main())
