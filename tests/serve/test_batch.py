"""BatchEngine: continuous batching gives each request exactly what a lone generate() gives."""

from __future__ import annotations

import threading
import types

import pytest
import torch

from bitnet158.engine import SamplingParams, generate, make_runner, runners
from bitnet158.engine.batch import BatchEngine, EngineStoppedError, Handle, QueueFullError
from bitnet158.errors import ContextLengthError

from .conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model(seed=3).pack()


def collect(engine, prompt, params):
    out, box, ev = [], {}, threading.Event()

    def done(reason, error):
        box.update(reason=reason, error=error)
        ev.set()
    engine.submit(prompt, params, out.append, done)
    return out, box, ev


@pytest.mark.parametrize("chunk,queued", [(512, False), (4, False), (512, True), (4, True)])
def test_matches_lone_generation(model, chunk, queued):
    """12 requests on 3 rows; with chunk=4 prompts are prefilled 4 tokens per step between decodes;
    queued: each step queued before the previous step's tokens are handed out (a GPU's default)."""
    eng = BatchEngine(make_runner(model, batch=3, backend="torch"), max_queue=16, prefill_chunk=chunk,
                      queued=queued).start()
    assert eng.queued is queued
    try:
        prompts = [[0, 5, 6, 7], [0, 9], [0, *([3] * 20)], [0, 1, 2], [0, 100, 200], [0, 7]]
        params = [SamplingParams(max_new_tokens=12, stop_ids=frozenset()),
                  SamplingParams(temperature=0.9, seed=4, max_new_tokens=15, stop_ids=frozenset({1, 4}))]
        jobs = [(p, sp, *collect(eng, p, sp)) for p in prompts for sp in params]   # 12 requests, 3 rows
        for p, sp, out, box, ev in jobs:
            assert ev.wait(60)
            gen = generate(model, p, sp)
            want = list(gen)
            assert box["error"] is None and box["reason"] == gen.finish_reason
            assert out == want
        assert eng.stats()["active"] == 0 and eng.stats()["queued"] == 0
    finally:
        eng.stop()


def test_cancel_frees_row_and_queue_bound(model):
    eng = BatchEngine(make_runner(model, batch=1, backend="torch"), max_queue=1)
    eng.running = True                                  # accept submissions; the loop is not started
    long = SamplingParams(max_new_tokens=100, stop_ids=frozenset())
    a = eng.submit([0, 1], long, lambda t: None, lambda r, e: None)
    eng.submit([0, 2], long, lambda t: None, lambda r, e: None)
    with pytest.raises(QueueFullError):                 # 1 free row + queue of 1 = 2 requests
        eng.submit([0, 3], long, lambda t: None, lambda r, e: None)
    eng.running = False
    eng.start()                                         # now run: cancel the first at once
    a.cancel()
    eng.stop()
    with pytest.raises(EngineStoppedError):
        eng.submit([0, 3], long, lambda t: None, lambda r, e: None)


def test_context_checked_at_submit(model):
    eng = BatchEngine(make_runner(model, batch=2, max_len=16, backend="torch")).start()
    try:
        with pytest.raises(ContextLengthError):
            eng.submit(list(range(16)), SamplingParams(), lambda t: None, lambda r, e: None)
        out, box, ev = collect(eng, list(range(10)), SamplingParams(max_new_tokens=50, stop_ids=frozenset()))
        assert ev.wait(30) and len(out) == 6 and box["reason"] == "length"   # clamped to the context
    finally:
        eng.stop()


def test_queued_only_on_a_gpu_by_default(model):
    eng = BatchEngine(make_runner(model, batch=1, backend="torch"))
    assert eng.queued is False and eng.prefill_together is False


@pytest.mark.parametrize("queued", [False, True])
def test_decode_error_ends_every_decoding_request(model, queued):
    """A failing decode step ends the requests past their prefill with its error (none hang)."""
    runner = make_runner(model, batch=2, backend="torch")
    decode, calls = runner.decode, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return decode(*a, **k)
    runner.decode = failing
    eng = BatchEngine(runner, queued=queued)
    eng.running = True                                  # both submitted before the loop runs
    sp = SamplingParams(max_new_tokens=20, stop_ids=frozenset())
    jobs = [collect(eng, [0, 5 + i], sp) for i in range(2)]
    eng.running = False
    eng.start()
    try:
        for out, box, ev in jobs:
            assert ev.wait(30)
            assert isinstance(box["error"], RuntimeError) and box["reason"] is None
            assert len(out) == 3                        # the prefill's token + 2 decode steps' tokens
    finally:
        eng.stop()


