"""``bitnet158 export CKPT OUT``: a training checkpoint -> a Hugging Face BitNet folder (packed by default).

    bitnet158 export runs/tiny OUT                       # the run's latest checkpoint, packed 2-bit
    bitnet158 export runs/tiny/checkpoints/step-00001000 OUT --layout master --dtype bfloat16
    bitnet158 export runs/tiny OUT --tokenizer tok/ --max-shard-mb 15

``CKPT`` is a checkpoint folder written by the training loop (``config.json`` + fp32
``model.safetensors``) or a run folder (its ``checkpoints/latest`` is used). The output is the
released layout (SPEC §3): uint8 ``[out/4, in]`` projections + bf16 ``weight_scale`` (= absmean
gamma, a multiplier), bf16 embeddings and norms, ``config.json`` with ``quantization_mode:
"offline"``, ``generation_config.json``, and the tokenizer files (from ``--tokenizer`` or the one
recorded in the checkpoint). It loads in ``bitnet158.load`` and transformers' ``BitNetForCausalLM``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import Transformer
from .loop import find_latest


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint or run folder."""
    p = Path(path)
    if (p / "model.safetensors").is_file() and (p / "config.json").is_file():
        return p
    latest = find_latest(p)
    if latest is None:
        raise CheckpointError(f"{p}: neither a training checkpoint (config.json + model.safetensors) "
                              "nor a run folder with checkpoints/")
    if not (latest / "config.json").is_file():
        raise CheckpointError(f"{latest}: has no config.json (a full-precision baseline run cannot be "
                              "exported as a BitNet model)")
    return latest


def load_training_checkpoint(path: str | Path) -> tuple[Transformer, dict]:
    """(Transformer with fp32 BitLinear latents, trainer_state dict) of a checkpoint or run folder."""
    ckpt = resolve_checkpoint(path)
    cfg = ModelConfig.from_json(ckpt / "config.json")
    model = Transformer(cfg.replace(dtype="float32"))
    state = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}/model.safetensors does not fit its config.json: missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]}")
    ts = ckpt / "trainer_state.json"
    return model.eval(), (json.loads(ts.read_text()) if ts.is_file() else {})


def export(ckpt: str | Path, out: str | Path, tokenizer: str | Path | None = None, layout: str = "packed",
           dtype: str = "bfloat16", max_shard_bytes: int | None = None, spelling: str = "v4") -> Path:
    from .. import checkpoint

    model, state = load_training_checkpoint(ckpt)
    tok = tokenizer or state.get("tokenizer")
    if tok is not None and not (Path(tok) / "tokenizer.json").is_file():
        if tokenizer is not None:
            raise CheckpointError(f"{tok}: no tokenizer.json")
        tok = None  # recorded path no longer exists (e.g. another machine): export without it
    with torch.no_grad():
        return checkpoint.save(model, out, layout=layout, tokenizer_dir=tok, spelling=spelling,
                               max_shard_bytes=max_shard_bytes, dtype=dtype)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="training checkpoint folder, or a run folder (uses its latest checkpoint)")
    p.add_argument("out", help="output Hugging Face folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one the run used)")
    p.add_argument("--layout", default="packed", choices=["packed", "master", "bitlinear"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of embeddings / norms (and master weights)")
    p.add_argument("--max-shard-mb", type=float, default=None, help="split model.safetensors past this size")
    p.add_argument("--spelling", default="v4", choices=["v4", "v5"], help="config.json key spelling")


def main(args: argparse.Namespace) -> int:
    shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    out = export(args.ckpt, args.out, tokenizer=args.tokenizer, layout=args.layout, dtype=args.dtype,
                 max_shard_bytes=shard, spelling=args.spelling)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(json.dumps({"out": str(out), "layout": args.layout, "bytes": size}))
    return 0
