"""A Hugging Face BitNet folder without torch: where it is, its config, the tensors it must hold.

    folder = resolve("path/to/bitnet-b1.58-2B-4T")      # or a hub id (downloaded when online)
    cfg = read_config(folder)
    layout = file_layout(cfg)                            # "packed" | "master" | "bitlinear"
    validate(cfg, infos, scale, sources, folder)         # CheckpointError naming file + tensor

Shared by :mod:`bitnet158.checkpoint` (torch tensors) and the torch-free CPU engine
(:mod:`bitnet158.kernels.cpu.lite`, numpy arrays), so both accept and refuse the same folders with
the same messages. SPEC §3 describes the layouts.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .safetensors_io import INDEX, refuse_pickle

HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", INDEX, "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "*.md", "LICENSE*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LAYOUTS = ("packed", "master", "bitlinear")
_CONVENTION = {"packed": "autobitlinear: weight_scale = mean|W|, a multiplier",
               "bitlinear": "bitlinear: weight_scale = 1/mean|W|, a divisor"}


# ------------------------------------------------------------------ resolve

def _offline() -> bool:
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def resolve(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model folder for ``path_or_hub_id``: the folder itself, or a hub snapshot.

    Hub ids (``owner/name``) are fetched with ``huggingface_hub.snapshot_download``, config,
    safetensors and tokenizer files only (never ``.bin``/``.pt``). Offline (``HF_HUB_OFFLINE`` or no
    network) only the local hub cache is used; failing that, CheckpointError says to pass a folder.
    """
    p = Path(path_or_hub_id).expanduser()
    if p.exists():
        if p.is_dir():
            return p
        refuse_pickle(p)
        if p.name == "config.json" or p.suffix == ".safetensors":
            return p.parent
        raise CheckpointError(f"{p}: expected a model folder (config.json + model.safetensors)")
    s = str(path_or_hub_id)
    if not _HUB_ID.match(s):
        raise CheckpointError(f"{s}: no such model folder (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download
    offline = _offline()
    try:
        folder = snapshot_download(s, revision=revision, allow_patterns=HUB_PATTERNS,
                                   local_files_only=offline)
    except Exception as e:  # network, auth, missing repo, missing cache: all mean "not fetched"
        why = "offline mode (HF_HUB_OFFLINE) and not in the local cache" if offline else \
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise CheckpointError(f"could not fetch {s!r} from the Hugging Face hub ({why}); "
                              f"download it elsewhere and pass the local folder instead") from None
    return Path(folder)


# ------------------------------------------------------------------ layouts and expected tensors

def file_layout(cfg: ModelConfig) -> str:
    """'packed' | 'master' | 'bitlinear': what a folder with this config holds."""
    if cfg.linear_class == "bitlinear":
        return "bitlinear"
    return "master" if cfg.quantization_mode == "online" else "packed"


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Unpacked [out, in] of each projection kind."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
            "mlp.down_proj": (d, f)}