def test_queued_cancel_mid_stream(model):
    """A request cancelled while its next step is queued ends without that step's token; the row
    is reused by a waiting request, which still gets a lone generation's tokens."""
    eng = BatchEngine(make_runner(model, batch=1, backend="torch"), max_queue=4, queued=True)
    sp = SamplingParams(max_new_tokens=30, stop_ids=frozenset())
    got, box, ev = [], {}, threading.Event()
    holder = {}

    def on_token(t):
        got.append(t)
        if len(got) == 4:
            holder["h"].cancel()
    holder["h"] = None
    eng.running = True
    holder["h"] = eng.submit([0, 9], sp, on_token, lambda r, e: (box.update(reason=r, error=e), ev.set()))
    out2, box2, ev2 = collect(eng, [0, 3, 4], sp)
    eng.running = False
    eng.start()
    try:
        assert ev.wait(30) and ev2.wait(30)
        assert box["reason"] is None and box["error"] is None and len(got) == 4
        assert got == list(generate(model, [0, 9], sp))[:4]
        assert out2 == list(generate(model, [0, 3, 4], sp)) and box2["reason"] == "length"
    finally:
        eng.stop()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_queued_steps_give_the_in_order_tokens(model):
    """On a GPU the engine queues each step (the default); mixed greedy / seeded top-p requests,
    stop ids and staggered lengths get exactly the in-order loop's tokens, prompts admitted
    together sharing prefill calls or not."""
    cuda_model = tiny_model(seed=3).pack().cuda()
    prompts = [[0, 5, 6, 7], [0, 9], [0, *([3] * 20)], [0, 1, 2], [0, 100, 200]]
    params = [SamplingParams(max_new_tokens=9, stop_ids=frozenset()),
              SamplingParams(temperature=0.9, top_p=0.9, seed=4, max_new_tokens=14, stop_ids=frozenset({1, 4}))]
    got = {}
    for queued, together in [(None, True), (False, True), (None, False)]:
        eng = BatchEngine(make_runner(cuda_model, batch=4), max_queue=16, queued=queued,
                          prefill_together=together)
        eng.running = True                                  # the first four admitted together
        jobs = [collect(eng, p, sp) for p in prompts for sp in params]
        eng.running = False
        eng.start()
        try:
            assert eng.queued is (queued is None)
            for out, box, ev in jobs:
                assert ev.wait(120) and box["error"] is None
            got[queued, together] = [(out, box["reason"]) for out, box, ev in jobs]
        finally:
            eng.stop()
    assert got[None, True] == got[False, True] == got[None, False]


@pytest.mark.parametrize("queued", [False, True])
def test_stop_id_mid_stream(model, queued):
    """A request that meets a stop id ends there (queued: the step already queued past it is
    dropped), and the request beside it goes on with a lone generation's tokens."""
    free = SamplingParams(max_new_tokens=10, stop_ids=frozenset())
    lone = list(generate(model, [0, 9], free))
    stop = lone[3]
    first = lone.index(stop)
    eng = BatchEngine(make_runner(model, batch=2, backend="torch"), queued=queued)
    eng.running = True
    a = collect(eng, [0, 9], SamplingParams(max_new_tokens=10, stop_ids=frozenset({stop})))
    b = collect(eng, [0, 3, 4], free)
    eng.running = False
    eng.start()
    try:
        assert a[2].wait(30) and b[2].wait(30)
        assert a[0] == lone[:first] and a[1]["reason"] == "stop"
        assert b[0] == list(generate(model, [0, 3, 4], free)) and b[1]["reason"] == "length"
    finally:
        eng.stop()


