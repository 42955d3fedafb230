"""Hugging Face BitNet b1.58 folders in and out: the three layouts of SPEC §3, validated.

    from bitnet158 import checkpoint
    model = checkpoint.load("path/to/bitnet-b1.58-2B-4T")           # PackedLinear, eval, config dtype
    model = checkpoint.load("microsoft/bitnet-b1.58-2B-4T")         # hub id (needs a network)
    model = checkpoint.load(master_dir, packed=False)               # trainable BitLinear latents
    checkpoint.save(model, "out", layout="packed", tokenizer_dir=src)
    cfg, tensors = checkpoint.load_state(folder)                    # raw, validated file tensors

Layouts (chosen by config.json's ``quantization_config``):

- ``packed``  — autobitlinear/offline (the released 2B4T): projection ``weight`` uint8
  ``[out/4, in]`` + ``weight_scale`` [1] = mean|W| (gamma), a **multiplier**.
- ``master``  — autobitlinear/online (the ``-bf16`` release, or no quantization block): float
  ``[out, in]`` latent weights, ternarized with absmean at load (``packed=True``) or kept for training.
- ``bitlinear`` — linear_class "bitlinear": packed as above but ``weight_scale`` = 1/mean|W|, a
  **divisor**; converted to the multiplier at load.

Loading a packed file with ``packed=False`` gives BitLinear latents ``W_t * gamma / mean|W_t|``:
their absmean ternarization is the file's W_t and gamma again, so the training forward computes
the packed model (the original latents are not recoverable; fine-tuning starts from these).
Extra tensors in a file are an error (they mean config and weights disagree), except a tied
``lm_head.weight`` (ignored with a warning) and ``rotary_emb.inv_freq`` (ignored).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import quant
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .folder import (HUB_PATTERNS, LAYOUTS, TensorInfo, file_layout, float_shapes, ignorable,  # noqa: F401
                     projection_shapes, read_config, resolve, validate)
from .layers import PackedLinear
from .model import PROJECTIONS, Transformer, rope_tables
from .safetensors_io import INDEX, SINGLE, atomic_folder, read_weights, write_weights
from .sampling_params import generation_defaults  # noqa: F401 (re-exported)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
           "fp32": torch.float32, "float": torch.float32}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / 'torch.float32' / torch.float16 ... -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ConfigError(f"dtype={dtype} is not bfloat16/float16/float32")
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------ load

def load_state(path_or_hub_id: str | os.PathLike, revision: str | None = None
               ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, {name: tensor}) exactly as stored in the folder, after validation (CPU tensors)."""
    folder = resolve(path_or_hub_id, revision)
    cfg = read_config(folder)
    tensors, sources = read_weights(folder)
    infos = {n: TensorInfo(_dtype_name(t.dtype), tuple(t.shape), t.is_floating_point())
             for n, t in tensors.items()}
    validate(cfg, infos, lambda n: float(tensors[n].float().reshape(-1)[0]), sources, folder)
    for k in list(tensors):  # the ignorable extras validate() let through
        if ignorable(cfg, k):
            del tensors[k]
    return cfg, tensors


def model_state(cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                packed: bool = True) -> dict[str, torch.Tensor]:
    """File tensors (validated) -> the state dict of ``Transformer(cfg, packed=packed)``.

    Consumes ``tensors`` (entries are popped so that big checkpoints are not held twice).
    Packed scales become fp32 multipliers holding the file's value exactly (autobitlinear) or
    1/value (bitlinear).
    """
    layout = file_layout(cfg)
    out: dict[str, torch.Tensor] = {}
    for name in float_shapes(cfg):
        out[name] = tensors.pop(name).to(dtype)
    for prefix, _ in _projection_names(cfg):
        w = tensors.pop(prefix + ".weight")
        if layout == "master":
            if packed:
                w_t, gamma = quant.ternarize(w)
                out[prefix + ".weight"] = quant.pack_hf(w_t)
                out[prefix + ".weight_scale"] = gamma.reshape(1).float()
            else:
                out[prefix + ".weight"] = w.to(dtype)
            continue
        s = tensors.pop(prefix + ".weight_scale").reshape(1)
        gamma = s.float() if layout == "packed" else (1.0 / s.double()).float()
        if packed:
            out[prefix + ".weight"] = w
            out[prefix + ".weight_scale"] = gamma
        else:  # latents W_t * gamma / mean|W_t|: their absmean ternarization is (W_t, gamma) again
            w_t = quant.unpack_hf(w).float()
            frac = w_t.abs().mean().clamp(min=1.0 / w_t.numel())  # share of nonzero weights
            out[prefix + ".weight"] = (w_t * (gamma.double() / frac.double()).float()).to(dtype)
    return out


def _projection_names(cfg: ModelConfig):
    for i in range(cfg.num_hidden_layers):
        for p in PROJECTIONS:
            yield f"model.layers.{i}.{p}", p


