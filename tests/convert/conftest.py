"""Fixtures of the GGUF tests: a tiny random BitNet folder whose row lengths fit TQ blocks (256),
with the tiny tokenizer asset, plus helpers to rewrite GGUF files into malformed ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

from bitnet158.config import ModelConfig  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOK_TINY = ASSETS / "tokenizer-tiny"
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
LLAMA3_RANKS = SHARED / "data" / "llama3-tokenizer" / "tokenizer.model"

# every row length (hidden 256, heads*head_dim 256, ffn 512) is a multiple of 256; the tiny
# tokenizer has 512 ids (specials 0..4), so rows 512..519 are padding
TQ_CFG = dict(vocab_size=520, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rope_theta=10000.0, bos_token_id=0, eos_token_id=1, dtype="float32")


def tq_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TQ_CFG, **overrides})


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    """A packed Hugging Face folder (bf16 scales, as released) with the tiny tokenizer."""
    from bitnet158.random_model import write_random_folder

    out = tmp_path_factory.mktemp("gguf") / "tiny-hf"
    return write_random_folder(out, tq_config(), layout="packed", seed=3, tokenizer_dir=TOK_TINY,
                               dtype="float32")


@pytest.fixture(scope="session")
def packed_model():
    """An in-memory packed model whose scales are fp32 (not bf16-rounded)."""
    from bitnet158.random_model import random_model

    return random_model(tq_config(), seed=5).pack()


@pytest.fixture(scope="session")
def gguf_files(hf_folder, tmp_path_factory) -> dict[str, Path]:
    """The folder exported once per weight type (head f16)."""
    from bitnet158.convert import export_gguf

    d = tmp_path_factory.mktemp("gguf-files")
    return {t: export_gguf(hf_folder, d / f"tiny-{t}.gguf", wtype=t, head="f16")
            for t in ("tq2_0", "tq1_0", "i2_s", "f16")}


def rewrite(src: Path, dst: Path, arch: str | None = None, drop_keys=(), set_keys: dict | None = None,
            tensors: dict | None = None, drop_tensors=(), add_tensors: dict | None = None) -> Path:
    """Copy a GGUF file with changes: metadata keys dropped/set, tensors replaced by
    ``{name: (numpy array, ggml type)}`` (uint8 data for quantized types), dropped or added."""
    import gguf

    from bitnet158.convert.gguf_import import _Reader

    r = _Reader(src)
    w = gguf.GGUFWriter(dst, arch or r.values["general.architecture"])
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in drop_keys:
            continue
        v = r.values[k]
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            w.add_array(k, v)
        else:
            w.add_key_value(k, v, t)
    for k, v in (set_keys or {}).items():
        w.add_key_value(k, v, gguf.GGUFValueType.STRING if isinstance(v, str) else gguf.GGUFValueType.UINT32)
    tensors = tensors or {}
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.name in tensors:
            data, gt = tensors[t.name]
            if data.dtype != np.uint8:                  # float data: its own shape
                shape = data.shape
        else:
            data, gt = np.asarray(t.data), t.tensor_type
        w.add_tensor_info(t.name, shape, np.dtype(np.float32), data.nbytes, raw_dtype=gt)
        tensors[t.name] = (data, gt)
    for name, (data, gt) in (add_tensors or {}).items():
        w.add_tensor_info(name, data.shape, np.dtype(np.float32), data.nbytes, raw_dtype=gt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        if t.name not in drop_tensors:
            w.write_tensor_data(np.ascontiguousarray(tensors[t.name][0]))
    for data, _ in (add_tensors or {}).values():
        w.write_tensor_data(np.ascontiguousarray(data))
    w.close()
    return dst
