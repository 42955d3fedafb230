"""Tokenized training shards, and a deterministic, resumable sampler over a mixture of them.

Build (``bitnet158 data`` calls this)::

    build_shards(iter_documents(["books/"]), tokenizer_dir, "shards/books", val_fraction=0.02)

writes ``shards/books/``: ``index.json``, ``train-00000.bin`` ..., ``val-00000.bin`` (raw uint16
token ids, uint32 when the vocabulary needs it, read back with ``np.memmap``) and a copy of the
tokenizer files under ``tokenizer/``. Every document is ``<bos> tokens <eos>`` (the eos id is the
document separator). The validation split holds whole documents (a seeded choice); when one
document would take more than twice the wanted share, its tail is split off instead.

Read::

    shards = TokenShards("shards/books", "train")           # memory-mapped
    sampler = MixtureSampler({"books": shards}, stages=[{"books": 1.0}], seq_len=1024, seed=0)
    rows = sampler.next_rows(64, stage=1)                    # int64 [64, seq_len + 1]
    state = sampler.state_dict()                             # resume exactly from here

Each source is cut into windows of ``seq_len + 1`` tokens starting every ``seq_len`` tokens; a source
is read in epochs, each a fresh seeded permutation of its windows, so every token is seen once per
epoch. Which source each row comes from is drawn from the current stage's mixture weights with a
generator seeded by (seed, rows drawn so far): the state is two integers per source, and a run
resumed from it draws the same rows.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .text import DataError

FORMAT = "bitnet158-tokens-v1"
INDEX = "index.json"


# ---------------------------------------------------------------- progress

class Progress:
    """A progress bar: tqdm when installed, else a line on stderr at most once a second."""

    def __init__(self, total: int | None, desc: str, unit: str = "doc", disable: bool = False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.disable = disable
        self._bar = None
        self._last = 0.0
        self._t0 = time.time()
        if not disable:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        if self.disable:
            return
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix(info)
            return
        now = time.time()
        if now - self._last >= 1.0 or (self.total and self.n >= self.total):
            self._last = now
            tot = f"/{self.total}" if self.total else ""
            extra = " ".join(f"{k}={v}" for k, v in info.items())
            print(f"\r{self.desc}: {self.n}{tot} {self.unit}s {now - self._t0:.0f}s {extra}",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.disable:
            print(file=sys.stderr)


# ---------------------------------------------------------------- building shards

def _load_tokenizer(tokenizer_dir: Path):
    """(tokenizers.Tokenizer, bos_id, eos_id) from a folder with tokenizer.json (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{tokenizer_dir}: no tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    def special(key: str, default: str) -> int:
        v = cfg.get(key, default)
        name = v.get("content") if isinstance(v, dict) else v
        tid = tok.token_to_id(name or default)
        if tid is None:
            raise DataError(f"{tokenizer_dir}: tokenizer has no {key} token {name!r}")
        return tid

    return tok, special("bos_token", "<|begin_of_text|>"), special("eos_token", "<|end_of_text|>")


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._n = 0
        self.tokens = 0
        self.docs = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._n = 0

    def write(self, ids: np.ndarray) -> None:
        self.docs += 1
        while len(ids):
            if self._f is None or self._n >= self.shard_tokens:
                if self._f is not None:
                    self._f.close()
                self._open()
            take = ids[: self.shard_tokens - self._n]
            self._f.write(take.astype(self.dtype).tobytes())
            self._n += len(take)
            self.shards[-1]["tokens"] += len(take)
            self.tokens += len(take)
            ids = ids[len(take):]

    def close(self) -> dict:
        if self._f is not None:
            self._f.close()
        return {"shards": self.shards, "tokens": self.tokens, "docs": self.docs}


def build_shards(docs: Iterable[tuple[str, str]], tokenizer_dir: str | Path, out_dir: str | Path,
                 val_fraction: float = 0.01, seed: int = 0, shard_tokens: int = 1 << 28,
                 add_bos: bool = True, batch_docs: int = 64, progress: bool = True) -> dict:
    """Tokenize ``docs`` (pairs of source, text) into ``out_dir``; return the index dict."""
    tokenizer_dir, out = Path(tokenizer_dir), Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    tok, bos, eos = _load_tokenizer(tokenizer_dir)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train-*.bin")) + list(out.glob("val-*.bin")):
        old.unlink()

    # 1) tokenize everything (kept in memory as compact arrays: fine up to a few GB of tokens)
    encoded: list[np.ndarray] = []
    sources: dict[str, int] = {}
    bar = Progress(None, "tokenize", disable=not progress)
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        for (src, _), enc in zip(batch, tok.encode_batch([t for _, t in batch], add_special_tokens=False)):
            ids = np.asarray(([bos] if add_bos else []) + enc.ids + [eos], dtype=dtype)
            encoded.append(ids)
            sources[src] = sources.get(src, 0) + 1
        bar.update(len(batch), tokens=sum(map(len, encoded)))
        batch.clear()

    for src, text in docs:
        if text:
            batch.append((src, text))
        if len(batch) >= batch_docs:
            flush()
    if batch:
        flush()
    bar.close()
    if not encoded:
        raise DataError("no documents with text in the input")

    # 2) choose the validation documents (seeded), or split one long document's tail
    total = sum(len(e) for e in encoded)
    want = int(round(val_fraction * total))
    val_docs: set[int] = set()
    tail_split: tuple[int, int] | None = None
    if want > 0:
        got = 0
        for i in np.random.default_rng(seed).permutation(len(encoded)):
            n = len(encoded[i])
            if got + n > 2 * want and got == 0:
                tail_split = (int(i), n - want)  # document i: tokens [cut:] go to val
                break
            if got + n > 2 * want:
                continue
            val_docs.add(int(i))
            got += n
            if got >= want:
                break

    train_w = _ShardWriter(out, "train", dtype, shard_tokens)
    val_w = _ShardWriter(out, "val", dtype, shard_tokens)
    for i, ids in enumerate(encoded):
        if i in val_docs:
            val_w.write(ids)
        elif tail_split and tail_split[0] == i:
            cut = tail_split[1]
            train_w.write(np.append(ids[:cut], eos).astype(dtype))
            val_w.write(np.insert(ids[cut:], 0, bos).astype(dtype) if add_bos else ids[cut:])
        else:
            train_w.write(ids)

    tok_out = out / "tokenizer"
    tok_out.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, tok_out / name)
    index = {
        "format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": vocab, "bos_id": bos,
        "eos_id": eos, "add_bos": add_bos, "tokenizer": "tokenizer", "val_fraction": val_fraction,
        "seed": seed, "sources": sources,
        "splits": {"train": train_w.close(), "val": val_w.close()},
    }
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


