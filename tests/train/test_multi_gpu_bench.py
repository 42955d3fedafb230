"""``bench/multi_gpu.py`` end to end on the CPU in its one-process form: ``torchrun --nproc_per_node=1``
with FSDP2 (the module is wrapped even with one rank) against a plain process, the rank's checkpoint
resumed by a plain process, exported packed and loaded. Two ranks are covered by test_distributed.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_one_rank_fsdp_matches_one_process(tmp_path, shards_dir):
    out = tmp_path / "res.json"
    cmd = [sys.executable, str(REPO / "bench" / "multi_gpu.py"), "--device", "cpu", "--size", "tiny",
           "--nproc", "1", "--data", str(shards_dir), "--steps", "6", "--resume-steps", "2", "--skip-steps", "1",
           "--seq", "32", "--micro-batch", "2", "--grad-accum", "2", "--val-rows", "4",
           "--work", str(tmp_path / "work"), "--json-out", str(out), "--deadline-s", "300"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {k: v for k, v in json.loads(out.read_text()).items() if not isinstance(v, list)}
    assert res["ngpu_rc"] == 0 and res["ref_rc"] == 0 and res["resume_rc"] == 0
    assert res["nccl_nvls_enable"] == "0" and res["torch_symm_mem_disable_multicast"] == "1"
    assert res["loss_steps_compared"] == 6
    assert res["loss_rel_diff_max"] <= 1e-5          # fp32: one FSDP2 rank computes what one process does
    assert res["resume_steps_compared"] == 2 and res["resume_loss_rel_diff_max"] <= 1e-5
    assert res["resume_1gpu_ok"] and res["export_loads"] and res["export_ok"] and res["export_step"] == 6
    assert res["export_top1_agree"] >= 0.9
    assert 0 < res["scaling_efficiency"]
