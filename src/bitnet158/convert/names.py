"""What the GGUF side calls things: tensor names, architectures, metadata keys, file types.

Tensor names come from the ``gguf`` package's own table (``gguf.TENSOR_NAMES``) for the
``bitnet`` architecture, so they are llama.cpp's spelling by construction:

    model.embed_tokens.weight                      -> token_embd.weight   (also the tied head)
    model.norm.weight                              -> output_norm.weight
    lm_head.weight (untied models only)            -> output.weight
    model.layers.{i}.input_layernorm.weight        -> blk.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj      -> blk.{i}.attn_{q,k,v,output}.weight
    model.layers.{i}.self_attn.attn_sub_norm       -> blk.{i}.attn_sub_norm.weight
    model.layers.{i}.post_attention_layernorm      -> blk.{i}.ffn_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj       -> blk.{i}.ffn_{gate,up,down}.weight
    model.layers.{i}.mlp.ffn_sub_norm              -> blk.{i}.ffn_sub_norm.weight

Architectures: upstream llama.cpp knows ``bitnet`` (its graph: SiLU, no activation quantization);
Microsoft's bitnet.cpp also knows ``bitnet-b1.58`` (ReLU², the 2B4T graph) and ``bitnet-25``.
Metadata keys are ``<arch>.<key>``; ours in the ``bitnet158.`` namespace say what the file means
(scale convention, activation) so that nothing rests on a reader's defaults.
"""

from __future__ import annotations

import gguf
from gguf import MODEL_TENSOR as MT

ARCH_LLAMA_CPP = "bitnet"          # upstream llama.cpp (TQ1_0 / TQ2_0 / F16 files)
ARCH_BITNET_CPP = "bitnet-b1.58"   # bitnet.cpp's 2B4T architecture (I2_S files)
KNOWN_ARCHS = (ARCH_LLAMA_CPP, ARCH_BITNET_CPP, "bitnet-25")

# our own keys (llama.cpp ignores unknown keys)
K_FORMAT = "bitnet158.format_version"
K_SCALE = "bitnet158.weight_scale"          # "multiplier": a ternary tensor's value is code * d
K_ACT = "bitnet158.hidden_act"              # "relu2"
K_ACT_QUANT = "bitnet158.activation_quant"  # "absmax-int8-per-token"
K_TIED = "bitnet158.tie_word_embeddings"
FORMAT_VERSION = 1

_T = gguf.TENSOR_NAMES
PROJ_GGUF = {  # our projection path -> gguf tensor kind
    "self_attn.q_proj": MT.ATTN_Q, "self_attn.k_proj": MT.ATTN_K, "self_attn.v_proj": MT.ATTN_V,
    "self_attn.o_proj": MT.ATTN_OUT, "mlp.gate_proj": MT.FFN_GATE, "mlp.up_proj": MT.FFN_UP,
    "mlp.down_proj": MT.FFN_DOWN,
}
NORM_GGUF = {
    "input_layernorm": MT.ATTN_NORM, "self_attn.attn_sub_norm": MT.ATTN_SUB_NORM,
    "post_attention_layernorm": MT.FFN_NORM, "mlp.ffn_sub_norm": MT.FFN_SUB_NORM,
}
EMBED = _T[MT.TOKEN_EMBD] + ".weight"
OUT_NORM = _T[MT.OUTPUT_NORM] + ".weight"
OUTPUT = _T[MT.OUTPUT] + ".weight"


def proj_name(layer: int, proj: str) -> str:
    return _T[PROJ_GGUF[proj]].format(bid=layer) + ".weight"


def proj_scale_name(layer: int, proj: str) -> str:
    """llama.cpp's optional separate per-tensor scale (``blk.N.attn_q.scale``), read on import."""
    return _T[PROJ_GGUF[proj]].format(bid=layer) + ".scale"


def norm_name(layer: int, norm: str) -> str:
    return _T[NORM_GGUF[norm]].format(bid=layer) + ".weight"


def key(arch: str, k: str) -> str:
    """``gguf.Keys`` template (e.g. ``Keys.LLM.CONTEXT_LENGTH``) filled with the architecture."""
    return k.format(arch=arch)


# general.file_type for each weight type (gguf.LlamaFileType; I2_S is bitnet.cpp's 40)
FILE_TYPES = {"tq1_0": int(gguf.LlamaFileType.MOSTLY_TQ1_0), "tq2_0": int(gguf.LlamaFileType.MOSTLY_TQ2_0),
              "f16": int(gguf.LlamaFileType.MOSTLY_F16), "i2_s": 40}
WEIGHT_TYPES = tuple(FILE_TYPES)
