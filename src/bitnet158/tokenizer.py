"""Tokenizer: a `tokenizers`-backed BPE tokenizer with the folder's chat template and special ids.

    from bitnet158.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained("path/to/bitnet-b1.58-2B-4T")   # tokenizer.json + tokenizer_config.json
    ids = tok.encode("Hello world", add_bos=True)
    tok.encode_chat([{"role": "user", "content": "How are you?"}])   # one BOS, ends 'Assistant: '
    dec = tok.stream_decoder(); text = "".join(dec.push(i) for i in ids) + dec.flush()

Special tokens: `encode(text)` treats special-token strings in `text` as plain text (so user input
can never inject `<|eot_id|>`); pass `allow_special=True` to parse them. `encode_chat` parses only the
template's own markup and `bos_token` as specials; message contents are always literal text.

`from_tiktoken(rank_file)` and `build_llama3_tokenizer_dir(out)` build the Llama-3 tokenizer from a
tiktoken rank file (see `tokenizer_build`); `DEFAULT_CHAT_TEMPLATE` is the 2B4T template (SPEC §4).
"""

from __future__ import annotations

import codecs
import json
import operator
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable

from .chat_template import (DEFAULT_CHAT_TEMPLATE, escape_messages, render_chat, unescape_specials,
                            validate_messages)
from .errors import TokenizerError
from .tokenizer_build import (BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS,
                              build_llama3_tokenizer_dir, from_tiktoken, unicode_to_bytes)

__all__ = ["Tokenizer", "StreamDecoder", "DEFAULT_CHAT_TEMPLATE", "LLAMA3_PATTERN",
           "LLAMA3_SPECIAL_TOKENS", "from_tiktoken", "build_llama3_tokenizer_dir", "TokenizerError"]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{what} at {path} is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{what} at {path} is not valid JSON: {e}") from e


def _token_name(cfg: dict, key: str, where: str) -> str | None:
    """`bos_token`/`eos_token` of a tokenizer_config: a string, an AddedToken dict, or null."""
    v = cfg.get(key)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    raise TokenizerError(f"{where}: field {key!r} must be a string or {{'content': str}}, got {v!r:.80}")


def _ids(v: Any) -> list[int]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, (list, tuple)):
        return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


def _template_from_folder(folder: Path, cfg: dict, where: str) -> str | None:
    """The chat template a folder provides: tokenizer_config.json, chat_template.jinja, .json."""
    t = cfg.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default", next(iter(named.values()), None))
    if t is not None and not isinstance(t, str):
        raise TokenizerError(f"{where}: field 'chat_template' must be a string, got {type(t).__name__}")
    if t:
        return t
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        t = _read_json(folder / "chat_template.json", "chat_template.json").get("chat_template")
        if isinstance(t, str) and t:
            return t
    return None


