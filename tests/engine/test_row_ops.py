"""The sampler's row ops: torch's ops off the GPU, the Triton row kernels on a CUDA float32 tensor.

    python3 -m pytest -q tests/engine/test_row_ops.py

The kernels themselves are tested in ``tests/kernels/test_triton_rows.py``; here the dispatch,
the CPU definitions the kernels are held to, and (marked ``cuda``) that a CUDA row gets the
kernels' results, within float32 rounding of the CPU's.
"""

import pytest
import torch

from bitnet158.engine import row_ops

CUDA = torch.cuda.is_available()


def test_off_cuda_the_torch_ops_run():
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(0))
    assert torch.equal(row_ops.softmax(x), torch.softmax(x, dim=-1))
    assert torch.equal(row_ops.argmax(x), torch.argmax(x, dim=-1))
    assert torch.equal(row_ops.argmax(x[0]), torch.argmax(x[0], dim=-1, keepdim=True))   # [V] -> [1]
    assert not row_ops.batch_invariant(x)


def test_first_reaching_on_cpu_is_the_leading_run():
    ps = torch.tensor([[0.5, 0.25, 0.125, 0.125], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    # mass before each position: [0, .5, .75, .875], [0, 1, 1, 1], [0, .25, .5, .75]
    assert row_ops.first_reaching(ps, 0.6).tolist() == [2, 1, 3]
    assert row_ops.first_reaching(ps, 0.75).tolist() == [2, 1, 3]          # reaching p ends the run
    assert row_ops.first_reaching(ps, 2.0).tolist() == [4, 4, 4]           # never reached: all of them
    assert row_ops.first_reaching(ps[2], 0.3).tolist() == [2]              # [V] -> [1]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("V", [128256, 32000, 1001])
def test_cuda_rows_run_the_kernels(V):
    from bitnet158.kernels.triton import rows
    gen = torch.Generator().manual_seed(V)
    x = torch.randn(4, V, generator=gen) * 4
    x[1, [3, V - 1]] = float(x.max()) + 1                                   # a tie of the maximum
    xc = x.cuda()
    assert row_ops.batch_invariant(xc)
    assert torch.equal(row_ops.argmax(xc), rows.argmax(xc))
    assert torch.equal(row_ops.argmax(xc).cpu(), torch.argmax(x, dim=-1))
    p = row_ops.softmax(xc)
    assert torch.equal(p, rows.softmax(xc))
    torch.testing.assert_close(p.cpu(), torch.softmax(x, dim=-1), rtol=1e-4, atol=1e-9)
    ps = p.sort(dim=-1, descending=True).values
    got = row_ops.first_reaching(ps, 0.9).cpu()
    want = row_ops.first_reaching(ps.cpu(), 0.9)
    assert (got - want).abs().max() <= 1                                    # rounding at the boundary


def test_keyed_draw_without_the_kernels_is_a_clear_error():
    with pytest.raises(ValueError, match="row_ops.race: the keyed draw needs the Triton row kernels"):
        row_ops.race(torch.full((2, 8), 0.125), torch.zeros(2, 2, dtype=torch.long))
