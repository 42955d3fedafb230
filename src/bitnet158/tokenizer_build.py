"""Build Llama-3-style byte-level BPE `tokenizer.json` files: from tiktoken ranks, or around a trained model.

    from bitnet158.tokenizer_build import from_tiktoken, build_llama3_tokenizer_dir
    tok = from_tiktoken("shared/data/llama3-tokenizer/tokenizer.model")   # -> bitnet158 Tokenizer
    build_llama3_tokenizer_dir("out/llama3")      # tokenizer.json + tokenizer_config.json

The pipeline matches the released Llama-3 / BitNet 2B4T `tokenizer.json`: no normalizer, pre-tokenizer
= Split(Llama-3 regex, isolated) + ByteLevel(no prefix space, no regex), BPE with `ignore_merges`
(tiktoken looks a whole pre-token up before merging), ByteLevel decoder, and a post-processor that
prepends `<|begin_of_text|>` for transformers users (bitnet158's own `encode` never uses it).

Merges are recovered from ranks the standard way: each token of two or more bytes gets one merge,
the last step of tiktoken's own BPE run on its bytes (lowest-rank pair first), ranked by the token's
rank. Tokens that BPE cannot reach from their bytes get no merge; `ignore_merges` still finds them
as whole pre-tokens, exactly as tiktoken does.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from functools import lru_cache
from pathlib import Path

from .chat_template import DEFAULT_CHAT_TEMPLATE
from .errors import TokenizerError

# The Llama-3 pre-tokenizer split pattern (tiktoken's, also in the released tokenizer.json).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"

# Llama 3.0's 256 special tokens in id order (ids 128000..128255 after the 128000 ranks).
_LLAMA3_FIRST = [BOS_TOKEN, EOS_TOKEN, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", EOT_TOKEN]


def llama3_special_tokens(num_special: int = 256) -> list[str]:
    """The first `num_special` Llama-3 special token names, in id order."""
    names = _LLAMA3_FIRST + [f"<|reserved_special_token_{i}|>" for i in range(5, num_special - 5)]
    return names[:num_special]


LLAMA3_SPECIAL_TOKENS = llama3_special_tokens(256)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_bytes_str(token: bytes) -> str:
    """Bytes of a token -> its byte-level vocabulary string."""
    return token.decode("latin-1").translate(bytes_to_unicode())  # latin-1: char ordinal = byte


def load_tiktoken_ranks(rank_file: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file (`<base64 token> <rank>` per line)."""
    path = Path(rank_file)
    if not path.is_file():
        raise TokenizerError(f"tiktoken rank file not found: {path}")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                b64, rank = line.split()
                ranks[base64.b64decode(b64, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as e:
                raise TokenizerError(f"{path}:{lineno}: not a tiktoken rank line "
                                     f"('<base64> <rank>'): {line[:60]!r}") from e
    if not ranks:
        raise TokenizerError(f"tiktoken rank file {path} is empty")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"tiktoken rank file {path}: ranks are not exactly 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"tiktoken rank file {path}: single bytes {missing[:8]} have no rank; "
                             f"a byte-level vocabulary needs all 256")
    return ranks


_INF = 1 << 62
_BYTE = [bytes([i]) for i in range(256)]


def _last_merge(token: bytes, get) -> tuple[bytes, bytes] | None:
    """Run tiktoken's BPE on the bytes of `token` until two parts remain; None if it gets stuck.

    `get` is `ranks.get`; `pr[i]` caches the rank of parts[i] + parts[i + 1]."""
    n = len(token)
    if n == 2:
        return _BYTE[token[0]], _BYTE[token[1]]
    parts = [_BYTE[c] for c in token]
    pr = [get(x + y, _INF) for x, y in zip(parts, parts[1:])]
    while n > 2:
        best = min(pr)
        if best == _INF:
            return None
        i = pr.index(best)  # leftmost lowest rank, as tiktoken
        parts[i] += parts.pop(i + 1)
        del pr[i]
        n -= 1
        if i < n - 1:
            pr[i] = get(parts[i] + parts[i + 1], _INF)
        if i:
            pr[i - 1] = get(parts[i - 1] + parts[i], _INF)
    return parts[0], parts[1]


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per reachable multi-byte token, in rank order (= BPE merge priority)."""
    merges = []
    get = ranks.get
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            pair = _last_merge(token, get)
            if pair is not None:
                merges.append(pair)
    return merges


def pipeline(pattern: str = LLAMA3_PATTERN):
    """(pre_tokenizer, decoder) of a Llama-3-style byte-level tokenizer, as `tokenizers` objects."""
    from tokenizers import Regex, decoders, pre_tokenizers

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    return pre, decoders.ByteLevel()


def post_processor(bos: tuple[str, int] | None):
    """ByteLevel offsets + (when there is a BOS) a template that prepends it, as in Llama-3's file.
    bitnet158 encodes with add_special_tokens=False, so this only serves transformers users."""
    from tokenizers import processors

    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        steps.append(processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B:1",
                                                   special_tokens=[bos]))
    return processors.Sequence(steps)


def assemble_byte_level(vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str],
                        pattern: str = LLAMA3_PATTERN, bos_token: str | None = BOS_TOKEN,
                        ignore_merges: bool = True) -> str:
    """tokenizer.json text of a Llama-3-style byte-level BPE from a vocab, merges and specials.

    Specials take the ids after the vocabulary, in order. Built as JSON directly: constructing the
    `tokenizers` model from Python objects and serializing it again would double the time."""
    pre, dec = pipeline(pattern)
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise TokenizerError(f"vocabulary ids must be exactly 0..{n - 1}")
    added = [{"id": n + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for k, s in enumerate(specials)]
    ids = {s: n + k for k, s in enumerate(specials)}
    bos = (bos_token, ids[bos_token]) if bos_token in ids else None
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": json.loads(pre.__getstate__()),
        "post_processor": json.loads(post_processor(bos).__getstate__()),
        "decoder": json.loads(dec.__getstate__()),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": [list(m) for m in merges]},
    }
    return json.dumps(doc, ensure_ascii=False)


def tokenizer_config(bos_token: str | None = BOS_TOKEN, eos_token: str | None = EOS_TOKEN,
                     chat_template: str = DEFAULT_CHAT_TEMPLATE, model_max_length: int | None = None) -> dict:
    """tokenizer_config.json contents that both bitnet158 and transformers read."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token, "eos_token": eos_token,
           "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
           "chat_template": chat_template}
    if model_max_length is not None:
        cfg["model_max_length"] = model_max_length
    return cfg


