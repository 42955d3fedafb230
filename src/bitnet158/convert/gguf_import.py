"""Read BitNet GGUF files (ours, llama.cpp's, bitnet.cpp's) back into a bitnet158 model.

    from bitnet158.convert import load_gguf, read_gguf
    model = load_gguf("model.gguf")                 # packed Transformer (eval), fp32 by default
    g = read_gguf("model.gguf")                     # config, metadata, tensors, vocabulary
    g.config, g.arch, g.fields["general.name"], g.vocab.save_folder("tok/", "model.gguf")

Ternary projections may be TQ1_0, TQ2_0 (one f16 ``d`` per 256-block: every block holding a
nonzero weight must carry the same ``d``, which becomes gamma), I2_S (bitnet.cpp, type 36: codes
+ float32 scale; see ``i2s.py``) or a float type holding ``W_t * gamma`` (F16/BF16/F32). llama.cpp's
optional separate ``blk.N.<proj>.scale`` tensors multiply in. Norms and the embedding may be any
type the ``gguf`` package dequantizes (F32, F16, BF16, Q8_0, Q6_K, ...).

Everything is checked: a file that is not GGUF, is truncated, has another architecture, misses a
key or a tensor, has a tensor of the wrong shape, type or values raises ``CheckpointError`` /
``ConfigError`` naming the file and the key or tensor.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType, Keys

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..model import PROJECTIONS
from . import headquant, i2s, names, tq
from .hf_layout import pack_hf_np
from .gguf_export import NORMS, _proj_shape
from .vocab import Vocab

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
IGNORED_TENSORS = ("rope_freqs.weight",)


_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
            GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?"}


class _Reader(gguf.GGUFReader):
    """``gguf.GGUFReader`` that also reads bitnet.cpp's I2_S (type 36), keeps tensors of unknown
    types (data None: an error only if the model needs them), and names the tensor when the file
    ends before its data does.

    Metadata values are decoded into ``self.values`` with ``struct`` over the mapped bytes: the
    stock reader builds one numpy view per array element, which takes ~30 s for a 128k-token
    vocabulary with its 280k merges on a small machine (this takes well under a second). Only
    little-endian files take this path; others go through the stock parser."""

    def _build_fields(self, offs: int, count: int) -> int:
        if self.byte_order == "S":
            offs = super()._build_fields(offs, count)
            self.values = {k: f.contents() for k, f in self.fields.items()}
            return offs
        buf = memoryview(self.data)
        self.values = {}
        for _ in range(count):
            start = offs
            key, offs = self._str(buf, offs)
            vtype = struct.unpack_from("<I", buf, offs)[0]
            offs += 4
            vstart = offs
            value, offs = self._value(buf, offs, vtype, key)
            if key in self.values:
                raise ValueError(f"duplicated metadata key {key!r}")
            self.values[key] = value
            gt = GGUFValueType(vtype)
            parts = ([self._get(vstart, np.dtype(_SCALARS[gt][1:]).newbyteorder("<"))] if gt in _SCALARS
                     else [self._get(start, np.uint8, offs - start)])
            self._push_field(gguf.ReaderField(start, key, parts, [0], [gt]), skip_sum=True)
        return offs

    @staticmethod
    def _str(buf, offs: int) -> tuple[str, int]:
        n = struct.unpack_from("<Q", buf, offs)[0]
        if offs + 8 + n > len(buf):
            raise ValueError(f"string at byte {offs} runs past the end of the file")
        return str(buf[offs + 8: offs + 8 + n], "utf-8"), offs + 8 + n

    def _value(self, buf, offs: int, vtype: int, key: str):
        try:
            gt = GGUFValueType(vtype)
        except ValueError:
            raise ValueError(f"metadata key {key!r} has unknown value type {vtype}") from None
        if gt == GGUFValueType.STRING:
            return self._str(buf, offs)
        if gt in _SCALARS:
            return struct.unpack_from(_SCALARS[gt], buf, offs)[0], offs + struct.calcsize(_SCALARS[gt])
        if gt == GGUFValueType.ARRAY:
            itype, n = struct.unpack_from("<IQ", buf, offs)
            offs += 12
            it = GGUFValueType(itype)
            if it in _SCALARS:
                dt = np.dtype(_SCALARS[it][1:]).newbyteorder("<")
                end = offs + n * dt.itemsize
                if end > len(buf):
                    raise ValueError(f"metadata array {key!r} runs past the end of the file")
                return np.frombuffer(buf[offs:end], dtype=dt).tolist(), end
            out = []
            for _ in range(n):
                v, offs = self._value(buf, offs, itype, key)
                out.append(v)
            return out, offs
        raise ValueError(f"metadata key {key!r} has unhandled value type {gt.name}")

    def _build_tensors(self, start_offs: int, fields) -> None:
        tensors, seen = [], set()
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = str(bytes(name_data), encoding="utf-8")
            if name in seen:
                raise ValueError(f"duplicated tensor {name!r}")
            seen.add(name)
            tid = int(raw_dtype[0])
            n_elems = int(np.prod(dims))
            np_dims = tuple(int(x) for x in reversed(dims.tolist()))
            offs = int(start_offs + offset[0])
            if tid == i2s.GGML_TYPE_I2_S:
                n_bytes, gtype, itype, count = n_elems // 4 + i2s.TRAILER, tid, np.uint8, None
            else:
                try:
                    gtype = T(tid)
                except ValueError:
                    tensors.append(gguf.ReaderTensor(name, tid, dims, n_elems, 0, offs, None, field))
                    continue
                block, type_size = GGML_QUANT_SIZES[gtype]
                n_bytes = n_elems * type_size // block
                itype = {T.F32: np.float32, T.F16: np.float16}.get(gtype, np.uint8)
                count = n_elems if itype is not np.uint8 else None
            if offs + n_bytes > size:
                raise ValueError(f"tensor {name!r} needs bytes {offs}..{offs + n_bytes} but the file "
                                 f"ends at {size} (truncated file?)")
            if count is None:
                data = self._get(offs, np.uint8, n_bytes)
                if gtype != i2s.GGML_TYPE_I2_S:
                    data = data.reshape(gguf.quants.quant_shape_to_byte_shape(np_dims, gtype))
            else:
                data = self._get(offs, itype, count).reshape(np_dims)
            tensors.append(gguf.ReaderTensor(name, gtype, dims, n_elems, n_bytes, offs, data, field))
        self.tensors = tensors


@dataclass
class GGUFModel:
    """A parsed BitNet GGUF file: metadata (decoded), tensors by name, config, vocabulary."""
    path: Path
    arch: str
    fields: dict
    tensors: dict
    config: ModelConfig
    vocab: Vocab | None

    def _err(self, what: str) -> str:
        return f"{self.path}: {what}"

    def tensor(self, name: str, shape: tuple[int, ...]):
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(self._err(f"missing tensor {name}"))
        got = tuple(int(x) for x in reversed(t.shape.tolist()))
        if got != tuple(shape):
            raise CheckpointError(self._err(f"tensor {name} has shape {list(got)}, expected {list(shape)} "
                                            "(numpy order [rows, row length])"))
        if t.data is None:
            raise CheckpointError(self._err(f"tensor {name} has ggml type id {t.tensor_type}, which "
                                            "this reader does not know"))
        return t

    def floats(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float tensor (any gguf-dequantizable type) as float32 numpy."""
        t = self.tensor(name, shape)
        if t.tensor_type == i2s.GGML_TYPE_I2_S or t.tensor_type in (T.TQ1_0, T.TQ2_0):
            raise CheckpointError(self._err(f"tensor {name} is {_tname(t.tensor_type)}, expected a "
                                            "float or quantized-float type"))
        rows = shape[0] if len(shape) == 2 else 1
        try:
            x = headquant.dequantize_float(t.data, t.tensor_type, rows, shape[-1])
        except NotImplementedError:
            raise CheckpointError(self._err(f"tensor {name} has type {_tname(t.tensor_type)}, which the "
                                            "gguf package cannot dequantize")) from None
        return x.reshape(shape)

    def ternary(self, layer: int, proj: str) -> tuple[np.ndarray, float]:
        """(W_t int8 [out, in], gamma) of one projection."""
        rows, k = _proj_shape(self.config, proj)
        name = names.proj_name(layer, proj)
        t = self.tensor(name, (rows, k))
        try:
            if t.tensor_type in (T.TQ1_0, T.TQ2_0):
                kind = "tq1_0" if t.tensor_type == T.TQ1_0 else "tq2_0"
                w, d = tq.PACKERS[kind][1](t.data, rows, k)
                if w.max(initial=0) > 1:
                    raise ValueError("holds code 3, which no ternary weight maps to")
                gamma = tq.tensor_scale(w, d, name)
            elif t.tensor_type == i2s.GGML_TYPE_I2_S:
                w, gamma = i2s.unpack_i2s(t.data, rows, k, name)
            elif t.tensor_type in FLOAT_TYPES:
                w, gamma = _ternary_from_floats(headquant.dequantize_float(t.data, t.tensor_type, rows, k))
            else:
                raise ValueError(f"has type {_tname(t.tensor_type)}; ternary projections must be "
                                 "TQ1_0, TQ2_0, I2_S or F16/BF16/F32")
        except ValueError as e:
            msg = str(e).removeprefix(name + ": ")
            raise CheckpointError(self._err(f"tensor {name} {msg}")) from None
        scale = self.tensors.get(names.proj_scale_name(layer, proj))
        if scale is not None:                       # llama.cpp's optional separate multiplier
            gamma *= float(self.floats(scale.name, (int(np.prod(scale.shape)),)).reshape(-1)[0])
        if not np.isfinite(gamma) or gamma < 0:
            raise CheckpointError(self._err(f"tensor {name} has scale {gamma}"))
        return w, gamma

    def state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The state dict of ``Transformer(self.config, packed=True)``."""
        cfg = self.config
        d, v = cfg.hidden_size, cfg.vocab_size
        sd = {"model.embed_tokens.weight": _torch(self.floats(names.EMBED, (v, d)), dtype),
              "model.norm.weight": _torch(self.floats(names.OUT_NORM, (d,)), dtype)}
        if not cfg.tie_word_embeddings:
            sd["lm_head.weight"] = _torch(self.floats(names.OUTPUT, (v, d)), dtype)
        sizes = {"input_layernorm": d, "post_attention_layernorm": d,
                 "self_attn.attn_sub_norm": cfg.num_attention_heads * cfg.head_dim,
                 "mlp.ffn_sub_norm": cfg.intermediate_size}
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            for norm in NORMS:
                sd[p + norm + ".weight"] = _torch(self.floats(names.norm_name(i, norm), (sizes[norm],)), dtype)
            for proj in PROJECTIONS:
                w, gamma = self.ternary(i, proj)
                sd[p + proj + ".weight"] = torch.from_numpy(pack_hf_np(w))
                sd[p + proj + ".weight_scale"] = torch.tensor([gamma], dtype=torch.float32)
        return sd

    def check_tensors(self) -> None:
        """Refuse tensors this model has no place for (they mean config and weights disagree)."""
        cfg = self.config
        known = {names.EMBED, names.OUT_NORM, *IGNORED_TENSORS}
        if not cfg.tie_word_embeddings:
            known.add(names.OUTPUT)
        for i in range(cfg.num_hidden_layers):
            known |= {names.norm_name(i, n) for n in NORMS}
            known |= {names.proj_name(i, p) for p in PROJECTIONS}
            known |= {names.proj_scale_name(i, p) for p in PROJECTIONS}
        extra = sorted(set(self.tensors) - known)
        if extra:
            raise CheckpointError(self._err(f"unexpected tensor(s) {', '.join(extra[:5])}"
                                            f"{' ...' if len(extra) > 5 else ''} for a "
                                            f"{cfg.num_hidden_layers}-layer BitNet model"))


def _f32(v) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(v)))


def _torch(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch tensor that owns its memory (never a view of the memory-mapped file)."""
    return torch.from_numpy(x.copy() if not x.flags.writeable else x).to(dtype)