# ---------------------------------------------------------------- reading shards

def read_index(data_dir: str | Path) -> dict:
    path = Path(data_dir) / INDEX
    if not path.is_file():
        raise DataError(f"{data_dir}: no {INDEX} (build it with `bitnet158 data`)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


class TokenShards:
    """One split of a shard folder, memory-mapped. Windows of ``seq_len + 1`` tokens every ``seq_len``."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.dir = Path(data_dir)
        self.index = read_index(self.dir)
        if split not in self.index["splits"]:
            raise DataError(f"{self.dir}: no split {split!r}")
        self.split = split
        dtype = np.dtype(self.index["dtype"])
        self.arrays = [np.memmap(self.dir / s["file"], dtype=dtype, mode="r")
                       for s in self.index["splits"][split]["shards"] if s["tokens"] > 0]
        self.tokens = sum(len(a) for a in self.arrays)

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    def num_windows(self, seq_len: int) -> int:
        return sum(max(len(a) - 1, 0) // seq_len for a in self.arrays)

    def windows(self, idx: np.ndarray, seq_len: int) -> np.ndarray:
        """Rows int64 [len(idx), seq_len + 1] for window numbers ``idx``."""
        counts = np.array([max(len(a) - 1, 0) // seq_len for a in self.arrays])
        starts = np.concatenate([[0], np.cumsum(counts)])
        out = np.empty((len(idx), seq_len + 1), dtype=np.int64)
        for r, w in enumerate(np.asarray(idx)):
            s = int(np.searchsorted(starts, w, side="right") - 1)
            off = (int(w) - int(starts[s])) * seq_len
            out[r] = self.arrays[s][off: off + seq_len + 1]
        return out


class MixtureSampler:
    """Rows from several sources; the mixture weights change with the stage. Resumable exactly."""

    def __init__(self, sources: dict[str, TokenShards], stages: list[dict[str, float]], seq_len: int,
                 seed: int = 0):
        if not sources:
            raise DataError("a mixture needs at least one source")
        self.names = sorted(sources)
        self.sources, self.seq_len, self.seed = sources, seq_len, seed
        self.counts = {}
        for n in self.names:
            c = sources[n].num_windows(seq_len)
            if c == 0:
                raise DataError(f"source {n!r} ({sources[n].dir}, {sources[n].split}) has fewer than "
                                f"seq_len+1={seq_len + 1} tokens")
            self.counts[n] = c
        self.weights = []
        for k, st in enumerate(stages or [{n: 1.0 for n in self.names}], 1):
            bad = sorted(set(st) - set(self.names))
            if bad:
                raise DataError(f"stage {k} mixture names unknown source(s) {bad}; sources: {self.names}")
            w = np.array([float(st.get(n, 0.0)) for n in self.names])
            if (w < 0).any() or w.sum() <= 0:
                raise DataError(f"stage {k} mixture weights must be >= 0 with a positive sum, got {st}")
            self.weights.append(w / w.sum())
        self.cursor = {n: 0 for n in self.names}   # windows taken so far from each source
        self.drawn = 0                              # rows drawn so far (all sources)
        self._perm: dict[str, tuple[int, np.ndarray]] = {}

    def _window(self, name: str, c: int) -> int:
        n = self.counts[name]
        epoch, i = divmod(c, n)
        cached = self._perm.get(name)
        if cached is None or cached[0] != epoch:
            sid = self.names.index(name)
            cached = (epoch, np.random.default_rng([self.seed, sid, epoch]).permutation(n))
            self._perm[name] = cached
        return int(cached[1][i])

    def epochs(self) -> dict[str, float]:
        return {n: self.cursor[n] / self.counts[n] for n in self.names}

    def next_rows(self, n: int, stage: int = 1, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Draw the next ``n`` rows (all ranks draw the same); return rows[lo:hi] as int64 [hi-lo, T+1]."""
        w = self.weights[min(stage, len(self.weights)) - 1]
        pick = np.random.default_rng([self.seed, 1 << 20, self.drawn]).choice(len(self.names), size=n, p=w)
        plan = []
        for s in pick:
            name = self.names[s]
            plan.append((name, self.cursor[name]))
            self.cursor[name] += 1
        self.drawn += n
        lo, hi = rows or (0, n)
        out = np.empty((hi - lo, self.seq_len + 1), dtype=np.int64)
        for r, (name, c) in enumerate(plan[lo:hi]):
            out[r] = self.sources[name].windows(np.array([self._window(name, c)]), self.seq_len)[0]
        return out

    def state_dict(self) -> dict:
        return {"cursor": dict(self.cursor), "drawn": self.drawn, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len:
            raise DataError(f"data state was saved with seq_len={state['seq_len']}, recipe has {self.seq_len}")
        if sorted(state["cursor"]) != self.names:
            raise DataError(f"data state names sources {sorted(state['cursor'])}, recipe has {self.names}")
        self.cursor = {k: int(v) for k, v in state["cursor"].items()}
        self.drawn = int(state["drawn"])
        self.seed = int(state.get("seed", self.seed))


def val_rows(shards: TokenShards, seq_len: int, max_rows: int) -> np.ndarray:
    """A fixed validation set: up to ``max_rows`` windows spread evenly over the split."""
    n = shards.num_windows(seq_len)
    if n == 0:
        raise DataError(f"{shards.dir}: split {shards.split!r} has fewer than {seq_len + 1} tokens")
    idx = np.unique(np.linspace(0, n - 1, num=min(max_rows, n)).round().astype(np.int64))
    return shards.windows(idx, seq_len)


def iter_chunks(a: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(a), size):
        yield a[i:i + size]
