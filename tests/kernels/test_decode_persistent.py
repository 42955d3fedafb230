"""The persistent batch-1 decode step (:mod:`bitnet158.kernels.triton.decode_persistent`) against
the torch reference and the unfused Triton step.

Without a GPU the layer kernel runs under ``TRITON_INTERPRET=1`` one stage a launch (a grid
barrier cannot open when programs run one after another), with few programs so that each takes
several weight tiles and attention items; with CUDA the whole layer is one launch with its
barriers (marked ``cuda``).

    python3 -m pytest -q tests/kernels/test_decode_persistent.py
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from bitnet158 import kernels  # noqa: E402
from bitnet158.kernels.triton import common  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and not common.INTERPRET:
    pytest.skip("Triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def _tiny(dtype, layers=2, device="cpu"):
    from bitnet158.config import ModelConfig
    from bitnet158.model import Transformer, init_weights
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", num_hidden_layers=layers)
    m = init_weights(Transformer(cfg), 0.05).pack().to(dtype)
    for name, p in m.named_parameters():
        if "norm" in name:
            p.data = (torch.rand_like(p.float()) + 0.5).to(dtype)
    return m.to(device).eval()


@pytest.fixture
def reference_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "_BACKENDS", [])


def _runners(m, max_len, **kw):
    from bitnet158.engine.runner import TorchRunner
    from bitnet158.kernels.triton.runner import TritonRunner
    ref = TorchRunner(m, batch=1, max_len=max_len)
    tr = TritonRunner(m, batch=1, max_len=max_len, step="persistent", **kw)
    assert tr._step_kind(1) == "persistent"
    return ref, tr


def test_interpreted_persistent_step_matches_unfused_step(reference_kernels):
    """Two layers, decode positions in the first, second and third 64-slot cache chunk (up to
    6 attention items over 3 programs), weight tiles split unevenly over the programs: logits
    bit-identical to the unfused Triton step, and as close to the torch reference as it is."""
    if CUDA:
        pytest.skip("the CUDA tests cover this")
    from bitnet158.kernels.triton.runner import TritonRunner
    m = _tiny(torch.bfloat16)
    ref, tr = _runners(m, 256, graphs=False)
    un = TritonRunner(m, batch=1, max_len=256, graphs=False)
    gen = torch.Generator().manual_seed(1)
    toks = torch.randint(0, m.config.vocab_size, (1, 70), generator=gen)
    for r in (ref, tr, un):
        r.prefill(toks, torch.arange(70)[None])
    for p in (70, 71, 130):
        nt = torch.randint(0, m.config.vocab_size, (1,), generator=gen)
        if p == 130:                       # jump: positions 72..129 through the prefills first
            fill = torch.randint(0, m.config.vocab_size, (1, 58), generator=gen)
            for r in (ref, tr, un):
                r.prefill(fill, torch.arange(72, 130)[None])
        pt = torch.tensor([p])
        want, got = un.decode(nt, pt), tr.decode(nt, pt)
        assert torch.equal(got, want), p
        # the Triton steps sum attention in another order than torch's bf16 SDPA
        torch.testing.assert_close(got, ref.decode(nt, pt), rtol=0, atol=5e-2)


@pytest.mark.parametrize("nprog,config", [(1, {}), (2, dict(BR_QKV=4, BR_GU=8, BR_DOWN=2)),
                                          (5, dict(BR_O=2, num_warps=4)), (2, dict(PREFETCH=2, SPIN=2))])
def test_interpreted_persistent_step_independent_of_tiling(nprog, config, reference_kernels):
    """Program count and tile shapes change which program computes what, never the result."""
    if CUDA:
        pytest.skip("the CUDA tests cover this")
    from bitnet158.kernels.triton.decode_persistent import PersistentStep
    m = _tiny(torch.float32, layers=1)
    _, tr = _runners(m, 128, graphs=False)
    toks = torch.randint(0, m.config.vocab_size, (1, 9))
    tr.prefill(toks, torch.arange(9)[None])
    nt, p = torch.tensor([3]), torch.tensor([9])
    base = tr.decode(nt, p)
    tr._persistent = PersistentStep(tr, nprog=nprog, config=config)
    assert torch.equal(tr.decode(nt, p), base)


def test_persistent_step_rejects_bad_config():
    from bitnet158.kernels.triton.decode_persistent import PersistentStep
    from bitnet158.kernels.triton.runner import TritonRunner
    tr = TritonRunner(_tiny(torch.float32, layers=1), batch=1, max_len=16, graphs=False)
    with pytest.raises(ValueError, match="PREFETH"):
        PersistentStep(tr, config=dict(PREFETH=2))
    with pytest.raises(ValueError, match="SPIN=3"):
        PersistentStep(tr, config=dict(SPIN=3))


def test_persistent_step_rejects_the_bf16_pipeline():
    from bitnet158.kernels.triton.decode_persistent import PersistentStep
    from bitnet158.kernels.triton.runner import TritonRunner
    tr = TritonRunner(_tiny(torch.float32, layers=1), batch=1, max_len=16, graphs=False, linear="bf16")
    with pytest.raises(ValueError, match="W2A8"):
        PersistentStep(tr)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_persistent_greedy_tokens_identical(reference_kernels):
    """Tiny fp32 model, CUDA graphs: 40 greedy tokens from a 9-token prompt as the reference."""
    m = _tiny(torch.float32, device="cuda")
    ref, tr = _runners(m, 128)
    prompt = torch.randint(0, m.config.vocab_size, (1, 9), device="cuda")

    def greedy(r):
        logits, out = r.prefill(prompt, torch.arange(9, device="cuda")[None]), []
        for i in range(40):
            out.append(logits.argmax(-1))
            logits = r.decode(out[-1], torch.full((1,), 9 + i, device="cuda"))
        return torch.stack(out, 1), logits

    ref_toks, ref_last = greedy(ref)
    toks, last = greedy(tr)
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("ctx", [1000, 3000])
@pytest.mark.parametrize("config", [{}, dict(PREFETCH=2, SPIN=2)], ids=["default", "prefetch_spin2"])
def test_cuda_persistent_2b4t_layers_match_unfused(ctx, config, reference_kernels):
    """Two 2B4T-shaped bf16 layers: the persistent step's logits against the unfused step's on
    the same cache (same argmax, close: only fp32 sum orders differ). At ctx 3000 the 5 KV heads
    x 47 chunks are more attention items than programs. Also with the weights prefetched into L2
    and the barrier polled by one thread a program."""
    from bitnet158.config import ModelConfig
    from bitnet158.kernels.triton.decode_persistent import PersistentStep
    from bitnet158.kernels.triton.runner import TritonRunner
    from bitnet158.random_model import random_packed_model
    m = random_packed_model(ModelConfig.from_name("2b4t", num_hidden_layers=2), device="cuda")
    un = TritonRunner(m, batch=1, max_len=4096)
    pe = TritonRunner(m, batch=1, max_len=4096, step="persistent")
    pe._persistent = PersistentStep(pe, config=config)
    gen = torch.Generator("cuda").manual_seed(ctx)
    toks = torch.randint(0, m.config.vocab_size, (1, ctx), device="cuda", generator=gen)
    pos = torch.arange(ctx, device="cuda")[None]
    un.prefill(toks, pos)
    pe.prefill(toks, pos)
    for p in (ctx, ctx + 1):
        nt = torch.randint(0, m.config.vocab_size, (1,), device="cuda", generator=gen)
        a = un.decode(nt, torch.tensor([p], device="cuda"))
        b = pe.decode(nt, torch.tensor([p], device="cuda"))
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        rel = float((a - b).norm() / a.norm())
        assert rel < 2e-2, rel
