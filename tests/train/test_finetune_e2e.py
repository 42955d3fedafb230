"""End to end on the CPU: pretrain a tiny model -> SFT -> DPO -> exported folders that load in bitnet158
and in transformers' BitNetForCausalLM with the same logits."""

import json
import sys

import pytest
import torch
from conftest import assert_transformers_logits, chat_data, ft_recipe, pref_data, pretrain_start

from bitnet158.train.loop import read_log

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, shards_dir):
    from bitnet158 import cli
    d = tmp_path_factory.mktemp("ft")
    pretrain_start(d, shards_dir, steps=8)
    chat_data(d / "chat.jsonl", 40, 0)
    pref_data(d / "pref.jsonl", 60, 1)
    sft = ft_recipe(d / "sft.toml", d / "pre", [d / "chat.jsonl"],
                     "seq_len = 64\nepochs = 1\nval_fraction = 0.1\nloss = \"sum\"\n", 6, 3e-3)
    argv = sys.argv[:]
    try:   # through the command line, as a user runs it
        assert cli.main(["sft", str(sft), "--out", str(d / "sft"), "--device", "cpu"]) == 0
    finally:
        sys.argv = argv
    from bitnet158.train.dpo import run_dpo
    dpo = ft_recipe(d / "dpo.toml", d / "sft", [d / "pref.jsonl"],
                     "max_len = 64\nepochs = 1\nval_fraction = 0.2\nbeta = 0.1\n", 12, 1e-2)
    summary = run_dpo(str(dpo), out=d / "dpo", device="cpu")
    return d, summary


def test_sft_trains_on_assistant_tokens_and_writes_outputs(pipeline):
    d, _ = pipeline
    summary = json.loads((d / "sft" / "summary.json").read_text())
    assert summary["stage"] == "sft" and summary["loss"] == "sum" and summary["steps"] == 6
    recs = read_log(d / "sft" / "log.jsonl")
    train = [r for r in recs if "loss" in r]
    assert len(train) == 6 and all(r["loss"] > 0 and r["tokens"] > 0 for r in train)
    # summed loss: the logged loss is ~ tokens x per-token NLL
    assert train[0]["loss"] == pytest.approx(train[0]["tokens"] * train[0]["nll_per_token"], rel=1e-4)
    assert any("val_loss" in r for r in recs)
    for sub in ("hf", "master", "checkpoints"):
        assert (d / "sft" / sub).is_dir(), sub
    assert (d / "sft" / "checkpoints" / "latest").is_file()


def test_dpo_starts_at_zero_reward_and_gains_held_out_margin(pipeline):
    d, summary = pipeline
    assert summary["stage"] == "dpo" and summary["val_pairs"] >= 10
    assert summary["start"]["val_reward_margin"] == 0.0
    assert summary["start"]["val_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert summary["first_step"]["margin"] == 0.0 and summary["first_step"]["loss"] == pytest.approx(0.693147, abs=1e-6)
    recs = [r for r in read_log(d / "dpo" / "log.jsonl") if "margin" in r]
    assert {"rewards_chosen", "rewards_rejected", "accuracy"} <= set(recs[-1])
    assert summary["val_reward_margin"] > 0 and summary["val_accuracy"] > 0.5


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_exported_folder_loads_in_bitnet158_and_transformers(pipeline, stage):
    d, _ = pipeline
    out = d / stage / "hf"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quantization_mode"] == "offline"
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f
    from bitnet158 import checkpoint
    ours = checkpoint.load(out, dtype="float32")
    tokens = torch.randint(0, cfg["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(tokens).float()
    # the fp32 master export ternarizes to the same model
    master = checkpoint.load(d / stage / "master", dtype="float32")
    with torch.no_grad():
        m = master(tokens).float()
    assert (a - m).abs().max() < 0.1 * m.abs().max()
    assert_transformers_logits(out, tokens, a)


def test_sft_resume_repeats_the_same_losses(pipeline, tmp_path):
    import shutil

    from bitnet158.train.sft import run_sft
    d, _ = pipeline
    rec = ft_recipe(tmp_path / "r.toml", d / "pre", [d / "chat.jsonl"],
                     "seq_len = 64\nepochs = 1\nval_fraction = 0.1\n", 4, 3e-3)
    over = ["train.ckpt_every=2", "train.keep_checkpoints=5", 'export=[]']
    run_sft(str(rec), out=tmp_path / "a", device="cpu", overrides=over)
    full = [r["loss"] for r in read_log(tmp_path / "a" / "log.jsonl") if "loss" in r]
    ck = tmp_path / "a" / "checkpoints"
    shutil.copytree(ck / "step-00000002", tmp_path / "b" / "checkpoints" / "step-00000002")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-00000002\n")
    run_sft(str(rec), out=tmp_path / "b", device="cpu", overrides=over, resume=True)
    resumed = [r["loss"] for r in read_log(tmp_path / "b" / "log.jsonl") if "loss" in r]
    assert len(full) == 4 and resumed == full[2:]
