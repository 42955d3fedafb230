"""Chat templates: message validation and Jinja rendering in a sandbox (used through `Tokenizer`).

    from bitnet158.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat
    render_chat(DEFAULT_CHAT_TEMPLATE, [{"role": "user", "content": "Hi"}], bos_token="<|begin_of_text|>")
    # -> '<|begin_of_text|>User: Hi<|eot_id|>Assistant: '

Templates run in jinja2's `ImmutableSandboxedEnvironment` with the settings transformers uses
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII), so a folder's template renders here exactly as `apply_chat_template` renders it.

Special-token injection: `escape_specials` / `unescape_specials` let the tokenizer render message
contents with every special-token string broken by a private-use marker, so that only the
template's own markup (and `bos_token`) is parsed as special tokens when the result is encoded.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from .errors import TokenizerError

# BitNet b1.58 2B4T's template (SPEC §4), verbatim: no newlines between turns.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ (bos_token if loop.first else '') + message['role'] | capitalize"
    " + ': ' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# Private-use code points used to break special-token strings inside message contents.
_MARK = "\ue000"
_MARK_ESC = "\ue001"  # _MARK + _MARK_ESC encodes a literal _MARK found in user text


def _raise_exception(message: str):
    raise TokenizerError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str):
    """Compile a template once (cached by its source); a syntax error becomes a TokenizerError."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


def _content_text(content: Any, i: int) -> str:
    """A message's content as text: a string, or OpenAI-style text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        out = []
        for j, part in enumerate(content):
            if (not isinstance(part, Mapping) or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)):
                raise TokenizerError(
                    f"messages[{i}].content[{j}]: only text parts {{'type': 'text', 'text': str}} "
                    f"are supported, got {part!r:.80}")
            out.append(part["text"])
        return "".join(out)
    raise TokenizerError(f"messages[{i}].content must be a string, got {type(content).__name__}")


def validate_messages(messages: Any) -> list[dict]:
    """Check a conversation and return plain-dict copies (content normalized to a string).

    Each message needs a non-empty string `role` and a `content` that is a string (or a list of
    OpenAI-style text parts); other keys are passed through to the template unchanged.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} dicts, "
                             f"got {type(messages).__name__}")
    if not messages:
        raise TokenizerError("messages is empty: a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TokenizerError(f"messages[{i}] must be a dict with 'role' and 'content', "
                                 f"got {type(m).__name__}")
        if "role" not in m:
            raise TokenizerError(f"messages[{i}] has no 'role'")
        if not isinstance(m["role"], str) or not m["role"].strip():
            raise TokenizerError(f"messages[{i}].role must be a non-empty string, got {m['role']!r:.80}")
        if "content" not in m:
            raise TokenizerError(f"messages[{i}] (role {m['role']!r}) has no 'content'")
        d = dict(m)
        d["content"] = _content_text(m["content"], i)
        out.append(d)
    return out


def render_chat(template: str, messages: Any, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **kwargs: Any) -> str:
    """Render `messages` with a Jinja chat template (validated first; errors are TokenizerError)."""
    import jinja2

    msgs = validate_messages(messages)
    tmpl = compile_template(template)
    try:
        return tmpl.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token, **kwargs)
    except TokenizerError:
        raise
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template failed to render: {e}") from e
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise TokenizerError(f"chat template failed to render: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------ special-token escaping
@lru_cache(maxsize=16)
def _specials_regex(specials: tuple[str, ...]) -> re.Pattern | None:
    # longest first so that a token that prefixes another never wins
    toks = sorted((s for s in specials if len(s) >= 2), key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in toks)) if toks else None


def escape_specials(text: str, specials: Iterable[str]) -> str:
    """Break every special-token string in `text` with a private-use marker (reversible)."""
    text = text.replace(_MARK, _MARK + _MARK_ESC)
    rx = _specials_regex(tuple(specials))
    return rx.sub(lambda m: m[0][0] + _MARK + m[0][1:], text) if rx else text


def unescape_specials(text: str) -> str:
    """Undo `escape_specials` (markers removed, literal private-use characters restored)."""
    if _MARK not in text:
        return text
    return re.sub(_MARK + "(" + _MARK_ESC + ")?", lambda m: _MARK if m[1] else "", text)


def escape_messages(messages: list[dict], specials: Iterable[str]) -> list[dict]:
    """Messages with every string field (role, content, name, ...) escaped."""
    specials = tuple(specials)
    return [{k: escape_specials(v, specials) if isinstance(v, str) else v for k, v in m.items()}
            for m in messages]
