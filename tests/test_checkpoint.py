"""Checkpoint folders: round trips of the three layouts, shards, atomic saves, hub resolution, and
a clear error (type + the file/tensor/field named) for every kind of bad input."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet158 import checkpoint, quant
from bitnet158.errors import CheckpointError, ConfigError
from bitnet158.layers import BitLinear, PackedLinear
from bitnet158.random_model import random_config, random_model

Q0 = "model.layers.0.self_attn.q_proj"
pytestmark = pytest.mark.usefixtures("one_thread")


def tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def rewrite(folder, fn):
    """Apply fn to the folder's {name: tensor} and write it back."""
    t = tensors(folder)
    fn(t)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_config(folder, fn):
    d = json.loads((folder / "config.json").read_text())
    fn(d)
    (folder / "config.json").write_text(json.dumps(d))


# ------------------------------------------------------------------ round trips

def test_packed_file_is_the_released_layout(tiny_folder):
    folder = tiny_folder("tiny", "packed")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                          "quantization_mode": "offline"}
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    t = tensors(folder)
    assert "lm_head.weight" not in t
    assert t[Q0 + ".weight"].dtype == torch.uint8 and t[Q0 + ".weight"].shape == (16, 64)
    assert t[Q0 + ".weight_scale"].dtype == torch.bfloat16 and t[Q0 + ".weight_scale"].shape == (1,)
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 1


def test_scale_is_the_absmean_multiplier(tmp_path):
    model = random_model("tiny", seed=3)
    checkpoint.save(model, tmp_path / "m")
    t = tensors(tmp_path / "m")
    for prefix, mod in model.projections():
        w_t, gamma = quant.ternarize(mod.weight)
        assert torch.equal(quant.unpack_hf(t[prefix + ".weight"]), w_t)
        assert t[prefix + ".weight_scale"].item() == gamma.to(torch.bfloat16).item()


@pytest.mark.parametrize("layout", ["packed", "master", "bitlinear"])
def test_load_save_round_trip_is_lossless(tiny_folder, tmp_path, layout):
    folder = tiny_folder("parity-gqa4", layout)  # untied head, 3 layers, fp32 config
    model = checkpoint.load(folder, packed=layout != "master")
    out = checkpoint.save(model, tmp_path / "again", layout=layout)
    a, b = tensors(folder), tensors(out)
    assert a.keys() == b.keys() and "lm_head.weight" in a
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_loaded_model_types_and_dtypes(tiny_folder):
    folder = tiny_folder("tiny", "packed")
    m = checkpoint.load(folder)
    assert m.dtype == torch.bfloat16 and not m.training and m.packed
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, PackedLinear) and q.weight_scale.dtype == torch.float32
    assert q.weight_scale.item() == tensors(folder)[Q0 + ".weight_scale"].item()  # bf16 value exactly
    assert not any(p.requires_grad for p in m.parameters())
    assert m.rope_cos.dtype == torch.float32 and not m.rope_cos.is_meta
    m32 = checkpoint.load(folder, dtype="float32")
    assert m32.dtype == torch.float32 and m32.model.norm.weight.dtype == torch.float32