def float_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every unquantized tensor (embeddings, norms, untied head)."""
    d = cfg.hidden_size
    out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        out[p + "self_attn.attn_sub_norm.weight"] = (cfg.num_attention_heads * cfg.head_dim,)
        out[p + "mlp.ffn_sub_norm.weight"] = (cfg.intermediate_size,)
    return out


class TensorInfo(NamedTuple):
    """What validation needs of a stored tensor: its dtype as torch names it, without the prefix
    ("bfloat16", "uint8", ...), its shape, and whether the dtype is a float."""

    dtype: str
    shape: tuple[int, ...]
    is_float: bool


def validate(cfg: ModelConfig, tensors: Mapping[str, TensorInfo], scale: Callable[[str], float],
             sources: Mapping[str, Path], folder: Path) -> None:
    """Raise CheckpointError naming file + tensor for anything the layout does not allow.

    ``tensors``: every stored tensor's :class:`TensorInfo`; ``scale(name)``: the value of a
    one-element float tensor (a ``weight_scale``); ``sources``: the file each tensor came from."""
    layout = file_layout(cfg)
    where = lambda n: sources.get(n, folder)  # noqa: E731
    seen = set()
    for name, shape in float_shapes(cfg).items():
        if name not in tensors:
            raise CheckpointError(f"{folder}: missing tensor {name!r} (expected shape {list(shape)})")
        t = tensors[name]
        seen.add(name)
        if not t.is_float:
            raise CheckpointError(f"{where(name)}: tensor {name!r} has dtype {t.dtype}, expected a float")
        if tuple(t.shape) != shape:
            if name.endswith(("embed_tokens.weight", "lm_head.weight")) and len(t.shape) == 2 \
                    and t.shape[1] == shape[1]:
                raise CheckpointError(f"{where(name)}: tensor {name!r} has {t.shape[0]} rows but "
                                      f"config.json vocab_size is {cfg.vocab_size}")
            raise CheckpointError(f"{where(name)}: tensor {name!r} has shape {list(t.shape)}, "
                                  f"expected {list(shape)}")
    for i in range(cfg.num_hidden_layers):
        for proj, (out, inp) in projection_shapes(cfg).items():
            name = f"model.layers.{i}.{proj}.weight"
            if name not in tensors:
                raise CheckpointError(f"{folder}: missing tensor {name!r}")
            t = tensors[name]
            seen.add(name)
            if layout == "master":
                if t.dtype == "uint8":
                    raise CheckpointError(
                        f"{where(name)}: tensor {name!r} is packed uint8 {list(t.shape)}, but "
                        "config.json says quantization_mode 'online' (float master weights [out, in])")
                if not t.is_float:
                    raise CheckpointError(f"{where(name)}: tensor {name!r} has dtype {t.dtype}, "
                                          "expected float master weights")
                if tuple(t.shape) != (out, inp):
                    raise CheckpointError(f"{where(name)}: tensor {name!r} has shape {list(t.shape)}, "
                                          f"expected {[out, inp]}")
                continue
            conv = _CONVENTION[layout]
            if t.dtype != "uint8":
                hint = ("quantization_mode 'online'" if layout == "packed" else
                        "linear_class 'autobitlinear' and quantization_mode 'online'")
                raise CheckpointError(
                    f"{where(name)}: tensor {name!r} has dtype {t.dtype}, expected uint8 packed "
                    f"[{out // 4}, {inp}] ({conv}); float master weights need {hint} in config.json")
            if out % 4 or tuple(t.shape) != (out // 4, inp):
                raise CheckpointError(f"{where(name)}: tensor {name!r} has shape {list(t.shape)}, "
                                      f"expected packed [{out // 4}, {inp}] ([out/4, in] of [{out}, {inp}])")
            sname = f"model.layers.{i}.{proj}.weight_scale"
            if sname not in tensors:
                raise CheckpointError(f"{folder}: missing tensor {sname!r} ({conv})")
            s = tensors[sname]
            seen.add(sname)
            if not s.is_float or math.prod(s.shape) != 1:
                raise CheckpointError(f"{where(sname)}: tensor {sname!r} must be one float value "
                                      f"(shape [1]), got {s.dtype} {list(s.shape)} ({conv})")
            v = scale(sname)
            if not math.isfinite(v) or v <= 0:
                raise CheckpointError(f"{where(sname)}: tensor {sname!r} = {v} must be a positive "
                                      f"finite number ({conv})")
    for name in sorted(set(tensors) - seen):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            warnings.warn(f"{where(name)}: ignoring 'lm_head.weight': config.json ties the head to "
                          "model.embed_tokens.weight (tie_word_embeddings=true)", stacklevel=3)
            continue
        hint = ""
        if name.endswith(".weight_scale") and layout == "master":
            hint = " (weight_scale belongs to packed files; config.json says quantization_mode 'online')"
        raise CheckpointError(f"{where(name)}: unexpected tensor {name!r}: config.json does not "
                              f"describe it{hint}")


# ------------------------------------------------------------------ config

def read_config(folder: Path) -> ModelConfig:
    """ModelConfig from ``folder/config.json``, with the checks transformers' defaults would skip."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: missing config.json (not a Hugging Face model folder)")
    cfg = ModelConfig.from_json(path)
    q = json.loads(path.read_text()).get("quantization_config") or {}
    if q.get("use_rms_norm"):
        raise ConfigError(f"{path}: quantization_config.use_rms_norm=true (an extra RMSNorm inside "
                          "every linear) is not part of BitNet b1.58 and is not supported")
    return cfg


def ignorable(cfg: ModelConfig, name: str) -> bool:
    """A stored tensor that :func:`validate` lets through and loading drops (RoPE inv_freq, a tied
    head's copy)."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings)


__all__ = ["resolve", "read_config", "file_layout", "projection_shapes", "float_shapes", "TensorInfo", "validate",
           "ignorable", "HUB_PATTERNS", "LAYOUTS"]
