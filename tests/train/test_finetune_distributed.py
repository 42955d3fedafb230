"""SFT and DPO under torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 give the losses of one process with
the same global batch (summed and mean SFT loss, the fused summed loss under DDP, DPO with the reference
on the fly or precomputed, fused DPO under FSDP2); FSDP2 checkpoints (gathered full state) resume on 2
ranks; rank 0 exports the final model."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import chat_data, ft_recipe, pref_data, pretrain_start

from bitnet158.train.dpo import run_dpo
from bitnet158.train.loop import read_log
from bitnet158.train.sft import run_sft

STEPS = 4
OVER = [f"train.ckpt_every={STEPS // 2}", "train.keep_checkpoints=5", f"train.eval_every={STEPS // 2}"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shards_dir):
    d = tmp_path_factory.mktemp("ftdist")
    pretrain_start(d, shards_dir, steps=6)
    chat_data(d / "chat.jsonl", 40, 0)
    pref_data(d / "pref.jsonl", 40, 1)
    sft = ft_recipe(d / "sft.toml", d / "pre", [d / "chat.jsonl"],
                     "seq_len = 64\nepochs = 1\nval_fraction = 0.1\n", STEPS, 3e-3)
    dpo = ft_recipe(d / "dpo.toml", d / "pre", [d / "pref.jsonl"],
                     "max_len = 64\nepochs = 1\nval_fraction = 0.2\nbeta = 0.1\n", STEPS, 2e-3)
    return d, sft, dpo


@pytest.fixture(scope="module")
def single(setup):
    """One process, micro_batch 4: the reference runs."""
    d, sft, dpo = setup
    runs = {}
    for loss in ("sum", "mean"):
        runs[f"sft-{loss}"] = d / f"sft-{loss}-1"
        run_sft(str(sft), out=runs[f"sft-{loss}"], device="cpu", overrides=OVER + [f'data.loss="{loss}"'])
    runs["sft-sum-fused"] = d / "sft-sum-fused-1"
    run_sft(str(sft), out=runs["sft-sum-fused"], device="cpu", overrides=OVER + ["model.fused=true"])
    for ref in ("model", "precomputed"):
        runs[f"dpo-{ref}"] = d / f"dpo-{ref}-1"
        run_dpo(str(dpo), out=runs[f"dpo-{ref}"], device="cpu", overrides=OVER + [f'data.reference="{ref}"'])
    runs["dpo-model-fused"] = d / "dpo-model-fused-1"
    run_dpo(str(dpo), out=runs["dpo-model-fused"], device="cpu", overrides=OVER + ["model.fused=true"])
    return runs


def _torchrun(stage, recipe, out, mode, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "bitnet158.cli", stage, str(recipe), "--out", str(out), "--device", "cpu", "--parallel", mode,
           "--set", "train.micro_batch=2", *[x for o in OVER for x in ("--set", o)], *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _records(out, key):
    return [r[key] for r in read_log(out / "log.jsonl") if key in r]


def _assert_same(got_out, want_out, keys):
    for key in keys:
        got, want = _records(got_out, key), _records(want_out, key)
        assert len(got) == len(want) > 0, key
        for a, b in zip(got, want):
            assert abs(a - b) <= 1e-5 * max(abs(b), 1e-6), (key, got, want)


@pytest.mark.slow
@pytest.mark.parametrize("mode,loss", [("ddp", "mean"), ("fsdp", "sum"), ("ddp", "sum-fused")])
def test_sft_two_processes_match_one(setup, single, tmp_path, mode, loss):
    """(``sum-fused``: ``--fused``, the fused blocks and the fused summed head loss under DDP)"""
    d, sft, _ = setup
    want = single[f"sft-{loss}"]
    out = tmp_path / mode
    extra = ("--set", 'data.loss="sum"', "--fused") if loss == "sum-fused" else ("--set", f'data.loss="{loss}"')
    stdout = _torchrun("sft", sft, out, mode, extra)
    assert stdout.count('"stage": "sft"') == 1                     # rank 0 alone prints the summary
    if mode == "fsdp":   # resume from the gathered checkpoint of step 2 on 2 ranks: the same losses
        shutil.rmtree(out / "checkpoints" / f"step-{STEPS:08d}")
        (out / "checkpoints" / "latest").write_text(f"step-{STEPS // 2:08d}\n")
        _torchrun("sft", sft, out, mode, extra + ("--resume",))
    _assert_same(out, want, ("loss", "nll_per_token", "tokens", "val_loss"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == 2 and summary["parallel"] == mode and summary["steps"] == STEPS
    assert summary["head"] == ("fused" if loss == "sum-fused" else "chunked")
    # the exported model is the one-process model (same weights up to float rounding)
    from bitnet158 import checkpoint
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = checkpoint.load(out / "master", dtype="float32")(tokens)
        b = checkpoint.load(want / "master", dtype="float32")(tokens)
    assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item()
    assert (out / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode,reference", [("ddp", "precomputed"), ("fsdp", "model"), ("fsdp", "model-fused")])
def test_dpo_two_processes_match_one(setup, single, tmp_path, mode, reference):
    """(``model-fused``: ``--fused``, policy and sharded reference on the fused blocks under FSDP2)"""
    _, _, dpo = setup
    out = tmp_path / mode
    extra = ("--fused",) if reference == "model-fused" else ("--set", f'data.reference="{reference}"')
    _torchrun("dpo", dpo, out, mode, extra)
    want_out = single[f"dpo-{reference}"]
    _assert_same(out, want_out, ("loss", "val_loss", "val_reward_margin"))
    got, want = _records(out, "margin"), _records(want_out, "margin")
    assert got[0] == pytest.approx(0.0, abs=1e-5) and got == pytest.approx(want, rel=1e-4, abs=1e-6)
    s = json.loads((out / "summary.json").read_text())
    assert s["start"]["val_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert s["world"] == 2 and (out / "hf" / "config.json").is_file()
    assert s["head"] == ("fused" if reference == "model-fused" else "chunked")
