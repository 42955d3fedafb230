"""Arguments and loading shared by the commands that run a model (generate, chat, and others).

    p = argparse.ArgumentParser(); add_model_arguments(p); add_sampling_arguments(p)
    args = p.parse_args(); model, tokenizer = load_model(args); params = sampling_params(args, tokenizer)

MODEL is a Hugging Face folder (or hub id); left out, the model embedded in the package
(``bitnet158/assets/default-model``) is used when it is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import CheckpointError, ConfigError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default-model"
DTYPES = ("auto", "bfloat16", "float16", "float32")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL (optional positional) and --dtype/--device/--backend/--threads/--tokenizer/--context."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="model folder or hub id (default: the embedded model, if installed)")
    g = p.add_argument_group("model")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype of embeddings/activations (default: the checkpoint's)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--backend", default="auto",
                   help="generation engine: auto (best available: on a CPU the C engine without torch, "
                        "'lite', for packed folders), lite, cpu, torch, or a registered one")
    g.add_argument("--head", choices=("bf16", "int8"), default=None,
                   help="head precision of the CPU engines: int8 (per-row) reads half the head bytes per "
                        "token, at a small perplexity cost (default: $BITNET158_CPU_HEAD, else bf16; "
                        "docs/cpu-engine.md)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder (default: the model folder)")
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="KV cache length in tokens (default: the model's max_position_embeddings)")


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int = 128, temperature: float = 0.0,
                           top_p: float = 1.0) -> None:
    """Sampling flags. A flag left out takes the model folder's generation_config.json value, else
    the command's default given here."""
    p.set_defaults(sampling_defaults=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                          top_k=0, repetition_penalty=1.0))
    g = p.add_argument_group("sampling (unset flags: the model's generation_config.json, then defaults)")
    g.add_argument("-n", "--max-tokens", type=int, default=None,
                   help=f"most new tokens per answer (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=None, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default 0 = off)")
    g.add_argument("--top-p", type=float, default=None, help=f"nucleus mass (default {top_p})")
    g.add_argument("--repetition-penalty", type=float, default=None, help="HF-style (default 1.0 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def model_path(args) -> str:
    """The MODEL argument, or the embedded default model; a clear error when there is none."""
    if args.model:
        return args.model
    if (DEFAULT_MODEL / "config.json").is_file():
        return str(DEFAULT_MODEL)
    raise CheckpointError("no MODEL given and no default model is installed yet: pass a model folder, "
                          "e.g. `bitnet158 generate path/to/bitnet-b1.58-2B-4T \"Hello\"`")


def pick_device(name: str):
    """torch.device for ``--device`` (auto: cuda when available)."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"--device {name!r}: this machine has {n} CUDA device{'s' if n > 1 else ''} "
                          f"(cuda:0{f' .. cuda:{n - 1}' if n > 1 else ''})")
    return dev


def _no_gpu() -> bool:
    """No NVIDIA device node: ``--device auto`` means the CPU, known without importing torch."""
    return not os.path.exists("/dev/nvidiactl") or os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1")


def _lite(args, folder: Path) -> bool:
    """Whether to run the torch-free C engine: ``--backend lite``, or ``auto`` on a CPU for a packed folder."""
    from ..kernels.cpu import lite
    if args.backend == "lite":
        if args.device not in ("auto", "cpu"):
            raise ConfigError(f"--backend lite runs on the CPU, not --device {args.device}")
        if not lite.supported(folder):
            from ..kernels.cpu import binding
            why = (f"the C kernels are unavailable ({binding.error()})" if binding.lib() is None else
                   "the folder holds float master weights (quantization_mode 'online')")
            raise ConfigError(f"--backend lite: {why}; use --backend cpu or torch")
        return True
    return (args.backend == "auto" and (args.device == "cpu" or (args.device == "auto" and _no_gpu()))
            and lite.supported(folder))


def load_model(args):
    """(model, tokenizer) from the parsed model arguments. On a CPU with a packed folder the model is
    a :class:`~bitnet158.kernels.cpu.lite.LiteRunner` (the C engine, torch never imported); else a
    torch Transformer. Sets the thread count first."""
    from .. import folder as hf
    from ..tokenizer import Tokenizer

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be >= 1")
    if args.context is not None and args.context < 2:
        raise ConfigError(f"--context {args.context}: must be >= 2")
    folder = hf.resolve(model_path(args))
    args.model_folder = folder
    dtype = None if args.dtype == "auto" else args.dtype
    if _lite(args, folder):
        from ..kernels.cpu.lite import LiteRunner
        model = LiteRunner(folder, max_len=args.context, head=getattr(args, "head", None), dtype=dtype,
                           threads=args.threads)
    else:
        import torch

        from .. import checkpoint
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if getattr(args, "head", None):          # the torch-side C runner reads its head from there
            os.environ["BITNET158_CPU_HEAD"] = args.head
        model = checkpoint.load(folder, dtype=dtype, device=pick_device(args.device))
    tok = Tokenizer.from_pretrained(args.tokenizer or folder)
    if tok.vocab_size > model.config.vocab_size:
        print(f"warning: the tokenizer has {tok.vocab_size} tokens but the model only "
              f"{model.config.vocab_size}", file=sys.stderr)
    return model, tok


def engine_runner(model, max_len: int, backend: str = "auto"):
    """A batch-1 runner of ``max_len`` positions for a model from :func:`load_model` (a LiteRunner
    is its own runner)."""
    if getattr(model, "arrays", None) == "numpy":
        return model
    from ..engine import make_runner
    return make_runner(model, batch=1, max_len=max_len, backend=backend)


def sampling_params(args, tokenizer):
    """SamplingParams from the sampling arguments; stops at the tokenizer's eot/eos ids."""
    from ..engine import GenerationError, SamplingParams

    from ..sampling_params import generation_defaults

    folder = getattr(args, "model_folder", None)
    chosen = {**getattr(args, "sampling_defaults", {}),
              **(generation_defaults(folder) if folder else {})}
    for key in ("temperature", "top_k", "top_p", "repetition_penalty", "max_tokens"):
        if getattr(args, key, None) is not None:
            chosen[key] = getattr(args, key)
    flags = dict(temperature=chosen.get("temperature", 0.0), top_k=chosen.get("top_k", 0),
                 top_p=chosen.get("top_p", 1.0), repetition_penalty=chosen.get("repetition_penalty", 1.0),
                 seed=args.seed, max_new_tokens=chosen.get("max_tokens", 128))
    for field, value in flags.items():       # validate one by one to name the flag at fault
        try:
            SamplingParams(**{field: value})
        except GenerationError as e:
            flag = "--" + ("max-tokens" if field == "max_new_tokens" else field.replace("_", "-"))
            raise GenerationError(f"{flag} {value}: {str(e).split(': ', 1)[1]}") from None
    return SamplingParams(**flags, stop_ids=frozenset(tokenizer.stop_ids))


def stats_line(gen) -> str:
    """'12 prompt tokens (3 cached) 41.0 tok/s | 20 tokens 9.8 tok/s | stop'."""
    new = gen.prompt_tokens - gen.cached_tokens
    cached = f" ({gen.cached_tokens} cached)" if gen.cached_tokens else ""
    return (f"[{gen.prompt_tokens} prompt tokens{cached}, {new} computed at {gen.prefill_tok_s:.1f} tok/s"
            f" | {gen.completion_tokens} new tokens at {gen.decode_tok_s:.1f} tok/s"
            f" | {gen.finish_reason or 'interrupted'}]")


def utf8_stdout() -> None:
    """Never die on a character the terminal's encoding lacks."""
    for s in (sys.stdout, sys.stderr):
        if hasattr(s, "reconfigure"):
            s.reconfigure(errors="replace")
