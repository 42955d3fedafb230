"""ModelConfig: named sizes, config.json round trips in the v4 and v5 spellings, and bad fields."""

import json

import pytest

from bitnet158.config import SIZES, ModelConfig
from bitnet158.errors import ConfigError
from bitnet158.random_model import PRESETS, random_config

# the released microsoft/bitnet-b1.58-2B-4T config.json (v4 spelling)
RELEASED_2B4T = {
    "architectures": ["BitNetForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "relu2", "hidden_size": 2560,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 4096,
    "model_type": "bitnet", "rms_norm_eps": 1e-05, "num_attention_heads": 20,
    "num_hidden_layers": 30, "num_key_value_heads": 5, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
    "quantization_config": {"linear_class": "autobitlinear", "quant_method": "bitnet",
                            "quantization_mode": "offline"},
}


def test_released_config_is_the_2b4t_size():
    cfg = ModelConfig.from_dict(RELEASED_2B4T)
    assert cfg == ModelConfig.from_name("2b4t")
    assert cfg.head_dim == 128
    assert (cfg.linear_class, cfg.quantization_mode, cfg.dtype) == ("autobitlinear", "offline", "bfloat16")


@pytest.mark.parametrize("name", [*SIZES, *PRESETS])
@pytest.mark.parametrize("spelling", ["v4", "v5"])
def test_round_trip(tmp_path, name, spelling):
    cfg = random_config(name)
    path = tmp_path / "config.json"
    cfg.to_json(path, spelling=spelling)
    d = json.loads(path.read_text())
    if spelling == "v4":
        assert "rope_theta" in d and "torch_dtype" in d and "rope_parameters" not in d
    else:
        assert d["rope_parameters"]["rope_theta"] == cfg.rope_theta and d["dtype"] == cfg.dtype
        assert "rope_theta" not in d and "torch_dtype" not in d
    assert ModelConfig.from_json(path) == cfg


def test_v5_spelling_read():
    d = {k: v for k, v in RELEASED_2B4T.items() if k not in ("rope_theta", "torch_dtype")}
    d.update(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, dtype="bfloat16")
    assert ModelConfig.from_dict(d) == ModelConfig.from_name("2b4t")


def test_values_come_from_the_file_not_transformers_defaults():
    d = dict(RELEASED_2B4T, max_position_embeddings=1234, tie_word_embeddings=False, rope_theta=1e4)
    cfg = ModelConfig.from_dict(d)
    assert (cfg.max_position_embeddings, cfg.tie_word_embeddings, cfg.rope_theta) == (1234, False, 1e4)


def test_quantization_block_defaults():
    no_block = {k: v for k, v in RELEASED_2B4T.items() if k != "quantization_config"}
    assert ModelConfig.from_dict(no_block).quantization_mode == "online"  # plain master weights
    bare = dict(RELEASED_2B4T, quantization_config={"quant_method": "bitnet"})
    cfg = ModelConfig.from_dict(bare)  # transformers' BitNetQuantConfig defaults
    assert (cfg.linear_class, cfg.quantization_mode) == ("bitlinear", "offline")


def test_torch_prefixed_dtype():
    assert ModelConfig.from_dict(dict(RELEASED_2B4T, torch_dtype="torch.float32")).dtype == "float32"


@pytest.mark.parametrize("change, words", [
    ({"quantization_config": {"quant_method": "gptq"}}, ["quant_method", "gptq"]),
    ({"quantization_config": {"quant_method": "bitnet", "linear_class": "foo"}}, ["linear_class", "foo"]),
    ({"quantization_config": {"quant_method": "bitnet", "quantization_mode": "lazy"}},
     ["quantization_mode", "lazy"]),
    ({"quantization_config": "bitnet"}, ["quantization_config"]),
    ({"model_type": "llama"}, ["model_type", "llama"]),
    ({"hidden_act": "silu"}, ["hidden_act", "silu"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads"]),
    ({"hidden_size": -1}, ["hidden_size"]),
    ({"vocab_size": "many"}, ["vocab_size"]),
    ({"torch_dtype": "int8"}, ["dtype", "int8"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope", "yarn"]),
])
def test_bad_fields_name_the_field(change, words):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(dict(RELEASED_2B4T, **change), source="some/config.json")
    msg = str(e.value)
    assert "some/config.json" in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_hidden_layers", "rope_theta",
                                   "max_position_embeddings"])
def test_missing_field(field):
    d = {k: v for k, v in RELEASED_2B4T.items() if k != field}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(d)


def test_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="unknown model size"):
        ModelConfig.from_name("7b")


def test_counts_and_derived():
    cfg = ModelConfig.from_name("2b4t")
    assert cfg.eos_token_ids == [128001]
    ternary = cfg.num_params(embedding=False) - cfg.num_hidden_layers * (3 * 2560 + 6912) - 2560
    assert abs(ternary - 2.084e9) < 0.01e9  # SPEC §6: 2.084 B ternary weights
    assert ModelConfig.from_name("tiny", eos_token_id=[1, 2]).eos_token_ids == [1, 2]
