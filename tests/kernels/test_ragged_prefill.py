"""Rows of different lengths in one prefill call (``prefill(..., rows, lengths)``), on every runner:
the logits of each row's last real token and the decode after it are those of prefilling each row
alone; the padding's KV slots are overwritten before they are read.

CPU (CI): the torch reference runner, the C runners (from a torch model and torch-free from a
folder, when built) and the Triton runner under
``TRITON_INTERPRET=1`` (eager and through a prefill graph's padded buffers) on a tiny fp32 model.
CUDA (marked ``cuda``): the Triton runner compiled, with prefill graphs.

    python3 -m pytest -q tests/kernels/test_ragged_prefill.py
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitnet158 import kernels  # noqa: E402
from bitnet158.config import ModelConfig  # noqa: E402
from bitnet158.engine.runner import TorchRunner  # noqa: E402
from bitnet158.kernels import cpu  # noqa: E402
from bitnet158.model import Transformer, init_weights  # noqa: E402

CUDA = torch.cuda.is_available()
try:
    from bitnet158.kernels.triton import common
    from bitnet158.kernels.triton.runner import TritonRunner
    TRITON = CUDA or common.INTERPRET
except ImportError:
    TRITON = False


@pytest.fixture
def reference_kernels(monkeypatch):
    """PackedLinear on the torch reference backend (the reference runner's numerics)."""
    monkeypatch.setattr(kernels, "_BACKENDS", [])


def _tiny(device="cpu"):
    torch.manual_seed(5)
    cfg = ModelConfig.from_name("tiny", num_hidden_layers=1)
    return init_weights(Transformer(cfg), 0.05).pack().to(device).eval()


class _Numpy:
    """The torch-free runner (numpy arrays in and out) behind torch tensors."""

    def __init__(self, runner):
        self.runner = runner

    def prefill(self, *args):
        return torch.from_numpy(self.runner.prefill(*(a if isinstance(a, list) else a.numpy() for a in args)))

    def decode(self, *args):
        return torch.from_numpy(self.runner.decode(*(a.numpy() for a in args)))


def _make(kind, model, batch, max_len, tmp_path=None):
    if kind == "torch":
        return TorchRunner(model, batch=batch, max_len=max_len)
    if kind == "cpu":
        from bitnet158.kernels.cpu.runner import CpuRunner
        return CpuRunner(model, batch=batch, max_len=max_len)
    if kind == "lite":
        from bitnet158 import checkpoint
        from bitnet158.kernels.cpu.lite import LiteRunner
        folder = tmp_path / "model"
        if not folder.exists():
            checkpoint.save(model, folder, layout="packed")
        return _Numpy(LiteRunner(folder, batch=batch, max_len=max_len))
    return TritonRunner(model, batch=batch, max_len=max_len, graphs=CUDA)


def _ragged(prompts, starts):
    """Rows padded to the longest: tokens, positions [B, T] (padding continues each row's
    positions) and the lengths."""
    T = max(len(p) for p in prompts)
    toks = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    pos = torch.tensor([list(range(s, s + T)) for s in starts])
    return toks, pos, [len(p) for p in prompts]


KINDS = ["torch",
         pytest.param("cpu", marks=pytest.mark.skipif(not cpu.available(), reason="C kernels unavailable")),
         pytest.param("lite", marks=pytest.mark.skipif(not cpu.available(), reason="C kernels unavailable")),
         pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="needs Triton (CUDA or the interpreter)"))]


@pytest.mark.parametrize("kind", KINDS)
def test_ragged_prefill_matches_rows_alone(kind, reference_kernels, tmp_path):
    dev = "cuda" if kind == "triton" and CUDA else "cpu"
    model = _tiny(dev)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    one, many = _make(kind, model, 4, 40, tmp_path), _make(kind, model, 4, 40, tmp_path)
    rows, starts = [3, 0, 2], [0, 0, 0]                   # out of order, row 1 left alone
    tol = dict(rtol=1e-5, atol=1e-5)
    for lens in ([5, 2, 7], [3, 9, 1]):                   # from position 0, then continuing
        prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]
        want = torch.cat([one.prefill(torch.tensor([p]), torch.arange(s, s + len(p))[None], torch.tensor([r]))
                          for p, s, r in zip(prompts, starts, rows)])
        toks, pos, lengths = _ragged(prompts, starts)
        got = many.prefill(toks, pos, torch.tensor(rows), lengths)                          # [3, V]
        torch.testing.assert_close(got.cpu(), want.cpu(), **tol)
        starts = [s + n for s, n in zip(starts, lens)]
    nxt, p = torch.tensor([4, 5, 6]), torch.tensor(starts)     # decode reads the slots prefilled above
    torch.testing.assert_close(many.decode(nxt, p, torch.tensor(rows)).cpu(),
                               one.decode(nxt, p, torch.tensor(rows)).cpu(), **tol)
    if kind == "triton" and CUDA:                         # the padded shape's graph: captured, replayed
        for _ in range(2):
            prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (6, 3, 4)]
            want = torch.cat([one.prefill(torch.tensor([q]), torch.arange(len(q))[None], torch.tensor([r]))
                              for q, r in zip(prompts, rows)])
            toks, pos, lengths = _ragged(prompts, [0, 0, 0])
            torch.testing.assert_close(many.prefill(toks, pos, torch.tensor(rows), lengths).cpu(),
                                       want.cpu(), **tol)


@pytest.mark.skipif(CUDA or not TRITON, reason="the CUDA test above replays the graphs")
def test_triton_padded_buffers_take_each_rows_last_token(reference_kernels):
    """A prefill graph's inputs (padded to 64 tokens) with each row's last real column: the
    logits of the eager ragged call."""
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (4, 7)]
    toks, pos, lengths = _ragged(prompts, [0, 0])
    a, b = _make("triton", model, 2, 40), _make("triton", model, 2, 40)
    want = a.prefill(toks, pos, torch.tensor([0, 1]), lengths)
    Tp, Lp = b._padded_shape(toks.shape[1], 0, True)
    bufs = b._prefill_bufs(2, Tp)
    b._pad_inputs(toks, torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]), bufs,
                  torch.tensor(lengths) - 1)
    torch.testing.assert_close(b._prefill_padded(bufs, True, Lp), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_bad_lengths_are_clear_errors(kind, tmp_path):
    model = _tiny()
    run = _make(kind, model, 2, 16, tmp_path)
    toks, pos = torch.zeros((2, 3), dtype=torch.long), torch.arange(3).expand(2, 3)
    with pytest.raises(ValueError, match=r"lengths has 1 entries for 2 rows"):
        run.prefill(toks, pos, torch.tensor([0, 1]), [3])
    with pytest.raises(ValueError, match=r"lengths \[0\] outside 1\.\.3"):
        run.prefill(toks, pos, torch.tensor([0, 1]), [0, 3])
    if kind == "torch":                                   # rows in any order, each once
        with pytest.raises(ValueError, match=r"name a cache row twice"):
            run.prefill(toks, pos, torch.tensor([1, 1]), [2, 3])
