"""Generation engine on token ids: sampling, runners (KV-cache engines) and the decode loop.

    from bitnet158.engine import SamplingParams, generate, generate_text, stream_text, make_runner
    gen = generate(model, prompt_ids, SamplingParams(temperature=0.7, top_p=0.9, seed=1))
    ids = list(gen); gen.finish_reason, gen.completion_tokens

Fast engines (CPU C, GPU Triton) plug in with :func:`register_runner`; ``make_runner(backend="auto")``
picks the best available one. Chat templates and text live above, in :mod:`bitnet158.tokenizer`.
"""

from ..sampling_params import GenerationError, SamplingError, SamplingParams
from .generate import (Generation, Session, TextStream, encode_prompt, generate, generate_text,
                       stream_text)

# torch-bound names load on first use: the generation loop itself runs without torch for numpy
# runners (the torch-free CPU engine, bitnet158.kernels.cpu.lite)
_LAZY = {"Runner": ".runner", "RunnerSpec": ".runner", "TorchRunner": ".runner", "make_runner": ".runner",
         "register_runner": ".runner", "runners": ".runner", "Sampler": ".sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SamplingParams", "Sampler", "GenerationError", "SamplingError", "Runner", "RunnerSpec",
           "TorchRunner", "make_runner", "register_runner", "runners", "Generation", "generate",
           "Session", "TextStream", "stream_text", "generate_text", "encode_prompt"]
