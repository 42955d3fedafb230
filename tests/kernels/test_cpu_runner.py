"""The C whole-model runner against the torch reference model (tiny random models).

    python3 -m pytest -q tests/kernels/test_cpu_runner.py
"""

from __future__ import annotations

import pytest
import torch

from bitnet158 import kernels
from bitnet158.config import ModelConfig
from bitnet158.kernels import cpu
from bitnet158.kernels.cpu import binding
from bitnet158.model import Transformer, init_weights

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"C kernels unavailable: {binding.error()}")

if cpu.available():
    from bitnet158.kernels.cpu.runner import CpuRunner


def _model(dtype=torch.float32, seed=0, **over) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny")
    cfg.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    for k, v in over.items():
        setattr(cfg, k, v)
    m = init_weights(Transformer(cfg, attn_impl="eager"), std=0.05)
    with torch.no_grad():                   # a different scale per projection: a wrong gamma shows
        for i, (_, mod) in enumerate(m.projections()):
            mod.weight.mul_(1.0 + 0.3 * (i % 5))
        for blk in m.model.layers:
            blk.input_layernorm.weight.uniform_(0.5, 1.5)
            blk.mlp.ffn_sub_norm.weight.uniform_(0.5, 1.5)
    return m.pack().to(dtype).eval()


class _Ref:
    """The pure torch reference (reference kernels backend, model.forward with a static cache)."""

    def __init__(self, model, batch, max_len):
        self.model, self.cache = model, model.new_cache(batch, max_len)

    @torch.no_grad()
    def step(self, tokens, pos, rows=None):
        saved = list(kernels._BACKENDS)
        kernels._BACKENDS.clear()
        try:
            cache = self.cache
            if rows is not None:
                from bitnet158.engine.runner import _RowsView
                cache = [_RowsView(c, rows[0], rows[-1] + 1) for c in cache]
            return self.model(tokens, pos, cache)[:, -1].float()
        finally:
            kernels._BACKENDS[:] = saved


@pytest.fixture(params=sorted({"scalar", cpu.supported_isas()[-1]}) if cpu.available() else [])
def isa(request):
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(None)


@pytest.mark.parametrize("layout", ["t16", "b3"])
def test_logits_and_greedy_match_reference_fp32(isa, layout):
    model = _model()
    B, T, steps = 2, 37, 12             # several 16-slot K blocks, vector exp
    run, ref = CpuRunner(model, batch=B, max_len=64, layout=layout), _Ref(model, B, 64)
    assert run.layout == layout
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    pos = torch.arange(T).expand(B, T).contiguous()
    a, b = run.prefill(tok, pos), ref.step(tok, pos)
    assert (a - b).abs().max() <= 1e-4
    nxt_a, nxt_b, p = a.argmax(-1), b.argmax(-1), torch.full((B,), T)
    for _ in range(steps):
        a, b = run.decode(nxt_a, p), ref.step(nxt_b[:, None], p[:, None])
        assert (a - b).abs().max() <= 1e-4
        nxt_a, nxt_b, p = a.argmax(-1), b.argmax(-1), p + 1
        assert torch.equal(nxt_a, nxt_b)


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_grouped_attention_gqa4(threads):
    """4 query heads per KV group, head_dim 32: prefill runs whole groups per item, batch-1 decode
    splits them while there are fewer items than threads (whole groups, halves, single heads for
    1, 3, 5 threads); both layouts."""
    model = _model(seed=8, hidden_size=256, num_attention_heads=8, num_key_value_heads=2)
    for layout in ("t16", "b3"):
        run = CpuRunner(model, batch=1, max_len=48, layout=layout, threads=threads)
        ref = _Ref(model, 1, 48)
        try:
            tok = torch.randint(0, model.config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(8))
            a, b = run.prefill(tok, torch.arange(21)[None]), ref.step(tok, torch.arange(21)[None])
            assert (a - b).abs().max() <= 1e-4
            for p in range(21, 29):
                nxt = a.argmax(-1)
                a, b = run.decode(nxt, torch.tensor([p])), ref.step(nxt[:, None], torch.tensor([[p]]))
                assert (a - b).abs().max() <= 1e-4
        finally:
            cpu.set_threads(torch.get_num_threads())


