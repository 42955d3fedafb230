"""Chunked head losses against the naive full-logits computation (values and gradients, fp32)."""

import math

import pytest
import torch
import torch.nn.functional as F

from bitnet158.train.losses import (LAST_CHUNKS, chunk_tokens_for, dpo_loss, linear_cross_entropy,
                                    sequence_logprobs, token_logprobs)


def _inputs(N=37, D=24, V=101, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(V, D, generator=g)).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore_frac] = -100
    return h, w, y


def _grads(loss, *ts):
    return torch.autograd.grad(loss, ts)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_linear_cross_entropy_matches_naive(reduction, chunk):
    h, w, y = _inputs()
    ref = F.cross_entropy(h @ w.t(), y, reduction=reduction, ignore_index=-100)
    got = linear_cross_entropy(h, w, y, reduction=reduction, chunk=chunk)
    assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    for a, b in zip(_grads(got, h, w), _grads(ref, h, w)):
        assert (a - b).abs().max().item() <= 1e-5


def test_awkward_shapes_all_ignored_and_no_weight_grad():
    h, w, y = _inputs(N=3, D=7, V=5, ignore_frac=0.0)
    y[:] = -100
    loss = linear_cross_entropy(h, w, y, reduction="mean", chunk=2)
    assert loss.item() == 0.0
    loss.backward()                                   # graph stays connected, grads are zero
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0
    h, w, y = _inputs(N=9, D=3, V=2, ignore_frac=0.0)
    w.requires_grad_(False)
    got = linear_cross_entropy(h, w, y, reduction="sum", chunk=4)
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    (gh,) = _grads(got, h)
    (rh,) = _grads(ref, h)
    assert (gh - rh).abs().max() <= 1e-5


def test_chunks_never_reach_full_logits():
    N, V = 64, 1000
    h, w, y = _inputs(N=N, D=16, V=V, ignore_frac=0.0)
    loss = linear_cross_entropy(h, w, y, reduction="sum", max_chunk_elems=10 * V)
    loss.backward()
    assert LAST_CHUNKS.chunk_tokens == 10 == chunk_tokens_for(V, None, 10 * V)
    shapes = LAST_CHUNKS.forward + LAST_CHUNKS.backward
    assert len(LAST_CHUNKS.forward) == len(LAST_CHUNKS.backward) == math.ceil(N / 10)
    assert all(r <= 10 and v == V for r, v in shapes)
    assert LAST_CHUNKS.max_elems == 10 * V < N * V
    # ignored tokens never reach the head at all
    y[::2] = -100
    linear_cross_entropy(h, w, y, chunk=7)
    assert sum(r for r, _ in LAST_CHUNKS.forward) == N // 2


def test_sequence_logprobs_and_dpo_match_naive():
    B, T, D, V = 4, 11, 8, 53
    g = torch.Generator().manual_seed(1)
    h = torch.randn(B, T, D, generator=g).requires_grad_()
    w = (0.5 * torch.randn(V, D, generator=g)).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, :3] = -100                                  # prompt tokens
    y[1, 8:] = -100                                  # padding
    got = sequence_logprobs(h, w, y, chunk=6)
    lp = torch.log_softmax(h @ w.t(), -1)            # [B, T, V]: the naive way
    mask = y != -100
    ref = (lp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * mask).sum(-1)
    assert (got - ref).abs().max() <= 1e-5
    ref_c, ref_r = ref.detach()[:2] - 0.3, ref.detach()[2:] + 0.2
    l1, s1 = dpo_loss(got[:2], got[2:], ref_c, ref_r, beta=0.1)
    l2, _ = dpo_loss(ref[:2], ref[2:], ref_c, ref_r, beta=0.1)
    naive = -F.logsigmoid(0.1 * ((ref[:2] - ref_c) - (ref[2:] - ref_r))).mean()
    assert abs(l2.item() - naive.item()) <= 1e-6 and abs(l1.item() - naive.item()) <= 1e-5
    for a, b in zip(_grads(l1, h, w), _grads(naive, h, w)):
        assert (a - b).abs().max() <= 1e-5
    assert set(s1) == {"rewards_chosen", "rewards_rejected", "margins", "accuracy"}


def test_dpo_reward_zero_when_policy_is_reference():
    lp = torch.tensor([-12.5, -30.0, -7.25])
    loss, s = dpo_loss(lp, lp - 1, lp.clone(), lp - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert s["rewards_chosen"].abs().max() == 0 and s["margins"].abs().max() == 0


def test_bf16_autocast_close_to_fp32():
    h, w, y = _inputs(N=20, D=32, V=64, ignore_frac=0.0)
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, y, reduction="sum", chunk=7)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 0.02 * abs(ref.item())
    gh, gw = _grads(got, h, w)
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    rh, rw = _grads(ref, h, w)
    assert (gh - rh).abs().max() < 0.05 * rh.abs().max()


def test_token_logprobs_rejects_bad_labels():
    h, w, y = _inputs(N=4, D=3, V=5, ignore_frac=0.0)
    y[0] = 5
    with pytest.raises(ValueError, match="outside"):
        token_logprobs(h, w, y)
