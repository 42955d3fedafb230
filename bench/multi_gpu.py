"""Multi-GPU pretraining acceptance: FSDP2 on N GPUs vs one GPU at the same global batch, then the N-rank
checkpoint resumed in one process, exported packed, and loaded.

    PYTHONPATH=src python bench/multi_gpu.py --nproc 8 --size 350m --data .carry/gutenberg --steps 200 \\
        --json-out /tmp/multi_gpu.json --logs-out /tmp/multi_gpu-logs.tar.gz
    PYTHONPATH=src python bench/multi_gpu.py --nproc 1 ...      # one GPU: torchrun world size 1 FSDP2 vs one process
    PYTHONPATH=src nice -n 19 python bench/multi_gpu.py --device cpu --size tiny --nproc 2 --steps 20 \\
        --seq 64 --micro-batch 2 --data .carry/gutenberg           # CPU rehearsal (gloo)

Every process is started with NVLink multicast off (``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``), as the shared multi-GPU hosts require.
One recipe (written to ``WORK/recipe.toml``: the named size, ternary BitLinear, two-stage schedule, bf16
autocast on GPUs, the fused path by default on GPUs) runs four ways:

1. ``ngpu``: ``torchrun --nproc_per_node=N ... pretrain --parallel fsdp``, ``micro_batch`` m and
   ``grad_accum`` a per rank (global batch N x m x a rows); it also checkpoints ``--resume-steps`` updates
   before the end (the checkpoint is the gathered full state);
2. ``ref``: one GPU, micro-batch m, ``grad_accum`` N x a: the same global batch, the same rows (every rank
   draws the global micro-batch and keeps its slice). ``--ref fsdp`` (the default for N > 1): ``torchrun
   --nproc_per_node=1`` with FSDP2, the N-rank run's own bf16-parameter policy, so that only the number of
   ranks differs; ``--ref plain`` (the default for N = 1): a plain process (fp32 weights under bf16
   autocast). The two policies compute each update within ~4e-5 of each other, but ternary training
   amplifies such differences: over 200 updates of the 350m model their losses drifted apart by 1.4 % on
   average (3.7 % at most; H100, 2026-12-05);
3. ``resume``: that N-rank checkpoint resumed by one plain process (micro-batch m, ``grad_accum`` N x a)
   for the last ``--resume-steps`` updates; its losses are compared with the N-rank run's at those steps;
4. ``export``: the resumed run's final checkpoint -> a packed HF folder (``bitnet158 export``), loaded with
   ``bitnet158.load``; its logits on held-out rows are compared with the fp32 latent model's.

Figures: per-update loss of ``ngpu`` vs ``ref`` (max / mean / final relative difference; acceptance
<= 1 %), tokens/s of each (median over the updates after ``--skip-steps``; the N-rank run's is global)
and the scaling efficiency ``tok_s_ngpu / (N * tok_s_1gpu)`` (acceptance >= 0.85). With N = 1 the
"N-GPU" run is torchrun with one FSDP2 rank (bf16 parameters in forward/backward), the reference a plain
process, and the "scaling efficiency" is the one-rank FSDP2 run's speed over the plain process's. A phase
still running at its share of ``--deadline-s`` (N-rank run 50 %, reference 85 %, resume 92 %) is stopped;
the figures then cover the updates it logged (350m, N = 1, 200 updates on an H100: ~100 s, 65 s, 30 s and
~20 s for the export: give it ``--deadline-s 300``). Prints a table, then one JSON line (flat keys).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)      # this process too, before torch is imported


def write_recipe(path: Path, a: argparse.Namespace) -> Path:
    """The one recipe of every phase; per-run micro-batch / accumulation come as --set overrides."""
    warm = max(1, a.steps // 20)
    over = f"vocab_size = {a.vocab}\n" if a.vocab else ""
    if a.seq > a.max_pos:
        over += f"max_position_embeddings = {a.seq}\n"
    text = f"""name = "multi-gpu-{a.size}"
