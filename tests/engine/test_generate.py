"""Generation: KV-cache parity with a full forward (batch 1 and 3 at different positions), greedy
equality, stop ids, max tokens, context errors, prefix re-use, runner registry.

    python3 -m pytest -q tests/engine/test_generate.py
"""

from __future__ import annotations

import sys

import pytest
import torch

from bitnet158.engine import (GenerationError, SamplingParams, Session, TorchRunner, generate,
                              make_runner, register_runner, runners)
from bitnet158.engine import runner as runner_mod
from bitnet158.errors import BitNetError, ConfigError, ContextLengthError

from .conftest import tiny_model

ATOL = 1e-4


def full_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()        # [T, V]


@pytest.mark.parametrize("which", ["model", "packed_model"])
def test_kv_decode_matches_full_forward_batch1(which, request):
    model = request.getfixturevalue(which)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (40,)).tolist()
    ref = full_logits(model, ids)
    r = make_runner(model, backend="torch")
    # prefill the first 7, then decode one at a time: every position matches the full forward
    got = [r.prefill(torch.tensor([ids[:7]]), torch.arange(7)[None])[0]]
    for p in range(7, len(ids)):
        got.append(r.decode(torch.tensor([ids[p]]), torch.tensor([p]))[0])
    got = torch.stack(got)                                    # [34, V] = positions 6..39
    assert got.dtype == torch.float32
    err = (got - ref[6:]).abs().max().item()
    assert err <= ATOL, err
    # chunked prefill at an offset (prefix re-use) also matches
    r.prefill(torch.tensor([ids[:10]]), torch.arange(10)[None])
    last = r.prefill(torch.tensor([ids[10:25]]), torch.arange(10, 25)[None])[0]
    assert (last - ref[24]).abs().max().item() <= ATOL


@pytest.mark.parametrize("which", ["model", "packed_model"])
def test_kv_decode_batch3_rows_at_different_positions(which, request):
    model = request.getfixturevalue(which)
    torch.manual_seed(1)
    V = model.config.vocab_size
    lens = [5, 12, 1]                                         # prompt length of each row
    steps = 9
    seqs = [torch.randint(0, V, (n + steps,)).tolist() for n in lens]
    refs = [full_logits(model, s) for s in seqs]
    r = make_runner(model, batch=3, max_len=64, backend="torch")
    assert r.batch == 3 and r.max_len == 64
    for i, (n, s) in enumerate(zip(lens, seqs)):             # prefill each row on its own
        out = r.prefill(torch.tensor([s[:n]]), torch.arange(n)[None], rows=torch.tensor([i]))
        assert (out[0] - refs[i][n - 1]).abs().max().item() <= ATOL
    for k in range(steps):                                    # then decode all rows together
        pos = torch.tensor([n + k for n in lens])
        toks = torch.tensor([s[n + k] for n, s in zip(lens, seqs)])
        out = r.decode(toks, pos)
        for i in range(3):
            err = (out[i] - refs[i][lens[i] + k]).abs().max().item()
            assert err <= ATOL, (i, k, err)
    # batched prefill with per-row offsets: rows continue from different positions
    extra = torch.randint(0, V, (3, 4))
    pos = torch.stack([torch.arange(n + steps, n + steps + 4) for n in lens])
    out = r.prefill(extra, pos)
    for i in range(3):
        ref = full_logits(model, seqs[i] + extra[i].tolist())[-1]
        assert (out[i] - ref).abs().max().item() <= ATOL


def test_runner_errors(model):
    r = make_runner(model, batch=2, max_len=16)
    with pytest.raises(ValueError, match="batch=2"):
        r.decode(torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="max_len=16"):
        r.decode(torch.tensor([1, 2]), torch.tensor([3, 16]))
    with pytest.raises(ConfigError, match="backend='nope'"):
        make_runner(model, backend="nope")
    with pytest.raises(ConfigError, match="batch"):
        make_runner(model, batch=0)


def greedy_reference(model, ids, n) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(full_logits(model, out)[-1].argmax()))
    return out[len(ids):]


def test_greedy_matches_recompute(packed_model):
    ids = [0, 17, 42, 99, 7]
    runner = make_runner(packed_model, max_len=64, backend="torch")
    gen = generate(runner, ids, SamplingParams(max_new_tokens=24, stop_ids=[]))
    toks = list(gen)
    assert toks == greedy_reference(packed_model, ids, 24)
    assert gen.finish_reason == "length" and gen.completion_tokens == 24 and gen.prompt_tokens == 5
    assert not gen.clamped


def test_stop_ids_and_max_tokens(model):
    ids = [0, 3, 4, 5]
    free = list(generate(model, ids, max_new_tokens=12, stop_ids=[]))
    stop = free[5]
    first = free.index(stop)
    gen = generate(model, ids, max_new_tokens=12, stop_ids=[stop, 100000])
    out = list(gen)
    assert out == free[:first] and stop not in out
    assert gen.finish_reason == "stop" and gen.completion_tokens == first
    gen = generate(model, ids, max_new_tokens=3, stop_ids=[])
    assert len(list(gen)) == 3 and gen.finish_reason == "length"
    # default stop ids: the config's eos
    eos = model.config.eos_token_ids[0]
    gen = generate(model, ids, max_new_tokens=200)
    assert eos not in list(gen)


