"""End to end on the CPU: data -> pretrain (loss goes down) -> export -> the folder loads in bitnet158
and in transformers' BitNetForCausalLM with the same logits."""

import json
import sys

import pytest
import torch
from conftest import assert_transformers_logits, write_recipe

from bitnet158.train.loop import read_log
from bitnet158.train.pretrain import run
from bitnet158.train.recipe import Recipe


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shards_dir):
    d = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(d / "r.toml", shards_dir, steps=40, eval_every=20, ckpt_every=20, plot=True)
    summary = run(Recipe.from_file(recipe), out=d / "run", device="cpu")
    return d, summary


def test_loss_goes_down_and_outputs_exist(pretrained):
    d, summary = pretrained
    recs = read_log(d / "run" / "log.jsonl")
    train = [r["loss"] for r in recs if "loss" in r]
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(train) == 40 and len(val) == 2
    assert sum(train[-5:]) / 5 < train[0] - 1.0          # from ~ln(320) = 5.8 to well below
    assert val[-1] < val[0]
    assert summary["schedule"] == "two_stage"
    assert {r["stage"] for r in recs if "stage" in r} == {1, 2}
    assert (d / "run" / "summary.json").is_file() and (d / "run" / "recipe.json").is_file()
    try:
        import matplotlib  # noqa: F401
        assert (d / "run" / "loss.png").stat().st_size > 1000
    except ImportError:
        pass


def test_export_loads_in_bitnet158_and_transformers(pretrained, tmp_path):
    d, _ = pretrained
    out = tmp_path / "hf"
    from bitnet158 import cli
    argv = sys.argv[:]
    try:
        assert cli.main(["export", str(d / "run"), str(out)]) == 0
    finally:
        sys.argv = argv
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quantization_mode"] == "offline"
    assert cfg["bos_token_id"] == 0 and cfg["eos_token_id"] == 1
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f

    import bitnet158
    ours = bitnet158.load(out, dtype="float32")
    tokens = torch.randint(0, cfg["vocab_size"], (2, 24))
    with torch.no_grad():
        a = ours(tokens).float()
    # the packed model computes what the trained latent model computes (up to the bf16 scale / embeddings)
    from bitnet158.train.export import load_training_checkpoint
    latent, _ = load_training_checkpoint(d / "run")
    with torch.no_grad():
        c = latent(tokens).float()
    assert (a - c).abs().max() < 0.1 * c.abs().max()

    assert_transformers_logits(out, tokens, a)


def test_deterministic_switches_torch_to_deterministic_algorithms(tmp_path, shards_dir, monkeypatch):
    """``train.deterministic = true`` asks torch for deterministic algorithms only (strict: warn-only mode keeps
    the non-deterministic attention backward on a GPU) and a fixed cuBLAS workspace, before the first update."""
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **kw: calls.append((mode, kw)))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")     # restored (or unset again) after the test
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    recipe = write_recipe(tmp_path / "r.toml", shards_dir, steps=6, eval_every=0, ckpt_every=0,
                          train="deterministic = true\n")
    run(Recipe.from_file(recipe), out=tmp_path / "run", device="cpu")
    assert calls == [(True, {})]
    import os
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_deterministic_run_repeats_bitwise(tmp_path, shards_dir, monkeypatch):
    """A real strict-mode run on the CPU: no op of the training step lacks a deterministic version, and two
    runs of one recipe give the same per-step losses."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")          # restored after the test
    recipe = write_recipe(tmp_path / "r.toml", shards_dir, steps=6, eval_every=0, ckpt_every=0,
                          train="deterministic = true\n")
    try:
        losses = []
        for name in ("a", "b"):
            run(Recipe.from_file(recipe), out=tmp_path / name, device="cpu")
            losses.append([r["loss"] for r in read_log(tmp_path / name / "log.jsonl") if "loss" in r])
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(losses[0]) == 6 and losses[0] == losses[1]
