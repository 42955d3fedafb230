"""Preference pairs for DPO: record formats -> (prompt, chosen, rejected) conversations -> padded rows.

    pairs, stats = encode_pairs(read_records(path), ChatEncoder(tok), max_len=1024)
    tokens, labels = pad_pairs(pairs[:4], pad_id)        # [2P, L]: the P chosen rows, then the P rejected

Record formats (``.json`` list or ``.jsonl``), recognized per record:

- ``{"prompt", "chosen", "rejected"}``: each a string (prompt = one user turn, chosen/rejected = one
  assistant turn) or a message list (OpenAI role/content or ShareGPT from/value). A chosen/rejected
  list that already starts with the prompt (UltraFeedback style) is not prefixed twice.
- LLaMA-Factory ``{"conversations": [...], "chosen": {"from", "value"}, "rejected": {...}}``.
- Anthropic HH-RLHF ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``: both full
  transcripts; the turns they share are the prompt.

The prompt of a pair is the longest run of messages both conversations share; the rest (normally
the final assistant turn) is the completion, and its assistant tokens (with ``<|eot_id|>``) are the
only ones whose log-probabilities count. A sequence longer than ``max_len`` loses the oldest prompt
tokens first (after BOS; the completion is kept), then the end of the completion. Pairs whose
completions are equal, or that have no completion token left, are dropped (counted in the stats).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .sft_data import IGNORE, ChatEncoder, DataError, Example, make_example, messages_of

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass
class Pair:
    chosen: Example
    rejected: Example

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def parse_hh(text: str, where: str) -> list[dict]:
    """An HH-RLHF transcript ``"\\n\\nHuman: a\\n\\nAssistant: b..."`` -> messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: not an HH-RLHF transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    return [{"role": "user" if r == "Human" else "assistant", "content": c}
            for r, c in zip(parts[1::2], parts[2::2])]


def to_pair_messages(rec: dict, where: str = "record") -> tuple[list[dict], list[dict]]:
    """(chosen conversation, rejected conversation), both complete (prompt included)."""
    if "chosen" not in rec or "rejected" not in rec:
        raise DataError(f"{where}: a preference record needs 'chosen' and 'rejected' (keys: {sorted(rec)[:8]})")
    c, r = rec["chosen"], rec["rejected"]
    if "prompt" not in rec and "conversations" not in rec and "messages" not in rec:
        if isinstance(c, str) and isinstance(r, str) and _HH_TURN.match(c):
            return parse_hh(c, f"{where}.chosen"), parse_hh(r, f"{where}.rejected")
        # full conversations as message lists (the shared turns are the prompt)
        return messages_of(c, f"{where}.chosen"), messages_of(r, f"{where}.rejected")
    if "prompt" in rec:
        p = rec["prompt"]
        prompt = ([{"role": "user", "content": p}] if isinstance(p, str) else messages_of(p, f"{where}.prompt"))
        if rec.get("system") and not any(m["role"] == "system" for m in prompt):
            prompt = [{"role": "system", "content": rec["system"]}] + prompt
    else:
        key = "conversations" if "conversations" in rec else "messages"
        prompt = messages_of(rec[key], f"{where}.{key}")
        if isinstance(rec.get("system"), str) and rec["system"] and not any(m["role"] == "system" for m in prompt):
            prompt = [{"role": "system", "content": rec["system"]}] + prompt
    cm, rm = messages_of(c, f"{where}.chosen"), messages_of(r, f"{where}.rejected")
    full_c = cm if cm[:len(prompt)] == prompt else prompt + cm
    full_r = rm if rm[:len(prompt)] == prompt else prompt + rm
    return full_c, full_r


def shared_prefix(a: list[dict], b: list[dict]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k]["role"] == b[k]["role"] and a[k]["content"] == b[k]["content"]:
        k += 1
    return k


def encode_pairs(recs: list[dict], enc: ChatEncoder, max_len: int, where: str = "data"
                 ) -> tuple[list[Pair], dict]:
    """Pairs of ``recs`` with completion targets; stats of what was dropped or truncated."""
    out: list[Pair] = []
    stats = {"records": len(recs), "dropped_equal": 0, "dropped_no_target": 0, "truncated": 0}
    for i, rec in enumerate(recs):
        w = f"{where}[{i}]"
        if not isinstance(rec, dict):
            raise DataError(f"{w}: a record must be an object")
        full_c, full_r = to_pair_messages(rec, w)
        k = shared_prefix(full_c, full_r)
        if k == len(full_c) and k == len(full_r):
            stats["dropped_equal"] += 1
            continue
        ids_c, t_c = enc.encode(full_c, train_from=k)
        ids_r, t_r = enc.encode(full_r, train_from=k)
        stats["truncated"] += int(len(ids_c) - 1 > max_len or len(ids_r) - 1 > max_len)
        ids_c, t_c = cut_prompt(ids_c, t_c, max_len)
        ids_r, t_r = cut_prompt(ids_r, t_r, max_len)
        ec, er = make_example(ids_c, t_c, max_len), make_example(ids_r, t_r, max_len)
        if ec is None or er is None:
            stats["dropped_no_target"] += 1
            continue
        out.append(Pair(ec, er))
    return out, stats


def cut_prompt(ids: list[int], target: list[bool], max_len: int) -> tuple[list[int], list[bool]]:
    """Too long for ``max_len`` inputs: drop the oldest prompt tokens (after the first, BOS) so that the
    completion fits; a completion longer than that is cut at its end later (``make_example``)."""
    excess = len(ids) - 1 - max_len
    if excess <= 0 or True not in target:
        return ids, target
    first = target.index(True)                     # first completion token (its header precedes it)
    cut = min(excess, max(first - 2, 0))           # keep BOS and the token that predicts the first target
    return ids[:1] + ids[1 + cut:], target[:1] + target[1 + cut:]


def pad_pairs(pairs: list[Pair], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens, labels [2P, L] (L = the longest sequence): chosen rows 0..P-1, rejected rows P..2P-1."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    L = max(len(s) for s in seqs)
    tokens = np.full((len(seqs), L), pad_id, dtype=np.int64)
    labels = np.full((len(seqs), L), IGNORE, dtype=np.int64)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s.tokens
        labels[i, :len(s)] = s.labels
    return tokens, labels