@pytest.mark.parametrize("queued", [False, True])
def test_first_token_ends_the_request(model, queued):
    """A one-token request and one whose first token is a stop id end on their prefill's token
    (queued: that token is handed out after the next step is queued, without a step of its own)."""
    free = SamplingParams(max_new_tokens=6, stop_ids=frozenset())
    first = list(generate(model, [0, 9], free))[0]
    eng = BatchEngine(make_runner(model, batch=3, backend="torch"), queued=queued)
    eng.running = True
    one = collect(eng, [0, 9], SamplingParams(max_new_tokens=1, stop_ids=frozenset()))
    stopped = collect(eng, [0, 9], SamplingParams(max_new_tokens=6, stop_ids=frozenset({first})))
    other = collect(eng, [0, 3, 4], free)
    eng.running = False
    eng.start()
    try:
        assert one[2].wait(30) and stopped[2].wait(30) and other[2].wait(30)
        assert one[0] == [first] and one[1]["reason"] == "length"
        assert stopped[0] == [] and stopped[1]["reason"] == "stop"
        assert other[0] == list(generate(model, [0, 3, 4], free))
    finally:
        eng.stop()


BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    "cpu" not in [s.name for s in runners()], reason="C kernels unavailable"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk,queued", [(512, False), (4, True), (512, True)])
def test_requests_arriving_together_share_prefill_calls(model, backend, chunk, queued):
    """Six prompts of 1 to 23 tokens admitted at once are prefilled in fewer calls than requests
    (rows padded to a call's longest chunk, out of row order), and every request still gets a lone
    generation's tokens; one call a request gives the same tokens."""
    prompts = [[0, *range(5, 5 + n)] for n in (0, 22, 3, 17, 6, 1)]
    params = [SamplingParams(max_new_tokens=8, stop_ids=frozenset()),
              SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_new_tokens=8, stop_ids=frozenset())]
    got = {}
    for together in (True, False):
        eng = BatchEngine(make_runner(model, batch=6, backend=backend), prefill_chunk=chunk, queued=queued,
                          prefill_together=together)
        prefill, calls = eng._prefill, []

        def counted(hs):
            calls.append(len(hs))
            return prefill(hs)
        eng._prefill = counted
        eng.running = True                                  # all six admitted by the first step
        jobs = [collect(eng, p, params[i % 2]) for i, p in enumerate(prompts)]
        eng.running = False
        eng.start()
        try:
            for out, box, ev in jobs:
                assert ev.wait(60) and box["error"] is None and box["reason"] == "length"
            got[together] = [out for out, box, ev in jobs]
        finally:
            eng.stop()
        if together:
            assert max(calls) > 1 and len(calls) < len(prompts) * (1 if chunk == 512 else 6)
        else:
            assert set(calls) == {1}
    assert got[True] == got[False]
    for i, p in enumerate(prompts):
        assert got[True][i] == list(generate(model, p, params[i % 2]))


def test_prefill_calls_group_by_length_budget_and_start(model):
    """Chunks from position 0 and continuing ones never share a call; a chunk joins the call of
    the longest one while its padding stays within its own length (or 64 tokens) and the call's
    rows x longest chunk within ``prefill_tokens``."""
    runner = types.SimpleNamespace(batch=16, max_len=1024, device=torch.device("cpu"))
    eng = BatchEngine(runner, prefill_chunk=512, prefill_tokens=2048, prefill_together=True)
    sp = SamplingParams()

    def handle(n, done=0):
        h = Handle(list(range(n)), sp, 4, frozenset(), lambda t: None, lambda r, e: None)
        h.prefilled = done
        return h
    fresh = [handle(n) for n in (5, 480, 30, 300, 40, 700)]      # 700: a 512-token first chunk
    cont = [handle(600, 512), handle(550, 512), handle(1000, 990)]   # the last one's padding: past the cache
    full = [handle(512) for _ in range(5)]
    sizes = [[min(512, len(h.prompt) - h.prefilled) for h in call] for call in eng._prefill_calls(fresh + cont)]
    assert sizes == [[512, 480, 300], [40, 30, 5], [88, 38], [10]]
    assert [len(c) for c in eng._prefill_calls(full)] == [4, 1]          # 4 x 512 = prefill_tokens
    eng.prefill_together = False
    assert [len(c) for c in eng._prefill_calls(fresh)] == [1] * 6
