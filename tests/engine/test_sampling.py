"""Sampling: greedy, top-k/top-p masks, repetition penalty (hand and HF processors), seeds, validation.

    python3 -m pytest -q tests/engine/test_sampling.py
"""

from __future__ import annotations

import pytest
import torch

from bitnet158.engine import GenerationError, Sampler, SamplingParams
from bitnet158.engine.sampling import apply_repetition_penalty, draw, process_logits, top_k_mask, top_p_mask
from bitnet158.errors import BitNetError


def test_greedy_is_argmax():
    torch.manual_seed(0)
    for _ in range(5):
        logits = torch.randn(1000)
        s = Sampler(SamplingParams(), 1000)
        assert s(logits) == int(logits.argmax())


def _distributions(n=12):
    """(seed, probs) pairs: dense, peaked and masked distributions over 5 to 128256 ids."""
    for seed, V in enumerate([5, 1000, 128256] * (n // 3)):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(V, generator=g) * (seed % 4 * 3)
        if seed % 2:
            logits[torch.rand(V, generator=g) < 0.5] = float("-inf")
            logits[0] = 1.0
        yield seed, torch.softmax(logits, -1)


@pytest.mark.cuda
def test_draw_on_cuda_is_torch_multinomial():
    """On a GPU the sampler's draw takes the same ids as torch.multinomial from the same generator
    state, without its checks."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for seed, probs in _distributions():
        probs = probs.cuda()
        ga, gb = (torch.Generator(device="cuda").manual_seed(seed + 7) for _ in range(2))
        for _ in range(4):
            assert torch.equal(draw(probs, ga), torch.multinomial(probs, 1, generator=gb))


@pytest.mark.cuda
@pytest.mark.parametrize("params", [dict(temperature=0.8), dict(temperature=0.8, top_p=0.95),
                                    dict(temperature=1.3, top_k=50, top_p=0.9),
                                    dict(temperature=0.7, top_p=0.9, repetition_penalty=1.3)])
def test_graphed_sampler_draws_the_eager_ids(params, monkeypatch):
    """From a request's second token the GPU sampler replays a CUDA graph: the same ids as the
    eager ops for the same seed, for two requests sharing the cached graph, one of them with
    another seed; the first token of a request never captures."""
    from bitnet158.engine import sampling, sampling_graph
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(sampling_graph, "_graphs", type(sampling_graph._graphs)())
    V, gen = 128256, torch.Generator().manual_seed(3)
    logits = [(torch.randn(V, generator=gen) * 4).cuda() for _ in range(12)]

    def ids(seed, graphs):
        monkeypatch.setattr(sampling, "GRAPHS", graphs)
        s = Sampler(SamplingParams(seed=seed, **params), V, prompt_ids=[5, 9], device="cuda")
        out = []
        for x in logits:
            t = s.next_id(x)
            out.append(int(t))
        return out

    want_a, want_b = ids(0, False), ids(1, False)
    assert not sampling_graph._graphs
    assert ids(0, True) == want_a and ids(1, True) == want_b
    assert len(sampling_graph._graphs) == 1
    monkeypatch.setattr(sampling, "GRAPHS", True)
    Sampler(SamplingParams(seed=0, temperature=0.5), V, device="cuda").next_id(logits[0])
    assert len(sampling_graph._graphs) == 1                    # one token: no capture


def test_draw_on_cpu_follows_probs():
    """On the CPU (inversion): never a zero-probability id, the same ids from the same seed, and
    frequencies within 5 standard deviations of the probabilities."""
    for seed, probs in _distributions(6):
        ga, gb = (torch.Generator().manual_seed(seed) for _ in range(2))
        a = torch.cat([draw(probs, ga) for _ in range(300)])
        assert torch.equal(a, torch.cat([draw(probs, gb) for _ in range(300)]))
        assert bool((probs[a] > 0).all())
    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.0, 0.05])
    g = torch.Generator().manual_seed(1)
    n = 20000
    freq = torch.bincount(torch.cat([draw(probs, g) for _ in range(n)]), minlength=6).double() / n
    sd = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert bool(((freq - probs.double()).abs() <= 5 * sd + 1e-12).all()), freq


def test_top_p_candidates_match_the_full_sort(monkeypatch):
    """The CPU's top-candidates path keeps exactly what the full sort keeps: peaked
    distributions (nucleus among the candidates), flat ones (past them: the full sort), ties at
    the boundary (kept whole), several rows at once."""
    from bitnet158.engine import sampling
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(4, 5000, generator=g) * s for s in (0.3, 1.0, 4.0, 12.0)]
    cases.append(torch.randn(4, 5000, generator=g) * torch.tensor([[12.0], [0.3], [4.0], [1.0]]))  # mixed rows
    tied = torch.full((5000,), -5.0)
    tied[:3] = torch.tensor([3.0, 2.0, 2.0])                               # 2.0 twice at the boundary
    cases.append(tied)
    for logits in cases:
        for p in (0.1, 0.35, 0.5, 0.9, 0.99):
            fast = top_p_mask(logits, p)
            monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 10 ** 9)
            assert torch.equal(fast, top_p_mask(logits, p))
            monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 64)
            assert torch.equal(fast, top_p_mask(logits, p))
            monkeypatch.undo()
    probs = torch.softmax(tied, -1)                                        # 0.293, 0.108, 0.108, ...
    assert probs[0] < 0.35 < probs[0] + probs[1]        # in sort order the second 2.0 would be dropped
    kept = torch.isfinite(top_p_mask(tied, 0.35)).nonzero().flatten().tolist()
    assert kept == [0, 1, 2]                                               # both tied tokens, not one


def test_top_k_mask_keeps_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    out = top_k_mask(logits, 2)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]
    assert torch.equal(top_k_mask(logits, 0), logits)
    assert torch.equal(top_k_mask(logits, 10), logits)


def test_top_p_mask_hand_example():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_p_mask(logits, p)).tolist()  # noqa: E731
    assert keep(0.4) == [False, True, False, False]       # the top token alone has 0.5 >= 0.4
    assert keep(0.7) == [False, True, False, True]        # 0.5 + 0.3 = 0.8 >= 0.7
    assert keep(0.85) == [False, True, True, True]
    assert keep(1.0) == [True, True, True, True]
    assert keep(1e-6) == [False, True, False, False]      # the most likely token is always kept


def test_repetition_penalty_hand_computation():
    logits = torch.tensor([2.0, -2.0, 1.0, -0.5, 3.0])
    seen = torch.tensor([True, True, False, False, False])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.allclose(out, torch.tensor([1.0, -4.0, 1.0, -0.5, 3.0]))
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([2.0, 1.5, -1.0])
    s = Sampler(SamplingParams(repetition_penalty=2.0), 3, prompt_ids=[0])
    assert s(logits) == 1                                  # 2.0 / 2 = 1.0 < 1.5
    assert s(logits) == 0                                  # 1 is now penalized too: 1.0 > 0.75


def test_matches_transformers_processors():
    tr = pytest.importorskip("transformers")
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    torch.manual_seed(1)
    V = 300
    logits = torch.randn(V) * 3
    ids = torch.randint(0, V, (40,))
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.8, repetition_penalty=1.3)
    seen = torch.zeros(V, dtype=torch.bool)
    seen[ids] = True
    ours = process_logits(logits, params, seen)
    x = logits[None].clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                 TopKLogitsWarper(50), TopPLogitsWarper(0.8)):
        x = proc(ids[None], x)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(x[0]))
    fin = torch.isfinite(ours)
    assert torch.allclose(ours[fin], x[0][fin], atol=1e-6)
    del tr


def test_seed_reproducible_and_independent():
    torch.manual_seed(0)
    logits = torch.randn(50, 64)
    p = SamplingParams(temperature=1.0, seed=123)
    draw = lambda params: [s(row) for s in [Sampler(params, 64)] for row in logits]  # noqa: E731
    a = draw(p)
    s1, s2 = Sampler(p, 64), Sampler(p, 64)
    inter = [(s1(row), s2(row)) for row in logits]        # interleaved requests: no shared state
    assert [x for x, _ in inter] == a and [y for _, y in inter] == a
    torch.manual_seed(999)                                 # global RNG must not matter
    assert draw(p) == a
    b = draw(p.replace(seed=124))
    assert a != b


def test_sampling_respects_masks():
    logits = torch.zeros(10)
    s = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=0), 10)
    logits[[2, 5, 7]] = 5.0
    picks = {s(logits) for _ in range(50)}
    assert picks <= {2, 5, 7} and len(picks) > 1


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_k", -1), ("top_p", 0.0),
                                         ("top_p", 1.5), ("repetition_penalty", 0.0),
                                         ("max_new_tokens", 0), ("seed", 1.5), ("top_k", 2.0),
                                         ("temperature", float("nan")), ("stop_ids", "abc"),
                                         ("stop_ids", [-1])])
def test_validation_names_parameter(field, value):
    with pytest.raises(GenerationError, match=field) as e:
        SamplingParams(**{field: value})
    assert isinstance(e.value, BitNetError) and isinstance(e.value, ValueError)


def test_stop_ids_normalized():
    assert SamplingParams(stop_ids=[3, 4, 3]).stop_ids == frozenset({3, 4})
