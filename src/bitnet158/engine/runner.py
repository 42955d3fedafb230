"""Runners: the layer below generation where fast engines plug in (torch reference, CPU C, GPU Triton).

    runner = make_runner(model, batch=1, max_len=None, backend="auto")
    runner.reset()
    logits = runner.prefill(tokens, pos)      # tokens, pos LongTensor [B, T] -> float32 [B, V] (last position)
    logits = runner.prefill(tokens, pos, rows, lengths)   # ragged rows: row b's prompt is tokens[b, :lengths[b]]
    logits = runner.decode(tokens, pos)       # tokens, pos LongTensor [B]    -> float32 [B, V]

A runner owns a static KV cache of ``runner.batch`` rows and ``runner.max_len`` positions. Every
row has its own positions (``pos`` is per row), so a server can keep rows at different lengths
(continuous batching); ``rows`` (LongTensor [b], optional) runs the call on a subset of the cache
rows only, e.g. to prefill one new request while the others wait. A call at positions ``pos`` writes
those KV slots and attends to slots ``0..pos`` of its row: slots past a row's position are never
read, so re-using a cached prefix only means prefilling from the first position that differs.
Rows of different lengths share one prefill call through ``lengths`` (host LongTensor or list [B]):
row b's real tokens are ``tokens[b, :lengths[b]]`` and its logits those of position
``lengths[b] - 1``; the tokens after them are padding whose positions continue the row's (they
must stay inside the cache), whose KV slots lie past the row's last real position and are
overwritten before anything reads them.
``tokens``, ``pos`` and ``rows`` may live on the host or on the runner's device: a GPU runner checks
host tensors without waiting for the device (device ones cost it one synchronization), so a
generation loop that keeps them on the host lets the GPU run ahead.

Other engines register themselves from their own modules::

    register_runner("cpu", factory=lambda model, batch, max_len: CRunner(...),
                    available=lambda model: model.device.type == "cpu", priority=10)

``make_runner(backend="auto")`` first imports ``bitnet158.kernels.cpu.runner`` and
``bitnet158.kernels.triton.runner`` (if installed; they call :func:`register_runner`), then picks the
available runner of highest priority. Runners read the thread count from ``torch.get_num_threads()``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from ..errors import ConfigError
from ..model import KVCache

# modules that register fast runners when imported (missing ones are skipped)
RUNNER_MODULES = ("bitnet158.kernels.cpu.runner", "bitnet158.kernels.triton.runner")


@runtime_checkable
class Runner(Protocol):
    """What generation needs from an engine. Logits are float32 [B, V] of the last position.

    ``config`` is the model's ModelConfig (generation reads its eos ids for the default stops).
    """

    config: object
    batch: int
    max_len: int
    vocab_size: int
    device: torch.device

    def reset(self) -> None: ...

    def prefill(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None,
                lengths: torch.Tensor | list[int] | None = None) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor,
               rows: torch.Tensor | None = None) -> torch.Tensor: ...


class _RowsView:
    """KV cache rows [r0, r1) of a KVCache as views (writes land in the full cache)."""

    def __init__(self, cache, r0: int, r1: int):
        self.k, self.v = cache.k[r0:r1], cache.v[r0:r1]

    update = KVCache.update


class _RowsIndex:
    """KV cache rows ``r`` (LongTensor [b] on the cache's device, any order) of a KVCache: writes land
    in the full cache, reads gather the slots in use (a copy of ``length`` slots a row)."""

    def __init__(self, cache, r: torch.Tensor):
        self.cache, self.r = cache, r

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int):
        c, r = self.cache, self.r
        c.k[r[:, None], :, pos] = k.transpose(1, 2).to(c.k.dtype)       # [b, T, Hkv, D]
        c.v[r[:, None], :, pos] = v.transpose(1, 2).to(c.v.dtype)
        return c.k[r, :, :length], c.v[r, :, :length]


class TorchRunner:
    """The reference runner: ``model.hidden`` with the model's static KV cache, head on the last position.

    Works for any device and dtype the model is on; the projections use whatever
    :mod:`bitnet158.kernels` backend serves the model's device.
    """

    name = "torch"

    def __init__(self, model, batch: int = 1, max_len: int | None = None):
        cfg = model.config
        self.model = model.eval()
        self.config = cfg
        self.batch = batch
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.vocab_size = cfg.vocab_size
        self.device = model.device
        check_cache_fits(cfg, batch, self.max_len, model.dtype, self.device, "torch runner")
        with torch.no_grad():
            self.cache = model.new_cache(batch, self.max_len)   # list of KVCache [B, Hkv, S, D]

    def reset(self) -> None:
        """Forget every row (slots are overwritten before they are read, so nothing is zeroed)."""

    def _caches(self, rows: torch.Tensor | None, n: int):
        if rows is None:
            if n != self.batch:
                raise ValueError(f"runner: got {n} rows but the runner has batch={self.batch}; "
                                 f"pass rows= to run on a subset")
            return self.cache
        r = on_host(torch.as_tensor(rows)).reshape(-1).tolist()
        if len(r) != n:
            raise ValueError(f"runner: rows has {len(r)} entries for {n} input rows")
        if any(not 0 <= i < self.batch for i in r):
            raise ValueError(f"runner: rows {r} out of range for batch={self.batch}")
        if r == list(range(r[0], r[0] + n)):                      # contiguous: views, no copies
            return [_RowsView(c, r[0], r[0] + n) for c in self.cache]
        if len(set(r)) != n:
            raise ValueError(f"runner: rows {r} name a cache row twice")
        idx = torch.tensor(r, device=self.device)                 # any order: indexed writes, gathered reads
        return [_RowsIndex(c, idx) for c in self.cache]

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None,
                lengths: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """tokens, pos [B, T] (host or device) -> float32 logits [B, V] of the last position of each
        row (with ``lengths``: of position ``lengths[b] - 1``)."""
        check_pos(pos, self.max_len)
        B, T = tokens.shape
        last = check_lengths(lengths, B, T)
        cache = self._caches(rows, B)
        tokens, pos = tokens.to(self.device), pos.to(self.device)
        h = self.model.hidden(tokens, pos, cache)                # [B, T, D]
        h = h[:, -1] if last is None else h[torch.arange(B, device=h.device), torch.tensor(last, device=h.device)]
        return self.model.logits(h).float()                      # head on the last positions only

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, pos [B] -> float32 logits [B, V]."""
        return self.prefill(tokens[:, None], pos[:, None], rows)


def on_host(t: torch.Tensor) -> torch.Tensor:
    """An index tensor to check on the host: a CPU tensor as it is (no wait), a device one copied
    (one synchronization; check everything on this copy rather than syncing per check)."""
    return t if t.device.type == "cpu" else t.cpu()


def check_pos(pos: torch.Tensor, max_len: int, who: str = "runner") -> int:
    """The largest of ``pos`` (host or device, see :func:`on_host`); a clear error naming ``who``
    unless every position lies in the KV cache ``[0, max_len)``."""
    p = on_host(pos)
    hi, lo = int(p.max()), int(p.min())
    if hi >= max_len or lo < 0:
        raise ValueError(f"{who}: position {hi if hi >= max_len else lo} outside the KV cache "
                         f"(max_len={max_len})")
    return hi


def check_lengths(lengths, B: int, T: int, who: str = "runner") -> list[int] | None:
    """The index ``lengths[b] - 1`` of each row's last real token (host list), checked: one length a
    row, each in ``1..T``; None when ``lengths`` is None (every row's last token is ``T - 1``)."""
    if lengths is None:
        return None
    got = on_host(torch.as_tensor(lengths)).reshape(-1).tolist()
    if len(got) != B:
        raise ValueError(f"{who}: lengths has {len(got)} entries for {B} rows")
    bad = [n for n in got if not 1 <= n <= T]
    if bad:
        raise ValueError(f"{who}: lengths {bad} outside 1..{T} (the prefill's {T} columns)")
    return [int(n) - 1 for n in got]


def check_cache_fits(cfg, batch: int, max_len: int, dtype: torch.dtype, device, who: str = "runner") -> None:
    """A KV cache of ``batch`` rows x ``max_len`` positions that cannot fit in the free memory of
    CUDA ``device`` is a clear error before anything is allocated, not an out-of-memory error
    deep inside the allocation. Off CUDA nothing is checked (the host swaps or the OS says no)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    need = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * max_len * cfg.head_dim
    need *= torch.empty((), dtype=dtype).element_size()
    free, total = torch.cuda.mem_get_info(device)
    if need > free:
        raise ConfigError(f"{who}: a KV cache of {batch} rows x {max_len} positions needs {need / 1e9:.2f} GB, "
                          f"but {free / 1e9:.2f} of {total / 1e9:.2f} GB are free on {device}; use fewer rows "
                          f"(batch, serve --max-batch) or positions (max_len, --context)")


# ---------------------------------------------------------------- registry

@dataclass
class RunnerSpec:
    name: str
    factory: Callable[..., Runner]          # factory(model, batch, max_len) -> Runner
    available: Callable[[object], bool]     # available(model) -> bool
    priority: int = 0


_RUNNERS: dict[str, RunnerSpec] = {}
_hooks_done = False


def register_runner(name: str, factory: Callable[..., Runner],
                    available: Callable[[object], bool] = lambda model: True, priority: int = 0) -> None:
    """Add (or replace) a runner. ``auto`` picks the available runner of highest priority."""
    _RUNNERS[name] = RunnerSpec(name, factory, available, priority)


def _import_hooks() -> None:
    global _hooks_done
    if _hooks_done:
        return
    _hooks_done = True
    for mod in RUNNER_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def runners() -> list[RunnerSpec]:
    """Registered runners, highest priority first."""
    _import_hooks()
    return sorted(_RUNNERS.values(), key=lambda s: -s.priority)


def make_runner(model, batch: int = 1, max_len: int | None = None, backend: str = "auto") -> Runner:
    """A runner for ``model`` with a KV cache of ``batch`` rows x ``max_len`` positions.

    ``max_len`` defaults to (and is capped at) the model's ``max_position_embeddings``.
    ``backend``: "auto" (best available), "torch", or the name of a registered runner.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"make_runner: batch={batch!r} must be a positive integer")
    if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
        raise ConfigError(f"make_runner: max_len={max_len!r} must be a positive integer or None")
    specs = runners()
    if backend == "auto":
        for s in specs:
            if s.available(model):
                return s.factory(model, batch, max_len)
        raise ConfigError("make_runner: no runner available for this model")  # torch always is
    spec = _RUNNERS.get(backend)
    if spec is None:
        names = ", ".join(["auto", *(s.name for s in specs)])
        raise ConfigError(f"backend={backend!r}: unknown runner (available: {names})")
    if not spec.available(model):
        raise ConfigError(f"backend={backend!r}: this runner cannot run this model "
                          f"(device {model.device}, dtype {model.dtype}); try backend='auto'")
    return spec.factory(model, batch, max_len)


register_runner("torch", TorchRunner, lambda model: True, priority=0)

__all__ = ["Runner", "TorchRunner", "check_cache_fits", "register_runner", "make_runner", "runners", "RunnerSpec", "on_host", "check_pos", "check_lengths"]