def test_sampled_generation_seeded(model):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_new_tokens=16, stop_ids=[])
    a, b = list(generate(model, [0, 1, 2], p)), list(generate(model, [0, 1, 2], p))
    assert a == b
    assert a != list(generate(model, [0, 1, 2], p.replace(seed=8)))


def test_context_errors_and_clamp(model):
    ctx = model.config.max_position_embeddings                  # 256
    with pytest.raises(ContextLengthError, match=f"{ctx} tokens.*context of {ctx}") as e:
        generate(model, [5] * ctx, max_new_tokens=1)
    assert isinstance(e.value, BitNetError)
    with pytest.raises(ContextLengthError, match="300 tokens"):
        generate(model, [5] * 300)
    gen = generate(model, [5] * (ctx - 3), max_new_tokens=10, stop_ids=[])
    assert len(list(gen)) == 3 and gen.clamped and gen.finish_reason == "length"
    r = make_runner(model, max_len=20)
    with pytest.raises(ContextLengthError, match="context of 20"):
        generate(r, list(range(20)))


def test_bad_prompts(model):
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [])
    with pytest.raises(GenerationError, match="token id 512 outside"):
        generate(model, [0, 512])
    with pytest.raises(GenerationError, match="text"):
        generate(model, "hello")


def test_session_reuses_prefix(model):
    sess = Session(model, max_len=128)
    p = SamplingParams(max_new_tokens=8, stop_ids=[])
    turn1 = [0, 10, 11, 12]
    g1 = sess.generate(turn1, p)
    out1 = list(g1)
    assert g1.cached_tokens == 0
    assert sess.tokens == turn1 + out1[:-1]                    # the last sampled id is not fed yet
    turn2 = turn1 + out1 + [20, 21]
    g2 = sess.generate(turn2, p)
    out2 = list(g2)
    assert g2.cached_tokens == len(turn1) + len(out1) - 1
    assert out2 == list(generate(model, turn2, p))             # same result as from scratch
    # a prompt that diverges early re-uses only the common prefix
    g3 = sess.generate([0, 10, 99], p)
    assert g3.cached_tokens == 2 and list(g3) == list(generate(model, [0, 10, 99], p))
    # the same prompt again: everything but the last token is re-used
    g4 = sess.generate([0, 10, 99], p)
    assert g4.cached_tokens == 2 and list(g4) == list(generate(model, [0, 10, 99], p))
    sess.reset()
    assert sess.tokens == []


def test_early_close_keeps_cache_consistent(model):
    sess = Session(model, max_len=64)
    p = SamplingParams(max_new_tokens=20, stop_ids=[])
    g = sess.generate([0, 1, 2], p)
    got = [next(g) for _ in range(4)]
    g.close()
    assert g.finish_reason is None and g.tokens == got
    nxt = [0, 1, 2, *got, 5]
    assert list(sess.generate(nxt, p)) == list(generate(model, nxt, p))


def test_registry_auto_picks_priority(model):
    calls = []

    class Fake(TorchRunner):
        name = "fake"

        def __init__(self, model, batch=1, max_len=None):
            calls.append((batch, max_len))
            super().__init__(model, batch, max_len)

    saved = dict(runner_mod._RUNNERS)
    try:
        register_runner("fake-off", Fake, available=lambda m: False, priority=100)
        register_runner("fake", Fake, available=lambda m: True, priority=50)
        assert [s.name for s in runners()][:2] == ["fake-off", "fake"]
        r = make_runner(model, batch=2, max_len=32)
        assert isinstance(r, Fake) and calls == [(2, 32)]
        assert type(make_runner(model, backend="torch")) is TorchRunner
        with pytest.raises(ConfigError, match="cannot run"):
            make_runner(model, backend="fake-off")
        ids = list(generate(r, [0, 1], max_new_tokens=4, stop_ids=[]))
        assert ids == list(generate(model, [0, 1], max_new_tokens=4, stop_ids=[]))
    finally:
        runner_mod._RUNNERS.clear()
        runner_mod._RUNNERS.update(saved)


def test_bf16_runner_close_to_fp32():
    m = tiny_model(packed=True, seed=3)
    ids = [0, 5, 9, 13, 2, 8]
    ref = full_logits(m, ids)[-1]
    m16 = tiny_model(packed=True, seed=3).to(torch.bfloat16)
    out = make_runner(m16).prefill(torch.tensor([ids]), torch.arange(6)[None])[0]
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.15 * ref.abs().max().item())


