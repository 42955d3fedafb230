"""HF folder -> GGUF -> bitnet158: identical ternary weights, scales and logits for every type;
the gguf package's reader sees llama.cpp's names, types, shapes and keys; the CLI both ways."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from bitnet158 import checkpoint
from bitnet158.convert import export_gguf, load_gguf, read_gguf, write_random_gguf
from bitnet158.convert.gguf_import import gguf_to_folder

from .conftest import TOK_TINY, tq_config

TOKENS = torch.tensor([[0, 5, 77, 300, 1, 42, 9, 511, 100, 7, 250, 519]])


def _projections_equal(a, b):
    for (na, ma), (nb, mb) in zip(a.projections(), b.projections()):
        assert na == nb
        assert torch.equal(ma.weight, mb.weight), na
        assert float(ma.weight_scale) == float(mb.weight_scale), na


@pytest.mark.parametrize("wtype", ["tq2_0", "tq1_0", "i2_s", "f16"])
def test_folder_roundtrip_identical(hf_folder, gguf_files, wtype):
    src = checkpoint.load(hf_folder, dtype="float32")
    got = load_gguf(gguf_files[wtype])
    # bf16 scales of the folder are exact in f16 (TQ/F16) and f32 (I2_S): nothing is rounded
    _projections_equal(src, got)
    for name, t in src.state_dict().items():
        assert torch.equal(t, got.state_dict()[name]), name
    with torch.no_grad():
        diff = (src(TOKENS) - got(TOKENS)).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("wtype", ["tq2_0", "tq1_0", "i2_s"])
def test_model_roundtrip_scale_rounding(packed_model, tmp_path, wtype):
    """fp32 scales: I2_S keeps them exactly, TQ types round them to f16 (the block's d)."""
    p = export_gguf(packed_model, tmp_path / "m.gguf", wtype=wtype, head="f32", tokenizer_dir=TOK_TINY)
    got = load_gguf(p)
    saved = [m.weight_scale.clone() for _, m in packed_model.projections()]
    try:
        for (_, m), (_, g) in zip(packed_model.projections(), got.projections()):
            assert torch.equal(m.weight, g.weight)
            want = m.weight_scale if wtype == "i2_s" else m.weight_scale.half().float()
            assert torch.equal(g.weight_scale, want)
            m.weight_scale.copy_(want)                 # compare like with like
            m.invalidate()
        with torch.no_grad():
            assert (packed_model(TOKENS) - got(TOKENS)).abs().max().item() <= 1e-4
    finally:
        for (_, m), s in zip(packed_model.projections(), saved):
            m.weight_scale.copy_(s)
            m.invalidate()


def test_gguf_reader_sees_llama_cpp_layout(gguf_files, hf_folder, tmp_path):
    import gguf

    cfg = tq_config()
    p = export_gguf(hf_folder, tmp_path / "q8.gguf", wtype="tq2_0", head="q8_0")
    r = gguf.GGUFReader(p)                              # the package's own reader
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 1 + 1 + cfg.num_hidden_layers * 11
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == T.Q8_0 and list(emb.shape) == [256, 520]
    assert "output.weight" not in tensors                # tied head
    for name, shape in (("blk.0.attn_q.weight", [256, 256]), ("blk.0.attn_k.weight", [256, 128]),
                        ("blk.1.attn_v.weight", [256, 128]), ("blk.1.attn_output.weight", [256, 256]),
                        ("blk.0.ffn_gate.weight", [256, 512]), ("blk.0.ffn_up.weight", [256, 512]),
                        ("blk.1.ffn_down.weight", [512, 256])):
        assert tensors[name].tensor_type == T.TQ2_0 and list(tensors[name].shape) == shape, name
    for name, n in (("blk.0.attn_norm.weight", 256), ("blk.0.attn_sub_norm.weight", 256),
                    ("blk.1.ffn_norm.weight", 256), ("blk.1.ffn_sub_norm.weight", 512),
                    ("output_norm.weight", 256)):
        assert tensors[name].tensor_type == T.F32 and list(tensors[name].shape) == [n], name
    f = {k: v.contents() for k, v in r.fields.items()}
    expect = {"general.architecture": "bitnet", "general.file_type": 37,
              "bitnet.block_count": 2, "bitnet.context_length": 128, "bitnet.embedding_length": 256,
              "bitnet.feed_forward_length": 512, "bitnet.attention.head_count": 4,
              "bitnet.attention.head_count_kv": 2, "bitnet.rope.dimension_count": 64,
              "bitnet.rope.freq_base": 10000.0, "bitnet.hidden_activation": "relu2",
              "bitnet158.weight_scale": "multiplier", "tokenizer.ggml.model": "gpt2",
              "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 0,
              "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.eot_token_id": 4,
              "tokenizer.ggml.add_bos_token": True}
    for k, v in expect.items():
        assert f[k] == v, k
    assert f["bitnet.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert len(f["tokenizer.ggml.tokens"]) == 520 and f["tokenizer.ggml.tokens"][4] == "<|eot_id|>"
    assert f["tokenizer.ggml.token_type"][0] == 3 and f["tokenizer.ggml.token_type"][300] == 1 
    assert f["tokenizer.ggml.token_type"][519] == 5      # padding row
    assert "Assistant: " in f["tokenizer.chat_template"]
    # I2_S files carry bitnet.cpp's architecture and type id 36 (unknown to the package: our reader)
    g = read_gguf(gguf_files["i2_s"])
    assert g.arch == "bitnet-b1.58" and g.fields["general.file_type"] == 40
    assert g.tensors["blk.0.ffn_down.weight"].tensor_type == 36
    assert g.tensors["blk.0.ffn_down.weight"].n_bytes == 512 * 256 // 4 + 32


def test_tokenizer_roundtrip(gguf_files, tmp_path):
    from bitnet158.tokenizer import Tokenizer

    a = Tokenizer.from_pretrained(TOK_TINY)
    g = read_gguf(gguf_files["tq2_0"])
    b = Tokenizer.from_pretrained(g.vocab.save_folder(tmp_path / "tok", "x"))
    for text in ("Hello world!", "  spaces\tand\nnewlines  ", "Ünïcödé 123456 don't", ""):
        assert a.encode(text) == b.encode(text), text
    msgs = [{"role": "user", "content": "How are you?"}]
    assert a.encode_chat(msgs) == b.encode_chat(msgs)
    assert (b.bos_id, b.eos_id, b.eot_id) == (0, 1, 4)


def test_gguf_to_folder_and_cli(gguf_files, hf_folder, tmp_path, capsys):
    from bitnet158.cli import main

    out = gguf_to_folder(gguf_files["tq1_0"], tmp_path / "back", dtype="float32")
    _projections_equal(checkpoint.load(hf_folder, dtype="float32"), checkpoint.load(out, dtype="float32"))
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    assert main(["convert", str(hf_folder), str(tmp_path / "c.gguf"), "--type", "tq1_0", "--head", "q6_k"]) == 0
    assert read_gguf(tmp_path / "c.gguf").tensors["token_embd.weight"].tensor_type == T.Q6_K
    assert main(["load", str(tmp_path / "c.gguf"), "--info"]) == 0
    assert "TQ1_0" in capsys.readouterr().out
    assert main(["load", str(tmp_path / "c.gguf"), "--out", str(tmp_path / "c-hf")]) == 0
    assert checkpoint.load(tmp_path / "c-hf").config.num_hidden_layers == 2
    assert main(["convert", str(tmp_path / "only-one.gguf")]) == 1          # missing OUT
    assert "expected MODEL and OUT.gguf" in capsys.readouterr().err


@pytest.mark.parametrize("wtype", ["tq2_0", "tq1_0", "i2_s", "f16"])
def test_random_generator(tmp_path, wtype):
    cfg = tq_config(num_hidden_layers=1)
    p = write_random_gguf(tmp_path / "r.gguf", cfg, wtype=wtype, head="q8_0", tokenizer_dir=TOK_TINY)
    g = read_gguf(p)
    assert g.config.hidden_size == 256 and g.config.vocab_size == 520 and g.vocab is not None
    m = load_gguf(p)
    w = m.model.layers[0].mlp.down_proj.ternary()
    frac0 = (w == 0).float().mean().item()
    assert 0.25 < frac0 < 0.6                           # random codes, not all one value
    gammas = {float(mod.weight_scale) for _, mod in m.projections()}
    assert len(gammas) > 1                              # scales differ per projection kind
    with torch.no_grad():
        assert torch.isfinite(m(TOKENS)).all()


@pytest.mark.parametrize("layout", ["master", "bitlinear"])
def test_other_folder_layouts(tmp_path, layout):
    """Latent (online) folders are ternarized at export; inverse-scale (bitlinear) folders are
    written with the multiplier: the GGUF model equals the folder's, scales rounded to f16."""
    from bitnet158.random_model import write_random_folder

    folder = write_random_folder(tmp_path / layout, tq_config(num_hidden_layers=1), layout=layout,
                                 seed=7, tokenizer_dir=TOK_TINY, dtype="float32")
    src = checkpoint.load(folder, dtype="float32")
    got = load_gguf(export_gguf(folder, tmp_path / "m.gguf", wtype="tq2_0"))
    for (_, a), (_, b) in zip(src.projections(), got.projections()):
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(b.weight_scale, a.weight_scale.half().float())
        a.weight_scale.copy_(b.weight_scale)
        a.invalidate()
    with torch.no_grad():
        assert (src(TOKENS) - got(TOKENS)).abs().max().item() <= 1e-4
