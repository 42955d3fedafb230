"""Chat data for fine-tuning: record formats -> conversations -> token ids with a target mask -> packed rows.

    recs = read_records("../shared/data/sft/fastchat-dummy/dummy_conversation.json")
    conv = to_messages(recs[0], where="dummy_conversation.json[0]")    # [{"role", "content"}, ...]
    enc = ChatEncoder(Tokenizer.from_pretrained(tok_dir))
    ids, target = enc.encode(conv)          # target[i]: token i is trained on (assistant text + <|eot_id|>)
    ex = make_example(ids, target)          # inputs ids[:-1], labels ids[1:] (-100 where not a target)
    rows = pack_examples([ex, ...], seq_len=1024, pad_id=0, seed=0)   # tokens/labels/segments [R, L]

Record formats (``.json`` list or ``.jsonl``), recognized per record:

- OpenAI ``{"messages": [{"role", "content"}, ...]}`` (roles system/user/assistant; also "tool");
- ShareGPT ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}`` (also
  user/assistant/bot/model), optional top-level ``"system"``;
- Alpaca ``{"instruction", "input", "output"}`` (input appended to the instruction after a blank
  line), optional ``"system"``; self-instruct seeds ``{"instruction", "instances": [{"input", "output"}]}``
  (first instance);
- prompt/response ``{"prompt", "response"|"completion"}`` (prompt used as the user turn, as is).

Encoding is turn by turn with the tokenizer's chat template (SPEC §4): text before an assistant
turn ends with the generation prompt (``Assistant: ``), tokenized exactly as ``encode_chat(...,
add_generation_prompt=True)`` tokenizes it at inference; the assistant content and its
``<|eot_id|>`` follow as separate tokens and are the only targets. Template markup becomes special
tokens; message text never does.

Packing puts whole examples into rows of ``seq_len`` tokens with a segment id per example (0 =
padding); the model's ``segment_ids`` keep attention inside an example and restart positions.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..chat_template import escape_messages, unescape_specials, validate_messages
from ..errors import ConfigError, TokenizerError

IGNORE = -100
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "system": "system",
                "tool": "tool", "function": "tool", "observation": "tool"}


class DataError(ConfigError):
    """A data file or record is malformed (the message names the file and record)."""


# ---------------------------------------------------------------- files and records

def read_records(path: str | Path) -> list[dict]:
    """Records of a ``.json`` (list, or {"data": [...]}) or ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        recs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        recs = data.get("data") if isinstance(data, dict) else data
        if not isinstance(recs, list):
            raise DataError(f"{path}: expected a JSON list of records")
    for i, r in enumerate(recs):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i} is a {type(r).__name__}, not an object")
    return recs


