"""The fused head loss (``losses.fused_linear_cross_entropy``) and the shared logits-row kernel.

Against ``F.cross_entropy`` of the full logits: value and gradients (hidden and head weight) within
1e-5 relative in fp32, mean and sum, with ignored labels, awkward chunk sizes; on the torch path and
on the Triton row kernel (``TRITON_INTERPRET=1`` on CPU). Memory: only one [chunk, V] logits tensor
per chunk, each made once (nothing recomputed in backward). The DPO log-probs reuse the row kernel.

    python3 -m pytest -q tests/train/test_fused_losses.py
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitnet158.train import losses  # noqa: E402


def _triton_ok() -> bool:
    try:
        from bitnet158.kernels.triton import common
        return torch.cuda.is_available() or common.INTERPRET
    except ImportError:
        return False


PATHS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(),
                                                                    reason="Triton not usable"))]


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setattr(losses, "FORCE_TRITON", request.param == "triton")
    return request.param


def _data(N, D, V, seed, ignore=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    if ignore:
        y[torch.randperm(N, generator=g)[:ignore]] = -100
    return h, w, y


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("N,D,V,chunk,ignore", [(23, 16, 37, 5, 4), (8, 12, 100, 8, 0), (7, 9, 33, 3, 7)])
def test_matches_full_logits_cross_entropy(path, reduction, N, D, V, chunk, ignore):
    h, w, y = _data(N, D, V, seed=N + V, ignore=ignore)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.cross_entropy(h1 @ w1.t(), y, reduction=reduction) * 1.7
    want.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = losses.fused_linear_cross_entropy(h2, w2, y, reduction=reduction, chunk=chunk) * 1.7
    got.backward()
    if ignore == N and reduction == "mean":
        want = torch.zeros(())
    assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))
    for a, b in ((h2.grad, h1.grad), (w2.grad, w1.grad)):
        assert float((a - b).abs().max()) <= 1e-5 * max(1e-3, float(b.abs().max()))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_each_logits_chunk_made_once(path):
    N, V = 50, 64
    h, w, y = _data(N, 8, V, seed=0)
    h.requires_grad_()
    loss = losses.fused_linear_cross_entropy(h, w, y, reduction="sum", max_chunk_elems=10 * V)
    loss.backward()
    assert LAST().chunk_tokens == 10
    assert len(LAST().forward) == 5 and LAST().backward == []      # no recomputation
    assert LAST().max_elems == 10 * V < N * V


def LAST():
    return losses.LAST_CHUNKS


def test_no_grad_and_bad_input():
    h, w, y = _data(6, 4, 11, seed=1)
    with torch.no_grad():
        v = losses.fused_linear_cross_entropy(h, w, y)
    assert abs(float(v) - float(F.cross_entropy(h @ w.t(), y))) <= 1e-5
    with pytest.raises(ValueError, match="outside"):
        losses.fused_linear_cross_entropy(h, w, torch.full((6,), 11))
    with pytest.raises(ValueError, match="reduction"):
        losses.fused_linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="match"):
        losses.fused_linear_cross_entropy(h, w, y[:3])


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_ce_rows_kernel(path):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, 70, generator=g) * 4
    lab = torch.randint(0, 70, (9,), generator=g)
    lab[2] = -100
    sc = torch.rand(9, generator=g)
    zz = z.clone()
    nll = losses.ce_rows(zz, lab, sc)
    want = F.cross_entropy(z, lab, reduction="none")
    assert torch.allclose(nll, want, atol=1e-5)
    zr = z.clone().requires_grad_()
    (F.cross_entropy(zr, lab, reduction="none") * sc).sum().backward()
    assert torch.allclose(zz, zr.grad, atol=1e-6)
    assert torch.equal(zz[2], torch.zeros(70))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_dpo_sequence_logprobs_reuse_the_row_kernel(path):
    g = torch.Generator().manual_seed(4)
    B, T, D, V = 2, 6, 8, 29
    h = torch.randn(B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, :2] = -100
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp = torch.log_softmax(h1 @ w1.t(), -1)
    want = (lp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)).sum(-1)
    (want * torch.tensor([0.3, -1.2])).sum().backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = losses.sequence_logprobs(h2, w2, y, chunk=4)
    (got * torch.tensor([0.3, -1.2])).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-5) and torch.allclose(w2.grad, w1.grad, atol=1e-5)


def test_no_gradients_made_under_no_grad(monkeypatch):
    """Evaluation (no_grad, parameters that require grad): the logits are not turned into gradients."""
    h, w, y = _data(12, 8, 30, seed=5)
    h.requires_grad_()
    w.requires_grad_()
    seen = []
    ce = losses.ce_rows
    monkeypatch.setattr(losses, "ce_rows", lambda *a, **k: seen.append(k["write_grad"]) or ce(*a, **k))
    with torch.no_grad():
        v = losses.fused_linear_cross_entropy(h, w, y, reduction="sum", chunk=5)
    assert seen == [False] * 3
    assert abs(float(v) - float(F.cross_entropy(h @ w.t(), y, reduction="sum"))) <= 1e-5 * abs(float(v))
    seen.clear()
    losses.fused_linear_cross_entropy(h, w, y, chunk=5).backward()
    assert seen == [True] * 3 and h.grad is not None and w.grad is not None


@pytest.mark.parametrize("per_row", [False, True])
def test_torch_row_fallback_in_blocks_of_rows(monkeypatch, per_row):
    """The torch fallback works a few rows at a time (small temporaries): same NLL and gradient."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(10, 70, generator=g) * 3
    lab = torch.randint(0, 70, (10,), generator=g)
    lab[[1, 7]] = -100
    sc = torch.rand(10, generator=g) if per_row else torch.tensor(0.7)
    whole = z.clone()
    want = losses.ce_rows(whole, lab, sc)
    monkeypatch.setattr(losses, "TORCH_ROWS_ELEMS", 3 * 70)              # blocks of 3 rows: 3+3+3+1
    blocks = z.clone()
    got = losses.ce_rows(blocks, lab, sc)
    assert torch.equal(got, want) and torch.equal(blocks, whole)
    bf = z.to(torch.bfloat16)
    got = losses.ce_rows(bf, lab, sc)                                      # bf16 logits: written back cast
    assert torch.allclose(got, want, atol=0.05) and torch.allclose(bf.float(), whole, atol=1e-2)
