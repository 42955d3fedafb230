"""Write BitNet b1.58 models as GGUF files for llama.cpp (TQ1_0 / TQ2_0 / F16) and bitnet.cpp (I2_S).

    from bitnet158.convert import export_gguf, write_random_gguf
    export_gguf("path/to/hf-folder", "model-tq2_0.gguf", wtype="tq2_0", head="f16")
    export_gguf(model, "m.gguf", wtype="i2_s", tokenizer_dir="path/to/tokenizer")   # a Transformer
    write_random_gguf("2b4t-tq2_0.gguf", "2b4t", wtype="tq2_0", head="q8_0")        # benchmarks

or ``bitnet158 convert MODEL OUT.gguf --type tq2_0 --head f16`` (see ``convert/cli.py``).

Every ternary projection is written as its codes and ONE per-tensor scale gamma (the absmean
multiplier): TQ types repeat ``d = f16(gamma)`` in every 256-weight block, I2_S stores gamma as
float32 after the codes, F16 stores ``W_t * f16(gamma)``. Norms are F32, the embedding (= the tied
head, which llama.cpp's ``bitnet`` graph reads as ``token_embd``) takes the ``head`` type.

Tensors are produced one at a time and streamed to disk (``GGUFWriter.add_tensor_info`` first,
then ``write_tensor_data`` per tensor), so a 2B4T export holds one projection at a time besides
the source model, and the random generator never holds more than the head. The file appears
atomically (written to ``OUT.tmp``, then renamed).
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..model import PROJECTIONS
from . import headquant, i2s, names, tq
from .hf_layout import unpack_hf_np
from .vocab import Vocab

NORMS = ("input_layernorm", "self_attn.attn_sub_norm", "post_attention_layernorm", "mlp.ffn_sub_norm")
_ROW_CHUNK = 4096


@dataclass
class Plan:
    """One tensor to write: numpy-order shape [rows, K], ggml type id, bytes, and a producer."""
    name: str
    shape: tuple[int, ...]
    gtype: int
    nbytes: int
    make: Callable[[], np.ndarray]


# ---------------------------------------------------------------- sources of weights

class ModelSource:
    """Weights of a bitnet158 Transformer (PackedLinear or BitLinear projections)."""

    def __init__(self, model):
        self.model, self.cfg = model, model.config

    def ternary(self, layer: int, proj: str) -> tuple[np.ndarray, float]:
        from .. import quant
        from ..layers import PackedLinear

        mod = self.model.model.layers[layer].get_submodule(proj)
        if isinstance(mod, PackedLinear):
            w_t = unpack_hf_np(mod.weight.detach().cpu().numpy())
            if w_t.max(initial=0) > 1:
                raise CheckpointError(f"{names.proj_name(layer, proj)}: packed weight holds code 3")
            return w_t, float(mod.weight_scale.float().reshape(()))
        w_t, gamma = quant.ternarize(mod.weight.detach())
        return w_t.cpu().numpy().astype(np.int8), float(gamma)

    def norm(self, layer: int | None, norm: str) -> np.ndarray:
        mod = self.model.model.norm if layer is None else self.model.model.layers[layer].get_submodule(norm)
        return mod.weight.detach().float().cpu().numpy()

    def rows(self, which: str) -> Callable[[int, int], np.ndarray]:
        w = self.model.model.embed_tokens.weight if which == "embed" else self.model.lm_head.weight
        return lambda r0, r1: w[r0:r1].detach().float().cpu().numpy()


class RandomSource:
    """Random ternary weights of a config's exact shapes, made on the fly (no float latents).

    Codes: P(-1) = P(+1) = 1/4, P(0) = 1/2; gamma per projection kind = E|N(0, std)| of
    ``random_model.DEFAULT_STDS`` rounded to bf16 (as ``random_packed_model`` does); norms 1;
    embedding N(0, 0.05)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, emb_std: float = 0.05):
        from ..random_model import DEFAULT_STDS

        self.cfg, self.seed, self.emb_std, self.stds = cfg, seed, emb_std, DEFAULT_STDS

    def _rng(self, layer: int, proj: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, layer, PROJECTIONS.index(proj)])

    def _gamma(self, proj: str) -> float:
        return _bf16(self.stds[proj.rsplit(".", 1)[-1]] * math.sqrt(2 / math.pi))  # E|N(0, std)|

    def ternary(self, layer: int, proj: str) -> tuple[np.ndarray, float]:
        out, inp = _proj_shape(self.cfg, proj)
        u = _random_fields(self._rng(layer, proj), out * inp // 4)        # packed 2-bit codes
        w = ((u[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & np.uint8(3)).view(np.int8)
        return w.reshape(out, inp) - np.int8(1), self._gamma(proj)

    def packed(self, layer: int, proj: str, wtype: str) -> np.ndarray | None:
        """Random data straight in the file's layout (the layout does not matter for random codes);
        None for types made from codes."""
        out, inp = _proj_shape(self.cfg, proj)
        rng, gamma = self._rng(layer, proj), self._gamma(proj)
        if wtype == "i2_s":
            trailer = np.zeros(i2s.TRAILER, dtype=np.uint8)
            trailer[:4] = np.array([gamma], dtype="<f4").view(np.uint8)
            return np.concatenate([_random_fields(rng, out * inp // 4), trailer])
        nb = out * inp // tq.QK_K
        d = np.full((nb, 1), gamma, dtype=np.float16).view(np.uint8)
        if wtype == "tq2_0":
            return np.concatenate([_random_fields(rng, nb * 64).reshape(nb, 64), d], axis=1)
        if wtype == "tq1_0":                  # uniform base-3 digits: 5 per qs byte, 4 per qh byte
            lut = ((np.arange(243, dtype=np.uint16) * 256 + 242) // 243).astype(np.uint8)
            qs = lut[rng.integers(0, 243, size=(nb, 48), dtype=np.uint8)]
            qh = lut[rng.integers(0, 81, size=(nb, 4), dtype=np.uint8) * np.uint8(3)]
            return np.concatenate([qs, qh, d], axis=1)
        return None

    def norm(self, layer: int | None, norm: str) -> np.ndarray:
        size = self.cfg.hidden_size
        if norm == "self_attn.attn_sub_norm":
            size = self.cfg.num_attention_heads * self.cfg.head_dim
        elif norm == "mlp.ffn_sub_norm":
            size = self.cfg.intermediate_size
        return np.ones(size, dtype=np.float32)

    def rows(self, which: str) -> Callable[[int, int], np.ndarray]:
        def get(r0: int, r1: int) -> np.ndarray:
            rng = np.random.default_rng([self.seed, 1000 + (which == "head"), r0])
            x = rng.standard_normal((r1 - r0, self.cfg.hidden_size), dtype=np.float32)
            return x * np.float32(self.emb_std)
        return get


def _random_fields(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random bytes whose four 2-bit fields are codes 0, 1, 2 (P = 1/4, 1/2, 1/4): random words
    with every field 3 turned into 1 (weight 0), 64 bits at a time."""
    buf = np.frombuffer(bytearray(rng.bytes((n + 7) // 8 * 8)), dtype=np.uint64)
    both = buf & (buf >> np.uint64(1)) & np.uint64(0x5555555555555555)   # low bit of each 3-field
    buf ^= both << np.uint64(1)                                          # 0b11 -> 0b01
    return buf.view(np.uint8)[:n]


def _bf16(x: float) -> float:
    """Round to the nearest bfloat16 value (as the released checkpoints store scales)."""
    import torch
    return float(torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).float())


def _proj_shape(cfg: ModelConfig, proj: str) -> tuple[int, int]:
    d, f, q = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
            "mlp.down_proj": (d, f)}[proj]


# ---------------------------------------------------------------- encoding

def _ternary_plan(src, layer: int, proj: str, wtype: str) -> Plan:
    out, inp = _proj_shape(src.cfg, proj)
    name = names.proj_name(layer, proj)
    plan = _ternary_plan_codes(src, layer, proj, wtype, out, inp, name)
    if hasattr(src, "packed") and wtype != "f16":           # random data: write it in place
        plan.make = lambda: src.packed(layer, proj, wtype)
    return plan


def _ternary_plan_codes(src, layer: int, proj: str, wtype: str, out: int, inp: int, name: str) -> Plan:
    if wtype in tq.PACKERS:
        if inp % tq.QK_K:
            raise ConfigError(f"{name}: row length {inp} is not a multiple of 256, which {wtype.upper()} "
                              "needs; use --type i2_s (multiples of 128) or f16")
        pack = tq.PACKERS[wtype][0]
        gt = T.TQ1_0 if wtype == "tq1_0" else T.TQ2_0
        return Plan(name, (out, inp), gt, tq.nbytes(wtype, out, inp),
                    lambda: pack(*src.ternary(layer, proj), what=name))
    if wtype == "i2_s":
        if inp % i2s.QK_I2_S:
            raise ConfigError(f"{name}: row length {inp} is not a multiple of 128, which I2_S needs; "
                              "use --type f16")
        return Plan(name, (out, inp), i2s.GGML_TYPE_I2_S, i2s.nbytes(out, inp),
                    lambda: i2s.pack_i2s(*src.ternary(layer, proj), what=name))
    if wtype == "f16":
        def make() -> np.ndarray:
            w_t, gamma = src.ternary(layer, proj)
            return w_t.astype(np.float16) * np.float16(gamma)     # exact: +-f16(gamma) or 0
        return Plan(name, (out, inp), T.F16, out * inp * 2, make)
    raise ConfigError(f"weight type {wtype!r} is not one of {', '.join(names.WEIGHT_TYPES)}")


def _rows_plan(name: str, get_rows: Callable[[int, int], np.ndarray], rows: int, k: int, head: str) -> Plan:
    t = headquant.HEAD_TYPES.get(head)
    if t is None:
        raise ConfigError(f"head type {head!r} is not one of {', '.join(headquant.HEAD_TYPES)}")
    try:
        headquant.check_shape(t, k, name)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    def make() -> np.ndarray:
        dt = {T.F32: np.float32, T.F16: np.float16}.get(t, np.uint8)
        out = np.empty((rows, k if dt is not np.uint8 else headquant.nbytes(t, 1, k)), dtype=dt)
        for r in range(0, rows, _ROW_CHUNK):
            r1 = min(rows, r + _ROW_CHUNK)
            out[r:r1] = headquant.quantize_float(get_rows(r, r1), head, name)[0]
        return out
    return Plan(name, (rows, k), t, headquant.nbytes(t, rows, k), make)


def _norm_plan(src, layer: int | None, norm: str) -> Plan:
    name = names.OUT_NORM if layer is None else names.norm_name(layer, norm)
    n = len(src.norm(layer, norm))
    return Plan(name, (n,), T.F32, n * 4, lambda: np.ascontiguousarray(src.norm(layer, norm), np.float32))


def plans(src, wtype: str, head: str) -> list[Plan]:
    """Tensors in llama.cpp's usual order: embedding, then block by block, then the final norm."""
    cfg = src.cfg
    out = [_rows_plan(names.EMBED, src.rows("embed"), cfg.vocab_size, cfg.hidden_size, head)]
    for i in range(cfg.num_hidden_layers):
        out.append(_norm_plan(src, i, "input_layernorm"))
        out += [_ternary_plan(src, i, p, wtype) for p in PROJECTIONS[:4]]
        out.append(_norm_plan(src, i, "self_attn.attn_sub_norm"))
        out.append(_norm_plan(src, i, "post_attention_layernorm"))
        out += [_ternary_plan(src, i, p, wtype) for p in PROJECTIONS[4:]]
        out.append(_norm_plan(src, i, "mlp.ffn_sub_norm"))
    out.append(_norm_plan(src, None, "norm"))
    if not cfg.tie_word_embeddings:
        out.append(_rows_plan(names.OUTPUT, src.rows("head"), cfg.vocab_size, cfg.hidden_size, head))
    return out


# ---------------------------------------------------------------- the file

class _Writer(gguf.GGUFWriter):
    """GGUFWriter that packs long metadata arrays (a 128k-token vocabulary, its merges and token
    types) in one go instead of one ``struct.pack`` per element (seconds -> ~0.2 s)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if (vtype == GGUFValueType.ARRAY and self.endianess == gguf.GGUFEndian.LITTLE
                and isinstance(val, (list, tuple)) and len(val) > 256):
            ltype = sub_type if sub_type is not None else GGUFValueType.get_type(val[0])
            head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val))
            if ltype == GGUFValueType.STRING:
                enc = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
                return head + b"".join(struct.pack("<Q", len(e)) + e for e in enc)
            fmt = self._simple_value_packing.get(ltype)
            if fmt is not None and ltype != GGUFValueType.BOOL:
                return head + np.asarray(val, dtype=np.dtype(fmt).newbyteorder("<")).tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _metadata(w: gguf.GGUFWriter, cfg: ModelConfig, wtype: str, name: str | None) -> None:
    arch = w.arch
    w.add_name(name or "BitNet b1.58")
    w.add_file_type(names.FILE_TYPES[wtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_string(f"{arch}.hidden_activation", cfg.hidden_act)  # newer llama.cpp reads this key
    w.add_uint32(names.K_FORMAT, names.FORMAT_VERSION)
    w.add_string(names.K_SCALE, "multiplier")
    w.add_string(names.K_ACT, cfg.hidden_act)
    w.add_string(names.K_ACT_QUANT, "absmax-int8-per-token")
    w.add_bool(names.K_TIED, cfg.tie_word_embeddings)


def write_gguf(path: str | os.PathLike, src, wtype: str = "tq2_0", head: str = "f16",
               vocab: Vocab | None = None, arch: str | None = None, name: str | None = None,
               log: Callable[[str], None] | None = None) -> Path:
    """Write ``src`` (a ModelSource / RandomSource) to ``path``; returns the path."""
    if wtype not in names.WEIGHT_TYPES:
        raise ConfigError(f"weight type {wtype!r} is not one of {', '.join(names.WEIGHT_TYPES)}")
    arch = arch or (names.ARCH_BITNET_CPP if wtype == "i2_s" else names.ARCH_LLAMA_CPP)
    if arch not in names.KNOWN_ARCHS:
        raise ConfigError(f"architecture {arch!r} is not one of {', '.join(names.KNOWN_ARCHS)}")
    cfg = src.cfg
    if not cfg.tie_word_embeddings:
        warnings.warn("untied head written as output.weight: llama.cpp's bitnet graph always uses "
                      "token_embd as the head and will not load this file", stacklevel=2)
    todo = plans(src, wtype, head)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = _Writer(tmp, arch)
    try:
        _metadata(w, cfg, wtype, name)
        if vocab is not None:
            vocab.write(w)
        else:
            w.add_tokenizer_model("none")
        for p in todo:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.gtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for j, p in enumerate(todo):
            data = p.make()
            if data.nbytes != p.nbytes:
                raise CheckpointError(f"{p.name}: produced {data.nbytes} bytes, expected {p.nbytes}")
            w.write_tensor_data(data)
            if log is not None and (j % 20 == 0 or j == len(todo) - 1):
                log(f"  [{j + 1}/{len(todo)}] {p.name} {p.shape} {_type_name(p.gtype)}")
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _type_name(t: int) -> str:
    return "I2_S" if t == i2s.GGML_TYPE_I2_S else T(t).name


# ---------------------------------------------------------------- entry points

def export_gguf(model_or_path, out: str | os.PathLike, wtype: str = "tq2_0", head: str = "f16",
                tokenizer_dir: str | os.PathLike | None = None, arch: str | None = None,
                name: str | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Export a Transformer or a Hugging Face folder (local path or hub id) to GGUF.

    The tokenizer comes from ``tokenizer_dir``, else from the folder itself; without one the file
    gets ``tokenizer.ggml.model = "none"`` (llama.cpp then runs on token ids only)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from .. import checkpoint
        folder = checkpoint.resolve(model_or_path)
        model = checkpoint.load(folder, packed=True)
        if tokenizer_dir is None and (folder / "tokenizer.json").is_file():
            tokenizer_dir = folder
        name = name or folder.name
    else:
        model = model_or_path
    cfg = model.config
    vocab = None
    if tokenizer_dir is not None:
        vocab = Vocab.from_folder(tokenizer_dir, vocab_size=cfg.vocab_size, bos_id=cfg.bos_token_id,
                                  eos_id=cfg.eos_token_ids[0], pad_id=cfg.pad_token_id)
    return write_gguf(out, ModelSource(model), wtype, head, vocab, arch, name, log)


def write_random_gguf(out: str | os.PathLike, cfg: str | ModelConfig = "2b4t", wtype: str = "tq2_0",
                      head: str = "f16", tokenizer_dir: str | os.PathLike | None = None, seed: int = 0,
                      arch: str | None = None, log: Callable[[str], None] | None = None) -> Path:
    """A random-weight model of ``cfg``'s exact shapes (e.g. "2b4t") as GGUF, for benchmarks.

    With no ``tokenizer_dir`` and a 128256-token config, the Llama-3 vocabulary is built from
    ../shared/data/llama3-tokenizer (``tokenizer_build.find_llama3_rank_file``) when present."""
    from ..random_model import random_config

    cfg = random_config(cfg)
    with tempfile.TemporaryDirectory() as td:
        if tokenizer_dir is None and cfg.vocab_size == 128256:
            from ..tokenizer_build import build_llama3_tokenizer_dir, find_llama3_rank_file
            if find_llama3_rank_file() is not None:
                tokenizer_dir = build_llama3_tokenizer_dir(td)
        vocab = None
        if tokenizer_dir is not None:
            vocab = Vocab.from_folder(tokenizer_dir, vocab_size=cfg.vocab_size, bos_id=cfg.bos_token_id,
                                      eos_id=cfg.eos_token_ids[0], pad_id=cfg.pad_token_id)
        label = "2B4T-shaped" if cfg == random_config("2b4t") else "random"
        return write_gguf(out, RandomSource(cfg, seed), wtype, head, vocab, arch,
                          f"BitNet b1.58 {label} random weights (seed {seed})", log)


__all__ = ["export_gguf", "write_random_gguf", "write_gguf", "ModelSource", "RandomSource", "plans",
           "Plan"]
