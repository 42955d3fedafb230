"""The sampler's Triton row kernels (:mod:`bitnet158.kernels.triton.rows`) against torch.

On CPU the kernels run under ``TRITON_INTERPRET=1`` with 64-element chunks on awkward row lengths
(one chunk, a ragged last chunk, many chunks); on CUDA compiled, with the default chunks, at the
Llama-3 vocabulary too. Argmax exactly ``torch.argmax`` (ties, NaN, masked rows); the softmax
within float32 rounding of a float64 softmax; top-p's cut equal to the float64 count except
where the mass is within rounding of p. Every result of a row is bit-identical alone and in a
batch of rows.

    python3 -m pytest -q tests/kernels/test_triton_rows.py
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from bitnet158.kernels.triton import common, rows  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not common.INTERPRET:
    pytest.skip("Triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0/0 rows
VOCABS = [1, 63, 1000, 1001] + ([32000, 128256] if DEV == "cuda" else [])


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    if DEV == "cpu":                       # many chunks on short rows, quickly under the interpreter
        monkeypatch.setattr(rows, "BLOCK", 64)


def _batch(V: int, seed: int) -> torch.Tensor:
    """[6, V] logits: plain, ties of the maximum across chunks and inside one, NaN, mostly
    masked, the maximum last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, V, generator=g) * 4
    top = float(x.max()) + 1
    x[1, [0, V // 2, V - 1]] = top
    x[2, [V // 3, min(V // 3 + 1, V - 1)]] = top
    x[3, [V // 3, V - 1]] = float("nan")
    x[4, torch.rand(V, generator=g) < 0.9] = float("-inf")
    x[5, -1] = top
    return x.to(DEV)


@pytest.mark.parametrize("V", VOCABS)
def test_argmax_is_torch_argmax(V):
    x = _batch(V, V)
    got = rows.argmax(x)
    assert torch.equal(got, torch.argmax(x, dim=-1))
    for i in range(x.shape[0]):                                   # alone: the same index
        assert torch.equal(rows.argmax(x[i]), got[i:i + 1])
    masked = torch.full((2, V), float("-inf"), device=DEV)         # every logit masked: index 0
    assert torch.equal(rows.argmax(masked), torch.argmax(masked, dim=-1))


@pytest.mark.parametrize("V", VOCABS)
def test_softmax_within_rounding_and_batch_invariant(V):
    x = _batch(V, V + 1)
    p = rows.softmax(x)
    want = torch.softmax(x.double(), dim=-1).float()
    for i in range(x.shape[0]):
        alone = rows.softmax(x[i])
        assert torch.equal(alone.view(torch.int32), p[i].view(torch.int32)), i   # the same bits, NaN too
        if i == 3:
            assert torch.isnan(alone).all()                       # NaN anywhere: a NaN row, as torch
            continue
        torch.testing.assert_close(alone, want[i], rtol=2e-6 * max(1.0, V ** 0.5), atol=1e-12, equal_nan=True)
        if not torch.isnan(want[i]).any():                        # (a fully masked row is NaN)
            assert abs(float(alone.double().sum()) - 1.0) < 1e-5
    assert torch.isnan(rows.softmax(torch.full((V,), float("-inf"), device=DEV))).all()  # 0 / 0, as torch


def _count64(ps: torch.Tensor, p: float) -> tuple[int, torch.Tensor]:
    before = torch.cumsum(ps.double(), dim=-1) - ps.double()
    return int((before < p).int().cumprod(dim=-1).sum()), before


@pytest.mark.parametrize("V", VOCABS)
def test_first_reaching_is_the_top_p_count(V):
    g = torch.Generator().manual_seed(V + 2)
    logits = torch.randn(5, V, generator=g) * torch.tensor([0.5, 2.0, 4.0, 8.0, 1.0])[:, None]
    ps = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True).values.to(DEV)   # [5, V]
    for p in (0.05, 0.5, 0.9, 0.95, 0.999, 1.5):
        got = rows.first_reaching(ps, p)
        for i in range(ps.shape[0]):
            assert torch.equal(rows.first_reaching(ps[i], p), got[i:i + 1])           # alone: the same
            k = int(got[i])
            want, before = _count64(ps[i].cpu(), p)
            if k != want:                     # only where float32 rounding puts the mass at p
                edge = before[min(k, want)]
                assert abs(float(edge) - p) < 1e-5 * max(1.0, V ** 0.5), (i, p, k, want)
    zeros = torch.zeros(2, V, device=DEV)                          # never reaching p: every position
    assert rows.first_reaching(zeros, 0.5).tolist() == [V, V]
    nan = torch.full((V,), float("nan"), device=DEV)               # a NaN mass ends the run: the first kept
    assert rows.first_reaching(nan, 0.5).tolist() == [1]


@pytest.mark.parametrize("V", VOCABS)
def test_top_p_last_is_the_sorted_cut(V):
    """The cut digit by digit keeps what the sorted cut keeps (the last kept value equal, except
    where float32 rounding puts the mass at p), ties kept whole, masked logits never the cut, each
    row the same alone and in the batch."""
    g = torch.Generator().manual_seed(V + 3)
    x = torch.randn(6, V, generator=g) * torch.tensor([0.3, 1.0, 4.0, 12.0, 2.0, 1.0])[:, None]
    x[4, torch.rand(V, generator=g) < 0.7] = float("-inf")                 # top-k masked most of it
    if V >= 3:
        x[5, :3] = torch.tensor([30.0, 29.0, 29.0])                          # a tie at the boundary
    x = x.to(DEV)
    probs = torch.softmax(x, dim=-1)
    for p in (0.05, 0.5, 0.7, 0.9, 0.95, 0.999):
        got = rows.top_p_last(x, probs, p)
        for i in range(x.shape[0]):
            assert torch.equal(rows.top_p_last(x[i], probs[i], p), got[i:i + 1])   # alone: the same
            vals, idx = x[i].cpu().double().sort(descending=True)
            k, before = _count64(probs[i].cpu()[idx], p)
            want = float(vals[max(k, 1) - 1])
            if float(got[i]) != want:          # only where float32 rounding puts the mass at p
                edge = before[min(k, int((vals > float(got[i])).sum()))]
                assert abs(float(edge) - p) < 1e-5 * max(1.0, V ** 0.5), (i, p, float(got[i]), want)
    if V >= 3:
        probs5 = torch.softmax(x[5], -1)
        assert probs5[0] < 0.7 < probs5[0] + probs5[1]                       # the sort would split the tie
        assert float(rows.top_p_last(x[5], probs5, 0.7)) == 29.0              # both 29s kept
    assert rows.top_p_last(x[4], probs[4], 0.5).isfinite().all()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="rows.softmax: expected a float32"):
        rows.softmax(torch.zeros(4, dtype=torch.float64, device=DEV))
    with pytest.raises(ValueError, match="rows.argmax"):
        rows.argmax(torch.zeros(2, 3, 4, device=DEV))


def test_race_draws_from_the_probabilities():
    """Keyed exponential race: the frequencies of 400 draws (different draw numbers; 8192 on CUDA)
    follow p, masked tokens are never drawn, a (key, draw) always gives the same id, alone or in
    a batch."""
    p = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.0, 0.05], device=DEV)
    n = 8192 if DEV == "cuda" else 400
    probs = p.expand(n, -1).contiguous()
    state = torch.stack([torch.full((n,), 12345), torch.arange(n)], dim=1).to(DEV)   # one key, draws 0..n-1
    ids = rows.race(probs, state).cpu()
    freq = torch.bincount(ids, minlength=p.numel()).double() / n
    assert freq[p.cpu() == 0].sum() == 0                                            # masked: never
    assert (freq - p.cpu().double()).abs().max() < 4.5 * (0.25 / n) ** 0.5         # 4.5 sigma at p = 0.5
    again = rows.race(probs[:7], state[:7])
    assert torch.equal(again.cpu(), ids[:7])                                        # the same draws
    for i in (0, 5):
        assert torch.equal(rows.race(probs[i], state[i:i + 1]).cpu(), ids[i:i + 1])
    other_key = state.clone()
    other_key[:, 0] = 999
    assert not torch.equal(rows.race(probs[:64], other_key[:64]).cpu(), ids[:64])    # another stream
    with pytest.raises(ValueError, match="state must be int64"):
        rows.race(probs[:2], state[:3])


@pytest.mark.parametrize("V", [63, 1001] + ([128256] if DEV == "cuda" else []))
def test_race_top_p_is_the_race_over_the_cut(V):
    """Top-p's draw without masking: the id of ``race`` over the probabilities with every token
    below the cut at 0, whatever the number of candidate rounds (none: the cut digit by digit
    for every row; or the cut given), each row the same alone and in the batch."""
    g = torch.Generator().manual_seed(V + 7)
    x = torch.randn(6, V, generator=g) * torch.tensor([0.3, 1.0, 4.0, 12.0, 2.0, 1.0])[:, None]
    x[4, torch.rand(V, generator=g) < 0.7] = float("-inf")                 # top-k masked most of it
    x[5, :3] = torch.tensor([30.0, 29.0, 29.0])                              # a tie at the boundary
    x = x.to(DEV)
    probs = torch.softmax(x, dim=-1)
    for p in (0.05, 0.7, 0.95):
        last = rows.top_p_last(x, probs, p)
        for draw in range(2):
            state = torch.stack([torch.arange(6) * 7919 + 1, torch.full((6,), draw)], dim=1).to(DEV)
            want = rows.race(torch.where(x >= last[:, None], probs, 0.0), state)
            for rounds in ((0, 3) if draw == 0 else (2,)):
                got = rows.race_top_p(x, probs, p, state, rounds=rounds)
                assert torch.equal(got, want), (p, draw, rounds, got.tolist(), want.tolist())
            assert torch.equal(rows.race_top_p(x, probs, p, state, last=last), want)
        with pytest.MonkeyPatch.context() as mp:     # 2 programs a row, each looping over its chunks
            mp.setattr(rows, "ROUND_PROGRAMS", 12)
            assert torch.equal(rows.race_top_p(x, probs, p, state, rounds=1), want)
            assert torch.equal(rows.top_p_last(x, probs, p), last)
        assert torch.equal(rows.race_top_p(x[5], probs[5], p, state[5:6]), want[5:6])   # alone: the same
    with pytest.raises(ValueError, match="rows.race_top_p: state must be int64"):
        rows.race_top_p(x, probs, 0.5, torch.zeros(2, 2, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match=r"rows.race_top_p: last \(the cut\) must be float32"):
        rows.race_top_p(x, probs, 0.5, state, last=last[:2])
    with pytest.raises(ValueError, match="rows.race_top_p: probs"):
        rows.race_top_p(x, probs[:2], 0.5, torch.zeros(6, 2, dtype=torch.long, device=DEV))


def test_race_top_p_draws_from_the_nucleus():
    """Frequencies of top-p's draws follow the nucleus renormalized (p = 0.7 keeps 0.5 and 0.3 of
    [0.5, 0.3, 0.15, 0.05]), never a token outside it."""
    p = torch.tensor([0.15, 0.5, 0.05, 0.3], device=DEV)
    n = 8192 if DEV == "cuda" else 400
    x = p.log().expand(n, -1).contiguous()
    probs = p.expand(n, -1).contiguous()
    state = torch.stack([torch.full((n,), 4242), torch.arange(n)], dim=1).to(DEV)
    ids = rows.race_top_p(x, probs, 0.7, state).cpu()
    freq = torch.bincount(ids, minlength=4).double() / n
    assert freq[0] == 0 and freq[2] == 0
    assert abs(float(freq[1]) - 0.625) < 4.5 * (0.25 / n) ** 0.5
