"""sampling.next_ids: the batch scheduler's rows drawn together get exactly the ids each request's
own Sampler gives alone, whatever the mix of parameters and seeds.

    python3 -m pytest -q tests/engine/test_batched_draw.py

On CPU the batched path is forced onto the Triton row kernels under ``TRITON_INTERPRET=1`` (with
short chunks); on CUDA (marked ``cuda``) it runs as the server runs it, against lone samplers
that replay their CUDA graphs.
"""

import os

import pytest
import torch

from bitnet158.engine import row_ops, sampling
from bitnet158.engine.sampling import Sampler, SamplingParams, next_ids

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

MIX = [dict(), dict(temperature=0.8, top_p=0.95, seed=1), dict(temperature=0.8, top_p=0.95, seed=2),
       dict(repetition_penalty=1.3), dict(temperature=1.3, top_k=20, top_p=0.9, seed=3), dict(),
       dict(temperature=0.7, top_p=0.9, repetition_penalty=1.2, seed=4), dict(temperature=0.8, seed=5)]


def _run(V: int, dev: str, steps: int = 5):
    gen = torch.Generator().manual_seed(V)
    prompt = [3, 5, 8]
    steps_logits = [(torch.randn(len(MIX), V, generator=gen) * 3).to(dev) for _ in range(steps)]
    alone = [Sampler(SamplingParams(**m), V, prompt, device=dev) for m in MIX]
    together = [Sampler(SamplingParams(**m), V, prompt, device=dev) for m in MIX]
    for x in steps_logits:
        want = [int(s.next_id(x[i])) for i, s in enumerate(alone)]
        got = next_ids(together, x).tolist()
        assert got == want
    for a, b in zip(alone, together):
        assert a.calls == b.calls
        assert (a.seen is None) == (b.seen is None) and (a.seen is None or torch.equal(a.seen, b.seen))


def test_cpu_rows_are_drawn_one_by_one():
    assert not row_ops.batch_invariant(torch.zeros(2, 8))
    _run(500, "cpu")


def test_batched_path_on_the_row_kernels(monkeypatch):
    """The grouped path itself (forced onto CPU tensors through the interpreted kernels)."""
    if CUDA:
        pytest.skip("the CUDA test below runs the kernels compiled")
    pytest.importorskip("triton")
    from bitnet158.kernels.triton import common, rows
    if not common.INTERPRET:
        pytest.skip("Triton kernels were imported before TRITON_INTERPRET=1 was set")
    monkeypatch.setattr(rows, "BLOCK", 64)
    monkeypatch.setattr(row_ops, "_kernels", lambda x: rows if x.dtype == torch.float32 and x.dim() in (1, 2)
                        else None)
    _run(300, "cpu", steps=3)


def test_row_count_must_match():
    with pytest.raises(ValueError, match="2 samplers for 3 rows"):
        next_ids([Sampler(SamplingParams(), 8)] * 2, torch.zeros(3, 8))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_batch_draws_the_lone_ids(monkeypatch):
    monkeypatch.setattr(sampling, "GRAPHS", True)              # lone samplers replay their graphs
    _run(128256, "cuda", steps=6)
