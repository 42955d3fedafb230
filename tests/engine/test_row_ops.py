"""Two-level row reductions of the GPU sampler against the torch ops they replace.

    python3 -m pytest -q tests/engine/test_row_ops.py

CPU: the torch ops run unchanged, and the two-level path forced onto CPU tensors gives the same
results as on CUDA below. CUDA (marked ``cuda``): argmax and integer sums exactly
torch's (ties and NaN included) at vocabularies that split into rows and ones that do not; the
softmax within float rounding of ``torch.softmax`` and summing to 1.
"""

import pytest
import torch

from bitnet158.engine import row_ops

CUDA = torch.cuda.is_available()


def test_off_cuda_the_torch_ops_run():
    x = torch.randn(1024, generator=torch.Generator().manual_seed(0))
    assert torch.equal(row_ops.softmax(x), torch.softmax(x, dim=-1))
    assert torch.equal(row_ops.argmax(x), torch.argmax(x, dim=-1, keepdim=True))
    c = (x > 0).to(torch.int32)
    assert torch.equal(row_ops.int_sum(c), c.sum(dim=-1, keepdim=True))
    assert row_ops._rows(x) == 0


def _two_level_on_cpu(monkeypatch):
    """The two-level path on CPU tensors (its views, gathers and index arithmetic)."""
    import math
    monkeypatch.setattr(row_ops, "_rows", lambda x: (math.gcd(x.numel(), 1024) if x.dim() == 1 and x.is_contiguous()
                                                   and math.gcd(x.numel(), 1024) >= row_ops.MIN_ROWS else 0))


@pytest.mark.parametrize("V", [128256, 1000, 1001])
def test_two_level_path_matches_torch_on_cpu(V, monkeypatch):
    _two_level_on_cpu(monkeypatch)
    _check(V, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("V", [128256, 32000, 1000, 1001])
def test_cuda_rows_match_torch(V):
    _check(V, "cuda")


def _check(V: int, dev: str):
    gen = torch.Generator().manual_seed(V)
    for case in range(6):
        x = (torch.randn(V, generator=gen) * 4).to(dev)
        if case == 1:                                   # ties of the maximum in different rows
            x[[7, V // 2, V - 1]] = x.max() + 1
        if case == 2:                                   # a tie inside one row
            x[[3, 4]] = x.max() + 1
        if case == 3:                                   # NaN counts as the maximum
            x[[V // 3, V - 2]] = float("nan")
        if case == 4:                                   # masked logits
            x[torch.rand(V, generator=gen).to(dev) < 0.9] = float("-inf")
        if case == 5:                                   # the maximum in the last element
            x[-1] = x.max() + 1
        assert torch.equal(row_ops.argmax(x), torch.argmax(x, dim=-1, keepdim=True)), case
        c = (torch.rand(V, generator=gen) < 0.7).to(torch.int32).to(dev).cumprod(dim=-1)
        assert torch.equal(row_ops.int_sum(c), c.sum(dim=-1, keepdim=True))
        if case != 3:
            p = row_ops.softmax(x)
            torch.testing.assert_close(p, torch.softmax(x, dim=-1), rtol=1e-4, atol=1e-9)   # sum order
            assert abs(float(p.double().sum()) - 1.0) < 1e-5
    assert (row_ops._rows(torch.empty(V, device=dev)) > 0) == (V != 1001)
