"""Our GGUF files in upstream llama.cpp (through llama-cpp-python, the `bench` extra): they load,
tokenize exactly like bitnet158, generate — and llama.cpp's `bitnet` graph is measured against
ours and against an emulation of what it computes (SiLU FFN, float activations).

Skipped when llama-cpp-python or ../shared/data/llama3-tokenizer is absent. Run with -s to see the
mismatch figures that docs/gguf.md reports.
"""

from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

llama_cpp = pytest.importorskip("llama_cpp")

from bitnet158.convert import export_gguf, write_random_gguf  # noqa: E402
from bitnet158.layers import PackedLinear  # noqa: E402
from bitnet158.model import FeedForward  # noqa: E402

from .conftest import LLAMA3_RANKS, tq_config  # noqa: E402

pytestmark = pytest.mark.skipif(not LLAMA3_RANKS.is_file(), reason="Llama-3 rank file not present")

TEXTS = ["Hello world! How are you doing today?", "  leading spaces, 12345 digits and émojis 🙂",
         "def f(x):\n    return x ** 2\n"]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    from bitnet158.tokenizer_build import build_llama3_tokenizer_dir
    return build_llama3_tokenizer_dir(tmp_path_factory.mktemp("llama3"), rank_file=LLAMA3_RANKS)


@pytest.fixture(scope="module")
def tiny_llama3(llama3_dir):
    from bitnet158.random_model import random_model
    torch.manual_seed(0)
    cfg = tq_config(vocab_size=128256, bos_token_id=128000, eos_token_id=128001, rope_theta=500000.0)
    return random_model(cfg, seed=11, emb_std=0.05).pack()


def _open(path, n_ctx=64):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, n_batch=64,
                           logits_all=True, verbose=False)


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _float_linear(self, x):                     # llama.cpp: dequantized weights, float activations
    return F.linear(x, self.ternary().to(x.dtype) * self.weight_scale.to(x.dtype))


def _silu_ffn(self, x):                         # llama.cpp's bitnet graph: SiLU-gated FFN
    return self.down_proj(self.ffn_sub_norm(F.silu(self.gate_proj(x)) * self.up_proj(x)))


@torch.no_grad()
def _emulate_llama_cpp(model, ids):
    with mock.patch.object(PackedLinear, "forward", _float_linear), \
         mock.patch.object(FeedForward, "forward", _silu_ffn):
        return model(torch.tensor([ids]))[0].float()


@pytest.mark.parametrize("wtype", ["tq2_0", "tq1_0"])
def test_tiny_model_in_llama_cpp(tiny_llama3, llama3_dir, tmp_path, wtype):
    from bitnet158.tokenizer import Tokenizer

    path = export_gguf(tiny_llama3, tmp_path / f"tiny-{wtype}.gguf", wtype=wtype, head="f32",
                       tokenizer_dir=llama3_dir)
    llm = _open(path)
    tok = Tokenizer.from_pretrained(llama3_dir)
    for text in TEXTS:                                   # same ids as bitnet158's tokenizer
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    chat = tok.render_chat([{"role": "user", "content": "How are you?"}])
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == \
        tok.encode_chat([{"role": "user", "content": "How are you?"}])

    # scales in the file are f16: compare with the same rounding on our side
    for _, m in tiny_llama3.projections():
        m.weight_scale.copy_(m.weight_scale.half().float())
        m.invalidate()
    ids = tok.encode(TEXTS[0], add_bos=True)
    got = _llama_logits(llm, ids)
    with torch.no_grad():
        ours = tiny_llama3(torch.tensor([ids]))[0].float()
    emul = _emulate_llama_cpp(tiny_llama3, ids)
    scale = ours.abs().max().item()
    d_ours = (got - ours).abs().max().item()
    d_emul = (got - emul).abs().max().item()
    agree = (got.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"\n[{wtype}] logit scale {scale:.3f}: llama.cpp vs bitnet158 max|diff| {d_ours:.4f} "
          f"(argmax agreement {agree:.0%}); vs SiLU/no-act-quant emulation {d_emul:.4f}")
    # llama.cpp computes the emulated graph (up to its Q8_K activation blocks), not ours
    assert d_emul < 0.1 * d_ours, "llama.cpp's bitnet graph changed: update docs/gguf.md"

    out = llm.create_completion(TEXTS[0], max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_2b4t_shaped_file_in_llama_cpp(tmp_path, llama3_dir):
    from bitnet158.tokenizer import Tokenizer

    path = write_random_gguf(tmp_path / "2b4t-tq2_0.gguf", "2b4t", wtype="tq2_0", head="f16",
                             tokenizer_dir=llama3_dir)
    llm = _open(path, n_ctx=32)
    assert llm.n_vocab() == 128256 and llm.n_embd() == 2560
    tok = Tokenizer.from_pretrained(llama3_dir)
    assert llm.tokenize(TEXTS[0].encode(), add_bos=False, special=False) == tok.encode(TEXTS[0])
    out = llm.create_completion(TEXTS[0], max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
