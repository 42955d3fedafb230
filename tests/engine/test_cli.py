"""The `generate` and `chat` subcommands on a tiny random model folder, and text streaming.

    python3 -m pytest -q tests/engine/test_cli.py
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from bitnet158 import cli
from bitnet158.engine import SamplingParams, generate, generate_text, make_runner, stream_text


@pytest.fixture(scope="module")
def loaded(model_dir):
    from bitnet158 import checkpoint
    from bitnet158.tokenizer import Tokenizer
    return checkpoint.load(model_dir), Tokenizer.from_pretrained(model_dir)


class ScriptedRunner:
    """A runner whose greedy choice is a fixed script of ids (to stream chosen text)."""

    def __init__(self, script: list[int], vocab: int, max_len: int = 512):
        self.script, self.vocab_size, self.max_len, self.batch = script, vocab, max_len, 1
        self.device = torch.device("cpu")
        self.k = 0

    def reset(self):
        self.k = 0

    def _next(self):
        out = torch.zeros(1, self.vocab_size)
        out[0, self.script[min(self.k, len(self.script) - 1)]] = 1.0
        self.k += 1
        return out

    def prefill(self, tokens, pos, rows=None):
        self.k = 0
        return self._next()

    def decode(self, tokens, pos, rows=None):
        return self._next()


@pytest.mark.parametrize("text", ["héllo wörld", "emoji 🙂👍🏽 and 🇫🇷", "中文字符和日本語のテキスト",
                                  "mixed: ∑ x² → ∞, ё, ع"])
def test_stream_text_keeps_multibyte_characters(loaded, text):
    _, tok = loaded
    ids = tok.encode(text)
    assert len(ids) > len(text)                               # byte tokens: characters span ids
    runner = ScriptedRunner(ids + [tok.eot_id], tok.vocab_size)
    stream = stream_text(runner, tok, [tok.bos_id], SamplingParams(max_new_tokens=200))
    pieces = list(stream)
    assert "".join(pieces) == text == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)               # no character was split
    assert stream.finish_reason == "stop" and stream.completion_tokens == len(ids)


def test_stream_text_equals_decode_of_ids(loaded):
    model, tok = loaded
    for prompt in ["Bonjour 🙂", "你好，世界", [{"role": "user", "content": "Hi 👋"}]]:
        p = SamplingParams(temperature=1.0, seed=3, max_new_tokens=40, stop_ids=[])
        ids = list(generate(model, _encode(tok, prompt), p))
        assert "".join(stream_text(model, tok, prompt, p)) == tok.decode(ids)


def _encode(tok, prompt):
    if isinstance(prompt, str):
        return tok.encode(prompt, add_bos=True)
    return tok.encode_chat(prompt)


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_cli_matches_engine(model_dir, loaded, capsys):
    model, tok = loaded
    code, out, err = run_cli(["generate", str(model_dir), "Once upon a time", "-n", "20", "--stats",
                              "--threads", "1"], capsys)
    assert code == 0, err
    want = generate_text(model, tok, "Once upon a time", max_new_tokens=20)
    assert out == want + "\n"
    assert "prompt tokens" in err and "tok/s" in err
    code, out2, _ = run_cli(["generate", str(model_dir), "Once upon a time", "-n", "20", "--no-stream"],
                            capsys)
    assert code == 0 and out2 == out


def test_generate_cli_chat_sampling_and_stdin(model_dir, loaded, capsys, monkeypatch):
    """Sampled text from the CLI is the library's with the same engine (the torch reference on
    both sides: engines whose logits differ in the last bits may draw differently)."""
    model, tok = loaded
    args = ["generate", str(model_dir), "-", "--chat", "--system", "Be brief.", "-n", "16",
            "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--repetition-penalty", "1.1",
            "--seed", "11", "--backend", "torch"]
    code, out, err = run_cli(args, capsys, stdin="What is 2+2?", monkeypatch=monkeypatch)
    assert code == 0, err
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=11,
                       max_new_tokens=16)
    assert out == generate_text(make_runner(model, max_len=192, backend="torch"), tok, msgs, p) + "\n"


def test_generate_cli_errors(model_dir, capsys, tmp_path):
    code, _, err = run_cli(["generate", str(model_dir), "x" * 300], capsys)
    assert code == 1 and "context" in err and "Traceback" not in err
    code, _, err = run_cli(["generate", str(model_dir), "hi", "--top-p", "2"], capsys)
    assert code == 1 and "--top-p" in err
    code, _, err = run_cli(["generate", str(tmp_path / "nowhere"), "hi"], capsys)
    assert code == 1 and "Traceback" not in err
    code, _, err = run_cli(["generate", str(model_dir), "hi", "--backend", "nope"], capsys)
    assert code == 1 and "nope" in err


def test_device_option_errors(monkeypatch):
    from bitnet158.commands.common import pick_device
    from bitnet158.errors import ConfigError
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device 'gpu'"):
        pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"--device 'cuda:2': this machine has 2 CUDA devices \(cuda:0 .. cuda:1\)"):
        pick_device("cuda:2")


def test_default_model_message(capsys, monkeypatch, tmp_path):
    from bitnet158.commands import common
    monkeypatch.setattr(common, "DEFAULT_MODEL", tmp_path / "absent")
    code, _, err = run_cli(["generate", "hello"], capsys)
    assert code == 1 and "no default model is installed" in err


def test_chat_cli_multi_turn(model_dir, loaded, capsys, monkeypatch):
    model, tok = loaded
    lines = "Hello there\n\nHow are you? 🙂\n/reset\nHello there\n/exit\nnever read\n"
    code, out, err = run_cli(["chat", str(model_dir), "--system", "You are terse.", "-n", "12",
                              "--temperature", "0", "--stats"], capsys, stdin=lines,
                             monkeypatch=monkeypatch)
    assert code == 0, err
    answers = out.split("\n")[:-1]
    assert len(answers) == 3
    # each answer equals a from-scratch generation over the whole conversation so far
    p = SamplingParams(max_new_tokens=12)
    sys_msg = {"role": "system", "content": "You are terse."}
    conv = [sys_msg, {"role": "user", "content": "Hello there"}]
    a1 = generate_text(model, tok, conv, p)
    conv += [{"role": "assistant", "content": a1}, {"role": "user", "content": "How are you? 🙂"}]
    a2 = generate_text(model, tok, conv, p)
    assert answers == [a1, a2, a1]
    stats = [ln for ln in err.splitlines() if "prompt tokens" in ln]
    assert len(stats) == 3 and "cached" in stats[1] and "cached" in stats[2]   # KV prefix re-used
    assert "conversation cleared" in err


def test_chat_cli_context_full(model_dir, capsys, monkeypatch):
    lines = "short\n" + "a very long message " * 10 + "\nok\n"
    code, out, err = run_cli(["chat", str(model_dir), "--context", "128", "-n", "8", "--temperature", "0"],
                             capsys, stdin=lines, monkeypatch=monkeypatch)
    assert code == 0, err
    assert "context full" in err and "Traceback" not in err
    assert len(out.split("\n")[:-1]) == 2                      # the long message got no answer


@pytest.mark.slow
def test_chat_cli_subprocess(model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "bitnet158.cli", "chat", str(model_dir), "-n", "5",
                        "--temperature", "0", "--threads", "1"], input="Hi\nBye\n", text=True,
                       capture_output=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split("\n")[:-1]) == 2
    assert ">>>" not in r.stdout                                 # no prompt when stdin is a pipe