seed = {a.seed}
[model]
size = "{a.size}"
linear = "bitlinear"
fused = {str(a.fused).lower()}
[model.overrides]
{over}[data]
seq_len = {a.seq}
val_rows = {a.val_rows}
sources = {{ corpus = "{Path(a.data).resolve()}" }}
stages = [{{ corpus = 1.0 }}, {{ corpus = 1.0 }}]
[schedule]
kind = "two_stage"
warmup_steps = {warm}
lr_peak = {a.lr}
lr_peak2 = {a.lr / 3}
[optim]
betas = [0.9, 0.95]
fused = {str(a.device == "cuda").lower()}
[train]
steps = {a.steps}
micro_batch = {a.micro_batch}
grad_accum = {a.grad_accum}
dtype = "{a.dtype}"
compile = {str(a.compile).lower()}
clip = 1.0
eval_every = 0
keep_checkpoints = 2
log_every = {max(1, a.steps // 8)}
plot = false
"""
    path.write_text(text)
    return path


def run_phase(name: str, cmd: list[str], work: Path, until: float) -> dict:
    """Run ``cmd`` (its own process group) with output to WORK/NAME.log; stop it at ``until``."""
    log = work / f"{name}.log"
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = p.wait(timeout=max(until - time.time(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            rc = "stopped at the deadline"
    res = {"rc": rc, "wall_s": round(time.time() - t0, 1)}
    print(f"[{name}] rc={rc} in {res['wall_s']} s  ({log})", flush=True)
    if rc != 0:
        print("".join(log.read_text().splitlines(True)[-25:]), flush=True)
    return res


def read_log(run: Path) -> list[dict]:
    p = run / "log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run) if "loss" in r}


def rel_diffs(a: dict[int, float], b: dict[int, float]) -> tuple[list[int], np.ndarray]:
    """Steps both logged, and |a - b| / |b| at each."""
    steps = sorted(set(a) & set(b))
    return steps, np.array([abs(a[s] - b[s]) / abs(b[s]) for s in steps])


def speed(run: Path, skip: int) -> dict:
    recs = [r for r in read_log(run) if "tok_s" in r]
    use = [r for r in recs if r["step"] > skip] or recs
    if not use:
        return {}
    summ = run / "summary.json"
    peak = json.loads(summ.read_text()).get("peak_mem_gb") if summ.is_file() else max(r["mem_gb"] for r in recs)
    return {"tok_s": float(np.median([r["tok_s"] for r in use])),
            "step_ms": 1e3 * float(np.median([r["time_s"] for r in use])), "peak_mem_gb": peak}


def check_export(resume_run: Path, hf: Path, data: Path, seq: int, device: str) -> dict:
    """Export the run's latest checkpoint packed; load it; compare logits with the fp32 latent model."""
    import torch

    import bitnet158
    from bitnet158.train.data import TokenShards, val_rows
    from bitnet158.train.export import export, load_training_checkpoint
    out: dict = {"export_loads": False}
    t0 = time.time()
    export(resume_run, hf)
    out["export_s"] = round(time.time() - t0, 1)
    out["export_bytes"] = sum(f.stat().st_size for f in hf.iterdir() if f.is_file())
    packed = bitnet158.load(hf, dtype="float32", device=device)
    latent, state = load_training_checkpoint(resume_run)
    latent.to(device)
    out["export_step"] = int(state.get("step", -1))
    rows = torch.from_numpy(val_rows(TokenShards(data, "val"), min(seq, 256), 4)).to(device)
    x, y = rows[:, :-1], rows[:, 1:]                                        # [4, T]
    with torch.no_grad():
        a, c = packed(x).float(), latent(x).float()                         # [4, T, V]
    out["export_loads"] = bool(torch.isfinite(a).all())
    out["export_logits_rel_diff"] = float((a - c).norm() / c.norm())
    out["export_logits_max_abs_diff_over_max"] = float((a - c).abs().max() / c.abs().max())
    out["export_top1_agree"] = float((a.argmax(-1) == c.argmax(-1)).float().mean())
    ce = torch.nn.functional.cross_entropy
    out["export_ce"] = float(ce(a.flatten(0, 1), y.flatten()))
    out["latent_ce"] = float(ce(c.flatten(0, 1), y.flatten()))
    out["export_ok"] = out["export_loads"] and out["export_logits_max_abs_diff_over_max"] < 0.1
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=0, help="ranks of the FSDP2 run (default: every GPU; 2 on the CPU)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--size", default="350m", help="named model size (bitnet158.config.SIZES)")
    ap.add_argument("--vocab", type=int, default=0, help="model vocab_size (0: the size's own if it holds the "
                    "data's tokens, else the data's)")
    ap.add_argument("--data", default=str(REPO / ".carry" / "gutenberg"), help="shard folder (bitnet158 data)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per micro-batch per rank")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update per rank in the N-rank "
                    "run (the reference runs N times as many)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--resume-steps", type=int, default=10, help="updates redone by the one-process resume")
    ap.add_argument("--skip-steps", type=int, default=10, help="updates left out of the tokens/s medians")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--val-rows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                    help="fused BitLinear + fused head (default: on GPUs)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (slower start)")
    ap.add_argument("--ref", choices=["fsdp", "plain"], default=None, help="the one-GPU reference: torchrun "
                    "with one FSDP2 rank, or a plain process (default: fsdp for N > 1, plain for N = 1)")
    ap.add_argument("--phases", default="ngpu,ref,resume,export")
    ap.add_argument("--work", default="/tmp/multi_gpu", help="run folders (checkpoints: ~12 bytes a parameter)")
    ap.add_argument("--deadline-s", type=float, default=1800, help="stop whatever still runs after this")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--logs-out", default=None, help="tar.gz of every phase's log, log.jsonl and summary")
    a = ap.parse_args()
    t_start = time.time()
    until = t_start + a.deadline_s

    import torch
    from bitnet158.config import ModelConfig
    from bitnet158.train.data import read_index
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    n = a.nproc or (gpus if a.device == "cuda" else 2)
    if a.device == "cuda" and n > gpus:
        ap.error(f"--nproc {n}: only {gpus} GPU(s) here")
    a.fused = (a.device == "cuda") if a.fused is None else a.fused
    a.ref = a.ref or ("fsdp" if n > 1 else "plain")
    a.dtype = "bf16" if a.device == "cuda" else "fp32"
    data_vocab = int(read_index(a.data)["vocab_size"])
    if not a.vocab:
        own = ModelConfig.from_name(a.size).vocab_size
        a.vocab = own if own >= data_vocab else 0           # 0: build_model takes the data's
    a.max_pos = ModelConfig.from_name(a.size).max_position_embeddings
    if a.resume_steps >= a.steps:
        ap.error("--resume-steps must be smaller than --steps")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("ngpu", "ref", "resume", "hf"):
        shutil.rmtree(work / sub, ignore_errors=True)
    recipe = write_recipe(work / "recipe.toml", a)
    cfg = ModelConfig.from_name(a.size, **({"vocab_size": a.vocab} if a.vocab else {"vocab_size": data_vocab}))
    phases = a.phases.split(",")
    dev_args = ["--device", a.device]
    ref_sets = ["--set", f"train.micro_batch={a.micro_batch}", "--set", f"train.grad_accum={n * a.grad_accum}"]
    cli = [sys.executable, "-m", "bitnet158.cli", "pretrain", str(recipe)]
    res: dict = {"bench": "multi_gpu", "device": torch.cuda.get_device_name(0) if gpus else "cpu",
                 "gpus": gpus, "nproc": n, "parallel": "fsdp", "torch": torch.__version__, "size": a.size,
                 "params": cfg.num_params(), "non_embedding_params": cfg.num_params(embedding=False),
                 "vocab_size": cfg.vocab_size, "ref": a.ref, "fused": a.fused, "dtype": a.dtype, "compile": a.compile,
                 "seq": a.seq, "micro_batch": a.micro_batch, "grad_accum_ngpu": a.grad_accum,
                 "grad_accum_1gpu": n * a.grad_accum, "global_batch_rows": n * a.micro_batch * a.grad_accum,
                 "tokens_per_step": n * a.micro_batch * a.grad_accum * a.seq, "steps": a.steps,
                 **{k.lower(): v for k, v in NO_MULTICAST.items()}}
    ckpt_step = a.steps - a.resume_steps

    def share(frac: float) -> float:
        """A phase may run until this share of the deadline (the later phases keep the rest)."""
        return t_start + frac * a.deadline_s

    def torchrun(ranks: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                "-m", "bitnet158.cli", "pretrain", str(recipe)]

    if "ngpu" in phases:
        cmd = torchrun(n) + ["--out", str(work / "ngpu"), *dev_args, "--parallel", "fsdp",
                             "--set", f"train.ckpt_every={ckpt_step}"]
        res["ngpu_phase"] = run_phase("ngpu", cmd, work, share(0.5))
    if "ref" in phases:
        head = torchrun(1) + ["--parallel", "fsdp"] if a.ref == "fsdp" else cli
        res["ref_phase"] = run_phase("ref", head + ["--out", str(work / "ref"), *dev_args, *ref_sets], work,
                                     share(0.85))
    src = work / "ngpu" / "checkpoints" / f"step-{ckpt_step:08d}"
    if "resume" in phases and (src / "trainer_state.json").is_file():
        dst = work / "resume" / "checkpoints"
        dst.mkdir(parents=True)
        (dst / src.name).symlink_to(src.resolve())              # read-only use: the run saves a new folder
        (dst / "latest").write_text(src.name + "\n")
        res["resume_phase"] = run_phase("resume", cli + ["--out", str(work / "resume"), *dev_args, *ref_sets,
                                                         "--resume"], work, share(0.92))

    # ---- figures
    ln, lr_, lres = losses(work / "ngpu"), losses(work / "ref"), losses(work / "resume")
    steps, d = rel_diffs(ln, lr_)
    if len(steps):
        res.update({"loss_steps_compared": len(steps), "loss_rel_diff_max": float(d.max()),
                    "loss_rel_diff_mean": float(d.mean()), "loss_rel_diff_final": float(d[-1]),
                    "loss_first": lr_[steps[0]], "loss_final_1gpu": lr_[steps[-1]],
                    "loss_final_ngpu": ln[steps[-1]], "loss_match_ok": bool(d.max() <= 0.01)})
        res["losses_1gpu"] = [round(lr_[s], 5) for s in steps]
        res["losses_ngpu"] = [round(ln[s], 5) for s in steps]
    for key, run in (("1gpu", "ref"), ("ngpu", "ngpu")):
        sp = speed(work / run, a.skip_steps)
        res.update({f"{k}_{key}": v for k, v in sp.items()})
        val = [r["val_loss"] for r in read_log(work / run) if "val_loss" in r]
        if val:
            res[f"val_loss_{key}"] = val[-1]
    if res.get("tok_s_1gpu") and res.get("tok_s_ngpu"):
        res["scaling_efficiency"] = res["tok_s_ngpu"] / (n * res["tok_s_1gpu"])
        res["scaling_ok"] = bool(res["scaling_efficiency"] >= 0.85)
    rs, rd = rel_diffs(lres, ln)
    res["resume_from_step"] = ckpt_step
    res["resume_steps_compared"] = len(rs)
    if len(rs):
        res["resume_loss_rel_diff_max"] = float(rd.max())            # vs the N-rank run
        _, rd1 = rel_diffs(lres, lr_)
        if len(rd1):
            res["resume_vs_1gpu_loss_rel_diff_max"] = float(rd1.max())
    res["resume_1gpu_ok"] = bool(res.get("resume_phase", {}).get("rc") == 0 and len(rs) == a.resume_steps
                                 and rd.max() <= 0.01)
    if "export" in phases and res.get("resume_phase", {}).get("rc") == 0 and time.time() < until:
        try:
            res.update(check_export(work / "resume", work / "hf", Path(a.data), a.seq, a.device))
        except Exception as e:   # report it with the rest
            res["export_error"] = f"{type(e).__name__}: {e}"[:500]
    res.setdefault("export_loads", False)
    res["wall_s"] = round(time.time() - t_start, 1)

    # ---- table, files, one JSON line
    ref_label = "1 x FSDP2" if a.ref == "fsdp" else "1 process"

    def f(k, fmt="{:.4g}"):
        v = res.get(k)
        return "-" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))
    print(f"\nmulti_gpu: {a.size} ({res['params'] / 1e6:.1f}M params), {n} x FSDP2 vs {ref_label}, "
          f"{res['global_batch_rows']} x {a.seq} tokens / update, {a.steps} updates, {res['device']}")
    print(f"{'run':<26}{'tok/s':>12}{'step ms':>10}{'peak GB':>9}{'final loss':>12}{'val loss':>10}")
    for key, label in (("1gpu", f"{ref_label} (accum {n * a.grad_accum})"),
                       ("ngpu", f"{n} x FSDP2 (accum {a.grad_accum})")):
        fin = res.get(f"loss_final_{key}")
        print(f"{label:<26}{f('tok_s_' + key, '{:.0f}'):>12}{f('step_ms_' + key, '{:.1f}'):>10}"
              f"{f('peak_mem_gb_' + key, '{:.2f}'):>9}{'-' if fin is None else f'{fin:.4f}':>12}"
              f"{f('val_loss_' + key, '{:.4f}'):>10}")
    print(f"loss rel diff max {f('loss_rel_diff_max', '{:.2e}')} (<= 1e-2: {f('loss_match_ok')}), "
          f"scaling efficiency {f('scaling_efficiency', '{:.3f}')} (>= 0.85: {f('scaling_ok')}), "
          f"resume on 1: {f('resume_1gpu_ok')} (rel {f('resume_loss_rel_diff_max', '{:.2e}')}), "
          f"export loads: {f('export_loads')} (logits rel {f('export_logits_rel_diff', '{:.2e}')}, "
          f"top-1 {f('export_top1_agree', '{:.3f}')})")
    flat = {k: v for k, v in res.items() if not isinstance(v, (dict, list))}
    for ph in ("ngpu", "ref", "resume"):
        if f"{ph}_phase" in res:
            flat[f"{ph}_rc"] = res[f"{ph}_phase"]["rc"]
            flat[f"{ph}_wall_s"] = res[f"{ph}_phase"]["wall_s"]
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps({**flat, "losses_1gpu": res.get("losses_1gpu"),
                                                "losses_ngpu": res.get("losses_ngpu")}, indent=1) + "\n")
    if a.logs_out:
        with tarfile.open(a.logs_out, "w:gz") as tar:
            for p in sorted(work.glob("*.log")) + [work / "recipe.toml"]:
                tar.add(p, arcname=p.name)
            for run in ("ngpu", "ref", "resume"):
                for name in ("log.jsonl", "summary.json"):
                    if (work / run / name).is_file():
                        tar.add(work / run / name, arcname=f"{run}/{name}")
    print(json.dumps(flat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
