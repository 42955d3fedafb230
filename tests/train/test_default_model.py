"""The packaged default model: loads offline, matches its stored config, and writes non-degenerate text."""

import json
from pathlib import Path

import pytest
import torch

import bitnet158

FOLDER = Path(bitnet158.__file__).resolve().parent / "assets" / "default-model"
DISTINCT2_FLOOR = 0.5      # share of distinct token bigrams in a 40-token sampled answer


@pytest.mark.skipif(not (FOLDER / "model.safetensors").is_file(), reason="default model not installed")
def test_default_model_loads_and_generates_text():
    from bitnet158.engine import SamplingParams, generate
    from bitnet158.tokenizer import Tokenizer

    files = sum(f.stat().st_size for f in FOLDER.iterdir() if f.is_file())
    assert files <= 25 * 10**6
    cfg = json.loads((FOLDER / "config.json").read_text())
    model = bitnet158.load(FOLDER)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size) == \
        (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"])
    assert model.packed and cfg["quantization_config"]["quantization_mode"] == "offline"
    tok = Tokenizer.from_pretrained(FOLDER)
    assert tok.vocab_size == cfg["vocab_size"]
    ids = tok.encode_chat([{"role": "user", "content": "Tell me a story about a ship."}])
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = list(generate(model, ids, SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9,
                                                       repetition_penalty=1.15, seed=0, stop_ids=set())))
    finally:
        torch.set_num_threads(n)
    assert len(out) >= 20
    assert len(set(out)) > 1
    bigrams = list(zip(out, out[1:]))
    assert len(set(bigrams)) / len(bigrams) >= DISTINCT2_FLOOR
    text = tok.decode(out, skip_special=True)
    assert sum(ch.isalpha() for ch in text) > 40
