"""The Triton GPU runner against the torch reference runner.

CPU (CI): a 1-layer tiny model under ``TRITON_INTERPRET=1``, prefill + decode, bit-exact in fp32
and bf16 against :class:`bitnet158.engine.runner.TorchRunner` with the reference kernels.
CUDA (marked ``cuda``): greedy tokens identical on a tiny fp32 model with CUDA graphs; a random
2B4T-shaped bf16 model within 1e-2 (relative L2) of the reference logits; rows at different
positions and subsets of rows; automatic selection by ``make_runner``.

    python3 -m pytest -q tests/kernels/test_triton_runner.py
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from bitnet158 import kernels  # noqa: E402
from bitnet158.config import ModelConfig  # noqa: E402
from bitnet158.engine.runner import TorchRunner, make_runner  # noqa: E402
from bitnet158.kernels.triton import common  # noqa: E402
from bitnet158.kernels.triton.runner import TritonRunner  # noqa: E402
from bitnet158.model import Transformer, init_weights  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA and not common.INTERPRET:
    pytest.skip("Triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


@pytest.fixture
def reference_kernels(monkeypatch):
    """Make PackedLinear use the torch reference backend (the Triton one registers itself on CUDA)."""
    monkeypatch.setattr(kernels, "_BACKENDS", [])


def _tiny(dtype, layers=2, seed=0, device="cpu"):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", num_hidden_layers=layers)
    m = init_weights(Transformer(cfg), 0.05).pack().to(dtype)
    for name, p in m.named_parameters():                   # non-trivial norm weights
        if "norm" in name:
            p.data = (torch.rand_like(p.float()) + 0.5).to(dtype)
    return m.to(device).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_runner_matches_reference(dtype, reference_kernels):
    if CUDA:
        pytest.skip("the CUDA tests below cover this")
    m = _tiny(dtype, layers=1)
    ref = TorchRunner(m, batch=2, max_len=32)
    tr = TritonRunner(m, batch=2, max_len=32, graphs=False)
    toks = torch.randint(0, m.config.vocab_size, (2, 5))
    pos = torch.arange(5)[None].expand(2, 5)
    a, b = ref.prefill(toks, pos), tr.prefill(toks, pos)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    nt, p = torch.tensor([3, 7]), torch.tensor([5, 2])          # rows at different positions
    a, b = ref.decode(nt, p), tr.decode(nt, p)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_on_the_int8_gemm_path(dtype, reference_kernels, monkeypatch):
    """Every prefill projection through :mod:`gemm_i8` (unpack + shared-memory int8 GEMM): the same
    logits as the reference runner (CPU, interpreter) and bit-identical to the default path."""
    from bitnet158.kernels.triton import w2a8
    m = _tiny(dtype, layers=1, device="cuda" if CUDA else "cpu")
    toks = torch.randint(0, m.config.vocab_size, (2, 5), device=m.device)
    pos = torch.arange(5, device=m.device)[None].expand(2, 5)
    default = TritonRunner(m, batch=2, max_len=32, graphs=False).prefill(toks, pos)
    monkeypatch.setattr(w2a8, "I8_MIN_M", 1)
    b = TritonRunner(m, batch=2, max_len=32, graphs=False).prefill(toks, pos)
    assert torch.equal(b, default)
    if not CUDA:
        torch.testing.assert_close(b, TorchRunner(m, batch=2, max_len=32).prefill(toks, pos), rtol=1e-6, atol=1e-6)


def test_prefill_unpack_ahead_is_bit_identical(reference_kernels, monkeypatch):
    """Weights unpacked ahead of their GEMMs (a side stream on CUDA, in line on the CPU; buffers
    rotating over 4 projections a layer, 3 layers) give the in-line unpack's logits bit for bit,
    eager and, on CUDA, replayed from a captured prefill graph (with ``"graphs"``: there only); an
    M the int8 GEMM does not take uses no unpack-ahead."""
    from bitnet158.kernels.triton import w2a8
    m = _tiny(torch.bfloat16, layers=3, device="cuda" if CUDA else "cpu")
    toks = torch.randint(0, m.config.vocab_size, (2, 5), device=m.device)
    pos = torch.arange(5, device=m.device)[None].expand(2, 5)
    monkeypatch.setattr(w2a8, "I8_MIN_M", 4)
    inline = TritonRunner(m, batch=2, max_len=32, graphs=False)
    inline.unpack_ahead = False
    ahead = TritonRunner(m, batch=2, max_len=32, graphs=False)
    ahead.unpack_ahead = True
    assert ahead._ahead(3) is None and ahead._ahead(10) is not None
    want = inline.prefill(toks, pos)
    assert torch.equal(ahead.prefill(toks, pos), want)
    ahead.unpack_ahead = "graphs"               # captured prefills only
    assert ahead._ahead(10) is None
    if CUDA:
        rows = torch.arange(2, device="cuda")
        g, out = ahead._capture((toks, pos, rows, True, 5), ahead._prefill)
        with torch.inference_mode():             # the captured output is an inference tensor
            out.zero_()
        g.replay()
        assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_prefill_matches_unpadded(dtype, reference_kernels):
    """The graph prefill's padding (tokens after the chunk, logits of the last real position),
    from position 0 and continuing two rows at different positions: the same logits and cache
    slots as the unpadded prefill, and the decode after it unchanged (bf16 on CUDA only: the
    interpreter takes a minute a dtype)."""
    from bitnet158.kernels.triton import runner as runner_mod
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("fp32 covers the padding logic on CPU")
    m = _tiny(dtype, layers=1, device="cuda" if CUDA else "cpu")
    dev = m.device
    B, T = 2, 5
    plain = TritonRunner(m, batch=B, max_len=40, graphs=False)
    padded = TritonRunner(m, batch=B, max_len=40, graphs=False)
    r = torch.arange(B, device=dev)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    start = torch.zeros(B, dtype=torch.long, device=dev)
    for fresh, Tp, Lp in [(True, 12, 12), (False, 9, 24)]:      # then rows continue at 5 and 9
        toks = torch.randint(0, m.config.vocab_size, (B, T), device=dev)
        pos = start[:, None] + torch.arange(T, device=dev)
        a = plain._prefill(toks, pos, r, fresh, int(pos.max()) + 1)
        bufs = padded._prefill_bufs(B, Tp)
        padded._pad_inputs(toks, start, r, bufs)
        out = torch.full((B, m.config.vocab_size), float("nan"), device=dev)    # a graph's logits buffer
        b = padded._prefill_padded(bufs, fresh, Lp, out)
        assert b.data_ptr() == out.data_ptr()
        torch.testing.assert_close(b, a, **tol)
        for ka, kb in zip(plain.k_cache + plain.v_cache, padded.k_cache + padded.v_cache):
            for row in range(B):
                end = int(start[row]) + T
                torch.testing.assert_close(kb[row, :, :end], ka[row, :, :end], **tol)
        start = torch.tensor([T, T + 4], device=dev)
        if fresh:          # row 1 decodes 4 tokens first (slots 5..8 overwritten before read)
            for i in range(4):
                nt, p = torch.tensor([3 + i], device=dev), torch.tensor([T + i], device=dev)
                one = torch.tensor([1], device=dev)
                torch.testing.assert_close(padded.decode(nt, p, one), plain.decode(nt, p, one), **tol)
    nt, p = a.argmax(-1), start + T                              # decode overwrites slot start + T first
    torch.testing.assert_close(padded.decode(nt, p), plain.decode(nt, p), **tol)
    assert runner_mod.PREFILL_ALIGN == 64 and runner_mod.PREFILL_SPAN == 512
    assert [plain._padded_shape(t, 0, True) for t in (1, 40)] == [(40, 40)] * 2     # capped by the cache
    big = TritonRunner(m, batch=1, max_len=8, graphs=False)
    big.max_len = 2000                                    # the shapes' arithmetic alone
    assert [big._padded_shape(t, 0, True) for t in (1, 64, 65)] == [(64, 64), (64, 64), (128, 128)]
    assert big._padded_shape(300, 1000, False) == (320, 1536)
    assert big._padded_shape(300, 1690, False) == (310, 2000)


def test_decode_spans_match_the_whole_cache(reference_kernels, monkeypatch):
    """Decode steps launched for the smallest attention span that holds their positions (8, 32
    slots here; then the whole 40-slot cache, on CUDA) give the reference runner's logits; on CUDA
    each (rows, span) gets its own graph."""
    from bitnet158.kernels.triton import runner as runner_mod
    from bitnet158.kernels.triton.attention import DecodeAttention
    monkeypatch.setattr(runner_mod, "DECODE_SPAN_MIN", 8)
    m = _tiny(torch.float32, layers=1, device="cuda" if CUDA else "cpu")
    dev, cfg = m.device, m.config
    tr = TritonRunner(m, batch=2, max_len=40, graphs=CUDA)
    tr.attn = DecodeAttention(cfg.num_attention_heads, cfg.num_key_value_heads,
                              cfg.hidden_size // cfg.num_attention_heads, 2, 40, dev, chunk=16, block_n=16)
    tr.decode_spans = True
    assert tr.attn.nch == 3                                            # 3 chunks of 16 slots
    assert [tr._span(1, h) for h in (0, 7, 8, 31, 32, 39)] == [8, 8, 32, 32, None, None]
    ref = TorchRunner(m, batch=2, max_len=40)
    toks = torch.randint(0, cfg.vocab_size, (2, 36), device=dev)
    pos = torch.arange(36, device=dev)[None].expand(2, 36)
    tr.prefill(toks, pos)
    ref.prefill(toks, pos)
    for p in ([3, 6], [3, 20]) + (([35, 2],) if CUDA else ()):   # a step rewrites slot p, reads those below
        nt, pt = torch.tensor([7, 9], device=dev), torch.tensor(p)
        torch.testing.assert_close(tr.decode(nt, pt), ref.decode(nt, pt), rtol=1e-4, atol=1e-4, msg=f"decode at {p}")
    if CUDA:
        assert set(tr._graphs) == {(2, 8), (2, 32), (2, None)}
    tr.decode_spans = False
    assert tr._span(1, 5) is None


def test_runner_rejects_unpacked_and_bad_positions():
    cfg = ModelConfig.from_name("tiny", num_hidden_layers=1)
    with pytest.raises(Exception, match="packed"):
        TritonRunner(Transformer(cfg), batch=1, max_len=8, graphs=False)
    dev = "cuda" if CUDA else "cpu"
    tr = TritonRunner(_tiny(torch.float32, layers=1, device=dev), batch=1, max_len=8, graphs=False)
    with pytest.raises(ValueError, match=r"must be \[rows, T\]"):
        tr.prefill(torch.zeros(3, dtype=torch.long), torch.arange(3))
    with pytest.raises(ValueError, match="no tokens"):
        tr.prefill(torch.zeros((1, 0), dtype=torch.long), torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(ValueError, match="pos has shape"):
        tr.prefill(torch.zeros((1, 3), dtype=torch.long), torch.arange(4)[None])
    two = TritonRunner(_tiny(torch.float32, layers=1, device=dev), batch=2, max_len=8, graphs=False)
    toks = torch.randint(0, 50, (2, 3))
    torch.testing.assert_close(two.prefill(toks, torch.arange(3)[None]), two.prefill(toks, torch.arange(3)))
    with pytest.raises(ValueError, match="outside the KV cache"):
        tr.prefill(torch.zeros((1, 3), dtype=torch.long), torch.arange(6, 9)[None])
    with pytest.raises(ValueError, match="1 tokens but 2 positions"):
        tr.decode(torch.zeros(1, dtype=torch.long), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="position 8 outside"):
        tr.decode(torch.zeros(1, dtype=torch.long), torch.tensor([8]))


def test_gpus_older_than_sm80_are_refused_clearly(monkeypatch):
    """An sm_75 GPU (T4): the runner is not picked automatically, naming it directly is a clear
    error, and a PackedLinear on it falls through to the reference backend."""
    import bitnet158.kernels.triton as tk
    from bitnet158.kernels.triton import runner as triton_runner
    monkeypatch.setattr(common, "_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    why = common.gpu_unsupported("cuda:0")
    assert "Tesla T4 is sm_75" in why and "sm_80" in why
    assert common.gpu_unsupported("cpu") is None

    class OnT4:  # the attributes the runner reads before it touches the device
        packed, device = True, torch.device("cuda", 0)
    assert not triton_runner._available(OnT4())
    with pytest.raises(Exception, match="Tesla T4 is sm_75.*backend='torch'"):
        TritonRunner(OnT4(), batch=1)
    class ActivationsOnT4:  # what the backend's check reads of a tensor
        is_cuda, dtype, shape, device = True, torch.bfloat16, (2, 8), torch.device("cuda", 0)
    x = ActivationsOnT4()
    assert not tk.available(x)
    monkeypatch.setattr(common, "_capability", lambda index: (8, 9))
    assert common.gpu_unsupported("cuda:0") is None and tk.available(x)


def test_kernels_launch_on_the_model_gpu(monkeypatch):
    """Triton, CUDA graphs and events use the current device: a model on another GPU than the
    current one gets that GPU made current around its launches; off CUDA nothing changes."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ctx = common.on_device("cuda:1")
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    for dev in ("cuda:0", "cpu", torch.device("cpu")):
        assert not isinstance(common.on_device(dev), torch.cuda.device)


