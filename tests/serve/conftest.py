"""Fixtures of the server tests: a tiny random model folder and a live server on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from bitnet158.config import ModelConfig
from bitnet158.model import Transformer, init_weights

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOKENIZER = ASSETS / "tokenizer-tiny"
MODEL_ID = "tiny-test"


def tiny_model(seed: int = 0) -> Transformer:
    """fp32 tiny model whose logits are peaked enough to give varied, non-trivial text."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", vocab_size=512, bos_token_id=0, eos_token_id=1, dtype="float32")
    return init_weights(Transformer(cfg), std=0.3).eval()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    from bitnet158.checkpoint import save
    path = tmp_path_factory.mktemp("serve") / "tiny-test"
    save(tiny_model(), path, layout="packed", tokenizer_dir=TOKENIZER, dtype="float32")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(base: str, proc=None, timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            get_json(base + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def wait_idle(base: str, timeout: float = 20.0) -> dict:
    """Poll /health until no row is busy and nothing is queued; return the last health body."""
    t0 = time.monotonic()
    h = {}
    while time.monotonic() - t0 < timeout:
        h = get_json(base + "/health")
        if h["active"] == 0 and h["queued"] == 0:
            return h
        time.sleep(0.05)
    return h


@pytest.fixture(scope="session")
def server(tiny_folder):
    """`bitnet158 serve` in a subprocess on 127.0.0.1:<free port>; yields (base_url, Popen)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bitnet158.cli", "serve", str(tiny_folder), "--host", "127.0.0.1",
         "--port", str(port), "--model-name", MODEL_ID, "--max-batch", "8", "--max-queue", "64",
         "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


class ThreadServer:
    """uvicorn in a thread of this process (direct access to the app's engine)."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_healthy(self.base, timeout=30)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
