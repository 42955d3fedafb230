"""The ``bitnet158`` command: one table of subcommands, each a module with two functions.

    bitnet158 generate MODEL "prompt"      bitnet158 chat [MODEL]        bitnet158 serve [MODEL]
    bitnet158 eval ppl|tasks MODEL ...     bitnet158 bench MODEL         bitnet158 convert MODEL OUT.gguf
    bitnet158 data ...                     bitnet158 tokenizer train ... bitnet158 pretrain RECIPE
    bitnet158 sft RECIPE                   bitnet158 dpo RECIPE          bitnet158 export CKPT OUT

Each module named below defines ``add_arguments(parser)`` and ``main(args) -> int``; it is imported
only when its subcommand runs, so a missing optional extra only affects that subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import BitNetError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("bitnet158.commands.generate", "complete a prompt with a model"),
    "chat": ("bitnet158.commands.chat", "interactive multi-turn chat"),
    "serve": ("bitnet158.serve.cli", "OpenAI-compatible HTTP server"),
    "eval": ("bitnet158.eval.cli", "perplexity and zero-shot tasks"),
    "bench": ("bitnet158.eval.bench_cli", "memory / latency / energy report of a model"),
    "convert": ("bitnet158.convert.cli", "export a model to GGUF"),
    "load": ("bitnet158.convert.load_cli", "import a GGUF file into a Hugging Face folder"),
    "data": ("bitnet158.train.data_cli", "tokenize text/jsonl/parquet into training shards"),
    "tokenizer": ("bitnet158.train.tokenizer_cli", "train a byte-level BPE tokenizer"),
    "pretrain": ("bitnet158.train.pretrain", "pretrain with the two-stage recipe"),
    "sft": ("bitnet158.train.sft", "supervised fine-tuning on chat data"),
    "dpo": ("bitnet158.train.dpo", "direct preference optimization"),
    "export": ("bitnet158.train.export", "export a training checkpoint to a packed HF folder"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            return None  # the subcommand itself is not part of this build
        raise


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="bitnet158", description="Native 1.58-bit (ternary) LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods = {}
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        # import only the module that runs (help lists all names without importing them)
        if name == wanted:
            mod = _load(module)
            if mod is not None:
                mod.add_arguments(p)
            mods[name] = mod
    return parser, mods


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser, mods = build_parser()
    args = parser.parse_args()
    if not args.command:
        parser.print_help()
        return 0
    mod = mods.get(args.command)
    if mod is None:
        print(f"bitnet158 {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        code = int(mod.main(args) or 0)
        dist_mod = sys.modules.get("bitnet158.train.distributed")
        if dist_mod is not None:          # a torchrun rank: skip interpreter finalization
            dist_mod.exit_if_closed(code)
        return code
    except BitNetError as e:
        print(f"bitnet158 {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except ImportError as e:
        print(f"bitnet158 {args.command}: missing dependency: {e.name or e} "
              f"(install the extra this command needs, e.g. pip install 'bitnet158[serve]')",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
