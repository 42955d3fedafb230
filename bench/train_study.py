"""Training study on one GPU: ternary two-stage vs one-stage vs full precision, several seeds, same tokens.

    PYTHONPATH=src python bench/train_study.py --data data/gutenberg --work /tmp/study --out results/ \\
        --steps 700 --seeds 0,1,2 --arms ternary_two_stage,ternary_one_stage,fp_two_stage_lr1.5e-3

Arms (recipes/, with the per-arm overrides of ``ARMS`` below); every arm runs every seed, and a seed
fixes both the initial weights and the data order, so seed ``s`` of every arm sees the same tokens in
the same order from the same start (per-seed pairs):

- ``ternary_two_stage``: ``embedded-pretrain.toml`` — SPEC §5: peak 3e-3, cosine planned to 10 % of it,
  abrupt drop at half the tokens into a cosine from 1e-3 to 0; weight decay a cosine from 0.1, exactly 0
  in stage 2;
- ``ternary_one_stage``: ``study-ternary-one-stage.toml`` — the same peak (3e-3), one cosine to the same
  final LR (0), and the same weight-decay cosine from 0.1 without the stage-2 zero;
- ``fp_two_stage_lr*``: ``study-fp-two-stage.toml`` — nn.Linear projections, everything else as the
  ternary two-stage run, at its own peak LR (a small scan: the best mean is "the" FP baseline).

Phases, all within ``--deadline-s``:

1. main: one run of each model kind starts first (it compiles and fills the inductor cache); once it
   trains, all other runs start; all run at once as separate processes sharing the GPU;
2. probes: each model kind alone on the GPU for ``--probe-steps`` updates (warm compile cache): tokens/s
   and peak memory of a process that has the GPU to itself;
3. report: final validation loss after the cooldown of every run; mean ± std per arm, per-seed pairs
   and paired differences; a plot, a results JSON, and a tarball of every run's log and summary.

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
# arm -> (recipe, overrides). LR pairs keep the ternary stage-2/stage-1 peak ratio (1/3).
ARMS = {
    "ternary_two_stage": ("recipes/embedded-pretrain.toml", []),
    "ternary_one_stage": ("recipes/study-ternary-one-stage.toml", []),
    "fp_two_stage_lr3e-3": ("recipes/study-fp-two-stage.toml", ["schedule.lr_peak=3e-3", "schedule.lr_peak2=1e-3"]),
    "fp_two_stage_lr1.5e-3": ("recipes/study-fp-two-stage.toml", ["schedule.lr_peak=1.5e-3", "schedule.lr_peak2=5e-4"]),
    "fp_two_stage_lr5e-4": ("recipes/study-fp-two-stage.toml", ["schedule.lr_peak=5e-4", "schedule.lr_peak2=1.667e-4"]),
}
DEFAULT_ARMS = "ternary_two_stage,ternary_one_stage,fp_two_stage_lr3e-3,fp_two_stage_lr1.5e-3"
T_CRIT_95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 8: 2.365, 10: 2.262}   # two-sided t, df = n-1


def kind(arm: str) -> str:
    return "ternary" if arm.startswith("ternary") else "fp"


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


def plot(work: Path, arms: list[str], seeds: list[int], final: dict, png: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, arm in enumerate(arms):
        curves = []
        for s in seeds:
            va = [r for r in read_log(work / f"{arm}_s{s}" / "log.jsonl") if "val_loss" in r]
            if va:
                curves.append(va)
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x = [c["step"] for c in curves[0][:n]]
        y = np.array([[c["val_loss"] for c in cur[:n]] for cur in curves])
        a1.plot(x, y.mean(0), "o-", ms=3, label=arm, color=f"C{i}")
        a1.fill_between(x, y.min(0), y.max(0), alpha=0.2, color=f"C{i}")
        vals = [final[arm][s] for s in seeds if final[arm].get(s) is not None]
        a2.scatter([i] * len(vals), vals, color=f"C{i}", s=18)
        if vals:
            st = stats(vals)
            a2.errorbar([i + 0.15], [st["mean"]], yerr=[st["std"]], fmt="s", color=f"C{i}", capsize=4)
    a1.set_xlabel("update"), a1.set_ylabel("validation loss (nats/token, held-out books)")
    lows = [v for a in arms for v in final[a].values() if v is not None]
    if lows:
        a1.set_ylim(min(lows) - 0.05, min(lows) + 1.5)
    a1.set_title(f"validation loss: mean over seeds {seeds} (band: min..max)")
    a1.legend()
    a2.set_xticks(range(len(arms)), [a.replace("_", "\n", 1) for a in arms], fontsize=8)
    a2.set_ylabel("final validation loss")
    a2.set_title("after the cooldown: seeds (dots), mean ± std (squares)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="shard folder of the corpus (bitnet158 data)")
    ap.add_argument("--work", default="/tmp/study", help="run folders (checkpoints are large)")
    ap.add_argument("--out", required=True, help="results JSON, plot, logs tarball")
    ap.add_argument("--steps", type=int, required=True, help="updates per run (all runs alike)")
    ap.add_argument("--arms", default=DEFAULT_ARMS, help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--probe-steps", type=int, default=30, help="0: no alone probes")
    ap.add_argument("--deadline-s", type=float, default=450, help="kill runs still going after this")
    ap.add_argument("--name", default="train_study-2026-11-25-h100-seeds", help="results file stem")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
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
    steps = args.steps
    warmup = max(1, round(0.04 * steps))
    common = data + [f"train.steps={steps}", f"schedule.warmup_steps={warmup}",
                     f"train.eval_every={max(steps // 6, 1)}", "train.log_every=50", "train.plot=false"]
    runs = {f"{a}_s{s}": (a, s) for a in arms for s in seeds}
    print(f"{len(runs)} runs ({len(arms)} arms x seeds {seeds}) x {steps} updates x {tokens_per_step} tokens "
          f"(warmup {warmup}) on {dev}", flush=True)

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
    probe_reserve = 60 if args.probe_steps else 0
    codes = wait_all(procs, t0 + args.deadline_s - probe_reserve)
    main_s = time.time() - t0
    for n, c in codes.items():
        if c != 0:
            print(f"{n}: exit {c}\n" + (work / f"{n}.log").read_text()[-2000:], flush=True)

    # 2) probes: each model kind alone (compile cache warm)
    probe: dict = {}
    for k, name in first.items() if args.probe_steps else []:
        if time.time() - t0 > args.deadline_s - 25:
            print(f"probe {k}: skipped (deadline)", flush=True)
            continue
        arm, _ = runs[name]
        recipe, sets = ARMS[arm]
        d = work / f"probe_{k}"
        p = launch(recipe, d, data + sets + [f"train.steps={args.probe_steps}", "schedule.warmup_steps=1",
                                             "train.eval_every=0", "data.val_rows=8", "train.log_every=10",
                                             "train.plot=false", "train.keep_checkpoints=1"],
                   work / f"probe_{k}.log", args.device)
        wait_all({k: p}, t0 + args.deadline_s - 3)
        probe[k] = read_json(d / "summary.json")
        print(f"probe {k}: {probe[k].get('tok_s_median', 0):.0f} tok/s alone, "
              f"{probe[k].get('peak_mem_gb', 0):.2f} GB", flush=True)

    # 3) report
    res: dict = {"device": dev, "torch": torch.__version__, "arms": arms, "seeds": seeds, "steps": steps,
                 "warmup_steps": warmup, "tokens_per_step": tokens_per_step, "micro_batch": mb, "grad_accum": accum,
                 "tokens_per_run": steps * tokens_per_step, "concurrent_runs": len(runs),
                 "main_phase_s": round(main_s, 1)}
    final: dict = {a: {} for a in arms}
    print(f"\n{'run':<28}{'val loss':>10}{'train loss':>12}{'tok/s shared':>14}{'peak GB':>9}{'epochs':>8}")
    tok_shared: dict = {"ternary": [], "fp": []}
    mem: dict = {"ternary": [], "fp": []}
    for name, (arm, s) in runs.items():
        sm = read_json(work / name / "summary.json")
        final[arm][s] = sm.get("val_loss") if codes.get(name) == 0 else None
        tok_shared[kind(arm)].append(sm.get("tok_s_median", 0))
        mem[kind(arm)].append(sm.get("peak_mem_gb", 0))
        ep = sm.get("data_epochs", {}).get("gutenberg", 0)
        res["data_epochs"] = round(ep, 3)
        res["non_embedding_params"] = sm.get("non_embedding_params", res.get("non_embedding_params"))
        v = sm.get("val_loss") or float("nan")
        print(f"{name:<28}{v:>10.4f}{sm.get('final_loss') or float('nan'):>12.4f}"
              f"{sm.get('tok_s_median', 0):>14.0f}{sm.get('peak_mem_gb', 0):>9.2f}{ep:>8.2f}")
    for k in ("ternary", "fp"):
        if tok_shared[k]:
            res[f"{k}_tok_s_shared_median"] = round(statistics.median(tok_shared[k]))
            res[f"{k}_peak_mem_gb"] = round(max(mem[k]), 2)
        if k in probe:
            res[f"{k}_tok_s_alone"] = round(probe[k].get("tok_s_median", 0))
            res[f"{k}_peak_mem_gb_alone"] = round(probe[k].get("peak_mem_gb", 0), 2)
    res["aggregate_tok_s_shared"] = round(sum(tok_shared["ternary"]) + sum(tok_shared["fp"]))
    ok = {a: [final[a][s] for s in seeds if final[a].get(s) is not None] for a in arms}
    for a in arms:
        key = a.replace(".", "_").replace("-", "_")
        res[f"{key}_val_loss_per_seed"] = [None if final[a].get(s) is None else round(final[a][s], 4) for s in seeds]
        if ok[a]:
            for sk, sv in stats(ok[a]).items():
                res[f"{key}_val_loss_{sk}"] = sv
    fp_arms = [a for a in arms if kind(a) == "fp" and ok[a]]
    best_fp = min(fp_arms, key=lambda a: statistics.fmean(ok[a])) if fp_arms else None
    res["fp_tuned_arm"] = best_fp

    def paired(a: str, b: str, key: str) -> None:
        d = [final[a][s] - final[b][s] for s in seeds
             if final[a].get(s) is not None and final[b].get(s) is not None]
        if d:
            res[f"{key}_nats_per_seed"] = [round(x, 4) for x in d]
            for sk, sv in stats(d).items():
                res[f"{key}_nats_{sk}"] = sv

    if "ternary_two_stage" in arms and "ternary_one_stage" in arms:
        paired("ternary_two_stage", "ternary_one_stage", "two_stage_minus_one_stage")
    if best_fp and "ternary_two_stage" in arms:
        paired("ternary_two_stage", best_fp, "ternary_minus_fp_tuned")
    if best_fp and "ternary_one_stage" in arms:
        paired("ternary_one_stage", best_fp, "ternary_one_stage_minus_fp_tuned")
    for a in fp_arms:
        if a != best_fp and "ternary_two_stage" in arms:
            paired("ternary_two_stage", a, f"ternary_minus_{a.replace('.', '_').replace('-', '_')}")
    if "ternary_minus_fp_tuned_nats_mean" in res:
        res["target_ternary_minus_fp_le_0_08_met"] = res["ternary_minus_fp_tuned_nats_mean"] <= 0.08
    if "two_stage_minus_one_stage_nats_mean" in res:
        res["target_two_stage_better_met"] = res["two_stage_minus_one_stage_nats_mean"] < 0
    for name in runs:
        va = [r for r in read_log(work / name / "log.jsonl") if "val_loss" in r]
        res[f"{name.replace('.', '_').replace('-', '_')}_val_curve"] = [[r["step"], round(r["val_loss"], 4)] for r in va]
    res["start_s"] = {n: round(v, 1) for n, v in start_at.items()}
    png = out / f"{args.name}.png"
    plot(work, arms, seeds, final, png)
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tf:
        for name in list(runs) + [f"probe_{k}" for k in probe]:
            for f in ("log.jsonl", "summary.json", "recipe.json"):
                if (work / name / f).is_file():
                    tf.add(work / name / f, arcname=f"{name}/{f}")
            if (work / f"{name}.log").is_file():
                tf.add(work / f"{name}.log", arcname=f"{name}.stdout.log")
    res["total_s"] = round(time.time() - t0, 1)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n" + "  ".join(f"{a}: {res.get(a.replace('.', '_').replace('-', '_') + '_val_loss_mean')} ± "
                           f"{res.get(a.replace('.', '_').replace('-', '_') + '_val_loss_std')}" for a in arms))
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_val_curve")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
