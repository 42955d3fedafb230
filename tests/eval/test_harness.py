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


def test_registered_and_built_from_arg_string(folder, tokenizer):
    from lm_eval.api.registry import get_model

    from bitnet158.checkpoint import load
    from bitnet158.eval.harness import BitNetLM
    cls = get_model("bitnet158")
    assert cls.__name__ == "BitNetLM"
    lm2 = cls.create_from_arg_string(f"pretrained={folder},batch_size=2")   # how lm_eval builds it
    reqs = [inst("loglikelihood", ("The cat sat on the", " mat"))]
    same = BitNetLM(model=load(folder), tokenizer=tokenizer)      # (the folder stores bf16 scales)
    assert lm2.loglikelihood(reqs) == same.loglikelihood(reqs)


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


SIMPLE_EVALUATE = r'''
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
from bitnet158.checkpoint import load
from bitnet158.eval.harness import BitNetLM
from bitnet158.eval.tasks import evaluate_task
from bitnet158.tokenizer import Tokenizer
folder, task_dir, data_dir = sys.argv[1:4]
model, tok = load(folder), Tokenizer.from_pretrained(folder)
r = lm_eval.simple_evaluate(model=BitNetLM(model=model, tokenizer=tok, batch_size=8), tasks=["copa_local"],
                            task_manager=TaskManager(include_path=task_dir))["results"]["copa_local"]
ours = evaluate_task(model, tok, "copa", data_dir)
print(json.dumps({"lm_eval": [r["acc,none"], r["acc_norm,none"]], "ours": [ours["acc"], ours["acc_norm"]]}))
'''


@pytest.mark.slow
def test_simple_evaluate_matches_eval_tasks(folder, tmp_path):
    """lm-eval's own pipeline (a local-file COPA task) scores exactly like `bitnet158 eval tasks`."""
    import json
    import os
    import subprocess
    import sys

    from .conftest import SHARED_EVAL
    if not (SHARED_EVAL / "llm-foundry" / "copa.jsonl").is_file():
        pytest.skip("../shared/data/eval not present")
    data = tmp_path / "data" / "llm-foundry"
    data.mkdir(parents=True)
    rows = (SHARED_EVAL / "llm-foundry" / "copa.jsonl").read_text().splitlines()[:12]
    (data / "copa.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "copa_local.yaml").write_text(
        "task: copa_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data / 'copa.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        'target_delimiter: " "\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SIMPLE_EVALUATE, str(folder), str(tmp_path), str(tmp_path / "data")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["lm_eval"] == d["ours"]
