"""Random BitNet b1.58 models and folders, for tests and benchmarks (no download needed).

    cfg = random_config("parity-gqa2")                    # or "tiny", "2b4t", a ModelConfig
    model = random_model(cfg, seed=0)                     # BitLinear latents, eval, fp32
    write_random_folder(tmp / "m", cfg, layout="packed")  # a Hugging Face folder (SPEC §3)
    model = random_packed_model(ModelConfig.from_name("2b4t"), seed=0)   # 2B4T shapes, ~1.2 GB

Every projection kind gets its own latent weight std (:data:`DEFAULT_STDS`), so the scales of
the layers differ by up to ~10x and a wrong ``weight_scale`` convention (dividing instead of
multiplying, or a scale applied to the wrong layer) changes the logits by a wide margin.
Embeddings, norms and latents hold bf16-representable values, so saving in bf16 loses nothing
but the bf16 rounding of the packed scales.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .config import SIZES, ModelConfig
from .model import PROJECTIONS, RMSNorm, Transformer

# latent weight std per projection kind (differ so that a wrong scale convention shows)
DEFAULT_STDS = {"q_proj": 0.02, "k_proj": 0.045, "v_proj": 0.09, "o_proj": 0.015,
                "gate_proj": 0.06, "up_proj": 0.03, "down_proj": 0.12}

# tiny test configs: GQA ratios 1, 2, 4, odd vocab sizes, one untied head
_TEST = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, rope_theta=10000.0, bos_token_id=0, eos_token_id=1,
             dtype="float32")
PRESETS: dict[str, dict] = {
    "parity-mha": dict(_TEST, vocab_size=301, num_key_value_heads=4),
    "parity-gqa2": dict(_TEST, vocab_size=300, num_key_value_heads=2, intermediate_size=160),
    "parity-gqa4": dict(_TEST, vocab_size=257, num_attention_heads=8, num_key_value_heads=2,
                        num_hidden_layers=3, tie_word_embeddings=False, rms_norm_eps=1e-6),
}


def random_config(name: str | ModelConfig = "tiny", **overrides) -> ModelConfig:
    """A ModelConfig from a test preset (:data:`PRESETS`), a named size, or a config (copied)."""
    if isinstance(name, ModelConfig):
        return name.replace(**overrides)
    if name in PRESETS:
        return ModelConfig(**{**PRESETS[name], **overrides})
    if name in SIZES:
        return ModelConfig.from_name(name, **overrides)
    raise ValueError(f"random_config: unknown name {name!r}; known: {', '.join([*PRESETS, *SIZES])}")


def _kind(proj: str) -> str:
    return proj.rsplit(".", 1)[-1]


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@torch.no_grad()
def random_model(cfg: str | ModelConfig, seed: int = 0, stds: dict[str, float] | None = None,
                 dtype: torch.dtype = torch.float32, emb_std: float = 1.0,
                 norm_jitter: float = 0.1, attn_impl: str = "sdpa") -> Transformer:
    """A Transformer with BitLinear latent weights: N(0, std of its kind) per projection,
    N(0, emb_std) embeddings (and untied head), norms 1 + N(0, norm_jitter). Eval mode."""
    cfg = random_config(cfg)
    stds = {**DEFAULT_STDS, **(stds or {})}
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg, packed=False, attn_impl=attn_impl)
    randn = lambda shape, std: _bf16_exact(torch.randn(shape, generator=g) * std)  # noqa: E731
    model.model.embed_tokens.weight.copy_(randn(model.model.embed_tokens.weight.shape, emb_std))
    if not cfg.tie_word_embeddings:
        model.lm_head.weight.copy_(randn(model.lm_head.weight.shape, emb_std))
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.weight.copy_(1.0 + randn(m.weight.shape, norm_jitter))
    for prefix, mod in model.projections():
        mod.weight.copy_(randn(mod.weight.shape, stds[_kind(prefix)]))
    return model.to(dtype).eval()


def write_random_folder(path: str | os.PathLike, cfg: str | ModelConfig = "tiny",
                        layout: str = "packed", seed: int = 0,
                        tokenizer_dir: str | os.PathLike | None = None,
                        stds: dict[str, float] | None = None, spelling: str = "v4",
                        max_shard_bytes: int | None = None, dtype: str | None = None) -> Path:
    """Write a random model as a Hugging Face folder: layout "packed" (offline autobitlinear),
    "master" (online, float latents) or "bitlinear" (packed, inverse scale). Returns the path."""
    from . import checkpoint  # checkpoint -> model; imported here to keep this module light

    model = random_model(cfg, seed=seed, stds=stds)
    return checkpoint.save(model, path, layout=layout, tokenizer_dir=tokenizer_dir,
                           spelling=spelling, max_shard_bytes=max_shard_bytes, dtype=dtype)


def _random_bits(n_bytes: int, g: torch.Generator) -> torch.Tensor:
    """int64 [ceil(n_bytes / 8)] of uniformly random bits (torch's fast integer fill)."""
    x = torch.empty((n_bytes + 7) // 8, dtype=torch.int64).random_(generator=g)  # 63 random bits
    return x ^ (x << 32)  # make bit 63 random too


def random_bf16(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """bf16 [rows, cols]: random sign, magnitude in [1/32, 1/8) (exponent -5 or -4, random
    mantissa), RMS ~0.07; built from random bits, several times faster than a normal draw."""
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    step = max(1, (1 << 22) // max(cols, 1))  # ~8 MB of temporaries at a time
    for r in range(0, rows, step):
        n = min(step, rows - r) * cols
        raw = _random_bits(2 * n, g).view(torch.int16)[:n]
        bits = (raw & (0x80FF - 0x10000)) | (122 << 7)  # keep sign, exponent lsb, mantissa
        out[r:r + step] = bits.view(torch.bfloat16).view(-1, cols)
    return out


def random_packed_bytes(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """uint8 [rows, cols] of random packed ternary weights: every 2-bit field in {0, 1, 2}
    (P(w=-1) = P(w=+1) = 1/4, P(w=0) = 1/2), made from random bits, no wide temporaries."""
    n = rows * cols
    x = _random_bits(n, g)
    both = x & (x >> 1) & 0x5555555555555555  # fields holding code 3 (never valid)
    x ^= both << 1                            # 3 -> 1 (weight 0)
    return x.view(torch.uint8)[:n].reshape(rows, cols)


@torch.no_grad()
def random_packed_model(cfg: str | ModelConfig = "2b4t", seed: int = 0,
                        dtype: torch.dtype = torch.bfloat16, stds: dict[str, float] | None = None,
                        attn_impl: str = "sdpa",
                        device: str | torch.device = "cpu") -> Transformer:
    """A packed (PackedLinear) model with random ternary weights, built directly in memory.

    No latent float weights ever exist: 2B4T shapes take ~0.52 GB of packed weights plus the
    bf16 embedding (0.66 GB) and build in about a second. Scales are mean|W| of a normal latent
    of the kind's std, rounded to bf16 as the released files store them; embeddings come from
    :func:`random_bf16`; norms are ones. Eval mode, no grads.
    """
    from .checkpoint import from_state, projection_shapes

    cfg = random_config(cfg)
    stds = {**DEFAULT_STDS, **(stds or {})}
    g = torch.Generator().manual_seed(seed)
    d = cfg.hidden_size
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": random_bf16(cfg.vocab_size, d, g).to(dtype),
        "model.norm.weight": torch.ones(d, dtype=dtype),
    }
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = random_bf16(cfg.vocab_size, d, g).to(dtype)
    shapes = projection_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(d, dtype=dtype)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=dtype)
        sd[p + "self_attn.attn_sub_norm.weight"] = torch.ones(cfg.num_attention_heads * cfg.head_dim,
                                                              dtype=dtype)
        sd[p + "mlp.ffn_sub_norm.weight"] = torch.ones(cfg.intermediate_size, dtype=dtype)
        for proj in PROJECTIONS:
            out, inp = shapes[proj]
            gamma = stds[_kind(proj)] * math.sqrt(2 / math.pi)  # E|N(0, s)| = s * sqrt(2/pi)
            sd[p + proj + ".weight"] = random_packed_bytes(out // 4, inp, g)
            sd[p + proj + ".weight_scale"] = _bf16_exact(torch.tensor([gamma]))
    return from_state(cfg, sd, packed=True, attn_impl=attn_impl, device=device)
