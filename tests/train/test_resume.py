"""Exact resume: a run killed with SIGKILL and resumed logs the same losses, bit for bit, as one that
never stopped; checkpoints are never half-written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_recipe
from safetensors.torch import load_file

from bitnet158.train import loop
from bitnet158.train.loop import find_latest, read_log
from bitnet158.train.pretrain import run
from bitnet158.train.recipe import Recipe

STEPS = 24


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_log(out / "log.jsonl") if "loss" in r]


def _assert_complete(ckpt):
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json",
                 "config.json", "rng-0.safetensors", "rng-0.json"):
        assert (ckpt / name).is_file(), f"{ckpt} lacks {name}"
    load_file(str(ckpt / "model.safetensors"))
    load_file(str(ckpt / "optimizer.safetensors"))
    json.loads((ckpt / "trainer_state.json").read_text())


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, shards_dir):
    recipe = write_recipe(tmp_path / "r.toml", shards_dir, steps=STEPS)
    # the reference: one uninterrupted run
    ref = tmp_path / "ref"
    run(Recipe.from_file(recipe), out=ref, device="cpu")
    want = _losses(ref)
    assert [s for s, _ in want] == list(range(1, STEPS + 1))

    # the same run in a subprocess, killed with SIGKILL part-way
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bitnet158.cli", "pretrain", str(recipe), "--out", str(out),
                             "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if len(_losses(out)) >= 10 if (out / "log.jsonl").is_file() else False:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = len(_losses(out))
    assert 10 <= done < STEPS
    # whatever checkpoints exist are complete; `latest` names a complete one
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts
    for c in ckpts:
        _assert_complete(c)
    latest = find_latest(out)
    assert latest is not None and int(latest.name.split("-")[1]) <= done

    # resume to the end: the logged loss sequence equals the reference exactly
    run(Recipe.from_file(recipe), out=out, resume=True, device="cpu")
    got = _losses(out)
    assert got == want
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_failed_save_leaves_previous_checkpoint(tmp_path, shards_dir, monkeypatch):
    recipe = write_recipe(tmp_path / "r.toml", shards_dir, steps=6)
    out = tmp_path / "run"
    real = loop._save_tensors

    def broken(path, tensors):
        if path.name == "optimizer.safetensors" and "step-00000006" in str(path):
            real(path, tensors)
            path.write_bytes(path.read_bytes()[:100])      # a torn write ...
            raise OSError("disk full")                     # ... and the save dies
        real(path, tensors)

    monkeypatch.setattr(loop, "_save_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        run(Recipe.from_file(recipe), out=out, device="cpu")
    latest = find_latest(out)
    assert latest.name == "step-00000003"
    _assert_complete(latest)
    assert not (out / "checkpoints" / "step-00000006").exists()
    # a resumed run finishes from the good checkpoint and cleans the debris
    monkeypatch.setattr(loop, "_save_tensors", real)
    summary = run(Recipe.from_file(recipe), out=out, resume=True, device="cpu")
    assert summary["steps"] == 6
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4, 5, 6]


def test_refuses_to_overwrite_without_resume(tmp_path, shards_dir):
    from bitnet158.errors import ConfigError
    recipe = write_recipe(tmp_path / "r.toml", shards_dir, steps=6)
    run(Recipe.from_file(recipe), out=tmp_path / "o", device="cpu")
    with pytest.raises(ConfigError, match="--resume"):
        run(Recipe.from_file(recipe), out=tmp_path / "o", device="cpu")


def test_activation_checkpointing_gives_the_same_losses(tmp_path, shards_dir):
    recipe = write_recipe(tmp_path / "r.toml", shards_dir, steps=6, eval_every=0, ckpt_every=0)
    run(Recipe.from_file(recipe), out=tmp_path / "a", device="cpu")
    run(Recipe.from_file(recipe, overrides=["train.activation_checkpointing=true"]), out=tmp_path / "b",
        device="cpu")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
