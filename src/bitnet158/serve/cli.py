"""``bitnet158 serve [MODEL]``: run the OpenAI-compatible server on a model folder.

    bitnet158 serve path/to/model --port 8000 --max-batch 8 --max-queue 64
    bitnet158 serve                                    # the embedded default model
    curl http://127.0.0.1:8000/v1/models

Binds 127.0.0.1 unless ``--host`` says otherwise. With ``--api-key KEY`` (or the environment
variable ``BITNET158_API_KEY``) every /v1 request needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import CheckpointError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default-model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="model folder (config.json + safetensors + tokenizer.json); default: the "
                        "embedded default model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("BITNET158_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $BITNET158_API_KEY, else none)")
    p.add_argument("--model-name", default=None,
                   help="the id clients send as 'model' (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="KV-cache rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row before new ones get 429 (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per step, so long prompts do not stall running "
                        "requests (default 512)")
    p.add_argument("--prefill-together", action="store_true",
                   help="prompts admitted together share prefill calls: sooner first tokens for bursts of "
                        "equal-length prompts on a GPU, later ones for varied lengths (docs/serving.md)")
    p.add_argument("--generation-config", choices=("auto", "none"), default="auto",
                   help="auto: sampling defaults for fields a request leaves out come from the model "
                        "folder's generation_config.json; none: OpenAI's defaults (temperature 1)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length per row (default: the model's max_position_embeddings)")
    p.add_argument("--backend", default="auto", help="runner: auto (best available), torch, cpu, ...")
    p.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--cors-origin", action="append", default=None,
                   help="allow browser clients from this origin (repeatable; '*' for any)")
    p.add_argument("--log-level", default="info")


def resolve_model(model: str | None) -> str:
    if model is not None:
        return model
    if (DEFAULT_MODEL / "config.json").is_file():
        return str(DEFAULT_MODEL)
    raise CheckpointError("no MODEL given and this build has no embedded default model "
                          f"({DEFAULT_MODEL} is missing)")


def main(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..checkpoint import load, resolve
    from ..tokenizer import Tokenizer
    from .app import create_app, generation_defaults

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("max_batch", "max_queue", "port", "prefill_chunk"):
        v = getattr(args, name)
        if v < (0 if name == "port" else 1):
            raise CheckpointError(f"--{name.replace('_', '-')}={v} must be positive")
    folder = resolve(resolve_model(args.model))
    model = load(folder, dtype=args.dtype, device=args.device)
    tok = Tokenizer.from_pretrained(folder)
    name = args.model_name or Path(folder).name
    defaults = generation_defaults(folder) if args.generation_config == "auto" else {}
    app = create_app(model, tok, name, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_len=args.ctx, backend=args.backend, api_key=args.api_key,
                     cors_origins=args.cors_origin, prefill_chunk=args.prefill_chunk, defaults=defaults,
                     prefill_together=args.prefill_together)
    print(f"serving {name!r} from {folder} on http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch}, queue {args.max_queue}, context {app.state.server.max_len}, "
          f"runner {type(app.state.server.engine.runner).__name__}, defaults {defaults or 'OpenAI'})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
