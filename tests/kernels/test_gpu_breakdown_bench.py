"""``bench/gpu_breakdown.py`` rebuilds the runner's 9-kernel decode step to issue one kernel twice;
without doubling it must be that step (else its marginal costs would time another step).

CPU: a tiny fp32 model under ``TRITON_INTERPRET=1``; the bench itself needs CUDA.

    python3 -m pytest -q tests/kernels/test_gpu_breakdown_bench.py
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from bitnet158.kernels.triton import common  # noqa: E402
from bitnet158.kernels.triton.runner import TritonRunner  # noqa: E402
from bitnet158.random_model import random_packed_model  # noqa: E402

if not torch.cuda.is_available() and not common.INTERPRET:
    pytest.skip("Triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import gpu_breakdown  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def runner():
    model = random_packed_model("tiny", seed=0, dtype=torch.float32, device=DEV)
    r = TritonRunner(model, batch=1, max_len=64, graphs=False)
    gen = torch.Generator(device=DEV).manual_seed(0)
    for k, v in zip(r.k_cache, r.v_cache):
        k.normal_(generator=gen)
        v.normal_(generator=gen)
    return r


def _args():
    return (torch.tensor([5], device=DEV), torch.tensor([10], dtype=torch.int32, device=DEV),
            torch.tensor([0], dtype=torch.int32, device=DEV))


def test_undoubled_step_is_the_runner_step(runner):
    assert torch.equal(gpu_breakdown.step_doubling(runner, None)(*_args()), runner._decode_step(*_args()))


def test_doubled_attention_keeps_the_logits(runner):
    """The attention only writes its own outputs and this position's cache slot: issued twice, the
    same logits (the doubled step does the step's work, once more)."""
    assert torch.equal(gpu_breakdown.step_doubling(runner, "attn")(*_args()), runner._decode_step(*_args()))


@pytest.mark.parametrize("name", ["attn_fused", "attn_fused_span16", "attn_span16", "attn_merge1", "attn_pw2"])
def test_attention_variants_keep_the_logits(runner, name):
    """The attention variants compute the step's attention (sums in another order, so within fp32
    rounding): they time the same step, not another one."""
    with gpu_breakdown.variant(runner, name):
        got = gpu_breakdown.step_doubling(runner, None)(*_args())
    torch.testing.assert_close(got, runner._decode_step(*_args()), rtol=1e-5, atol=1e-5)


def test_every_variant_name_is_known(runner):
    """``--variants all`` names only variants the bench can build (else a GPU call would stop
    halfway with "unknown variant")."""
    for name in gpu_breakdown.VARIANTS.split(","):
        with gpu_breakdown.variant(runner, name):
            pass


def test_unknown_or_malformed_variant_is_a_clear_error(runner):
    with pytest.raises(SystemExit, match="unknown variant"):
        gpu_breakdown.variant(runner, "gemv_fast")
    with pytest.raises(SystemExit, match="expected a number"):
        gpu_breakdown.variant(runner, "attn_chunkX")
    with pytest.raises(SystemExit, match="expected a number"):
        gpu_breakdown.variant(runner, "attn_fusedX")
    with pytest.raises(SystemExit, match="must cover --ctx 1024"):
        gpu_breakdown.variant(runner, "attn_span128", ctx=1024)
