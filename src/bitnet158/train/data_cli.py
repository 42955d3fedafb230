"""``bitnet158 data``: tokenize text / jsonl / parquet files (or a Hugging Face dataset) into shards.

    bitnet158 data --input ../shared/data/gutenberg/texts --tokenizer tok/ --out shards/gutenberg
    bitnet158 data --input notes.jsonl --text-key body --tokenizer tok/ --out shards/notes --val-fraction 0.05
    bitnet158 data --hf-dataset wikitext --hf-config wikitext-2-raw-v1 --tokenizer tok/ --out shards/wt2

Writes ``OUT/index.json`` and memory-mapped ``train-*.bin`` / ``val-*.bin`` token files (see
:mod:`bitnet158.train.data`). Project Gutenberg licence headers/footers are stripped.
"""

from __future__ import annotations

import argparse
import json

from .data import build_shards
from .text import DataError, iter_documents


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", default=[], metavar="PATH",
                   help="files or folders (.txt/.md/.jsonl/.parquet, optionally .gz)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="folder with tokenizer.json")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of tokens held out (whole documents)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--text-key", default=None, help="jsonl field / parquet column holding the text")
    p.add_argument("--no-gutenberg-strip", action="store_true", help="keep Project Gutenberg licence text")
    p.add_argument("--no-bos", action="store_true", help="do not start documents with the BOS token")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file")
    p.add_argument("--hf-dataset", default=None, help="a Hugging Face dataset name (needs `datasets` and network)")
    p.add_argument("--hf-config", default=None, help="its configuration name")
    p.add_argument("--hf-split", default="train", help="its split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _hf_documents(name: str, config: str | None, split: str, key: str | None):
    try:
        import datasets
    except ImportError:
        raise DataError("--hf-dataset needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, ...: say which dataset failed and why
        raise DataError(f"cannot load Hugging Face dataset {name!r} ({config}, {split}): {e}") from None
    col = key or "text"
    for row in ds:
        text = row.get(col)
        if isinstance(text, str) and text.strip():
            yield f"hf:{name}", text


def main(args: argparse.Namespace) -> int:
    if not args.input and not args.hf_dataset:
        raise DataError("give --input files or --hf-dataset")

    def docs():
        if args.input:
            yield from iter_documents(args.input, text_key=args.text_key,
                                      gutenberg=not args.no_gutenberg_strip)
        if args.hf_dataset:
            yield from _hf_documents(args.hf_dataset, args.hf_config, args.hf_split, args.text_key)

    index = build_shards(docs(), args.tokenizer, args.out, val_fraction=args.val_fraction,
                         seed=args.seed, shard_tokens=args.shard_tokens, add_bos=not args.no_bos,
                         progress=not args.quiet)
    s = index["splits"]
    print(json.dumps({"out": args.out, "vocab_size": index["vocab_size"], "dtype": index["dtype"],
                      "train_tokens": s["train"]["tokens"], "train_docs": s["train"]["docs"],
                      "val_tokens": s["val"]["tokens"], "val_docs": s["val"]["docs"]}))
    return 0
