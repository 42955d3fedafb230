"""Malformed or unsupported GGUF files and unexportable shapes give errors naming the file and the
key or tensor at fault."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from bitnet158.convert import export_gguf, load_gguf, read_gguf
from bitnet158.convert.tq import pack_tq2_0
from bitnet158.errors import CheckpointError, ConfigError

from .conftest import rewrite


def test_not_gguf_and_truncated(gguf_files, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf file at all" * 4)
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF file"):
        read_gguf(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        read_gguf(tmp_path / "missing.gguf")
    data = gguf_files["tq2_0"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: .*tensor 'output_norm.weight'.*truncated"):
        read_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:3000])                       # ends inside the vocabulary
    with pytest.raises(CheckpointError, match=r"head\.gguf: not a readable GGUF file"):
        read_gguf(head)


def test_wrong_arch_and_missing_keys(gguf_files, tmp_path):
    src = gguf_files["tq2_0"]
    with pytest.raises(ConfigError, match=r"general.architecture='llama' is not a BitNet architecture"):
        read_gguf(rewrite(src, tmp_path / "llama.gguf", arch="llama"))
    with pytest.raises(ConfigError, match=r"missing metadata key bitnet.block_count"):
        read_gguf(rewrite(src, tmp_path / "nokey.gguf", drop_keys=("bitnet.block_count",)))
    with pytest.raises(ConfigError, match="bitnet158.weight_scale='divisor'"):
        read_gguf(rewrite(src, tmp_path / "div.gguf", drop_keys=("bitnet158.weight_scale",),
                          set_keys={"bitnet158.weight_scale": "divisor"}))
    with pytest.raises(CheckpointError, match="missing tensor blk.1.ffn_up.weight"):
        load_gguf(rewrite(src, tmp_path / "notensor.gguf", drop_tensors=("blk.1.ffn_up.weight",)))


def test_unsupported_and_non_ternary_tensors(gguf_files, tmp_path):
    src = gguf_files["tq2_0"]
    name = "blk.0.attn_q.weight"
    x = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    q8 = rewrite(src, tmp_path / "q8.gguf", tensors={name: (quants.quantize(x, T.Q8_0), T.Q8_0)})
    with pytest.raises(CheckpointError, match=rf"q8\.gguf: tensor {name} has type Q8_0; ternary"):
        load_gguf(q8)
    f16 = rewrite(src, tmp_path / "f16.gguf", tensors={name: (x.astype(np.float16), T.F16)})
    with pytest.raises(CheckpointError, match=rf"tensor {name} is a float tensor whose values are not"):
        load_gguf(f16)
    w = np.random.default_rng(1).integers(-1, 2, (256, 256)).astype(np.int8)
    two = pack_tq2_0(w, 0.5)
    two[128:, -2:] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)   # other blocks, other d
    with pytest.raises(CheckpointError, match=rf"tensor {name} blocks carry 2 different scales"):
        load_gguf(rewrite(src, tmp_path / "two.gguf", tensors={name: (two, T.TQ2_0)}))
    unknown = rewrite(src, tmp_path / "unk.gguf", tensors={name: (pack_tq2_0(w, 0.5), 99)})
    with pytest.raises(CheckpointError, match=rf"tensor {name} has ggml type id 99"):
        load_gguf(unknown)
    shape = rewrite(src, tmp_path / "shape.gguf",
                    tensors={"blk.0.ffn_sub_norm.weight": (np.ones(256, np.float32), T.F32)})
    with pytest.raises(CheckpointError, match=r"blk.0.ffn_sub_norm.weight has shape \[256\], expected \[512\]"):
        load_gguf(shape)
    extra = rewrite(src, tmp_path / "extra.gguf",
                    add_tensors={"blk.2.attn_norm.weight": (np.ones(256, np.float32), T.F32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) blk.2.attn_norm.weight for a 2-layer"):
        read_gguf(extra)


def test_export_shape_errors(tmp_path):
    from bitnet158.config import ModelConfig
    from bitnet158.model import Transformer

    m = Transformer(ModelConfig.from_name("tiny", dtype="float32")).pack()   # hidden 64, ffn 160
    with pytest.raises(ConfigError, match=r"blk.0.attn_q.weight: row length 64 is not a multiple of 256.*i2_s"):
        export_gguf(m, tmp_path / "t.gguf", wtype="tq2_0")
    with pytest.raises(ConfigError, match=r"row length 64 is not a multiple of 128.*f16"):
        export_gguf(m, tmp_path / "t.gguf", wtype="i2_s")
    with pytest.raises(ConfigError, match="token_embd.weight: row length 64 is not a multiple of 256"):
        export_gguf(m, tmp_path / "t.gguf", wtype="f16", head="q6_k")
    assert not (tmp_path / "t.gguf").exists() and not (tmp_path / "t.gguf.tmp").exists()
    p = export_gguf(m, tmp_path / "ok.gguf", wtype="f16", head="q8_0")      # f16 fits any shape
    assert load_gguf(p).config.hidden_size == 64 and read_gguf(p).vocab is None


def test_unsupported_tokenizer_keeps_weights(gguf_files, tmp_path):
    p = rewrite(gguf_files["tq2_0"], tmp_path / "spm.gguf", drop_keys=("tokenizer.ggml.model",),
                set_keys={"tokenizer.ggml.model": "llama"})
    with pytest.warns(UserWarning, match=r"tokenizer.ggml.model='llama' is not supported.*without a tokenizer"):
        g = read_gguf(p)
    assert g.vocab is None and (g.config.bos_token_id, g.config.eos_token_id) == (0, 1)
    with pytest.warns(UserWarning, match="without a tokenizer"):
        assert load_gguf(p).config.num_hidden_layers == 2
