"""``pretrain --fused`` (``model.fused = true``): the fused blocks and head loss in the training loop.

On the CPU (torch backend, fp32) a few steps give the reference run's losses within 1e-4 relative,
and the checkpoint holds the same tensor names (the swap changes classes only).

    python3 -m pytest -q tests/train/test_fused_pretrain.py
"""

from conftest import write_recipe

from bitnet158.kernels.norm_bitlinear import FusedBlock
from bitnet158.train.loop import read_log
from bitnet158.train.pretrain import add_arguments, build_model, main, run
from bitnet158.train.recipe import Recipe


def _losses(out):
    return [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]


def test_fused_recipe_matches_reference(tmp_path, shards_dir):
    recipe = write_recipe(tmp_path / "r.toml", shards_dir, steps=6, eval_every=6, ckpt_every=6)
    run(Recipe.from_file(recipe), out=tmp_path / "ref", device="cpu")
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert main(p.parse_args([str(recipe), "--out", str(tmp_path / "fused"), "--device", "cpu",
                              "--fused"])) == 0
    want, got = _losses(tmp_path / "ref"), _losses(tmp_path / "fused")
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-4 * abs(b), (got, want)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "ref" / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "fused" / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert a.keys() == b.keys()


def test_recipe_field(tmp_path, shards_dir):
    recipe = Recipe.from_file(write_recipe(tmp_path / "r.toml", shards_dir), overrides=["model.fused=true"])
    assert recipe.model.fused is True
    model = build_model(recipe, 512)
    assert not any(isinstance(m, FusedBlock) for m in model.modules())   # swapped in run(), not here