def test_master_loads_packed_or_trainable(tiny_folder):
    folder = tiny_folder("tiny", "master", seed=2)
    src = random_model("tiny", seed=2)
    train = checkpoint.load(folder, dtype=torch.float32, packed=False)
    q = train.model.layers[0].self_attn.q_proj
    assert isinstance(q, BitLinear) and q.weight.requires_grad
    assert torch.equal(q.weight, src.model.layers[0].self_attn.q_proj.weight)  # bf16-exact latents
    packed = checkpoint.load(folder, dtype=torch.float32)
    w_t, gamma = quant.ternarize(q.weight)
    pq = packed.model.layers[0].self_attn.q_proj
    assert torch.equal(pq.ternary(), w_t) and pq.weight_scale.item() == gamma.item()
    t = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same math, different float order: exact up to activation-rounding ties
        torch.testing.assert_close(train(t), packed(t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["packed", "bitlinear"])
def test_packed_to_latents(tiny_folder, layout):
    folder = tiny_folder("tiny", layout)
    packed = checkpoint.load(folder, dtype=torch.float32)
    latent = checkpoint.load(folder, dtype=torch.float32, packed=False)
    for (_, p), (_, l) in zip(packed.projections(), latent.projections()):
        w_t, gamma = quant.ternarize(l.weight)  # latents W_t * gamma ternarize back to the file
        assert torch.equal(w_t, p.ternary())
        torch.testing.assert_close(gamma.reshape(1), p.weight_scale, rtol=1e-6, atol=0)
    t = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the training forward of the latents is the packed model
        torch.testing.assert_close(latent(t), packed(t), rtol=1e-4, atol=1e-4)


def test_bitlinear_inverse_scale_converted(tiny_folder):
    a = checkpoint.load(tiny_folder("tiny", "packed"), dtype=torch.float32)
    b = checkpoint.load(tiny_folder("tiny", "bitlinear"), dtype=torch.float32)
    raw = tensors(tiny_folder("tiny", "bitlinear"))
    for (name, pa), (_, pb) in zip(a.projections(), b.projections()):
        assert torch.equal(pa.weight, pb.weight)
        assert raw[name + ".weight_scale"].item() > 1  # stored 1/mean|W|
        torch.testing.assert_close(pa.weight_scale, pb.weight_scale, rtol=1e-2, atol=0)


def test_sharded_and_v5(tiny_folder):
    one = tiny_folder("tiny", "packed")
    many = tiny_folder("tiny", "packed", max_shard_bytes=20_000, spelling="v5")
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (many / "model.safetensors").exists()
    assert "rope_parameters" in json.loads((many / "config.json").read_text())
    a, b = checkpoint.load(one).state_dict(), checkpoint.load(many).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg, raw = checkpoint.load_state(many)
    assert cfg.num_hidden_layers == 2 and Q0 + ".weight_scale" in raw
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in raw.values())


def test_tokenizer_files_and_eot(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 7, "content": "<|eot_id|>"}]}))
    (tok / "tokenizer_config.json").write_text("{}")
    out = checkpoint.save(random_model("tiny"), tmp_path / "m", tokenizer_dir=tok)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 7]
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        checkpoint.save(random_model("tiny"), tmp_path / "n", tokenizer_dir=tmp_path)


def test_save_errors(tmp_path):
    packed = random_model("tiny").pack()
    with pytest.raises(CheckpointError, match="master.*packed"):
        checkpoint.save(packed, tmp_path / "m", layout="master")
    with pytest.raises(CheckpointError, match="layout"):
        checkpoint.save(packed, tmp_path / "m", layout="gguf")
    assert not (tmp_path / "m").exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "m"
    checkpoint.save(random_model("tiny", seed=1), target)
    before = tensors(target)
    from bitnet158 import safetensors_io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_weights", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(random_model("tiny", seed=2), target)
    monkeypatch.setattr(checkpoint, "write_weights", safetensors_io.write_weights)
    after = tensors(target)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind
    checkpoint.save(random_model("tiny", seed=2), target)  # a model folder is replaced
    assert not torch.equal(tensors(target)[Q0 + ".weight"], before[Q0 + ".weight"])
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700
    assert all((f.stat().st_mode & 0o777) == 0o666 & ~umask for f in target.iterdir())
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a model folder"):
        checkpoint.save(random_model("tiny"), other)
    assert (other / "todo.txt").read_text() == "keep me"


# ------------------------------------------------------------------ resolve

def test_resolve_local(tiny_folder, tmp_path):
    folder = tiny_folder("tiny")
    assert checkpoint.resolve(folder) == folder
    assert checkpoint.resolve(str(folder / "config.json")) == folder
    with pytest.raises(CheckpointError, match="no such model folder"):
        checkpoint.resolve(tmp_path / "absent" / "deeper" / "x")


def test_resolve_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        checkpoint.resolve("nobody-here/not-a-model-xyz")
    assert "nobody-here/not-a-model-xyz" in str(e.value) and "local folder" in str(e.value)


