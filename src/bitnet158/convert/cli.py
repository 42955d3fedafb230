"""``bitnet158 convert``: a BitNet b1.58 model (or random weights) to a GGUF file.

    bitnet158 convert path/to/hf-folder model-tq2_0.gguf --type tq2_0 --head f16
    bitnet158 convert path/to/hf-folder model-i2_s.gguf --type i2_s        # bitnet.cpp
    bitnet158 convert --random 2b4t bench-2b4t-tq2_0.gguf --type tq2_0 --head q8_0

``--type``: tq2_0 / tq1_0 (upstream llama.cpp ternary types, 2.06 / 1.69 bits per weight), i2_s
(Microsoft bitnet.cpp, 2 bits + one float per tensor; architecture ``bitnet-b1.58``) or f16
(dequantized ternary values). ``--head`` is the embedding / tied head type. ``--random NAME``
writes random ternary weights of a named size's exact shapes ("2b4t", "tiny", ...), with the
Llama-3 vocabulary when ../shared/data/llama3-tokenizer is present; no download, little memory.
See docs/gguf.md for what llama.cpp computes with these files.
"""

from __future__ import annotations

import argparse
import os
import time

from ..errors import ConfigError
from . import names
from .headquant import HEAD_TYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="MODEL OUT.gguf: the source model (Hugging Face folder or hub id) and the "
                        "output file; with --random only OUT.gguf")
    p.add_argument("--type", dest="wtype", default="tq2_0", choices=names.WEIGHT_TYPES,
                   help="ternary weight type (default tq2_0)")
    p.add_argument("--head", default="f16", choices=tuple(HEAD_TYPES),
                   help="embedding / tied head type (default f16)")
    p.add_argument("--random", metavar="SIZE", default=None,
                   help="write random weights of a named size's shapes (e.g. 2b4t) instead of a model")
    p.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="folder with tokenizer.json (default: the model folder; for --random 2b4t the "
                        "Llama-3 vocabulary from ../shared/data when present)")
    p.add_argument("--arch", default=None, choices=names.KNOWN_ARCHS,
                   help="GGUF architecture (default: bitnet, or bitnet-b1.58 for i2_s)")
    p.add_argument("--name", default=None, help="general.name written into the file")


def main(args: argparse.Namespace) -> int:
    from .gguf_export import export_gguf, write_random_gguf

    paths = args.paths
    want = 1 if args.random else 2
    if len(paths) != want:
        raise ConfigError("convert: expected " + ("OUT.gguf after --random SIZE" if args.random
                                                  else "MODEL and OUT.gguf"))
    out = paths[-1]
    if os.path.isdir(out):
        raise ConfigError(f"convert: output {out} is a directory; give a file name")
    t0 = time.time()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.random:
        write_random_gguf(out, args.random, wtype=args.wtype, head=args.head,
                          tokenizer_dir=args.tokenizer, seed=args.seed, arch=args.arch, log=log)
    else:
        export_gguf(paths[0], out, wtype=args.wtype, head=args.head, tokenizer_dir=args.tokenizer,
                    arch=args.arch, name=args.name, log=log)
    size = os.path.getsize(out)
    print(f"wrote {out}: {size / 1e9:.3f} GB, weights {args.wtype}, head {args.head}, "
          f"{time.time() - t0:.1f} s")
    return 0
