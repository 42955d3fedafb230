"""Sliding-window perplexity against direct computation with the model's full forward."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bitnet158.eval.perplexity import perplexity, perplexity_text, windows


def direct_nll(model, ids: list[int], ctx: int, stride: int) -> tuple[float, int]:
    """Reference: one plain forward per window, scoring exactly the tokens the window owns."""
    nll, n = 0.0, 0
    scored = set()
    for b, e, first in windows(len(ids), ctx, stride):
        x = torch.tensor([ids[b:e - 1]])
        with torch.no_grad():
            lp = torch.log_softmax(model(x).float()[0], dim=-1)           # [T, V]
        for j in range(first, e):
            nll -= float(lp[j - 1 - b, ids[j]])
            n += 1
            scored.add(j)
    assert scored == set(range(1, len(ids)))
    return nll, n


@pytest.mark.parametrize("n,ctx,stride", [(11, 4, 4), (10, 4, 2), (3, 8, 4), (50, 7, 3), (64, 16, 16), (2, 1, 1)])
def test_windows_score_every_token_once(n, ctx, stride):
    seen = []
    for b, e, first in windows(n, ctx, stride):
        assert e - 1 - b <= ctx                                 # input never exceeds ctx
        assert b < first <= e
        assert first - b >= min(first, ctx - stride + 1)        # guaranteed left context
        seen += range(first, e)
    assert seen == list(range(1, n))


def test_lm_eval_rolling_example():
    # lm-eval's loglikelihood_rolling docstring: tokens BOS 0..9, max length 4
    assert windows(11, 4, 4) == [(0, 5, 1), (4, 9, 5), (6, 11, 9)]


def test_single_window_equals_full_forward(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (100,), generator=g).tolist()
    r = perplexity(model, ids, ctx=200)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
    want = -float(lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert r.tokens == 99 and r.windows == 1
    assert r.nll == pytest.approx(want, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(want / 99), rel=1e-5)


@pytest.mark.parametrize("ctx,stride,batch", [(32, 16, 1), (32, 16, 5), (32, 32, 3), (20, 7, 2)])
def test_sliding_equals_direct(model, ctx, stride, batch):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (150,), generator=g).tolist()
    r = perplexity(model, ids, ctx=ctx, stride=stride, batch_size=batch)
    nll, n = direct_nll(model, ids, ctx, stride)
    assert r.tokens == n == 149
    assert r.nll == pytest.approx(nll, rel=1e-5)


def test_text_metrics(model, tokenizer):
    text = "The quick brown fox jumps over the lazy dog.\nIt was the best of times. " * 4
    r = perplexity_text(model, tokenizer, text, ctx=64, stride=32)
    ids = tokenizer.encode(text, add_bos=True)
    assert r.tokens == len(ids) - 1
    assert r.words == len(text.split()) and r.bytes == len(text.encode())
    assert r.bits_per_byte == pytest.approx(r.nll / r.bytes / math.log(2))
    d = r.to_dict()
    assert d["ppl"] == pytest.approx(r.ppl) and json.dumps(d)


def test_eval_ppl_cli(folder, tmp_path, capsys):
    from bitnet158.cli import main
    data = tmp_path / "t.txt"
    data.write_text("Some text to score. " * 30)
    assert main(["eval", "ppl", str(folder), "--data", str(data), "--ctx", "48", "--stride", "24",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    d = json.loads(out[-1])
    assert d["ctx"] == 48 and d["stride"] == 24 and d["tokens"] > 0 and math.isfinite(d["ppl"])


def test_bad_arguments(model):
    from bitnet158.errors import ContextLengthError
    with pytest.raises(ContextLengthError):
        perplexity(model, [1, 2, 3], ctx=1000)
    with pytest.raises(ContextLengthError):
        perplexity(model, [1, 2, 3], ctx=8, stride=9)
    with pytest.raises(ContextLengthError):
        perplexity(model, [1], ctx=8)