def test_resolve_hub_calls_snapshot_download(monkeypatch, tiny_folder):
    import huggingface_hub

    folder = tiny_folder("tiny")
    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(folder)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert checkpoint.resolve("microsoft/bitnet-b1.58-2B-4T", revision="main") == folder
    assert seen["repo_id"] == "microsoft/bitnet-b1.58-2B-4T" and seen["revision"] == "main"
    pats = seen["allow_patterns"]
    assert "*.safetensors" in pats and "config.json" in pats and "tokenizer.json" in pats
    assert not any(p.endswith((".bin", ".pt", ".pth", "*")) and p != "*.safetensors" and
                   not p.startswith("LICENSE") for p in pats)

    def no_network(repo_id, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CheckpointError, match="could not fetch 'microsoft/x'.*ConnectionError.*local folder"):
        checkpoint.load("microsoft/x")


# ------------------------------------------------------------------ bad input

def test_missing_config(tiny_folder):
    folder = tiny_folder("tiny")
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"missing config\.json"):
        checkpoint.load(folder)


def test_missing_weights(tmp_path, tiny_folder):
    folder = tiny_folder("tiny")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights.*model\.safetensors"):
        checkpoint.load(folder)


def test_pickle_refused_never_opened(tiny_folder, monkeypatch):
    import pickle

    def never(*a, **k):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    folder = tiny_folder("tiny")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(folder)
    assert "pytorch_model.bin" in str(e.value) and "pickle" in str(e.value)
    assert "safetensors" in str(e.value)
    for name in ("model.pt", "weights.pth", "last.ckpt"):
        (folder / name).write_bytes(b"\x80\x04")
        with pytest.raises(CheckpointError, match=rf"{name}.*never loaded"):
            checkpoint.load(folder / name)


@pytest.mark.parametrize("q, field", [
    ({"quant_method": "awq", "linear_class": "autobitlinear"}, "quant_method"),
    ({"quant_method": "bitnet", "linear_class": "ternarylinear"}, "linear_class"),
    ({"quant_method": "bitnet", "quantization_mode": "dynamic"}, "quantization_mode"),
    ({"quant_method": "bitnet", "linear_class": "autobitlinear", "use_rms_norm": True}, "use_rms_norm"),
])
def test_unknown_quantization_config(tiny_folder, q, field):
    folder = tiny_folder("tiny")
    edit_config(folder, lambda d: d.update(quantization_config=q))
    with pytest.raises(ConfigError) as e:
        checkpoint.load(folder)
    assert field in str(e.value) and "config.json" in str(e.value)


def test_wrong_dtype_of_packed_weight(tiny_folder):
    folder = tiny_folder("tiny")
    rewrite(folder, lambda t: t.update({Q0 + ".weight": t[Q0 + ".weight"].to(torch.float16)}))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(folder)
    msg = str(e.value)
    assert "model.safetensors" in msg and Q0 + ".weight" in msg and "uint8" in msg and "float16" in msg


def test_wrong_packed_shape(tiny_folder):
    folder = tiny_folder("tiny")
    rewrite(folder, lambda t: t.update({Q0 + ".weight": torch.zeros(64, 64, dtype=torch.uint8)}))
    with pytest.raises(CheckpointError, match=rf"{Q0}\.weight.*\[64, 64\].*\[16, 64\]"):
        checkpoint.load(folder)


def test_float_weight_with_offline_config(tiny_folder):
    folder = tiny_folder("tiny", "master")
    edit_config(folder, lambda d: d["quantization_config"].update(quantization_mode="offline"))
    with pytest.raises(CheckpointError, match=rf"{Q0}\.weight.*expected uint8.*online"):
        checkpoint.load(folder)


def test_packed_weight_with_online_config(tiny_folder):
    folder = tiny_folder("tiny", "packed")
    edit_config(folder, lambda d: d["quantization_config"].update(quantization_mode="online"))
    with pytest.raises(CheckpointError, match=rf"{Q0}\.weight.*packed uint8.*online"):
        checkpoint.load(folder)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.ffn_sub_norm.weight", Q0 + ".weight",
                                  "model.embed_tokens.weight"])
