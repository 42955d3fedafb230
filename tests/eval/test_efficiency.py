"""Energy model (op counts x 7 nm energies), memory/latency helpers and the bench command."""

from __future__ import annotations

import json

import pytest

from bitnet158.config import ModelConfig
from bitnet158.eval.efficiency import (ENERGY_PJ_7NM, energy_per_token, model_bytes, op_counts,
                                       ternary_zero_fraction)
from bitnet158.quant import unpack_hf


def test_2b4t_counts_and_ratio():
    cfg = ModelConfig.from_name("2b4t")
    ops = op_counts(cfg, context=512)
    assert ops["parts"]["projection_weights"] == 2_084_044_800         # SPEC: 2.084 B ternary weights
    assert ops["parts"]["head_macs"] == 128256 * 2560
    assert ops["parts"]["attention_macs"] == 2 * 20 * 128 * 512 * 30
    e = energy_per_token(cfg, context=512)
    # the papers' matmul saving: fp16 mul + add (0.34 + 0.16 pJ) vs one int8 add (0.007 pJ)
    assert e["matmul_ratio"] == pytest.approx(0.5 / 0.007)
    assert e["bitnet_matmul_pj"] == pytest.approx(2_084_044_800 * ENERGY_PJ_7NM["int8_add"])
    assert 1 < e["ratio"] < e["matmul_ratio"]                          # head + attention are fp16 in both
    skip = energy_per_token(cfg, context=512, zero_fraction=0.4, skip_zeros=True)
    assert skip["bitnet_matmul_pj"] == pytest.approx(0.6 * e["bitnet_matmul_pj"])


def test_zero_fraction_and_bytes(model):
    zeros = total = 0
    for _, mod in model.projections():
        w = unpack_hf(mod.weight)
        zeros += int((w == 0).sum())
        total += w.numel()
    assert ternary_zero_fraction(model) == pytest.approx(zeros / total)
    b = model_bytes(model)
    assert b["packed_bytes"] == total // 4 and b["head_bytes"] == 512 * 64 * 4


def test_bench_cli(folder, tmp_path, capsys):
    from bitnet158.cli import main
    charts = tmp_path / "charts"
    assert main(["bench", str(folder), "--prompt-tokens", "8", "--gen-tokens", "3", "--repeats", "1",
                 "--threads", "1", "--backend", "torch", "--charts", str(charts), "--no-gpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    d = json.loads(out[-1])
    for key in ("load_s", "rss_gb", "cpu_pp_tok_s", "cpu_tg_tok_s", "cpu_tg_ms_per_token",
                "energy_bitnet_uj_per_token", "energy_fp16_uj_per_token", "energy_int8_add_pj"):
        assert key in d and d[key] is not None
    assert d["energy_context_tokens"] == 256                          # clamped to the model's context
    assert any("7 nm" in line for line in out)                         # the method is stated
    try:
        import matplotlib  # noqa: F401
        assert (charts / "bench-energy.png").is_file()
    except ImportError:
        pass
