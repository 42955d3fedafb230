"""Zero-shot task scoring: loglikelihoods against a direct forward, scoring rules, local data files."""

from __future__ import annotations

import json

import pytest
import torch

from bitnet158.eval import tasks
from bitnet158.eval.tasks import (TASKS, Example, TaskError, encode_pair, evaluate_task, load_task,
                                  loglikelihood_ids, loglikelihoods, score)

from .conftest import SHARED_EVAL


def direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    x = torch.tensor([(ctx + cont)[:-1]])                                  # the last token is not fed
    with torch.no_grad():
        lp = torch.log_softmax(model(x).float()[0], dim=-1)               # [T, V]
    rows = lp[len(ctx) - 1:]
    t = torch.tensor(cont)
    return float(rows.gather(1, t[:, None]).sum()), bool((rows.argmax(-1) == t).all())


def test_encode_pair(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: is it?\nAnswer: ", "yes")
    # the trailing space moved to the continuation; the split is that of the whole string
    assert ctx[0] == tokenizer.bos_id
    assert ctx[1:] == tokenizer.encode("Question: is it?\nAnswer:")
    assert ctx[1:] + cont == tokenizer.encode("Question: is it?\nAnswer: yes")
    assert encode_pair(tokenizer, "a", " b", add_bos=False)[0] == tokenizer.encode("a")


def test_loglikelihoods_equal_direct_and_order_free(model, tokenizer):
    reqs = [("The cat sat on the", " mat"), ("Question: why?\nAnswer:", " because it is"),
            ("", "Hello world"), ("One two three four five six seven", " eight"),
            ("The cat sat on the", " hat and the bat")]
    got = loglikelihoods(model, tokenizer, reqs, batch_size=2)
    for (c, x), (ll, greedy) in zip(reqs, got):
        a, b = encode_pair(tokenizer, c, x)
        ref_ll, ref_greedy = direct(model, a, b)
        assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-4) and greedy == ref_greedy
    rev = loglikelihoods(model, tokenizer, reqs[::-1], batch_size=3)[::-1]
    assert [r[0] for r in rev] == pytest.approx([r[0] for r in got], rel=1e-5, abs=1e-4)


def test_greedy_flag_true_for_greedy_continuation(model):
    ctx = [0, 17, 33]
    cont = []
    with torch.no_grad():
        seq = list(ctx)
        for _ in range(3):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            seq.append(nxt)
            cont.append(nxt)
    (ll, greedy), = loglikelihood_ids(model, [(ctx, cont)])
    assert greedy and ll < 0


def test_long_pair_is_left_truncated(model):
    ctx = list(range(2, 300))                                   # longer than the 256-token context
    (ll, _), = loglikelihood_ids(model, [(ctx, [5, 6])])
    ref, _ = direct(model, ctx[-255:], [5, 6])                  # 255 + 2 = max_len + 1 tokens kept
    assert ll == pytest.approx(ref, rel=1e-5, abs=1e-4)


def test_score_acc_and_acc_norm():
    spec = TASKS["copa"]
    ex = [Example(["q"] * 2, [" a", " bbbbbbbb"], ["a", "bbbbbbbb"], gold=1),
          Example(["q"] * 2, [" cc", " d"], ["cc", "d"], gold=0)]
    # ex0: raw picks 0 (-1 > -4) but per character picks 1 (-0.5 > -1); ex1: both pick 0
    res = [(-1.0, False), (-4.0, False), (-1.0, False), (-3.0, False)]
    d = score(spec, ex, res)
    assert d["acc"] == 0.5 and d["acc_norm"] == 1.0 and d["n"] == 2
    lam = score(TASKS["lambada"], [Example(["c"], [" w"], ["w"], 0)] * 2, [(-1.0, True), (-3.0, False)])
    assert lam["acc"] == 0.5 and lam["ppl"] == pytest.approx(2.718281828 ** 2)


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "eval" / "llm-foundry"
    d.mkdir(parents=True)
    rows = {
        "copa.jsonl": [{"query": "The man turned on the faucet, therefore", "gold": 1,
                        "choices": ["the toilet filled with water.", "water flowed from the spout."]},
                       {"query": "The girl was tired, because", "gold": 0,
                        "choices": ["she ran far.", "she slept well."]}],
        "winogrande.jsonl": [{"context_options": ["Sarah was better than Maria so Sarah",
                                                  "Sarah was better than Maria so Maria"],
                              "continuation": "got the easier cases.", "gold": 1}],
        "lambada_openai.jsonl": [{"context": "He opened the door and saw his", "continuation": "dog"}],
        "piqa.jsonl": [{"query": "Question: How to open a jar?\n", "choices": ["twist the lid", "hit it"],
                        "gold": 0}],
    }
    for name, rs in rows.items():
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
    return tmp_path / "eval"


def test_task_scoring_equals_direct(model, tokenizer, data_dir):
    for name in ("copa", "winogrande", "lambada", "piqa"):
        exs = load_task(name, data_dir)
        got = evaluate_task(model, tokenizer, name, data_dir, batch_size=3)
        res = [direct(model, *encode_pair(tokenizer, c, x)) for ex in exs
               for c, x in zip(ex.contexts, ex.continuations)]
        want = score(TASKS[name], exs, res)
        assert got["n"] == len(exs) and got["acc"] == want["acc"]
        if name == "lambada":
            assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-4)
        else:
            assert got["acc_norm"] == want["acc_norm"]
    ex = load_task("piqa", data_dir)[0]
    assert ex.contexts[0] == "Question: How to open a jar?\nAnswer:" and ex.continuations[0] == " twist the lid"
    wg = load_task("winogrande", data_dir)[0]
    assert wg.contexts[1].endswith("so Maria") and wg.continuations == [" got the easier cases."] * 2


def test_eval_tasks_cli(folder, data_dir, capsys):
    from bitnet158.cli import main
    assert main(["eval", "tasks", str(folder), "--tasks", "copa,winogrande,lambada", "--data-dir",
                 str(data_dir), "--threads", "1"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["copa_n"] == 2 and 0 <= d["copa_acc"] <= 1 and "lambada_ppl" in d


def test_errors(tmp_path):
    with pytest.raises(TaskError, match="unknown task"):
        tasks.task_name("hellaswag_full")
    with pytest.raises(TaskError, match="not found"):
        load_task("copa", tmp_path)
    (tmp_path / "copa.jsonl").write_text('{"query": "x", "choices": ["a"]}\n')
    with pytest.raises(TaskError, match="record 1"):
        load_task("copa", tmp_path)


@pytest.mark.skipif(not SHARED_EVAL.is_dir(), reason="../shared/data/eval not present")
@pytest.mark.parametrize("name", tasks.DEFAULT_TASKS)
def test_local_files_parse(name):
    exs = load_task(name, SHARED_EVAL, limit=5)
    assert len(exs) == 5
    for ex in exs:
        assert len(ex.contexts) == len(ex.continuations) == len(ex.choices) >= 1
        assert 0 <= ex.gold < len(ex.choices)
        assert all(c.startswith(" ") for c in ex.continuations)
