"""Generation engine on token ids: sampling, runners (KV-cache engines) and the decode loop.

    from bitnet158.engine import SamplingParams, generate, generate_text, stream_text, make_runner
    gen = generate(model, prompt_ids, SamplingParams(temperature=0.7, top_p=0.9, seed=1))
    ids = list(gen); gen.finish_reason, gen.completion_tokens

Fast engines (CPU C, GPU Triton) plug in with :func:`register_runner`; ``make_runner(backend="auto")``
picks the best available one. Chat templates and text live above, in :mod:`bitnet158.tokenizer`.
"""

from .generate import (Generation, Session, TextStream, encode_prompt, generate, generate_text,
                       stream_text)
from .runner import Runner, RunnerSpec, TorchRunner, make_runner, register_runner, runners
from .sampling import GenerationError, Sampler, SamplingError, SamplingParams

__all__ = ["SamplingParams", "Sampler", "GenerationError", "SamplingError", "Runner", "RunnerSpec",
           "TorchRunner", "make_runner", "register_runner", "runners", "Generation", "generate",
           "Session", "TextStream", "stream_text", "generate_text", "encode_prompt"]