def test_rows_at_different_positions_and_chunked_prefill():
    model = _model(seed=2)
    run = CpuRunner(model, batch=3, max_len=48, prefill_chunk=4)   # forces several prefill chunks
    ref = _Ref(model, 3, 48)
    g = torch.Generator().manual_seed(2)
    V = model.config.vocab_size
    t1 = torch.randint(0, V, (1, 11), generator=g)
    t2 = torch.randint(0, V, (1, 5), generator=g)
    a = run.prefill(t1, torch.arange(11)[None], rows=torch.tensor([1]))
    b = ref.step(t1, torch.arange(11)[None], rows=[1])
    assert (a - b).abs().max() <= 1e-4
    a = run.prefill(t2, torch.arange(5)[None], rows=torch.tensor([2]))
    b = ref.step(t2, torch.arange(5)[None], rows=[2])
    assert (a - b).abs().max() <= 1e-4
    # decode rows 1 and 2 together at positions 11 and 5 (reference: one row at a time)
    tok = torch.tensor([3, 7])
    a = run.decode(tok, torch.tensor([11, 5]), rows=torch.tensor([1, 2]))
    b1 = ref.step(tok[:1, None], torch.tensor([[11]]), rows=[1])
    b2 = ref.step(tok[1:, None], torch.tensor([[5]]), rows=[2])
    assert (a - torch.cat([b1, b2])).abs().max() <= 1e-4


def test_bf16_model_close_to_reference():
    """bf16 model: the C engine computes in fp32 (bf16 KV cache), the reference in bf16."""
    model = _model(torch.bfloat16, seed=3)
    run, ref = CpuRunner(model, batch=1, max_len=32), _Ref(model, 1, 32)
    tok = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(8)[None]
    a, b = run.prefill(tok, pos), ref.step(tok, pos)
    assert run._M.kv_bf16 == 1 and run._M.head_round_bf16 == 1
    scale = b.abs().max()
    assert (a - b).abs().max() <= 0.05 * scale


def test_int8_head_close_to_bf16_head():
    model = _model(torch.bfloat16, seed=4)
    tok = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(6)[None]
    a = CpuRunner(model, max_len=16, head="bf16").prefill(tok, pos)
    r8 = CpuRunner(model, max_len=16, head="int8")
    b = r8.prefill(tok, pos)
    assert r8._M.head_kind == 2 and r8._M.embed_kind == 2          # tied: one int8 table
    assert (a - b).abs().max() <= 0.1 * a.abs().max()   # int8 table at both ends of a 64-wide model
    with pytest.raises(ValueError, match="head="):
        CpuRunner(model, head="q4")


def test_untied_head_and_odd_sizes():
    """Untied head, N and K not multiples of 16 (hidden 72, intermediate 200, 3 heads of 24)."""
    model = _model(seed=5, hidden_size=72, intermediate_size=200, num_attention_heads=3,
                   num_key_value_heads=1, tie_word_embeddings=False)
    run, ref = CpuRunner(model, batch=1, max_len=32), _Ref(model, 1, 32)
    tok = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(7)[None]
    assert (run.prefill(tok, pos) - ref.step(tok, pos)).abs().max() <= 1e-4


def test_errors_and_engine_registration():
    model = _model(seed=6)
    run = CpuRunner(model, batch=1, max_len=8)
    with pytest.raises(ValueError, match="outside the KV cache"):
        run.decode(torch.tensor([1]), torch.tensor([8]))
    with pytest.raises(ValueError, match="vocabulary"):
        run.decode(torch.tensor([10**6]), torch.tensor([0]))
    with pytest.raises(ValueError, match="batch=1"):
        run.decode(torch.tensor([1, 2]), torch.tensor([0, 0]))
    engine = pytest.importorskip("bitnet158.engine")
    r = engine.make_runner(model, batch=1, max_len=16)
    assert isinstance(r, CpuRunner)
    ids = list(engine.generate(model, [1, 2, 3], engine.SamplingParams(max_new_tokens=5)))
    ref_ids = list(engine.generate(engine.make_runner(model, 1, 16, backend="torch"), [1, 2, 3],
                                   engine.SamplingParams(max_new_tokens=5)))
    assert ids == ref_ids


def test_with_int8_head_matches_int8_runner():
    """The torch-side simulation used for the perplexity measurement equals the int8 runner."""
    from bitnet158.kernels.cpu.runner import with_int8_head
    model = _model(seed=7)
    run = CpuRunner(model, max_len=16, head="int8")
    tok = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(6)[None]
    a = run.prefill(tok, pos)
    b = _Ref(with_int8_head(model), 1, 16).step(tok, pos)
    assert (a - b).abs().max() <= 1e-4
