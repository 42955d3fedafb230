"""`bitnet158 generate [MODEL] PROMPT`: complete a prompt and stream the text to stdout.

    bitnet158 generate path/to/bitnet-b1.58-2B-4T "The capital of France is" -n 32
    bitnet158 generate MODEL "Why is the sky blue?" --chat --temperature 0.7 --seed 1 --stats
    echo "Once upon a time" | bitnet158 generate MODEL -

Greedy by default. The prompt gets a BOS token; ``--chat`` wraps it in the model's chat template
(with ``--system``). Generation stops at the tokenizer's eot/eos tokens or after ``--max-tokens``.
"""

from __future__ import annotations

import argparse
import sys

from .common import (add_model_arguments, add_sampling_arguments, engine_runner, load_model,
                     sampling_params, stats_line, utf8_stdout)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text ('-' reads it from stdin)")
    add_sampling_arguments(p, max_tokens=128, temperature=0.0)
    g = p.add_argument_group("output")
    g.add_argument("--chat", action="store_true", help="apply the chat template (a user turn)")
    g.add_argument("--system", default=None, help="system prompt (with --chat)")
    g.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    g.add_argument("--echo", action="store_true", help="print the prompt before the completion")


def main(args) -> int:
    from ..engine import generate
    from ..engine.generate import TextStream
    from ..errors import ContextLengthError

    utf8_stdout()
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tok = load_model(args)
    params = sampling_params(args, tok)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tok.encode_chat(messages + [{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt, add_bos=True)
    ctx = min(args.context or model.config.max_position_embeddings, model.config.max_position_embeddings)
    if len(ids) >= ctx:
        raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context holds {ctx} "
                                 f"(it must leave room for at least one new token)")
    runner = engine_runner(model, max_len=min(ctx, len(ids) + params.max_new_tokens), backend=args.backend)
    stream = TextStream(generate(runner, ids, params), tok)
    out = sys.stdout
    if args.echo:
        out.write(prompt)
        out.flush()
    text = ""
    code = 0
    try:
        for piece in stream:
            text += piece
            if not args.no_stream:
                out.write(piece)
                out.flush()
    except KeyboardInterrupt:
        code = 130
    if args.no_stream:
        out.write(text)
    out.write("\n")
    out.flush()
    gen = stream.generation
    if gen.clamped and gen.finish_reason == "length":
        print(f"[stopped: the context of {runner.max_len} tokens is full]", file=sys.stderr)
    if args.stats:
        print(stats_line(gen), file=sys.stderr)
    return code