@lru_cache(maxsize=4)
def _tiktoken_json(path: str, mtime_ns: int, size: int, pattern: str, num_special: int) -> str:
    ranks = load_tiktoken_ranks(path)
    vocab = {token_to_bytes_str(t): r for t, r in ranks.items()}
    merges = [(token_to_bytes_str(a), token_to_bytes_str(b)) for a, b in merges_from_ranks(ranks)]
    return assemble_byte_level(vocab, merges, llama3_special_tokens(num_special), pattern)


def tiktoken_json(rank_file: str | os.PathLike, pattern: str = LLAMA3_PATTERN, num_special: int = 256) -> str:
    """tokenizer.json text for a tiktoken rank file (cached per file version within a process)."""
    p = Path(rank_file).resolve()
    if not p.is_file():
        raise TokenizerError(f"tiktoken rank file not found: {rank_file}")
    st = p.stat()
    return _tiktoken_json(str(p), st.st_mtime_ns, st.st_size, pattern, num_special)


def from_tiktoken(rank_file: str | os.PathLike, pattern: str = LLAMA3_PATTERN, num_special: int = 256,
                  chat_template: str = DEFAULT_CHAT_TEMPLATE):
    """A `Tokenizer` from a tiktoken rank file + the Llama-3 split pattern and `num_special` specials."""
    from .tokenizer import Tokenizer

    return Tokenizer.from_json(tiktoken_json(rank_file, pattern, num_special),
                               config=tokenizer_config(chat_template=chat_template))


def find_llama3_rank_file() -> Path | None:
    """Where the Llama-3 rank file is: $BITNET158_LLAMA3_RANKS, else ../shared/data/llama3-tokenizer
    next to a source checkout (the layout the test suite uses)."""
    env = os.environ.get("BITNET158_LLAMA3_RANKS")
    if env:
        return Path(env) if Path(env).is_file() else None
    for parent in Path(__file__).resolve().parents:
        cand = parent / ".." / "shared" / "data" / "llama3-tokenizer" / "tokenizer.model"
        if cand.is_file():
            return cand.resolve()
    return None


def build_llama3_tokenizer_dir(out_dir: str | os.PathLike, rank_file: str | os.PathLike | None = None,
                               chat_template: str = DEFAULT_CHAT_TEMPLATE) -> Path:
    """Write the Llama-3 / 2B4T tokenizer folder (tokenizer.json, tokenizer_config.json) to `out_dir`.

    `rank_file` defaults to `find_llama3_rank_file()`; a TokenizerError says where it was looked for.
    The conversion is cached in-process, so repeated calls only write files."""
    rank_file = rank_file or find_llama3_rank_file()
    if rank_file is None:
        raise TokenizerError("Llama-3 tiktoken rank file not found: pass rank_file, set "
                             "BITNET158_LLAMA3_RANKS, or place it at ../shared/data/llama3-tokenizer/"
                             "tokenizer.model next to the repository")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tiktoken_json(rank_file), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(chat_template=chat_template), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8")
    return out