def test_missing_tensor(tiny_folder, name):
    folder = tiny_folder("tiny")
    rewrite(folder, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{name}'"):
        checkpoint.load(folder)


@pytest.mark.parametrize("layout, convention", [("packed", "autobitlinear.*multiplier"),
                                                ("bitlinear", "bitlinear.*divisor")])
def test_missing_or_bad_scale_names_convention(tiny_folder, layout, convention):
    folder = tiny_folder("tiny", layout)
    rewrite(folder, lambda t: t.pop(Q0 + ".weight_scale"))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{Q0}\.weight_scale'.*{convention}"):
        checkpoint.load(folder)
    folder = tiny_folder("tiny", layout)
    rewrite(folder, lambda t: t.update({Q0 + ".weight_scale": torch.tensor([-1.0])}))
    with pytest.raises(CheckpointError, match=rf"{Q0}\.weight_scale.*positive.*{convention}"):
        checkpoint.load(folder)


def test_unexpected_tensor(tiny_folder):
    folder = tiny_folder("tiny")
    rewrite(folder, lambda t: t.update({"model.layers.2.input_layernorm.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected tensor 'model\.layers\.2"):
        checkpoint.load(folder)
    folder = tiny_folder("tiny", "master")
    rewrite(folder, lambda t: t.update({Q0 + ".weight_scale": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*weight_scale.*online"):
        checkpoint.load(folder)


def test_tied_lm_head_is_ignored_with_a_warning(tiny_folder):
    folder = tiny_folder("tiny")
    rewrite(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    with pytest.warns(UserWarning, match="lm_head.weight"):
        m = checkpoint.load(folder)
    assert not hasattr(m, "lm_head")


def test_old_rotary_buffers_are_ignored(tiny_folder):
    folder = tiny_folder("tiny")
    rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    cfg, raw = checkpoint.load_state(folder)
    assert not any(k.endswith("inv_freq") for k in raw)
    checkpoint.load(folder)


def test_vocab_mismatch(tiny_folder):
    folder = tiny_folder("tiny")
    edit_config(folder, lambda d: d.update(vocab_size=600))
    with pytest.raises(CheckpointError, match=r"embed_tokens\.weight.*512 rows.*vocab_size is 600"):
        checkpoint.load(folder)


def test_truncated_file(tiny_folder):
    folder = tiny_folder("tiny")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        checkpoint.load(folder)
    f.write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        checkpoint.load(folder)


def test_broken_index(tiny_folder):
    folder = tiny_folder("tiny", max_shard_bytes=20_000)
    index = folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    shard = d["weight_map"][Q0 + ".weight"]
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json.*{shard}.*missing"):
        checkpoint.load(folder)
    folder = tiny_folder("tiny", max_shard_bytes=20_000)
    index = folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["model.extra.weight"] = d["weight_map"][Q0 + ".weight"]
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"index\.json.*'model\.extra\.weight'.*does not hold"):
        checkpoint.load(folder)
    d["weight_map"] = {"x": "../../etc/passwd"}
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="not a shard file name"):
        checkpoint.load(folder)


def test_bad_dtype_argument(tiny_folder):
    with pytest.raises(ConfigError, match="int8"):
        checkpoint.load(tiny_folder("tiny"), dtype="int8")


def test_random_packed_model_fast_path():
    from bitnet158.random_model import random_packed_model

    cfg = random_config("tiny")
    a, b = random_packed_model(cfg, seed=4), random_packed_model(cfg, seed=4)
    assert a.packed and a.dtype == torch.bfloat16
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # deterministic per seed
    w = a.model.layers[0].mlp.down_proj.ternary()
    assert set(w.unique().tolist()) == {-1, 0, 1}
    with torch.no_grad(), warnings.catch_warnings():
        out = a(torch.randint(0, cfg.vocab_size, (1, 5)))
    assert out.shape == (1, 5, cfg.vocab_size) and torch.isfinite(out).all()