def test_packed_model_copies_after_a_backend_ran():
    """A backend's weight layout (cached on the layer, naming the backend module) is not copied:
    a model that has run can still be deep-copied, and the copy computes the same logits."""
    import copy
    m = tiny_model(packed=True, seed=4)
    r = make_runner(m, backend="torch")
    want = r.prefill(torch.tensor([[0, 1, 2]]), torch.arange(3)[None])
    assert any(getattr(mod, "kernel_state", None) is not None for mod in m.modules())
    m2 = copy.deepcopy(m)
    assert all(getattr(mod, "kernel_state", None) is None for mod in m2.modules())
    got = make_runner(m2, backend="torch").prefill(torch.tensor([[0, 1, 2]]), torch.arange(3)[None])
    assert torch.equal(got, want)


def test_runner_kept_on_packed_model_and_not_shared():
    import copy
    m = tiny_model(packed=True, seed=4)
    p = SamplingParams(max_new_tokens=6, stop_ids=[])
    a = list(generate(m, [0, 1, 2], p))
    r1 = m._engine_runner.runner
    g1 = generate(m, [0, 1, 2], p)                             # re-uses the kept runner
    assert g1.runner is r1
    g2 = generate(m, [0, 1, 2], p)                             # r1 is busy: a private runner
    assert g2.runner is not r1
    assert list(g2) == a and list(g1) == a
    g = generate(m, [0, 1, 2], p)
    assert g.runner is r1                                      # free again after g1 finished
    g.close()
    g3 = generate(m, [3] * 100, p)                             # longer: a bigger runner replaces it
    assert g3.runner.max_len >= 106 and list(g3)
    g4 = generate(m, [0, 1, 2], p)
    g4.close()                                                 # closed early: runner given back
    g5 = generate(m, [0, 1, 2], p)
    assert g5.runner is g4.runner and g5.runner is g3.runner
    g5.close()
    m2 = copy.deepcopy(m)                                      # copies start without a runner
    assert m2._engine_runner.runner is None
    assert list(generate(m2, [0, 1, 2], p)) == a


def _step_by_step(runner, ids, n) -> list[int]:
    """Greedy ids from the runner's own prefill / decode, one synchronous step at a time."""
    logits = runner.prefill(torch.tensor([ids]), torch.arange(len(ids))[None])
    out = []
    for i in range(n):
        out.append(int(logits[0].argmax()))
        logits = runner.decode(torch.tensor(out[-1:]), torch.tensor([len(ids) + i]))
    return out


def _check_queued(m, backend, monkeypatch):
    """Generation with steps queued ahead of the host (on a GPU) against synchronous steps: greedy
    ids as the runner's own steps give them, stop and length endings, cache contents, a session
    that continues after an early close; sampled ids (seeded draws, top-p, repetition penalty) as
    the synchronous loop draws them."""
    ids = [0, 17, 42, 99, 7]
    free = _step_by_step(make_runner(m, max_len=64, backend=backend), ids, 24)
    runner = make_runner(m, max_len=64, backend=backend)
    gen = generate(runner, ids, SamplingParams(max_new_tokens=24, stop_ids=[]))
    assert list(gen) == free and gen.finish_reason == "length" and gen.decode_steps == 23
    assert gen.cache_tokens == ids + free[:-1]
    stop = free[5]
    gen = generate(runner, ids, SamplingParams(max_new_tokens=24, stop_ids=[stop]))
    first = free.index(stop)
    assert list(gen) == free[:first] and gen.finish_reason == "stop"
    assert gen.cache_tokens == ids + free[:first]
    gen = generate(runner, ids, SamplingParams(max_new_tokens=1, stop_ids=[]))
    assert list(gen) == free[:1] and gen.finish_reason == "length" and gen.decode_steps == 0
    sess = Session(m, max_len=64, backend=backend)
    g = sess.generate(ids, SamplingParams(max_new_tokens=20, stop_ids=[]))
    got = [next(g) for _ in range(4)]
    g.close()
    assert got == free[:4]
    nxt = ids + got + [5]
    assert list(sess.generate(nxt, SamplingParams(max_new_tokens=6, stop_ids=[]))) == \
        _step_by_step(make_runner(m, max_len=64, backend=backend), nxt, 6)
    sampled = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=3,
                             max_new_tokens=20, stop_ids=[])
    queued = list(generate(runner, ids, sampled))
    with monkeypatch.context() as mp:
        mp.setattr(sys.modules["bitnet158.engine.generate"], "_queued", lambda runner: False)
        assert list(generate(runner, ids, sampled)) == queued


def test_queued_loop_on_cpu(packed_model, monkeypatch):
    """The queued loop's bookkeeping, run in order on the CPU."""
    module = sys.modules["bitnet158.engine.generate"]         # the package re-exports the function
    monkeypatch.setattr(module, "_queued", lambda runner: True)
    _check_queued(packed_model, "torch", monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_queued_matches_synchronous(backend, monkeypatch):
    """On a GPU decode steps are queued ahead of the host."""
    _check_queued(tiny_model(packed=True, seed=1).cuda(), backend, monkeypatch)