def load(path_or_hub_id: str | os.PathLike, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", packed: bool = True, attn_impl: str = "sdpa",
         revision: str | None = None) -> Transformer:
    """Load a BitNet b1.58 folder (or hub id) into a Transformer in eval mode.

    ``dtype`` defaults to the config's (``torch_dtype``/``dtype``); embeddings and norms are cast
    to it, packed scales stay fp32. ``packed=True`` gives PackedLinear inference layers (no
    gradients); ``packed=False`` gives BitLinear latent weights for training.
    """
    cfg, tensors = load_state(path_or_hub_id, revision)
    dt = torch_dtype(dtype if dtype is not None else cfg.dtype)
    return from_state(cfg, model_state(cfg, tensors, dt, packed), packed, attn_impl, device)


class _MetaBuild(torch.overrides.TorchFunctionMode):
    """Build modules on the meta device without computing on it: parameter init is skipped (the
    state replaces it) and ``arange`` (the RoPE tables) runs on the CPU. Any computation on meta
    tensors imports torch._dynamo (torch's Python meta kernels): ~0.13 GB more resident memory."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        if func is torch.arange:
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], packed: bool = True,
               attn_impl: str = "sdpa", device: str | torch.device = "cpu") -> Transformer:
    """A Transformer (eval) that takes ownership of ``state``'s tensors: nothing is allocated twice."""
    with torch.device("meta"), _MetaBuild():  # no memory for weights that are about to be replaced
        model = Transformer(cfg, packed=packed, attn_impl=attn_impl)
    model.load_state_dict(state, strict=True, assign=True)
    cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"from_state: tensors left uninitialized: {left}")
    model.to(device)
    model.requires_grad_(not packed)
    return model.eval()


# ------------------------------------------------------------------ save

def _packed_of(mod) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [out/4, in], gamma fp32 scalar) of a BitLinear (ternarized now) or PackedLinear."""
    if isinstance(mod, PackedLinear):
        return mod.weight, mod.weight_scale.float().reshape(())
    w_t, gamma = quant.ternarize(mod.weight.detach())
    return quant.pack_hf(w_t), gamma


def _eot_id(cfg: ModelConfig, tokenizer_dir: Path | None) -> int | None:
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        try:
            tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
            for tok in tj.get("added_tokens", []):
                if tok.get("content") == "<|eot_id|>":
                    return int(tok["id"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            pass
    if cfg.vocab_size == 128256 and cfg.eos_token_ids == [128001]:
        return 128009  # the Llama-3 vocabulary of every 2B4T-family model
    return None


def save(model: Transformer, path: str | os.PathLike, layout: str = "packed",
         tokenizer_dir: str | os.PathLike | None = None, spelling: str = "v4",
         max_shard_bytes: int | None = None, dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder that transformers' BitNetForCausalLM loads.

    ``layout``: "packed" (the released offline layout: uint8 weights + bf16 ``weight_scale`` =
    gamma, rounded to bf16 as in the released files), "master" (float latent weights,
    quantization_mode "online"; needs BitLinear layers) or "bitlinear" (packed with the inverse
    scale, linear_class "bitlinear"). Embeddings and norms are written in ``dtype`` (default: the
    config's). Shards past ``max_shard_bytes``. Tokenizer files are copied from ``tokenizer_dir``.
    The folder appears atomically: a crash leaves the old folder or none, never half of one.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"save: layout={layout!r} is not one of {LAYOUTS}")
    if spelling not in ("v4", "v5"):
        raise CheckpointError(f"save: spelling={spelling!r} is not 'v4' or 'v5'")
    cfg = model.config
    dt = torch_dtype(dtype if dtype is not None else cfg.dtype)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok_dir is not None and not (tok_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{tok_dir}: tokenizer_dir has no tokenizer.json")
    if layout == "master" and model.packed:
        raise CheckpointError("save: layout='master' needs latent BitLinear weights, but the model is "
                              "packed (ternary weights cannot give back the latents); save "
                              "layout='packed' instead")
    tensors: dict[str, torch.Tensor] = {}
    state = {k: v for k, v in model.state_dict().items()}
    for name in float_shapes(cfg):
        tensors[name] = state[name].detach().to(dt)
    for prefix, mod in model.projections():
        if layout == "master":
            tensors[prefix + ".weight"] = mod.weight.detach().to(dt)
            continue
        w, gamma = _packed_of(mod)
        scale = gamma if layout == "packed" else 1.0 / gamma.double()
        tensors[prefix + ".weight"] = w
        tensors[prefix + ".weight_scale"] = scale.to(torch.bfloat16).reshape(1)
    mode = "online" if layout == "master" else "offline"
    lin = "bitlinear" if layout == "bitlinear" else "autobitlinear"
    out_cfg = cfg.replace(linear_class=lin, quantization_mode=mode, dtype=_dtype_name(dt))
    eot = _eot_id(cfg, tok_dir)
    eos = cfg.eos_token_ids + ([eot] if eot is not None and eot not in cfg.eos_token_ids else [])
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0]}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    path = Path(path)
    with atomic_folder(path) as tmp:
        write_weights(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(out_cfg.to_dict(spelling=spelling), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tok_dir is not None:
            for f in TOKENIZER_FILES:
                if (tok_dir / f).is_file():
                    shutil.copyfile(tok_dir / f, tmp / f)
    return path


__all__ = ["resolve", "load", "load_state", "save", "model_state", "from_state", "read_config", "file_layout",
           "torch_dtype", "LAYOUTS", "SINGLE", "INDEX"]
