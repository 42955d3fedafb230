"""The lm-evaluation-harness adapter gives the same numbers as ``bitnet158 eval`` (needs lm-eval)."""

from __future__ import annotations

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from bitnet158.eval.perplexity import perplexity  # noqa: E402
from bitnet158.eval.tasks import TASKS, load_task, loglikelihoods  # noqa: E402


def inst(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@pytest.fixture(scope="module")
def lm(model, tokenizer):
    from bitnet158.eval.harness import BitNetLM
    return BitNetLM(model=model, tokenizer=tokenizer, batch_size=4)


def test_registered():
    import bitnet158.eval.harness  # noqa: F401
    from lm_eval.api.registry import get_model
    assert get_model("bitnet158").__name__ == "BitNetLM"


def test_loglikelihood_equals_eval(lm, model, tokenizer, tmp_path):
    reqs = [("The man turned on the faucet, therefore", " water flowed from the spout."),
            ("The man turned on the faucet, therefore", " the toilet filled with water."),
            ("Question: How to open a jar?\nAnswer:", " twist the lid"),
            ("Sarah was better than Maria so Maria", " got the easier cases."),
            ("He opened the door and saw his ", "dog")]                  # trailing space handled alike
    ours = loglikelihoods(model, tokenizer, reqs, batch_size=4)
    theirs = lm.loglikelihood([inst("loglikelihood", r, i) for i, r in enumerate(reqs)])
    assert theirs == ours                                               # the same code path, exactly


def test_loglikelihood_rolling_equals_perplexity(lm, model, tokenizer):
    text = "It was the best of times, it was the worst of times. " * 40  # > 256 tokens: several windows
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    assert len(ids) > 256
    (got,) = lm.loglikelihood_rolling([inst("loglikelihood_rolling", (text,))])
    r = perplexity(model, ids, ctx=256, stride=256)
    assert got == pytest.approx(-r.nll, rel=1e-9)


def test_generate_until(lm):
    reqs = [inst("generate_until", ("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 12})),
            inst("generate_until", ("Hello", {"until": "e", "max_gen_toks": 20}), 1)]
    outs = lm.generate_until(reqs)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert "e" not in outs[1] and "\n\n" not in outs[0]
    assert lm.generate_until(reqs) == outs                              # greedy: deterministic