# ---------------------------------------------------------------- CUDA

def _greedy(runner, prompt, steps):
    B, T = prompt.shape
    pos = torch.arange(T, device=prompt.device)[None].expand(B, T)
    logits = runner.prefill(prompt, pos)
    out = []
    for i in range(steps):
        nt = logits.argmax(-1)
        out.append(nt)
        logits = runner.decode(nt, torch.full((B,), T + i, device=prompt.device))
    return torch.stack(out, 1), logits


@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_greedy_tokens_identical_tiny_fp32(batch, reference_kernels):
    if not CUDA:
        pytest.skip("needs CUDA")
    m = _tiny(torch.float32, layers=2, device="cuda")
    prompt = torch.randint(0, m.config.vocab_size, (batch, 9), device="cuda")
    ref_toks, ref_last = _greedy(TorchRunner(m, batch=batch, max_len=128), prompt, 40)
    tr = TritonRunner(m, batch=batch, max_len=128)
    assert tr.graphs
    toks, last = _greedy(tr, prompt, 40)
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_model_on_the_second_gpu(reference_kernels):
    """The model on cuda:1 while cuda:0 is current: the same greedy tokens as the reference, and
    greedy generation (events on the model's stream) the same tokens as the bare decode loop."""
    from bitnet158.engine import SamplingParams, generate
    m = _tiny(torch.float32, layers=2, device="cuda:1")
    prompt = torch.randint(0, m.config.vocab_size, (1, 9), device="cuda:1")
    assert torch.cuda.current_device() == 0
    ref_toks, _ = _greedy(TorchRunner(m, batch=1, max_len=128), prompt, 20)
    tr = TritonRunner(m, batch=1, max_len=128)
    toks, _ = _greedy(tr, prompt, 20)
    assert torch.equal(toks, ref_toks)
    tr.reset()
    out = list(generate(tr, prompt[0].tolist(), SamplingParams(max_new_tokens=20, stop_ids=[])))
    assert out == ref_toks[0].tolist()


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _compare_2b4t(layers, B=2, T=37, stds=None):
    """Reference (torch kernels) vs Triton runner on a random 2B4T-shaped bf16 model.

    Also measures the reference's own spread: its eager attention against its SDPA attention
    (the same math, other rounding) - how far a correct implementation may land from it.
    """
    from bitnet158.random_model import random_packed_model
    cfg = ModelConfig.from_name("2b4t", num_hidden_layers=layers)
    m = random_packed_model(cfg, seed=0, dtype=torch.bfloat16, device="cuda", stds=stds)
    toks = torch.randint(0, cfg.vocab_size, (B, T), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    pos = torch.arange(T, device="cuda")[None].expand(B, T)
    dp = torch.full((B,), T, device="cuda")
    out = {}
    for impl in ("sdpa", "eager"):
        m.attn_impl = impl
        ref = TorchRunner(m, batch=B, max_len=256)
        a = ref.prefill(toks, pos)
        nt = a.argmax(-1)
        out[impl] = (a, ref.decode(nt, dp), nt)
        del ref
    m.attn_impl = "sdpa"
    a, a2, nt = out["sdpa"]
    tr = TritonRunner(m, batch=B, max_len=256)
    b, b2 = tr.prefill(toks, pos), tr.decode(nt, dp)
    e = dict(prefill=_rel(b, a), decode=_rel(b2, a2), ref_spread_prefill=_rel(out["eager"][0], a),
             ref_spread_decode=_rel(out["eager"][1], a2), max_abs_decode=float((b2 - a2).abs().max()),
             ref_max_abs=float(a2.abs().max()))
    print(f"\n2b4t-shaped, {layers} layers, bf16, stds {stds}: " + ", ".join(f"{k} {v:.3e}" for k, v in e.items()))
    return e


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_2b4t_logits_close(reference_kernels):
    """2B4T shapes, bf16, 2 layers (every kernel at full size): prefill within 1e-2 relative L2
    (bit-exact on an H100); decode within 1e-2 or twice the reference's own eager-vs-SDPA spread,
    since these random layers turn one-ulp attention differences into int8 rounding flips."""
    e = _compare_2b4t(layers=2)
    assert e["prefill"] <= 1e-2
    assert e["decode"] <= max(1e-2, 2 * e["ref_spread_decode"])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_2b4t_full_depth_within_reference_spread(reference_kernels):
    """All 30 layers: random ternary layers amplify one-ulp differences (the reference moves by
    ~27 % / ~99 % between its own attention implementations); stay within twice that spread."""
    e = _compare_2b4t(layers=30)
    for k in ("prefill", "decode"):
        assert e[k] <= max(1e-2, 2 * e["ref_spread_" + k])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_host_inputs_match_device_inputs(reference_kernels):
    """Tokens, positions and rows given on the host (checked there, copied without a device wait)
    give the logits of the same inputs given on the device; a bad host position is still refused."""
    m = _tiny(torch.float32, layers=2, device="cuda")
    a, b = TritonRunner(m, batch=3, max_len=64), TritonRunner(m, batch=3, max_len=64)
    prompt = torch.randint(0, m.config.vocab_size, (2, 9))
    pos, rows = torch.arange(9)[None].expand(2, 9), torch.tensor([2, 0])
    for _ in range(2):                                        # eager, then the prefill graph
        la = a.prefill(prompt.cuda(), pos.cuda(), rows.cuda())
        lb = b.prefill(prompt, pos, rows)
        assert torch.equal(la, lb)
    for i in range(4):
        nt = la.argmax(-1)
        la = a.decode(nt, torch.full((2,), 9 + i, device="cuda"), rows.cuda())
        lb = b.decode(nt.cpu(), torch.full((2,), 9 + i), rows)
        assert torch.equal(la, lb)
    with pytest.raises(ValueError, match="position 64 outside"):
        b.decode(nt.cpu(), torch.tensor([64, 3]), rows)
    with pytest.raises(ValueError, match="out of range"):
        b.decode(nt.cpu(), torch.tensor([13, 13]), torch.tensor([0, 3]))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_rows_at_different_positions_and_subsets(reference_kernels):
    m = _tiny(torch.float32, layers=2, device="cuda")
    B = 4
    ref = TorchRunner(m, batch=B, max_len=64)
    tr = TritonRunner(m, batch=B, max_len=64)
    for r, T in enumerate([3, 11, 6, 1]):                      # prefill each row separately
        toks = torch.randint(0, m.config.vocab_size, (1, T), device="cuda")
        pos = torch.arange(T, device="cuda")[None]
        rows = torch.tensor([r], device="cuda")
        torch.testing.assert_close(tr.prefill(toks, pos, rows), ref.prefill(toks, pos, rows),
                                   rtol=1e-4, atol=1e-4)
    nt = torch.tensor([5, 6, 7, 8], device="cuda")
    p = torch.tensor([3, 11, 6, 1], device="cuda")
    torch.testing.assert_close(tr.decode(nt, p), ref.decode(nt, p), rtol=1e-4, atol=1e-4)
    # a subset of rows (contiguous, as the reference runner needs), graphs keyed by row count
    rows = torch.tensor([1, 2], device="cuda")
    nt2, p2 = torch.tensor([9, 10], device="cuda"), torch.tensor([12, 7], device="cuda")
    torch.testing.assert_close(tr.decode(nt2, p2, rows), ref.decode(nt2, p2, rows), rtol=1e-4, atol=1e-4)
    # prefix re-use: prefill continues row 0 from position 4 (mask path of the prefill)
    toks = torch.randint(0, m.config.vocab_size, (1, 5), device="cuda")
    pos = torch.arange(4, 9, device="cuda")[None]
    rows = torch.tensor([0], device="cuda")
    torch.testing.assert_close(tr.prefill(toks, pos, rows), ref.prefill(toks, pos, rows),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="outside the KV cache"):
        tr.decode(nt, torch.tensor([64, 0, 0, 0], device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_prefill_graphs(reference_kernels, monkeypatch):
    """Prompt chunks replay a graph per padded shape from its second use: the eager prefill's
    logits (and the decode's after it) for lengths that share a graph and lengths that do not,
    from position 0 and continuing from a cached prefix, rows given or not (fp32: the padded
    attention rows are longer, so their sums may round differently); the least recently used
    graph is dropped past PREFILL_GRAPHS; all graphs share one logits buffer."""
    from bitnet158.kernels.triton import runner as runner_mod
    monkeypatch.setattr(runner_mod, "PREFILL_GRAPHS", 2)
    monkeypatch.setattr(runner_mod, "PREFILL_SPAN", 128)       # the tiny model's cache holds 256
    m = _tiny(torch.float32, layers=2, device="cuda")
    tr = TritonRunner(m, batch=2, max_len=1024)
    tr.prefill_graphs = True
    eager = TritonRunner(m, batch=2, max_len=1024, graphs=False)
    assert not eager.prefill_graphs
    one = torch.tensor([1], device="cuda")
    # keys (rows, padded length, cache slots read, from 0): A (2, 64, 64, True) seen, captured,
    # replayed; B (1, 128, 128, True) seen, captured; C (1, 64, 128, False) seen, captured
    # (dropping A), replayed; D (1, 64, 256, False) seen; A captured again (dropping B); E seen
    cases = [(2, 0, 7, None), (2, 0, 50, None), (2, 0, 64, None), (1, 0, 65, one), (1, 0, 65, one),
             (1, 65, 30, one), (1, 95, 30, one), (1, 125, 3, one), (1, 128, 60, one), (2, 0, 3, None),
             (1, 0, 200, one)]
    for B, s0, T, rows in cases:
        toks = torch.randint(0, m.config.vocab_size, (B, T), device="cuda")
        pos = torch.arange(s0, s0 + T, device="cuda")[None].expand(B, T)
        a, b = tr.prefill(toks, pos, rows), eager.prefill(toks, pos, rows)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"prefill {(B, s0, T)}")
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        nt, p = b.argmax(-1), torch.full((B,), s0 + T, device="cuda")
        torch.testing.assert_close(tr.decode(nt, p, rows), eager.decode(nt, p, rows), rtol=1e-4, atol=1e-4,
                                   msg=f"decode {(B, s0, T)}")
    assert list(tr._prefill_graphs) == [(1, 64, 128, False), (2, 64, 64, True)]
    # every kept graph, prefill or decode, writes its logits into the one shared buffer
    assert {e[1].data_ptr() for e in tr._prefill_graphs.values()} == {tr._graph_out.data_ptr()}
    assert sorted(n for n, _ in tr._graphs) == [1, 2]
    assert {e[1].data_ptr() for e in tr._graphs.values()} == {tr._graph_out.data_ptr()}


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_auto_selection_and_linear_backend():
    m = _tiny(torch.bfloat16, layers=1, device="cuda")
    r = make_runner(m, batch=1, max_len=32)
    assert type(r).__name__ == "TritonRunner"
    assert make_runner(m, batch=1, max_len=32, backend="torch").name == "torch"
    lin = m.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, lin.in_features, device="cuda", dtype=torch.bfloat16)
    y = lin(x)                                                 # Triton backend on CUDA tensors
    assert kernels.select(x).name == "triton"
    from bitnet158.kernels import reference
    ref = reference.forward(x, lin, reference.prepare(lin))
    assert torch.equal(y, ref)
    # the optional int8 head: same tokens path, logits within the 8-bit rounding of the head
    toks = torch.randint(0, m.config.vocab_size, (1, 6), device="cuda")
    pos = torch.arange(6, device="cuda")[None]
    a = TritonRunner(m, batch=1, max_len=32).prefill(toks, pos)
    b = TritonRunner(m, batch=1, max_len=32, int8_head=True).prefill(toks, pos)
    assert _rel(b, a) < 2e-2
