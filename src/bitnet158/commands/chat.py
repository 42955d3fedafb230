"""`bitnet158 chat [MODEL]`: multi-turn chat in the terminal with the model's chat template.

    bitnet158 chat path/to/bitnet-b1.58-2B-4T --system "You are a helpful assistant."
    printf 'Hi\\nWhat did I just say?\\n' | bitnet158 chat MODEL --temperature 0     # scripted

Type a message and press Enter; the answer streams as it is generated. Commands: ``/reset``
clears the conversation (the system prompt stays), ``/exit`` (or Ctrl-D) quits, ``/help``.
Ctrl-C while the model answers stops that answer only. The KV cache keeps the conversation: each
turn prefills only the tokens that are new since the last one. When stdin is not a terminal, lines
are read one message each and no prompt is shown.
"""

from __future__ import annotations

import argparse
import sys

from .common import (add_model_arguments, add_sampling_arguments, load_model, sampling_params,
                     stats_line, utf8_stdout)

HELP = "commands: /reset (clear the conversation), /exit (or Ctrl-D) quit, /help"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt (kept across /reset)")
    add_sampling_arguments(p, max_tokens=1024, temperature=0.7, top_p=0.9)


class Chat:
    """The conversation and the KV-cache session behind it (no terminal I/O: used by tests too)."""

    def __init__(self, model, tokenizer, params, system: str | None = None, context: int | None = None,
                 backend: str = "auto"):
        from ..engine import Session

        self.tok = tokenizer
        self.params = params
        self.system = system
        ctx = model.config.max_position_embeddings
        self.session = Session(model, max_len=min(context or ctx, ctx), backend=backend)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    @property
    def context(self) -> int:
        return self.session.max_len

    def ask(self, text: str):
        """Start an answer to ``text``: returns a TextStream (iterate for the pieces).

        Raises ContextLengthError (conversation unchanged) when the prompt does not fit. Call
        :meth:`commit` with the stream afterwards, also after an interruption.
        """
        from ..engine.generate import TextStream
        from ..errors import ContextLengthError

        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.tok.encode_chat(messages)
        if len(ids) >= self.context:
            raise ContextLengthError(f"the conversation would take {len(ids)} tokens but the context "
                                     f"holds {self.context}")
        self._pending = messages
        return TextStream(self.session.generate(ids, self.params), self.tok)

    def commit(self, stream) -> None:
        """Keep the user turn and the (possibly partial) answer in the conversation."""
        self.messages = self._pending + [{"role": "assistant", "content": stream.text}]


def _read_line(interactive: bool) -> str | None:
    """One line of input; None at end of input (Ctrl-D)."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def main(args) -> int:
    from ..errors import ContextLengthError

    utf8_stdout()
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    model, tok = load_model(args)
    chat = Chat(model, tok, sampling_params(args, tok), system=args.system, context=args.context,
                backend=args.backend)
    if interactive:
        print(f"bitnet158 chat: context {chat.context} tokens. {HELP}", file=sys.stderr)
    out = sys.stdout
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:
            if not interactive:
                return 130
            print("\n(type /exit or press Ctrl-D to quit)", file=sys.stderr)
            continue
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        cmd = text.lower()
        if cmd in ("/exit", "/quit", "/bye"):
            return 0
        if cmd == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if cmd in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        try:
            stream = chat.ask(text)
        except ContextLengthError as e:
            print(f"context full: {e}. Type /reset to start a new conversation.", file=sys.stderr)
            continue
        interrupted = False
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            interrupted = True
        out.write("\n")
        out.flush()
        chat.commit(stream)
        gen = stream.generation
        if interrupted:
            print("(answer interrupted)", file=sys.stderr)
        elif gen.clamped and gen.finish_reason == "length":
            print("(context full: the answer was cut. Type /reset to start a new conversation.)",
                  file=sys.stderr)
        if args.stats:
            print(stats_line(gen), file=sys.stderr)
