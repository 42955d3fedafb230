"""`bitnet158 tokenizer ...`: train a byte-level BPE, convert tiktoken ranks, inspect a tokenizer.

    bitnet158 tokenizer train --input ../shared/data/gutenberg/texts --vocab-size 16384 --out tok16k
    bitnet158 tokenizer convert-tiktoken ../shared/data/llama3-tokenizer/tokenizer.model llama3-tok
    bitnet158 tokenizer encode tok16k "Hello world"          # ids and the piece each stands for
    bitnet158 tokenizer encode tok16k --chat "How are you?"   # a user turn through the chat template
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import TokenizerError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    p = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files",
                       description="Train a byte-level BPE tokenizer (Llama-3 split regex) with the "
                                   "tokenizers library; writes tokenizer.json + tokenizer_config.json.")
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH",
                   help=".txt/.md/.jsonl/.parquet files (optionally .gz) or directories of them")
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size, specials included")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count to merge (default 2)")
    p.add_argument("--special", nargs="+", default=None, metavar="TOKEN",
                   help="special tokens, given the first ids in this order (default: <|begin_of_text|> "
                        "<|end_of_text|> <|start_header_id|> <|end_header_id|> <|eot_id|>)")
    p.add_argument("--bos", default="<|begin_of_text|>", help="BOS token (one of the specials)")
    p.add_argument("--eos", default="<|end_of_text|>", help="EOS token (one of the specials)")
    p.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                   help="Jinja chat template file (default: the BitNet b1.58 2B4T template)")
    p.add_argument("--text-key", default=None, help="jsonl/parquet field holding the text (default text)")
    p.add_argument("--keep-gutenberg-license", action="store_true",
                   help="do not strip Project Gutenberg headers/footers")
    p.add_argument("--max-chars", type=int, default=None, help="stop reading after this many characters")
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bars")

    p = sub.add_parser("convert-tiktoken", help="build tokenizer.json from a tiktoken rank file",
                       description="Convert a tiktoken rank file (e.g. Llama-3's tokenizer.model) into a "
                                   "tokenizer folder with the Llama-3 specials and the 2B4T chat template.")
    p.add_argument("ranks", help="tiktoken rank file (<base64 token> <rank> per line)")
    p.add_argument("out", help="output folder")
    p.add_argument("--num-special", type=int, default=256,
                   help="special tokens after the ranks (default 256)")

    p = sub.add_parser("encode", help="show the token ids of a text",
                       description="Encode text with a tokenizer folder and print ids and pieces.")
    p.add_argument("tokenizer", help="folder with tokenizer.json")
    p.add_argument("text", help="text to encode ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="encode as one user turn with the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--bos", action="store_true", help="prepend BOS (plain text only)")
    p.add_argument("--json", action="store_true", help="print the ids as one JSON list")


def _train(args: argparse.Namespace) -> int:
    from ..chat_template import DEFAULT_CHAT_TEMPLATE
    from ..tokenizer import Tokenizer
    from .tokenizer_train import train_bpe

    template = DEFAULT_CHAT_TEMPLATE
    if args.chat_template is not None:
        if not args.chat_template.is_file():
            raise TokenizerError(f"--chat-template: no such file {args.chat_template}")
        template = args.chat_template.read_text(encoding="utf-8")
    t0 = time.time()
    out = train_bpe(args.input, args.vocab_size, args.out, specials=args.special, chat_template=template,
                    text_key=args.text_key, strip_gutenberg=not args.keep_gutenberg_license,
                    min_frequency=args.min_frequency, bos_token=args.bos, eos_token=args.eos,
                    max_chars=args.max_chars, show_progress=args.progress)
    tok = Tokenizer.from_pretrained(out)
    print(f"wrote {out}/tokenizer.json: vocab {tok.vocab_size} (bos {tok.bos_id}, eos {tok.eos_id}, "
          f"eot {tok.eot_id}) in {time.time() - t0:.1f}s")
    if tok.vocab_size < args.vocab_size:
        print(f"note: the corpus only supports {tok.vocab_size} tokens (asked {args.vocab_size}; "
              f"lower --min-frequency or add text)", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..tokenizer import from_tiktoken

    t0 = time.time()
    tok = from_tiktoken(args.ranks, num_special=args.num_special)
    tok.save(args.out)
    print(f"wrote {args.out}/tokenizer.json: vocab {tok.vocab_size} (bos {tok.bos_id}, eos {tok.eos_id}, "
          f"eot {tok.eot_id}) in {time.time() - t0:.1f}s")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer)
    text = sys.stdin.read() if args.text == "-" else args.text
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": text}]
        ids = tok.encode_chat(msgs)
    else:
        ids = tok.encode(text, add_bos=args.bos)
    if args.json:
        print(json.dumps(ids))
        return 0
    for i in ids:
        b = tok.token_bytes(i)
        try:
            piece = repr(b.decode("utf-8"))
        except UnicodeDecodeError:
            piece = repr(b)  # part of a multi-byte character
        print(f"{i:>8}  {piece}")
    print(f"{len(ids)} tokens")
    return 0


def main(args: argparse.Namespace) -> int:
    return {"train": _train, "convert-tiktoken": _convert, "encode": _encode}[args.tokenizer_command](args)
