"""The tokenizer both ways: a byte-level BPE ``tokenizer.json`` folder <-> GGUF ``tokenizer.*`` keys.

    v = Vocab.from_folder(tokenizer_dir, vocab_size=cfg.vocab_size)   # read tokenizer.json & co
    v.write(gguf_writer)                                              # tokenizer.ggml.* keys
    v = Vocab.from_fields(reader_fields, source="model.gguf")          # read them back
    v.save_folder(out_dir)                                            # tokenizer.json + config

GGUF stores a BPE vocabulary the way llama.cpp's converter does: ``tokenizer.ggml.model =
"gpt2"`` (byte-level BPE), ``tokenizer.ggml.pre`` names the pre-tokenizer split regex
(``llama-bpe`` = the Llama-3 pattern), ``tokens`` are the byte-level strings in id order (padded to
the embedding's row count with ``[PAD{i}]`` of type UNUSED), ``token_type`` marks specials CONTROL
(added non-special tokens USER_DEFINED), ``merges`` are ``"left right"`` strings in rank order.
Importing rebuilds the same tokenizer with the ``tokenizers`` library (Llama-3 pipeline, merges
ignored for whole-word hits as in tiktoken and llama.cpp's llama-bpe).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import Keys, TokenType

from ..errors import TokenizerError

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _llama3_pattern() -> str:
    from ..tokenizer_build import LLAMA3_PATTERN
    return LLAMA3_PATTERN


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str = "llama-bpe"
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True
    chat_template: str | None = None

    # ------------------------------------------------------------------ tokenizer.json -> GGUF
    @classmethod
    def from_folder(cls, folder: str | Path, vocab_size: int | None = None,
                    bos_id: int | None = None, eos_id: int | None = None,
                    pad_id: int | None = None) -> "Vocab":
        """Read ``folder/tokenizer.json`` (+ tokenizer_config.json). ``vocab_size``: the model's
        embedding rows (tokens are padded up to it; a larger tokenizer is an error). The special
        ids are the tokenizer's; ``bos_id``/``eos_id`` (the model config's) fill in where it has none."""
        from ..tokenizer import Tokenizer

        folder = Path(folder)
        tj = folder / "tokenizer.json"
        tok = Tokenizer.from_pretrained(folder)            # validates, finds template and special ids
        d = json.loads(tj.read_text(encoding="utf-8"))
        model = d.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{tj}: model.type={model.get('type')!r}; GGUF export supports "
                                 "byte-level BPE tokenizers only")
        pre = _pre_name(d.get("pre_tokenizer"), tj)
        vocab: dict[str, int] = dict(model.get("vocab") or {})
        added = {int(t["id"]): t for t in d.get("added_tokens", [])}
        n = max([*vocab.values(), *added, -1]) + 1
        size = vocab_size if vocab_size is not None else n
        if n > size:
            raise TokenizerError(f"{tj}: tokenizer has {n} token ids but the model's embedding has "
                                 f"only {size} rows")
        tokens: list[str | None] = [None] * size
        types = [int(TokenType.UNUSED)] * size
        for s, i in vocab.items():
            tokens[i], types[i] = s, int(TokenType.NORMAL)
        for i, t in added.items():
            tokens[i] = t["content"]
            types[i] = int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
        for i, s in enumerate(tokens):
            if s is None:
                tokens[i] = f"[PAD{i}]"
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        add_bos = _adds_bos(d, tok.bos_id)
        return cls(tokens=tokens, types=types, merges=merges, pre=pre,
                   bos_id=tok.bos_id if tok.bos_id is not None else bos_id,
                   eos_id=tok.eos_id if tok.eos_id is not None else eos_id,
                   eot_id=tok.eot_id, pad_id=pad_id, add_bos=add_bos,
                   chat_template=tok.chat_template)

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        w.add_token_merges(self.merges)
        for k, v in ((Keys.Tokenizer.BOS_ID, self.bos_id), (Keys.Tokenizer.EOS_ID, self.eos_id),
                     (Keys.Tokenizer.EOT_ID, self.eot_id), (Keys.Tokenizer.PAD_ID, self.pad_id)):
            if v is not None:
                w.add_uint32(k, int(v))
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(False)
        if self.chat_template:
            w.add_chat_template(self.chat_template)

    # ------------------------------------------------------------------ GGUF -> tokenizer.json
    @classmethod
    def from_fields(cls, fields: dict, source: str) -> "Vocab | None":
        """From a GGUF reader's ``{key: value}`` (decoded); None when the file has no vocabulary."""
        model = fields.get(Keys.Tokenizer.MODEL)
        if model is None or model in ("none", "no_vocab"):
            return None
        if model != "gpt2":
            raise TokenizerError(f"{source}: tokenizer.ggml.model={model!r} is not supported "
                                 "(byte-level BPE 'gpt2' only)")
        for k in (Keys.Tokenizer.LIST, Keys.Tokenizer.MERGES):
            if k not in fields:
                raise TokenizerError(f"{source}: missing metadata key {k}")
        tokens = list(fields[Keys.Tokenizer.LIST])
        types = list(fields.get(Keys.Tokenizer.TOKEN_TYPE) or [int(TokenType.NORMAL)] * len(tokens))
        if len(types) != len(tokens):
            raise TokenizerError(f"{source}: {Keys.Tokenizer.TOKEN_TYPE} has {len(types)} entries, "
                                 f"{Keys.Tokenizer.LIST} has {len(tokens)}")
        ids = {k: fields.get(k) for k in (Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID,
                                          Keys.Tokenizer.EOT_ID, Keys.Tokenizer.PAD_ID)}
        return cls(tokens=tokens, types=[int(t) for t in types], merges=list(fields[Keys.Tokenizer.MERGES]),
                   pre=fields.get(Keys.Tokenizer.PRE, "default"),
                   bos_id=ids[Keys.Tokenizer.BOS_ID], eos_id=ids[Keys.Tokenizer.EOS_ID],
                   eot_id=ids[Keys.Tokenizer.EOT_ID], pad_id=ids[Keys.Tokenizer.PAD_ID],
                   add_bos=bool(fields.get(Keys.Tokenizer.ADD_BOS, True)),
                   chat_template=fields.get(Keys.Tokenizer.CHAT_TEMPLATE))

    def tokenizer_json(self, source: str) -> str:
        """tokenizer.json text (Llama-3 style pipeline for llama-bpe, GPT-2's regex otherwise)."""
        from ..tokenizer_build import assemble_byte_level

        if self.pre in ("llama-bpe", "llama3", "smaug-bpe"):
            pattern = _llama3_pattern()
        elif self.pre in ("default", "gpt2", "gpt-2"):
            pattern = GPT2_PATTERN
        else:
            raise TokenizerError(f"{source}: tokenizer.ggml.pre={self.pre!r} is not supported "
                                 "(llama-bpe or gpt-2)")
        vocab, specials = {}, []
        for i, (s, t) in enumerate(zip(self.tokens, self.types)):
            if t == TokenType.NORMAL:
                vocab[s] = i
            elif t in (TokenType.CONTROL, TokenType.USER_DEFINED):
                vocab[s] = i                               # keeps its id when added below
                specials.append(s)
        merges = []
        for j, m in enumerate(self.merges):
            parts = m.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{source}: merge {j} {m!r} is not 'left right'")
            merges.append((parts[0], parts[1]))
        bos = self.tokens[self.bos_id] if self.add_bos and self.bos_id is not None else None
        return assemble_byte_level(vocab, merges, specials, pattern=pattern, bos_token=bos,
                                   ignore_merges=self.pre != "default")

    def save_folder(self, out: str | Path, source: str, max_length: int | None = None) -> Path:
        """Write tokenizer.json + tokenizer_config.json (chat template, bos/eos) to ``out``."""
        from ..tokenizer_build import tokenizer_config

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(self.tokenizer_json(source), encoding="utf-8")
        name = lambda i: self.tokens[i] if i is not None and 0 <= i < len(self.tokens) else None  # noqa: E731
        kw = {"chat_template": self.chat_template} if self.chat_template else {}
        cfg = tokenizer_config(bos_token=name(self.bos_id), eos_token=name(self.eos_id),
                               model_max_length=max_length, **kw)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        return out


