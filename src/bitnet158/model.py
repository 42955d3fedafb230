"""The BitNet b1.58 decoder: a Llama with BitLinear projections, sub-norms and squared ReLU.

    model = Transformer(ModelConfig.from_name("tiny"))          # training layers (BitLinear)
    model.pack()                                                # -> PackedLinear, 2-bit inference
    logits = model(tokens)                                      # tokens [B, T] -> [B, T, V]

    cache = model.new_cache(batch=1, max_len=256)               # static KV cache
    logits = model(tokens, input_pos=torch.arange(T), cache=cache)

Numerics follow transformers' ``BitNetForCausalLM`` (SPEC §1–3): RMSNorm in fp32 then cast back
and scaled, RoPE tables in fp32 cast to the model dtype, softmax in fp32. Parameter names are the
checkpoint's (``model.layers.{i}.self_attn.q_proj.weight`` ...); the head is tied to
``model.embed_tokens`` unless the config unties it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import BitLinear, PackedLinear

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [max_pos, head_dim] (Llama rotate_half convention: frequencies repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [B, 1, T, D] in x's dtype
    return x * cos + rotate_half(x) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, impl: str) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, Hkv, L, D] (KV heads repeated to H): ``"eager"``
    (fp32 softmax) or ``"sdpa"``; ``mask`` [.., T, L] bool or None (causal when T > 1) -> [B, H, T, D]."""
    rep, T = q.shape[1] // k.shape[1], q.shape[2]
    if impl == "eager":
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5                 # [B, H, T, L]
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)


class KVCache(nn.Module):
    """Static per-layer cache: k, v [B, Hkv, S, D]. Rows may sit at different positions."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int):
        """Write k, v [B, Hkv, T, D] at positions pos [B, T]; return the first ``length`` slots."""
        b = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[b, :, pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed view: [B, T, Hkv, D]
        self.v[b, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[:, :, :length], self.v[:, :, :length]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, linear):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, q = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        self.q_proj = linear(d, q)
        self.k_proj = linear(d, self.n_kv * self.head_dim)
        self.v_proj = linear(d, self.n_kv * self.head_dim)
        self.o_proj = linear(q, d)
        self.attn_sub_norm = RMSNorm(q, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, pos, length, impl: str):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(pos, k, v, length)                                    # [B, Hkv, L, D]
        o = attend(q, k, v, mask, impl)                                               # [B, H, T, D]
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(self.attn_sub_norm(o))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, linear):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(d, f)
        self.up_proj = linear(d, f)
        self.down_proj = linear(f, d)
        self.ffn_sub_norm = RMSNorm(f, cfg.rms_norm_eps)

    def forward(self, x):
        h = F.relu(self.gate_proj(x)).square() * self.up_proj(x)
        return self.down_proj(self.ffn_sub_norm(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, linear):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, linear)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = FeedForward(cfg, linear)

    def forward(self, x, cos, sin, mask, cache, pos, length, impl):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, pos, length, impl)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """``model.*`` of the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig, linear):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, linear) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """BitNetForCausalLM. ``packed=False`` builds trainable BitLinear layers, True PackedLinear."""

    def __init__(self, cfg: ModelConfig, packed: bool = False, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.attn_impl = attn_impl
        linear = PackedLinear if packed else BitLinear
        self.model = Decoder(cfg, linear)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ------------------------------------------------------------------ structure
    @property
    def packed(self) -> bool:
        return isinstance(self.model.layers[0].self_attn.q_proj, PackedLinear)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection [V, D] (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def projections(self):
        """Yield (checkpoint name prefix, linear module) for every BitLinear/PackedLinear."""
        for i, layer in enumerate(self.model.layers):
            for p in PROJECTIONS:
                yield f"model.layers.{i}.{p}", layer.get_submodule(p)

    @torch.no_grad()
    def pack(self) -> "Transformer":
        """Ternarize every BitLinear (absmean) into a PackedLinear, in place. Returns self."""
        for name, mod in list(self.projections()):
            if isinstance(mod, BitLinear):
                parent, child = name.removeprefix("model.").rsplit(".", 1)
                self.model.get_submodule(parent).register_module(child, mod.to_packed())
        return self

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None) -> list[KVCache]:
        c = self.config
        max_len = max_len or c.max_position_embeddings
        return [KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, dtype or self.dtype, self.device)
                for _ in range(c.num_hidden_layers)]

    # ------------------------------------------------------------------ forward
    def hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
               cache: list[KVCache] | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, D] for tokens [B, T].

        ``input_pos`` [T] or [B, T]: absolute positions (default 0..T-1); with a ``cache`` the keys
        and values are written there and attention reads slots ``0..max(input_pos)``.
        ``segment_ids`` [B, T]: packed sequences; attention stays inside a segment (no cache).
        """
        B, T = tokens.shape
        dev = tokens.device
        if input_pos is None:
            input_pos = torch.arange(T, device=dev)
        pos = input_pos if input_pos.dim() == 2 else input_pos[None, :].expand(B, T)   # [B, T]
        if segment_ids is not None:
            pos = _segment_positions(segment_ids)
        x = self.model.embed_tokens(tokens)
        cos = self.rope_cos[pos].to(x.dtype)[:, None]                                  # [B, 1, T, D]
        sin = self.rope_sin[pos].to(x.dtype)[:, None]
        length = T
        mask = None
        if cache is not None:
            length = int(pos.max()) + 1
            keys = torch.arange(length, device=dev)
            mask = (keys[None, None, :] <= pos[:, :, None])[:, None]                   # [B, 1, T, L]
        elif segment_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            mask = (causal & same)[:, None]
        elif self.attn_impl == "eager":
            mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache[i] if cache is not None else None, pos, length,
                      self.attn_impl)
        return self.model.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Head: h [..., D] -> logits [..., V] in the head's dtype."""
        w = self.head_weight
        return F.linear(h.to(w.dtype), w)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden(tokens, input_pos, cache, segment_ids))


def _segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every new segment: [B, T] -> [B, T]."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def init_weights(model: Transformer, std: float = 0.02) -> Transformer:
    """Normal(0, std) linears and embeddings, ones for norms (call on a freshly built model)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
    return model
