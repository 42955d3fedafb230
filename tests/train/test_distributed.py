"""DDP and FSDP2 on the CPU (gloo, 2 processes through torchrun) give the losses of one process with the
same global batch, on the reference path (full logits) and on the fused one (``--fused``: fused blocks
and the fused head loss inside the wrapped module's forward); FSDP2's BitLinear sees the full weight
(absmean over the whole tensor), and its checkpoints (gathered full state) load in one process."""

import os
import subprocess
import sys

import pytest
from conftest import write_recipe

from bitnet158.train.loop import find_latest, read_log
from bitnet158.train.pretrain import run
from bitnet158.train.recipe import Recipe

STEPS = 6


def _losses(out):
    return [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory, shards_dir):
    """One process, micro_batch 4: the reference run and the fused run."""
    d = tmp_path_factory.mktemp("single")
    recipe = write_recipe(d / "r.toml", shards_dir, steps=STEPS, eval_every=3, ckpt_every=3)
    run(Recipe.from_file(recipe), out=d / "run", device="cpu")
    run(Recipe.from_file(recipe, overrides=["model.fused=true"]), out=d / "fused", device="cpu")
    return recipe, {False: d / "run", True: d / "fused"}


@pytest.mark.slow
@pytest.mark.parametrize("mode,fused", [("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True)])
def test_two_processes_match_one(mode, fused, single, tmp_path):
    recipe, refs = single
    ref = refs[fused]
    out = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "bitnet158.cli", "pretrain", str(recipe), "--out", str(out), "--device", "cpu",
           "--parallel", mode, "--set", "train.micro_batch=2"]          # 2 x 2 rows = the same global batch
    if fused:
        cmd.append("--fused")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if mode == "fsdp" and not fused:
        # sharded resume: drop the last checkpoint, resume from step 3 on 2 ranks, same losses
        import shutil
        shutil.rmtree(out / "checkpoints" / f"step-{STEPS:08d}")
        (out / "checkpoints" / "latest").write_text("step-00000003\n")
        r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == 2 and summary["head"] == ("fused" if fused else "full")
    want, got = _losses(ref), _losses(out)
    assert len(got) == len(want) == STEPS
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (mode, got, want)
    vw = [r["val_loss"] for r in read_log(ref / "log.jsonl") if "val_loss" in r]
    vg = [r["val_loss"] for r in read_log(out / "log.jsonl") if "val_loss" in r]
    assert vg == pytest.approx(vw, rel=1e-5)
    # the gathered checkpoint is a full single-process checkpoint
    from safetensors.torch import load_file
    a = load_file(str(find_latest(ref) / "model.safetensors"))
    b = load_file(str(find_latest(out) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape
        assert (a[k] - b[k]).abs().max() <= 1e-4 * max(a[k].abs().max().item(), 1.0), k


def test_closed_rank_exits_without_finalization(monkeypatch, capsys):
    """A rank that closed its process group ends through os._exit with the command's exit code
    (flushed output first); a process that never closed one returns normally."""
    from bitnet158.train import distributed
    exits = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    monkeypatch.setattr(distributed.logging, "shutdown", lambda: None)    # pytest's handlers stay
    monkeypatch.setattr(distributed, "_closed", False)
    distributed.exit_if_closed(0)
    assert exits == []
    monkeypatch.setattr(distributed, "_closed", True)
    print("summary")
    distributed.exit_if_closed(3)
    assert exits == [3] and capsys.readouterr().out == "summary\n"
