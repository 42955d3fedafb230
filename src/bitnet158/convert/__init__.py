"""GGUF interop with llama.cpp and bitnet.cpp, both ways (needs the `gguf` package: the `gguf` extra).

    from bitnet158.convert import export_gguf, load_gguf, write_random_gguf
    export_gguf("hf-folder", "model.gguf", wtype="tq2_0", head="f16")   # TQ2_0 / TQ1_0 / I2_S / F16
    model = load_gguf("model.gguf")                                     # -> packed Transformer
    write_random_gguf("bench-2b4t.gguf", "2b4t", wtype="tq2_0")         # random 2B4T-shaped file

Command line: ``bitnet158 convert`` and ``bitnet158 load``. Formats and caveats: docs/gguf.md.
"""

from .gguf_export import export_gguf, write_gguf, write_random_gguf  # noqa: F401
from .gguf_import import load_gguf, read_gguf  # noqa: F401
