"""The torch-free C engine (``kernels.cpu.lite``) against the torch-side engines, on tiny random folders.

    python3 -m pytest -q tests/kernels/test_cpu_lite.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet158 import checkpoint, kernels
from bitnet158.errors import CheckpointError, ConfigError
from bitnet158.kernels import cpu
from bitnet158.kernels.cpu import binding

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"C kernels unavailable: {binding.error()}")

if cpu.available():
    from bitnet158.kernels.cpu.lite import LiteRunner, supported
    from bitnet158.kernels.cpu.runner import CpuRunner

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "tests" / "assets" / "tokenizer-tiny"


def _inputs(vocab: int, B: int = 2, T: int = 21, seed: int = 1):
    g = np.random.default_rng(seed)
    tok = g.integers(0, vocab, (B, T))
    return tok, np.broadcast_to(np.arange(T), (B, T)).copy()


def _pair(folder: Path, **kw):
    """(LiteRunner, CpuRunner) of one folder with the same options."""
    lite = LiteRunner(folder, batch=2, max_len=48, **kw)
    model = checkpoint.load(folder, dtype=kw.get("dtype"))
    ref = CpuRunner(model, batch=2, max_len=48, head=kw.get("head", "bf16"), layout=kw.get("layout"))
    return lite, ref


@pytest.mark.parametrize("head", ["bf16", "int8"])
@pytest.mark.parametrize("layout", ["packed", "bitlinear"])
def test_bf16_folder_logits_equal_torch_side_engine(tiny_folder, head, layout):
    """Same C forward, same weights, same tables: bitwise equal logits, prefill and decode."""
    folder = tiny_folder("tiny", layout=layout, seed=3, dtype="bfloat16")
    lite, ref = _pair(folder, head=head)
    tok, pos = _inputs(lite.vocab_size)
    a = lite.prefill(tok, pos)
    b = ref.prefill(torch.from_numpy(tok), torch.from_numpy(pos)).numpy()
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (2, lite.vocab_size)
    assert np.array_equal(a, b)
    nxt, p = a.argmax(-1), np.full(2, tok.shape[1])
    for _ in range(5):
        a = lite.decode(nxt, p)
        b = ref.decode(torch.from_numpy(nxt), torch.from_numpy(p)).numpy()
        assert np.array_equal(a, b)
        nxt, p = a.argmax(-1), p + 1


def test_fp32_folder_matches_torch_reference(tiny_folder):
    """fp32: RoPE tables computed in numpy (within an ulp of torch's): logits <= 1e-4 of the torch
    reference engine, greedy continuations identical."""
    from bitnet158.engine import SamplingParams, TorchRunner, generate
    folder = tiny_folder("tiny", seed=5, dtype="float32")
    lite = LiteRunner(folder, max_len=64)
    model = checkpoint.load(folder)
    tok, pos = _inputs(lite.vocab_size, B=1, T=30)
    saved = list(kernels._BACKENDS)
    kernels._BACKENDS.clear()                            # the pure torch reference
    try:
        ref = TorchRunner(model, batch=1, max_len=64)
        b = ref.prefill(torch.from_numpy(tok), torch.from_numpy(pos)).numpy()
        a = lite.prefill(tok, pos)
        assert np.abs(a - b).max() <= 1e-4
        params = SamplingParams(max_new_tokens=20, stop_ids=[])
        want = list(generate(TorchRunner(model, batch=1, max_len=64), tok[0].tolist(), params))
    finally:
        kernels._BACKENDS[:] = saved
    assert list(generate(lite, tok[0].tolist(), params)) == want


def test_sharded_folder_and_sampling_parity(tiny_folder):
    """Shards are read like one file; seeded sampling gives the torch-side engine's tokens."""
    from bitnet158.engine import SamplingParams, generate
    folder = tiny_folder("tiny", seed=2, max_shard_bytes=40_000)
    assert (folder / "model.safetensors.index.json").is_file()
    lite, ref = _pair(folder)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=7,
                            max_new_tokens=24, stop_ids=[])
    prompt = [1, 5, 9, 200]
    assert list(generate(lite, prompt, params)) == list(generate(ref, prompt, params))