def _pre_name(pre: dict | None, source: Path) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` block."""
    def walk(p):
        if not p:
            return []
        if p.get("type") == "Sequence":
            return [q for s in p.get("pretokenizers", []) for q in walk(s)]
        return [p]
    steps = walk(pre)
    kinds = [s.get("type") for s in steps]
    if "ByteLevel" not in kinds:
        raise TokenizerError(f"{source}: pre_tokenizer is not byte-level ({kinds}); GGUF export "
                             "supports byte-level BPE tokenizers only")
    splits = [s for s in steps if s.get("type") == "Split"]
    if not splits:
        if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
            return "gpt-2"
        raise TokenizerError(f"{source}: byte-level pre_tokenizer without a split pattern")
    pat = (splits[0].get("pattern") or {}).get("Regex")
    if pat == _llama3_pattern():
        return "llama-bpe"
    if pat == GPT2_PATTERN:
        return "gpt-2"
    raise TokenizerError(f"{source}: pre-tokenizer split pattern {pat!r} is neither Llama-3's "
                         "(llama-bpe) nor GPT-2's; llama.cpp would split text differently")


def _adds_bos(d: dict, bos_id: int | None) -> bool:
    """Does the tokenizer.json post-processor prepend BOS (as Llama-3's TemplateProcessing does)?"""
    return bos_id is not None and "TemplateProcessing" in json.dumps(d.get("post_processor"))
