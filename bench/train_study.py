"""Training study on one GPU: ternary two-stage vs one-stage schedule vs full precision, same tokens.

    PYTHONPATH=src python bench/train_study.py --data data/gutenberg --work /tmp/study --out results/ \\
        --budget-s 330

Runs (recipes/): ``embedded-pretrain.toml`` (ternary, two-stage LR + WD: also the embedded default
model's pretraining), ``study-ternary-one-stage.toml``, ``study-fp-two-stage.toml`` (nn.Linear, LR / 6)
and ``study-fp-one-stage-lr1.5e-3.toml`` (a usual full-precision recipe). Phases:

1. probe: each model kind (ternary, full precision) alone on the GPU for a few steps (compiles once,
   fills the compile cache, measures tokens/s and peak memory of a process that has the GPU alone);
2. main: all runs at once as separate processes on the one GPU, each for the same number of steps
   over the same data order (same seed: the same tokens), sized from the probe to fit ``--budget-s``;
3. report: final validation loss after the cooldown of every run, a table, one plot, the results
   JSON, and the ternary two-stage model exported to the packed HF layout (``OUT/model/``).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "ternary_two_stage": "recipes/embedded-pretrain.toml",
    "ternary_one_stage": "recipes/study-ternary-one-stage.toml",
    "fp_two_stage": "recipes/study-fp-two-stage.toml",
    "fp_one_stage_lr1.5e-3": "recipes/study-fp-one-stage-lr1.5e-3.toml",
}
PROBES = {"ternary": "recipes/embedded-pretrain.toml", "fp": "recipes/study-fp-two-stage.toml"}


DEVICE = "cuda"


def launch(recipe: str, out: Path, sets: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bitnet158.cli", "pretrain", str(REPO / recipe), "--out", str(out),
           "--device", DEVICE]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


def wait_all(procs: dict, deadline: float) -> dict:
    codes = {}
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
        time.sleep(2)
    return codes


def plot(work: Path, names: list[str], png: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for n in names:
        recs = [json.loads(x) for x in (work / n / "log.jsonl").read_text().splitlines()] \
            if (work / n / "log.jsonl").is_file() else []
        tr = [r for r in recs if "loss" in r]
        va = [r for r in recs if "val_loss" in r]
        if tr:
            k = max(len(tr) // 60, 1)
            loss = np.convolve([r["loss"] for r in tr], np.ones(k) / k, mode="valid")
            a1.plot([r["tokens_seen"] / 1e6 for r in tr][k - 1:], loss, label=n, lw=1.2)
        if va:
            a2.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label=n, ms=3)
    a1.set_xlabel("tokens (M)"), a1.set_ylabel("train loss (nats/token)"), a1.set_ylim(top=6)
    a2.set_xlabel("update"), a2.set_ylabel("validation loss (held-out books)")
    a1.legend(), a2.legend()
    a1.set_title("training loss (smoothed)"), a2.set_title("validation loss")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="shard folder of the corpus (bitnet158 data)")
    ap.add_argument("--work", default="/tmp/study", help="run folders (checkpoints are large)")
    ap.add_argument("--out", required=True, help="results, plot and the exported model")
    ap.add_argument("--budget-s", type=float, default=330, help="seconds for the main phase")
    ap.add_argument("--probe-steps", type=int, default=20)
    ap.add_argument("--probes", default="ternary,fp", help="model kinds to probe alone (an unprobed "
                    "kind is assumed as slow as the ternary one)")
    ap.add_argument("--steps", type=int, default=0, help="fix the steps instead of sizing from the probe")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    ap.add_argument("--deadline-s", type=float, default=520, help="kill runs still going after this")
    ap.add_argument("--machine", default="h100")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    t0 = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data = [f"data.sources.gutenberg={Path(args.data).resolve()}", *args.set]
    names = args.runs.split(",")
    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"

    # 1) probes, one at a time
    probe = {}
    if not args.steps:
        for kind in args.probes.split(","):
            recipe = PROBES[kind]
            d = work / f"probe_{kind}"
            p = launch(recipe, d, data + [f"train.steps={args.probe_steps}", f"schedule.warmup_steps={max(args.probe_steps // 4, 1)}",
                                          "train.eval_every=0", "data.val_rows=32", "train.log_every=5"],
                       work / f"probe_{kind}.log")
            p.wait()
            probe[kind] = read_json(d / "summary.json")
            print(f"probe {kind}: rc {p.returncode} {probe[kind].get('tok_s_median', 0):.0f} tok/s, "
                  f"{probe[kind].get('peak_mem_gb', 0):.1f} GB, {time.time() - t0:.0f}s", flush=True)
            if p.returncode:
                print((work / f"probe_{kind}.log").read_text()[-3000:])
                return 1
    import tomllib
    rec = tomllib.loads((REPO / RUNS["ternary_two_stage"]).read_text())
    over = dict(x.split("=", 1) for x in args.set)
    tokens_per_step = (int(over.get("train.micro_batch", rec["train"]["micro_batch"]))
                       * int(over.get("train.grad_accum", rec["train"]["grad_accum"]))
                       * int(over.get("data.seq_len", rec["data"]["seq_len"])))
    if args.steps:
        steps = args.steps
    else:
        rate = {k: probe.get(k, probe["ternary"])["tok_s_median"] for k in PROBES}
        per_round = sum(tokens_per_step / rate["ternary" if n.startswith("ternary") else "fp"] for n in names)
        steps = int((args.budget_s - 40) / per_round / 10) * 10
    warmup = max(10, round(0.04 * steps))
    sets = data + [f"train.steps={steps}", f"schedule.warmup_steps={warmup}",
                   f"train.eval_every={max(steps // 8, 1)}", "train.log_every=25"]
    print(f"main: {len(names)} runs x {steps} steps x {tokens_per_step} tokens (warmup {warmup})", flush=True)

    # 2) all runs at once
    t_main = time.time()
    procs = {n: launch(RUNS[n], work / n, sets, work / f"{n}.log") for n in names}
    codes = wait_all(procs, t0 + args.deadline_s)
    main_s = time.time() - t_main
    for n, c in codes.items():
        if c != 0:
            print(f"{n}: exit {c}\n" + (work / f"{n}.log").read_text()[-2000:], flush=True)

    # 3) report
    res: dict = {"device": dev, "torch": torch.__version__, "steps": steps, "tokens_per_step": tokens_per_step,
                 "tokens_per_run": steps * tokens_per_step, "main_phase_s": round(main_s, 1),
                 "concurrent_runs": len(names)}
    for kind, s in probe.items():
        res[f"probe_{kind}_alone_tok_s"] = round(s.get("tok_s_median", 0))
        res[f"probe_{kind}_alone_peak_mem_gb"] = round(s.get("peak_mem_gb", 0), 2)
    print(f"\n{'run':<24}{'val loss':>10}{'train loss':>12}{'tok/s (shared)':>16}{'peak GB':>9}{'epochs':>8}")
    for n in names:
        s = read_json(work / n / "summary.json")
        key = n.replace(".", "_").replace("-", "_")
        res[f"{key}_val_loss"] = s.get("val_loss")
        res[f"{key}_final_train_loss"] = s.get("final_loss")
        res[f"{key}_tok_s_shared"] = round(s.get("tok_s_median", 0))
        res[f"{key}_peak_mem_gb"] = round(s.get("peak_mem_gb", 0), 2)
        res[f"{key}_wall_s"] = round(s.get("wall_s", 0), 1)
        ep = s.get("data_epochs", {}).get("gutenberg", 0)
        res["data_epochs"] = round(ep, 2)
        print(f"{n:<24}{s.get('val_loss') or float('nan'):>10.4f}{s.get('final_loss') or float('nan'):>12.4f}"
              f"{s.get('tok_s_median', 0):>16.0f}{s.get('peak_mem_gb', 0):>9.1f}{ep:>8.2f}")
    v = {n: res.get(f"{n.replace('.', '_').replace('-', '_')}_val_loss") for n in names}
    if v.get("ternary_two_stage") and v.get("fp_two_stage"):
        res["ternary_minus_fp_two_stage_nats"] = round(v["ternary_two_stage"] - v["fp_two_stage"], 4)
    if v.get("ternary_two_stage") and v.get("fp_one_stage_lr1.5e-3"):
        res["ternary_minus_fp_best_nats"] = round(
            v["ternary_two_stage"] - min(x for k, x in v.items() if k.startswith("fp") and x), 4)
    if v.get("ternary_two_stage") and v.get("ternary_one_stage"):
        res["two_stage_minus_one_stage_nats"] = round(v["ternary_two_stage"] - v["ternary_one_stage"], 4)
    plot(work, names, out / f"train_study-2026-11-25-{args.machine}.png")
    # the ternary two-stage run is the embedded model's pretraining: export it packed
    if codes.get("ternary_two_stage") == 0:
        r = subprocess.run([sys.executable, "-m", "bitnet158.cli", "export", str(work / "ternary_two_stage"),
                            str(work / "model"), "--tokenizer", str(Path(args.data) / "tokenizer")],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        print(r.stdout.strip() or r.stderr[-2000:])
        res["export_ok"] = r.returncode == 0
    res["total_s"] = round(time.time() - t0, 1)
    (out / f"train_study-2026-11-25-{args.machine}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