def test_session_reuses_the_cache(tiny_folder):
    from bitnet158.engine import SamplingParams, Session
    folder = tiny_folder("tiny", seed=4)
    s = Session(LiteRunner(folder, max_len=64))
    params = SamplingParams(max_new_tokens=6, stop_ids=[])
    first = s.generate([1, 2, 3, 4], params)
    out = first.run()
    held = list(s.tokens)                  # the prompt and every answer token but the last (never fed)
    assert held == [1, 2, 3, 4, *out[:-1]]
    second = s.generate([1, 2, 3, 4, *out, 7, 8], params)
    second.run()
    assert second.cached_tokens == len(held)
    fresh = Session(LiteRunner(folder, max_len=64)).generate([1, 2, 3, 4, *out, 7, 8], params).run()
    assert second.tokens == fresh


def test_master_folder_is_refused_with_the_reason(tiny_folder):
    folder = tiny_folder("tiny", layout="master")
    assert not supported(folder)
    with pytest.raises(CheckpointError, match="online.*packed"):
        LiteRunner(folder)


def _messages(folder: Path) -> tuple[str, str]:
    with pytest.raises(CheckpointError) as a:
        checkpoint.load(folder)
    with pytest.raises(CheckpointError) as b:
        LiteRunner(folder)
    return str(a.value), str(b.value)


def _rewrite(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file
    f = folder / "model.safetensors"
    t = load_file(f)
    edit(t)
    save_file(t, f, metadata={"format": "pt"})


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit", [
    lambda t: t.update({Q0 + ".weight": t[Q0 + ".weight"].to(torch.float16)}),
    lambda t: t.pop(Q0 + ".weight_scale"),
    lambda t: t.update({Q0 + ".weight_scale": -t[Q0 + ".weight_scale"]}),
    lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:-3]}),
    lambda t: t.update({"model.extra.weight": torch.zeros(2)}),
], ids=["dtype", "missing-scale", "negative-scale", "vocab", "extra"])
def test_bad_folders_get_the_loaders_message(tiny_folder, edit):
    folder = tiny_folder("tiny")
    _rewrite(folder, edit)
    a, b = _messages(folder)
    assert a == b and str(folder) in a


def test_truncated_file(tiny_folder):
    folder = tiny_folder("tiny")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        LiteRunner(folder)


def test_cli_backend_lite_on_master_folder_is_a_clear_error(tiny_folder):
    from bitnet158.commands import common

    class Args:
        backend, device = "lite", "auto"

    with pytest.raises(ConfigError, match="--backend lite.*master weights"):
        common._lite(Args(), tiny_folder("tiny", layout="master"))


def test_cli_greedy_never_imports_torch(tiny_folder, tmp_path):
    """``bitnet158 generate`` on a packed folder, greedy, in a fresh process: the C engine without
    torch, the same text as the torch-side engine."""
    folder = tiny_folder("tiny", seed=6, tokenizer_dir=TOKENIZER)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    code = ("import sys; from bitnet158.cli import main; sys.argv = ['bitnet158', 'generate', sys.argv[1], "
            "'Once upon a time', '-n', '12', '--temperature', '0']; rc = main(); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    runs = {}
    for backend in ("auto", "cpu"):
        cmd = [sys.executable, "-c", code.replace("'0']", f"'0', '--backend', '{backend}']"), str(folder)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[backend] = r.stdout.splitlines()
    assert runs["auto"][-1] == "NO-TORCH 0" and runs["cpu"][-1] == "TORCH 0"
    assert runs["auto"][:-1] == runs["cpu"][:-1]


def test_cpu_runner_from_pretrained_reads_the_folder_directly(tiny_folder):
    """CpuRunner.from_pretrained on a packed folder skips the torch model: the same logits."""
    folder = tiny_folder("tiny", seed=8, dtype="bfloat16")
    direct = CpuRunner.from_pretrained(folder, batch=2, max_len=48, head="int8")
    via_model = CpuRunner(checkpoint.load(folder), batch=2, max_len=48, head="int8")
    tok, pos = (torch.from_numpy(a) for a in _inputs(direct.vocab_size))
    assert torch.equal(direct.prefill(tok, pos), via_model.prefill(tok, pos))


def test_head_from_the_environment(tiny_folder, monkeypatch):
    """No head given: BITNET158_CPU_HEAD decides; a bad value is a ConfigError naming the variable."""
    folder = tiny_folder("tiny", seed=9)
    monkeypatch.setenv("BITNET158_CPU_HEAD", "int8")
    assert LiteRunner(folder, max_len=16).head_kind == "int8"
    assert LiteRunner(folder, max_len=16, head="bf16").head_kind == "bf16"
    monkeypatch.setenv("BITNET158_CPU_HEAD", "fp8")
    with pytest.raises(ConfigError, match="BITNET158_CPU_HEAD='fp8'"):
        LiteRunner(folder, max_len=16)