def _msg(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise DataError(f"{where}: a message must be an object, got {type(m).__name__}")
    role = m.get("role", m.get("from"))
    content = m.get("content", m.get("value"))
    if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
        raise DataError(f"{where}: unknown role {role!r} (known: {', '.join(sorted(ROLE_ALIASES))})")
    if isinstance(content, list):  # OpenAI text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise DataError(f"{where}: message content must be a string, got {type(content).__name__}")
    return {"role": ROLE_ALIASES[role.lower()], "content": content}


def messages_of(x: Any, where: str) -> list[dict]:
    """A message list (role/content or from/value) or a bare string (one assistant turn)."""
    if isinstance(x, str):
        return [{"role": "assistant", "content": x}]
    if isinstance(x, dict):
        return [_msg(x, where)]
    if isinstance(x, list):
        return [_msg(m, f"{where}[{i}]") for i, m in enumerate(x)]
    raise DataError(f"{where}: expected a string or a list of messages, got {type(x).__name__}")


def to_messages(rec: dict, where: str = "record", system: str | None = None) -> list[dict]:
    """One record of any supported format -> [{"role", "content"}, ...]."""
    sys_msg = rec.get("system") if isinstance(rec.get("system"), str) and rec.get("system") else system
    if "messages" in rec or "conversations" in rec:
        key = "messages" if "messages" in rec else "conversations"
        msgs = messages_of(rec[key], f"{where}.{key}")
    elif "instruction" in rec:
        inp, out = rec.get("input", ""), rec.get("output")
        if out is None and isinstance(rec.get("instances"), list) and rec["instances"]:
            inst = rec["instances"][0]
            inp, out = inst.get("input", ""), inst.get("output")
        if not isinstance(rec["instruction"], str) or not isinstance(out, str):
            raise DataError(f"{where}: Alpaca record needs string 'instruction' and 'output'")
        user = rec["instruction"] + (f"\n\n{inp}" if isinstance(inp, str) and inp.strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    elif "prompt" in rec and ("response" in rec or "completion" in rec):
        resp = rec.get("response", rec.get("completion"))
        if not isinstance(rec["prompt"], str) or not isinstance(resp, str):
            raise DataError(f"{where}: 'prompt' and 'response' must be strings")
        msgs = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": resp}]
    else:
        raise DataError(f"{where}: unknown record format with keys {sorted(rec)[:8]}; expected "
                        "messages, conversations, instruction/input/output or prompt/response")
    if sys_msg and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": sys_msg}] + msgs
    return msgs


# ---------------------------------------------------------------- encoding

class ChatEncoder:
    """Token ids + target mask of a conversation, built turn by turn with the tokenizer's template."""

    def __init__(self, tok):
        self.tok = tok
        specials = sorted(set(tok.special_tokens) | {s for s in (tok.bos_token, tok.eos_token) if s},
                          key=len, reverse=True)
        self._rx = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        if tok.eot_id is None:
            raise TokenizerError("the tokenizer has no <|eot_id|> token: it cannot mark the end of an "
                                 "assistant turn")

    def _render(self, msgs: list[dict], gen: bool) -> str:
        if not msgs:
            return ""
        return self.tok.render_chat(msgs, add_generation_prompt=gen)

    def _ids(self, text: str) -> list[int]:
        """Template text -> ids: template markup as special tokens, escaped message text literal."""
        ids: list[int] = []
        pos = 0
        for m in self._rx.finditer(text) if self._rx else ():
            if m.start() > pos:
                ids += self.tok.encode(unescape_specials(text[pos:m.start()]))
            ids.append(self.tok.token_to_id(m[0]))
            pos = m.end()
        if pos < len(text):
            ids += self.tok.encode(unescape_specials(text[pos:]))
        return ids

    def encode(self, messages: list[dict], train_from: int = 0) -> tuple[list[int], list[bool]]:
        """(ids, target) for the conversation; assistant messages at index >= ``train_from`` are targets.

        Each assistant turn contributes its content and the end-of-turn token (whatever the template
        writes after the content); the ``Assistant: `` header belongs to the prompt.
        """
        msgs = escape_messages(validate_messages(messages), self.tok.special_tokens)
        ids: list[int] = []
        target: list[bool] = []
        done = ""                                              # text encoded so far
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompt = self._render(msgs[:k], True)
                full = self._render(msgs[:k + 1], False)
                if not prompt.startswith(done) or not full.startswith(prompt):
                    raise TokenizerError("the chat template does not render conversations turn by turn "
                                         "(a prefix of the conversation is not a prefix of its text)")
                head = self._ids(prompt[len(done):])
                body = self._ids(full[len(prompt):])
                train = k >= train_from
                ids += head + body
                target += [False] * len(head) + [train] * len(body)
                done = full
            else:
                full = self._render(msgs[:k + 1], False)
                if not full.startswith(done):
                    raise TokenizerError("the chat template does not render conversations turn by turn")
                piece = self._ids(full[len(done):])
                ids += piece
                target += [False] * len(piece)
                done = full
        bos = self.tok.bos_id
        if bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
            target.insert(0, False)
        return ids, target


@dataclass
class Example:
    """One training sequence: inputs [L] and next-token labels [L] (-100 where not a target)."""
    tokens: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


def make_example(ids: list[int], target: list[bool], max_len: int | None = None) -> Example | None:
    """Shift ids into (inputs, labels), truncated to ``max_len`` inputs; None if no target is left."""
    ids_a = np.asarray(ids, dtype=np.int64)
    tgt = np.asarray(target, dtype=bool)
    tokens, labels = ids_a[:-1], np.where(tgt[1:], ids_a[1:], IGNORE)
    if max_len is not None and len(tokens) > max_len:
        tokens, labels = tokens[:max_len], labels[:max_len]
    if not (labels != IGNORE).any():
        return None
    return Example(tokens, labels)


def encode_records(recs: list[dict], enc: ChatEncoder, max_len: int, where: str = "data",
                   system: str | None = None) -> tuple[list[Example], dict]:
    """Examples of ``recs`` (truncated to ``max_len``); stats of what was truncated or dropped."""
    out: list[Example] = []
    stats = {"records": len(recs), "truncated": 0, "dropped": 0}
    for i, r in enumerate(recs):
        ids, tgt = enc.encode(to_messages(r, f"{where}[{i}]", system))
        stats["truncated"] += len(ids) - 1 > max_len
        ex = make_example(ids, tgt, max_len)
        if ex is None:
            stats["dropped"] += 1
        else:
            out.append(ex)
    return out, stats


# ---------------------------------------------------------------- packing

@dataclass
class Rows:
    """Fixed-length rows: tokens, labels (-100: no loss), segments (1.. per example, 0 padding), [R, L]."""
    tokens: np.ndarray
    labels: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def pack_examples(examples: list[Example], seq_len: int, pad_id: int = 0, seed: int = 0,
                  pack: bool = True) -> Rows:
    """Examples (shuffled with ``seed``) into rows of ``seq_len``; first-fit over open rows.

    ``pack=False`` gives one example per row (padded). No example is ever split across rows.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i])
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens > seq_len {seq_len} (truncate first)")
        for b in range(len(bins)) if pack else ():
            if space[b] >= n:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(seq_len - n)
    R = len(bins)
    tokens = np.full((R, seq_len), pad_id, dtype=np.int64)
    labels = np.full((R, seq_len), IGNORE, dtype=np.int64)
    segments = np.zeros((R, seq_len), dtype=np.int64)
    for r, members in enumerate(bins):
        p = 0
        for s, i in enumerate(members, 1):
            ex = examples[i]
            n = len(ex)
            tokens[r, p:p + n] = ex.tokens
            labels[r, p:p + n] = ex.labels
            segments[r, p:p + n] = s
            p += n
    perm = np.random.default_rng(seed).permutation(R)
    return Rows(tokens[perm], labels[perm], segments[perm])


def split_holdout(items: list, fraction: float, seed: int, max_items: int = 0) -> tuple[list, list]:
    """(train, held-out) split of ``items`` by a seeded shuffle; at least one held out when fraction > 0."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"val_fraction={fraction} must be in [0, 1)")
    idx = list(range(len(items)))
    random.Random(seed + 7919).shuffle(idx)
    n_val = 0 if fraction == 0 else max(1, int(round(fraction * len(items))))
    if max_items:
        n_val = min(n_val, max_items)
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [items[i] for i in train], [items[i] for i in val]
