"""ModelConfig: the shape of a BitNet b1.58 model, named sizes, and config.json in and out.

    cfg = ModelConfig.from_name("2b4t")
    cfg = ModelConfig.from_json("path/to/config.json")   # v4 (rope_theta, torch_dtype) or v5
    cfg.to_dict()                                        # what `save` writes

Every value is read from the file: transformers' own BitNet defaults differ (2048 positions,
untied head), so nothing missing is filled from them silently except fields with one sane value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

LINEAR_CLASSES = ("autobitlinear", "bitlinear")
QUANT_MODES = ("offline", "online")


@dataclass
class ModelConfig:
    vocab_size: int = 128256
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int = 5
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = True
    bos_token_id: int = 128000
    eos_token_id: int | list[int] = 128001
    pad_token_id: int | None = None
    hidden_act: str = "relu2"
    dtype: str = "bfloat16"
    # quantization_config of the checkpoint (SPEC §3)
    linear_class: str = "autobitlinear"
    quantization_mode: str = "offline"
    head_dim_override: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return list(e) if isinstance(e, (list, tuple)) else [e]

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count (tied head counted once)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q = self.num_attention_heads * hd
        kv = self.num_key_value_heads * hd
        per_layer = 2 * d * q + 2 * d * kv + 3 * d * f + 3 * d + f  # 7 linears + 4 norms
        n = self.num_hidden_layers * per_layer + d
        if embedding:
            n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return n

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is impossible or unsupported."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.hidden_act not in ("relu2",):
            raise ConfigError(f"config field 'hidden_act'={self.hidden_act!r} is not supported "
                              "(BitNet b1.58 uses 'relu2')")
        if self.linear_class not in LINEAR_CLASSES:
            raise ConfigError(f"quantization_config.linear_class={self.linear_class!r} is not one of "
                              f"{LINEAR_CLASSES}")
        if self.quantization_mode not in QUANT_MODES:
            raise ConfigError(f"quantization_config.quantization_mode={self.quantization_mode!r} is "
                              f"not one of {QUANT_MODES}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"config field 'dtype'={self.dtype!r} is not bfloat16/float16/float32")

    # ------------------------------------------------------------------ named sizes
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in SIZES:
            raise ConfigError(f"unknown model size {name!r}; known: {', '.join(SIZES)}")
        return cls(**{**SIZES[name], **overrides})

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ config.json
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config dict (v4 or v5 spelling). ``source`` names the file in errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        mt = d.get("model_type")
        if mt not in (None, "bitnet"):
            raise ConfigError(f"{source}: model_type={mt!r}, expected 'bitnet'")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        kw: dict[str, Any] = {k: d[k] for k in required}
        kw["num_key_value_heads"] = d.get("num_key_value_heads", d["num_attention_heads"])
        for k in ("max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
                  "eos_token_id", "pad_token_id", "hidden_act"):
            if k in d and d[k] is not None:
                kw[k] = d[k]
        if "max_position_embeddings" not in d:
            raise ConfigError(f"{source}: missing field max_position_embeddings")
        if "tie_word_embeddings" not in d:
            kw["tie_word_embeddings"] = True  # every BitNet b1.58 release ties; say so explicitly
        # RoPE theta: v4 top-level `rope_theta`, v5 `rope_parameters.rope_theta`
        rp = d.get("rope_parameters") or d.get("rope_scaling")
        if isinstance(rp, dict) and rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
            raise ConfigError(f"{source}: rope type {rp.get('rope_type', rp.get('type'))!r} is not supported")
        if "rope_theta" in d:
            kw["rope_theta"] = float(d["rope_theta"])
        elif isinstance(rp, dict) and "rope_theta" in rp:
            kw["rope_theta"] = float(rp["rope_theta"])
        else:
            raise ConfigError(f"{source}: missing rope_theta (or rope_parameters.rope_theta)")
        dt = d.get("dtype", d.get("torch_dtype", "bfloat16"))
        kw["dtype"] = str(dt).replace("torch.", "")
        if d.get("head_dim") and d["head_dim"] != d["hidden_size"] // d["num_attention_heads"]:
            kw["head_dim_override"] = d["head_dim"]
        q = d.get("quantization_config")
        if q is not None:
            if not isinstance(q, dict):
                raise ConfigError(f"{source}: quantization_config must be an object")
            if q.get("quant_method", "bitnet") != "bitnet":
                raise ConfigError(f"{source}: quantization_config.quant_method={q.get('quant_method')!r} "
                                  "is not 'bitnet'")
            kw["linear_class"] = q.get("linear_class", "bitlinear")
            kw["quantization_mode"] = q.get("quantization_mode", "offline")
        else:
            # no quantization block: plain master weights, ternarized at load
            kw["quantization_mode"] = "online"
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self, quantization_mode: str | None = None, spelling: str = "v4") -> dict:
        """The Hugging Face config.json dict. ``spelling`` is "v4" (rope_theta, torch_dtype) or "v5"."""
        mode = quantization_mode or self.quantization_mode
        d: dict[str, Any] = {
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": self.hidden_act,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "quantization_config": {"quant_method": "bitnet", "linear_class": self.linear_class,
                                    "quantization_mode": mode},
        }
        if self.pad_token_id is not None:
            d["pad_token_id"] = self.pad_token_id
        if spelling == "v5":
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
            d["dtype"] = self.dtype
        else:
            d["rope_theta"] = self.rope_theta
            d["torch_dtype"] = self.dtype
        return d

    def to_json(self, path: str | Path, **kw: Any) -> None:
        Path(path).write_text(json.dumps(self.to_dict(**kw), indent=2) + "\n")


# Named sizes. "2b4t" is the released model exactly; the small ones are for tests and training
# (their vocab is usually replaced by the trained tokenizer's size).
SIZES: dict[str, dict[str, Any]] = {
    "2b4t": dict(),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 bos_token_id=0, eos_token_id=1, rope_theta=10000.0),
    "20m": dict(vocab_size=16384, hidden_size=384, intermediate_size=1024, num_hidden_layers=12,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024),
    "125m": dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
    "350m": dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048),
}