def _tname(t: int) -> str:
    if t == i2s.GGML_TYPE_I2_S:
        return "I2_S"
    try:
        return T(t).name
    except ValueError:
        return f"type id {t}"


def _ternary_from_floats(x: np.ndarray) -> tuple[np.ndarray, float]:
    """x = W_t * gamma (float) -> (W_t, gamma); values must be 0 or +-gamma (to 1e-3 relative)."""
    gamma = float(np.abs(x).max(initial=0.0))
    if gamma == 0.0:
        return np.zeros(x.shape, dtype=np.int8), 0.0
    w = np.rint(x / gamma)
    if np.abs(x - w * gamma).max() > 1e-3 * gamma:
        raise ValueError("is a float tensor whose values are not {-g, 0, +g} for one scale g "
                         "(not a ternary weight)")
    return w.astype(np.int8), gamma


def _fields(reader: _Reader) -> dict:
    return {k: v for k, v in reader.values.items() if not k.startswith("GGUF.")}


def _config(path: Path, arch: str, f: dict, tensors: dict) -> ModelConfig:
    def get(k: str, default=None, required: bool = True):
        key = names.key(arch, k)
        if key in f:
            return f[key]
        if required and default is None:
            raise ConfigError(f"{path}: missing metadata key {key}")
        return default

    emb = tensors.get(names.EMBED)
    if emb is None:
        raise CheckpointError(f"{path}: missing tensor {names.EMBED}")
    heads = int(get(Keys.Attention.HEAD_COUNT))
    hidden = int(get(Keys.LLM.EMBEDDING_LENGTH))
    head_dim = int(get(Keys.Attention.KEY_LENGTH, hidden // heads, required=False))
    rot = int(get(Keys.Rope.DIMENSION_COUNT, head_dim, required=False))
    if rot != head_dim:
        raise ConfigError(f"{path}: {names.key(arch, Keys.Rope.DIMENSION_COUNT)}={rot} differs from "
                          f"head_dim={head_dim}; partial RoPE is not part of BitNet b1.58")
    act = f.get(names.K_ACT, f.get(f"{arch}.hidden_activation"))
    if act is None and arch != names.ARCH_LLAMA_CPP:
        act = "relu2"                   # bitnet.cpp's bitnet-b1.58 / bitnet-25 graphs use ReLU²
    if act is None:
        warnings.warn(f"{path}: no activation key ({names.K_ACT}); assuming relu2 (BitNet b1.58 "
                      "2B4T). Files converted from SiLU models (1bitLLM bitnet_b1_58-*) would compute "
                      "differently", stacklevel=3)
        act = "relu2"
    conv = f.get(names.K_SCALE, "multiplier")
    if conv != "multiplier":
        raise ConfigError(f"{path}: {names.K_SCALE}={conv!r}, only 'multiplier' is defined")
    kw = dict(vocab_size=int(emb.shape[1]), hidden_size=hidden,
              intermediate_size=int(get(Keys.LLM.FEED_FORWARD_LENGTH)),
              num_hidden_layers=int(get(Keys.LLM.BLOCK_COUNT)), num_attention_heads=heads,
              num_key_value_heads=int(get(Keys.Attention.HEAD_COUNT_KV, heads, required=False)),
              max_position_embeddings=int(get(Keys.LLM.CONTEXT_LENGTH)),
              rms_norm_eps=_f32(get(Keys.Attention.LAYERNORM_RMS_EPS)),
              rope_theta=_f32(get(Keys.Rope.FREQ_BASE)),
              tie_word_embeddings=names.OUTPUT not in tensors, hidden_act=str(act), dtype="float32")
    if head_dim != hidden // heads:
        kw["head_dim_override"] = head_dim
    ids = {k: f.get(getattr(Keys.Tokenizer, k)) for k in ("BOS_ID", "EOS_ID", "EOT_ID", "PAD_ID")}
    fits = lambda i: i is not None and 0 <= int(i) < kw["vocab_size"]  # noqa: E731
    if fits(ids["BOS_ID"]):
        kw["bos_token_id"] = int(ids["BOS_ID"])
    eos = ids["EOS_ID"] if fits(ids["EOS_ID"]) else ids["EOT_ID"]
    if fits(eos):
        kw["eos_token_id"] = int(eos)
    if fits(ids["PAD_ID"]):
        kw["pad_token_id"] = int(ids["PAD_ID"])
    if not fits(ModelConfig.bos_token_id) and "bos_token_id" not in kw:
        kw["bos_token_id"] = 0          # no special ids in the file and the 2B4T ones do not fit
    if not fits(ModelConfig.eos_token_id) and "eos_token_id" not in kw:
        kw["eos_token_id"] = 0
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Parse and validate a BitNet GGUF file's header (tensor data stays memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        reader = _Reader(path)
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, struct.error,
            UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    f = _fields(reader)
    arch = f.get(Keys.General.ARCHITECTURE)
    if arch is None:
        raise ConfigError(f"{path}: missing metadata key {Keys.General.ARCHITECTURE}")
    if arch not in names.KNOWN_ARCHS:
        raise ConfigError(f"{path}: general.architecture={arch!r} is not a BitNet architecture "
                          f"({', '.join(names.KNOWN_ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    try:
        vocab = Vocab.from_fields(f, str(path))
    except TokenizerError as e:     # the weights are still usable; say why there is no tokenizer
        warnings.warn(f"{e}; loading the weights without a tokenizer", stacklevel=2)
        vocab = None
    cfg = _config(path, arch, f, tensors)
    g = GGUFModel(path, arch, f, tensors, cfg, vocab)
    g.check_tensors()
    return g


def load_gguf(path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu",
              attn_impl: str = "sdpa") -> "torch.nn.Module":
    """A packed bitnet158 Transformer (eval) from a BitNet GGUF file."""
    from ..checkpoint import from_state, torch_dtype

    g = read_gguf(path)
    dt = torch_dtype(dtype)
    cfg = g.config.replace(dtype=str(dt).replace("torch.", ""))
    return from_state(cfg, g.state(dt), packed=True, attn_impl=attn_impl, device=device)


def gguf_to_folder(path: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Write a GGUF file as a packed Hugging Face folder (config, safetensors, tokenizer files).

    Scales are stored as bf16 ``weight_scale`` there (the released format), so an f16 TQ scale
    loses its last 3 mantissa bits; load the GGUF directly for bit-exact scales."""
    import tempfile

    from .. import checkpoint

    g = read_gguf(path)
    model = load_gguf(path, dtype=dtype)
    with tempfile.TemporaryDirectory() as td:
        tok_dir = None
        if g.vocab is not None:
            tok_dir = g.vocab.save_folder(td, str(path), max_length=g.config.max_position_embeddings)
        return checkpoint.save(model, out, layout="packed", tokenizer_dir=tok_dir)