class Tokenizer:
    """Byte-level BPE tokenizer (any `tokenizers` model works) plus chat template and special ids."""

    def __init__(self, tok, config: dict | None = None, chat_template: str | None = None,
                 extra_stop_ids: Iterable[int] = (), bos_id: int | None = None, eos_id: int | None = None):
        self._tok = tok
        # `encode_special_tokens` is a flag on the shared tokenizer (True: special-token strings are
        # plain text); the lock makes set-flag-then-encode atomic across threads.
        self._lock = threading.Lock()
        self.config = dict(config or {})
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        added = tok.get_added_tokens_decoder()              # {id: AddedToken}
        self._added = {i: t.content for i, t in added.items()}
        self._special_ids = {i for i, t in added.items() if t.special}
        self.special_tokens = [added[i].content for i in sorted(self._special_ids)]
        self._special_rx = (re.compile("|".join(re.escape(s) for s in
                                                sorted(self.special_tokens, key=len, reverse=True)))
                            if self.special_tokens else None)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(self._added, default=-1) + 1)

        where = "tokenizer_config.json"
        self.bos_token = _token_name(self.config, "bos_token", where)
        self.eos_token = _token_name(self.config, "eos_token", where)
        self.bos_id = self._resolve(self.bos_token, bos_id, BOS_TOKEN, "bos_token")
        self.eos_id = self._resolve(self.eos_token, eos_id, EOS_TOKEN, "eos_token")
        if self.bos_token is None and self.bos_id is not None:
            self.bos_token = tok.id_to_token(self.bos_id)
        if self.eos_token is None and self.eos_id is not None:
            self.eos_token = tok.id_to_token(self.eos_id)
        self.eot_id = tok.token_to_id(EOT_TOKEN)
        pad = _token_name(self.config, "pad_token", where)
        self.pad_id = tok.token_to_id(pad) if pad is not None else None
        stops = {self.eot_id, self.eos_id, *extra_stop_ids}
        self.stop_ids = {i for i in stops if i is not None and 0 <= i < self.vocab_size}
        self._byte_level = self._is_byte_level()
        self._bytes_cache: dict[int, bytes] = {}

    def _resolve(self, name: str | None, fallback_id: int | None, default: str, field: str) -> int | None:
        if name is not None:
            i = self._tok.token_to_id(name)
            if i is None:
                raise TokenizerError(f"tokenizer_config.json: {field} {name!r} is not in the vocabulary")
            return i
        if fallback_id is not None and 0 <= fallback_id < self.vocab_size:
            return fallback_id
        return self._tok.token_to_id(default)

    def _is_byte_level(self) -> bool:
        dec = self._tok.decoder
        if dec is None:
            return False
        state = json.loads(dec.__getstate__())
        kinds = [d.get("type") for d in state.get("decoders", [])] if state.get("type") == "Sequence" \
            else [state.get("type")]
        return kinds == ["ByteLevel"]

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a folder with tokenizer.json (+ tokenizer_config.json, generation_config.json,
        config.json when present). A hub id is resolved through `bitnet158.checkpoint.resolve`."""
        folder = Path(path)
        if folder.is_file() and folder.name == "tokenizer.json":
            folder = folder.parent
        if not folder.exists() and not str(path).startswith((".", "/", "~")) and str(path).count("/") == 1:
            try:
                from .checkpoint import resolve
            except ImportError:
                resolve = None
            if resolve is not None:
                folder = Path(resolve(str(path)))
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder not found: {path}")
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            hint = ""
            if (folder / "tokenizer.model").is_file():
                hint = " (it has a tiktoken tokenizer.model: convert it with `bitnet158 tokenizer convert-tiktoken`)"
            raise TokenizerError(f"no tokenizer.json in {folder}{hint}")
        try:
            text = tj.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{tj} is not UTF-8 text: {e}") from e
        cfg_path = folder / "tokenizer_config.json"
        cfg = _read_json(cfg_path, "tokenizer_config.json") if cfg_path.is_file() else {}
        if not isinstance(cfg, dict):
            raise TokenizerError(f"tokenizer_config.json at {cfg_path} must hold a JSON object")
        template = _template_from_folder(folder, cfg, f"tokenizer_config.json at {cfg_path}")
        stops, bos_id, eos_id = [], None, None
        for name in ("config.json", "generation_config.json"):
            p = folder / name
            if p.is_file():
                d = _read_json(p, name)
                if isinstance(d, dict):
                    stops += _ids(d.get("eos_token_id"))
                    bos_id = (_ids(d.get("bos_token_id")) or [bos_id])[0]
                    eos_id = eos_id if eos_id is not None else (_ids(d.get("eos_token_id")) or [None])[0]
        return cls.from_json(text, config=cfg, chat_template=template, extra_stop_ids=stops,
                             bos_id=bos_id, eos_id=eos_id, source=tj)

    @classmethod
    def from_json(cls, text: str, config: dict | None = None, source: Path | str = "tokenizer.json",
                  **kwargs: Any) -> "Tokenizer":
        """Build from tokenizer.json text (+ tokenizer_config dict)."""
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            tok = _HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            _check_json(text, source)  # a clearer message for empty / truncated / non-tokenizer JSON
            raise TokenizerError(f"{source} is not a valid tokenizers file: {e}") from e
        if config is not None and not isinstance(config, dict):
            raise TokenizerError("tokenizer config must be a dict")
        if "chat_template" not in kwargs:
            t = (config or {}).get("chat_template")
            kwargs["chat_template"] = t if isinstance(t, str) else None
        return cls(tok, config=config, **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) to a folder."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        cfg = dict(self.config)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg.setdefault("clean_up_tokenization_spaces", False)
        cfg["bos_token"], cfg["eos_token"] = self.bos_token, self.eos_token
        cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        return out

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings are plain text unless `allow_special`."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode([text], allow_special)[0]
        return [self._need_bos(), *ids] if add_bos else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        """`encode` over many texts at once (parallel inside `tokenizers`)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TokenizerError("encode_batch expects a list of str")
        head = [self._need_bos()] if add_bos else []
        return [head + ids for ids in self._encode(list(texts), allow_special)]

    def _encode(self, texts: list[str], allow_special: bool) -> list[list[int]]:
        with self._lock:
            self._tok.encode_special_tokens = not allow_special
            if len(texts) == 1:
                return [self._tok.encode(texts[0], add_special_tokens=False).ids]
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _need_bos(self) -> int:
        if self.bos_id is None:
            raise TokenizerError("this tokenizer has no BOS token (tokenizer_config.json bos_token)")
        return self.bos_id

    def _check_ids(self, ids: Any) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            try:
                j = operator.index(i)
            except TypeError:
                j = None
            if j is None or isinstance(i, bool) or not 0 <= j < self.vocab_size:
                raise TokenizerError(f"token id {i!r} is not an integer in [0, {self.vocab_size})")
            out.append(j)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 from a partial sequence shows as U+FFFD)."""
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The exact bytes token `i` stands for (added tokens: their UTF-8 text)."""
        b = self._bytes_cache.get(i)
        if b is None:
            if i in self._added:
                b = self._added[i].encode("utf-8")
            elif self._byte_level:
                table = unicode_to_bytes()
                s = self._tok.id_to_token(i)
                if s is None:
                    raise TokenizerError(f"token id {i} is not in [0, {self.vocab_size})")
                b = bytes(table[c] for c in s) if all(c in table for c in s) else s.encode("utf-8")
            else:
                b = self._tok.decode([i], skip_special_tokens=False).encode("utf-8")
            self._bytes_cache[i] = b
        return b

    def is_special(self, i: int) -> bool:
        return i in self._special_ids

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        """Incremental decoder: `push(id)` returns text that is safe to print so far."""
        return StreamDecoder(self, skip_special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"eot_id={self.eot_id}, stop_ids={sorted(self.stop_ids)})")

    # ------------------------------------------------------------------ chat
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The conversation as text, rendered with the folder's (or the default) chat template."""
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Token ids of the rendered conversation with exactly one leading BOS.

        Only the template's markup (and bos/eos_token) become special tokens; a message that
        contains e.g. '<|eot_id|>' is encoded as those characters."""
        msgs = escape_messages(validate_messages(messages), self.special_tokens)
        text = self.render_chat(msgs, add_generation_prompt, **kwargs)
        ids: list[int] = []
        pos = 0
        pieces: list[str] = []
        for m in self._special_rx.finditer(text) if self._special_rx else ():
            pieces.append(text[pos:m.start()])
            pieces.append(m[0])
            pos = m.end()
        pieces.append(text[pos:])
        for k, piece in enumerate(pieces):
            if k % 2:  # a special token from the template
                ids.append(self._tok.token_to_id(piece))
            elif piece:
                ids += self._encode([unescape_specials(piece)], allow_special=False)[0]
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids


def _check_json(text: str, path: Path | str) -> None:
    if not text.strip():
        raise TokenizerError(f"{path} is empty")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from e
    if not isinstance(d, dict) or "model" not in d:
        raise TokenizerError(f"{path} is not a tokenizers file: no 'model' section")


class StreamDecoder:
    """Turns a stream of token ids into text chunks without splitting a UTF-8 character.

    Byte-level vocabularies: token bytes go through an incremental UTF-8 decoder that holds back an
    incomplete character until its last byte arrives (bytes that can never form a character become
    U+FFFD, as in `decode`). Other vocabularies use `tokenizers.decoders.DecodeStream`."""

    def __init__(self, tok: Tokenizer, skip_special: bool = False):
        self._tok = tok
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tok._byte_level else None
        if self._utf8 is None:
            from tokenizers.decoders import DecodeStream
            self._stream = DecodeStream(skip_special_tokens=skip_special)

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text completed by it ('' while a character is incomplete)."""
        (i,) = self._tok._check_ids([int(token_id)])
        if self._utf8 is None:
            return self._stream.step(self._tok._tok, i) or ""
        if self._skip and self._tok.is_special(i):
            return ""
        return self._utf8.decode(self._tok.token_bytes(i))

    def flush(self) -> str:
        """End of stream: whatever is held back (an incomplete character becomes U+FFFD)."""
        if self._utf8 is None:
            return ""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
