"""``bitnet158 load``: import a BitNet GGUF file (llama.cpp or bitnet.cpp) into a Hugging Face folder.

    bitnet158 load model-tq2_0.gguf --out my-model/          # packed folder + tokenizer files
    bitnet158 load model-i2_s.gguf --out my-model/ --dtype float32
    bitnet158 load model.gguf --info                         # print what the file holds, write nothing

The folder is the released 2B4T layout (uint8 packed weights, bf16 ``weight_scale``, config.json,
tokenizer.json rebuilt from the file's vocabulary and merges, the chat template), loadable by
``bitnet158.checkpoint.load`` and transformers' ``BitNetForCausalLM``. In Python,
``bitnet158.convert.load_gguf(path)`` gives the model directly (scales exact, no bf16 rounding).
"""

from __future__ import annotations

import argparse
import collections

from ..errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE.gguf", help="GGUF file to import")
    p.add_argument("--out", default=None, metavar="DIR", help="output Hugging Face folder")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of embeddings and norms in the folder (default bfloat16)")
    p.add_argument("--info", action="store_true", help="describe the file and exit")


def describe(path: str) -> str:
    from .gguf_import import _tname, read_gguf

    g = read_gguf(path)
    c = g.config
    types = collections.Counter(_tname(t.tensor_type) for t in g.tensors.values())
    v = g.vocab
    tok = "none" if v is None else f"{v.pre}, {len(v.tokens)} tokens, {len(v.merges)} merges"
    lines = [f"{path}: architecture {g.arch}, {len(g.tensors)} tensors "
             f"({', '.join(f'{n} {k}' for k, n in types.most_common())})",
             f"  layers {c.num_hidden_layers}, hidden {c.hidden_size}, ffn {c.intermediate_size}, heads "
             f"{c.num_attention_heads}/{c.num_key_value_heads} (head_dim {c.head_dim}), vocab {c.vocab_size}, "
             f"context {c.max_position_embeddings}, rope theta {c.rope_theta:g}, eps {c.rms_norm_eps:g}, "
             f"{'tied' if c.tie_word_embeddings else 'untied'} head",
             f"  tokenizer: {tok}, bos {c.bos_token_id}, eos {c.eos_token_id}"]
    name = g.fields.get("general.name")
    if name:
        lines.insert(1, f"  name: {name}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from .gguf_import import gguf_to_folder

    if args.info:
        print(describe(args.file))
        return 0
    if not args.out:
        raise ConfigError("load: give --out DIR (or --info)")
    out = gguf_to_folder(args.file, args.out, dtype=args.dtype)
    print(describe(args.file))
    print(f"wrote {out}")
    return 0
