"""Continuous batching: one decode loop serving many requests on the rows of one batched runner.

    engine = BatchEngine(make_runner(model, batch=8), max_queue=64).start()
    handle = engine.submit(prompt_ids, SamplingParams(max_new_tokens=32, seed=0),
                           on_token=lambda tok: ..., on_done=lambda reason, error: ...)
    handle.cancel()            # e.g. the client went away: its row is free before the next step
    engine.stats()             # {"slots": 8, "active": 1, "queued": 0, ...}
    engine.stop()

A single thread owns the runner. Between two decode steps it drops cancelled requests, admits queued
ones into free rows, prefills the new requests on their rows (``rows=``; rows already decoding
keep their KV cache) in chunks of at most ``prefill_chunk`` tokens, one chunk per step, so a long
prompt does not stall the others for its whole prefill; with ``prefill_together=True`` the
step's chunks share prefill calls, rows padded to the call's longest chunk (``lengths=``: each
row's logits at its own last token; see :meth:`BatchEngine._prefill_calls`), so requests that
arrive together pay one call's launches and weight reads rather than one each (off by default:
on a GPU every new (rows, padded length) shape of a shared call runs eagerly, then is captured,
and prompts of varied lengths keep making new ones; one call a request meets few shapes);
then it runs ONE decode call over the
contiguous range of rows in use, so requests at different positions share every step. Rows in that
range that are idle or still prefilling are fed a dummy token at a position they overwrite before
they ever read it (their next prefill position), so their cache stays intact. Each request samples with its own
:class:`Sampler` (own ``torch.Generator``), so a seeded request gives the same tokens whatever else
runs beside it on the same shapes. On a GPU (``queued``, the default there) each step and its
sampling are queued before the host reads the previous step's ids (and a new request's first
token, sampled after its prefill): its rows' tokens are fed from the device, and the host hands
out the previous tokens (stop tests, callbacks) while the GPU runs the step: the host waits
neither for a step nor for a prefill's first token before it queues more work. A request that
ends on a token has had one step queued past it, whose id is dropped and whose cache slot is
overwritten before it is read; the tokens are the ones handed out in order (``queued=False``). Callbacks run on the engine thread and must be quick (the server
hands them to its event loop). The queue is bounded: ``submit`` raises :class:`QueueFullError` when
``max_queue`` requests already wait.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Callable

import torch

from ..errors import BitNetError, ContextLengthError
from .sampling import Sampler, SamplingParams, next_ids, to_device


# a prompt chunk may join a prefill call padded by up to its own length or this many tokens
PAD_FREE = 64
# padded tokens (rows x longest chunk) of one prefill call at most (at least ``prefill_chunk``)
PREFILL_TOKENS = 4096


class QueueFullError(BitNetError):
    """Every row is busy and the waiting queue holds ``max_queue`` requests already."""


class EngineStoppedError(BitNetError):
    """The batch engine is not running (stopped, or it never started)."""


class Handle:
    """One submitted request. ``cancel()`` is safe from any thread; the row is freed at the next step."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, max_new_tokens: int,
                 stop_ids: frozenset[int], on_token: Callable[[int], None],
                 on_done: Callable[[str | None, BaseException | None], None]):
        self.id = next(self._ids)
        self.prompt = prompt
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.on_token = on_token
        self.on_done = on_done
        self.cancelled = False
        self.done = False
        self.row: int | None = None
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.sampler: Sampler | None = None
        self.next_token: int | None = None     # sampled, not yet fed back through decode
        self.prefilled = 0                     # prompt tokens already in the KV cache
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class _Step:
    """A queued decode step (or a prefill call's first tokens): its requests, the sampled ids (long
    [b] on the device: row ``lo + i`` at ``i``, or without ``lo`` ``handles[i]`` at ``i``), where
    each request's id sits (``at``: row -> index) and their copy to pinned host memory behind an
    event."""

    def __init__(self, handles: list[Handle], ids: torch.Tensor, lo: int | None = None):
        self.handles, self.ids = handles, ids
        self.at = {h.row: (h.row - lo if lo is not None else i) for i, h in enumerate(handles)}
        self.event = None
        if ids.is_cuda:
            self.host = torch.empty(ids.shape, dtype=torch.long, pin_memory=True)
            self.host.copy_(ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(ids.device))
        else:
            self.host = ids

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class BatchEngine:
    """The decode loop over a runner of ``runner.batch`` rows (see the module docstring)."""

    def __init__(self, runner, max_queue: int = 64, stop_ids: frozenset[int] | set[int] = frozenset(),
                 prefill_chunk: int = 512, queued: bool | None = None, prefill_together: bool = False,
                 prefill_tokens: int = PREFILL_TOKENS):
        self.runner = runner
        # queue each decode step before handing out the previous one's tokens (default: on a GPU)
        dev = getattr(runner, "device", None)
        self.queued = getattr(dev, "type", None) == "cuda" if queued is None else bool(queued)
        # queued steps whose tokens are not handed out yet: the last decode step, then the first
        # tokens of prefills finished since
        self.pending: list[_Step] = []
        self.prefill_chunk = max(1, int(prefill_chunk))
        # the prompt chunks of a step share prefill calls of at most prefill_tokens padded tokens.
        # Off by default. H100, 64 clients: equal 32-token prompts got their first token after
        # 0.025 s against 0.12 s one call a request, prompts of 32-224 tokens after 1.2 s against
        # 0.16-0.19 s (a GPU meets a new (rows, length) shape in nearly every shared call: eager,
        # then captured); on 2 cores the CPU's first tokens came later (its prefill is arithmetic)
        self.prefill_together = bool(prefill_together)
        self.prefill_tokens = max(self.prefill_chunk, int(prefill_tokens))
        self.slots: list[Handle | None] = [None] * runner.batch
        self.max_queue = max_queue
        self.stop_ids = frozenset(stop_ids)
        self.waiting: deque[Handle] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.steps = 0                     # decode steps run
        self.tokens_out = 0                # tokens produced (prefill + decode)

    # ------------------------------------------------------------ control
    def start(self) -> "BatchEngine":
        if self.thread is None:
            self.running = True
            self.thread = threading.Thread(target=self._loop, name="bitnet158-batch", daemon=True)
            self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still queued or running end with finish_reason None and an error."""
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
            self.thread = None
        for h in [*self.waiting, *(s for s in self.slots if s is not None)]:
            self._finish(h, None, EngineStoppedError("the server is shutting down"))
        self.waiting.clear()
        self.slots = [None] * len(self.slots)
        self.pending = []

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_token: Callable[[int], None],
               on_done: Callable[[str | None, BaseException | None], None]) -> Handle:
        """Queue a request. Raises ContextLengthError, QueueFullError or EngineStoppedError at once."""
        prompt = list(prompt_ids)
        ctx = self.runner.max_len
        if not prompt:
            raise ContextLengthError("the prompt is empty (it needs at least one token)")
        if len(prompt) >= ctx:
            raise ContextLengthError(f"prompt of {len(prompt)} tokens does not fit the context of "
                                     f"{ctx} tokens (it must leave room for at least one new token)")
        stops = self.stop_ids if params.stop_ids is None else params.stop_ids
        h = Handle(prompt, params, min(params.max_new_tokens, ctx - len(prompt)), frozenset(stops),
                   on_token, on_done)
        with self.cond:
            if not self.running:
                raise EngineStoppedError("the batch engine is not running")
            free = sum(s is None for s in self.slots)
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFullError(f"all {len(self.slots)} rows are busy and {len(self.waiting)} "
                                     f"requests are queued (max_queue={self.max_queue})")
            self.waiting.append(h)
            self.cond.notify_all()
        return h

    def stats(self) -> dict:
        with self.cond:
            active = sum(s is not None for s in self.slots)
            return {"slots": len(self.slots), "active": active, "free": len(self.slots) - active,
                    "queued": len(self.waiting), "max_queue": self.max_queue, "steps": self.steps,
                    "tokens_out": self.tokens_out, "running": self.running}

    # ------------------------------------------------------------ loop
    def _finish(self, h: Handle, reason: str | None, error: BaseException | None = None) -> None:
        if h.done:
            return
        h.done, h.finish_reason = True, reason
        if h.row is not None and self.slots[h.row] is h:
            self.slots[h.row] = None
        try:
            h.on_done(reason, error)
        except Exception:  # a callback must never kill the loop
            pass

    def _emit(self, h: Handle, tok: int) -> bool:
        """Handle a sampled token; True when the request goes on decoding."""
        if h.cancelled:
            self._finish(h, None)
            return False
        if tok in h.stop_ids:
            self._finish(h, "stop")
            return False
        h.tokens.append(tok)
        self.tokens_out += 1
        try:
            h.on_token(tok)
        except Exception as e:
            self._finish(h, None, e)
            return False
        if len(h.tokens) >= h.max_new_tokens:
            self._finish(h, "length")
            return False
        h.next_token = tok
        return True

    def _admit(self) -> list[Handle]:
        """Under the lock: drop cancelled requests, move waiting ones into free rows."""
        for i, h in enumerate(self.slots):
            if h is not None and h.cancelled:
                self._finish(h, None)
        while self.waiting and self.waiting[0].cancelled:
            self._finish(self.waiting.popleft(), None)
        admitted = []
        for i in range(len(self.slots)):
            if self.slots[i] is None and self.waiting:
                h = self.waiting.popleft()
                while h.cancelled and self.waiting:
                    self._finish(h, None)
                    h = self.waiting.popleft()
                if h.cancelled:
                    self._finish(h, None)
                    break
                h.row = i
                self.slots[i] = h
                admitted.append(h)
        return admitted

    def _prefill_calls(self, filling: list[Handle]) -> list[list[Handle]]:
        """This step's prompt chunks (one of each request still prefilling) grouped into prefill
        calls: chunks from position 0 apart from continuing ones (a continuation's attention reads
        the cache), longest first; a chunk joins a call while the call's rows x its longest chunk
        stay within ``prefill_tokens``, its padding is at most its own length or PAD_FREE tokens,
        and the padding's positions stay inside the cache."""
        if not self.prefill_together:
            return [[h] for h in filling]
        size = {id(h): min(len(h.prompt) - h.prefilled, self.prefill_chunk) for h in filling}
        calls: list[list[Handle]] = []
        for fresh in (True, False):
            call: list[Handle] | None = None
            for h in sorted((h for h in filling if (h.prefilled == 0) == fresh), key=lambda h: -size[id(h)]):
                n = size[id(h)]
                if call is not None:
                    T = size[id(call[0])]                          # the call's longest chunk
                    if ((len(call) + 1) * T <= self.prefill_tokens and T - n <= max(n, PAD_FREE)
                            and h.prefilled + T <= self.runner.max_len):
                        call.append(h)
                        continue
                call = [h]
                calls.append(call)
        return calls

    def _prefill(self, hs: list[Handle]) -> None:
        """Prefill the next chunk of each request's prompt in one call (rows padded to the longest
        chunk); sample the first token of the requests whose prompt is then complete."""
        r = self.runner
        dev = r.device
        for h in hs:
            if h.sampler is None:
                h.sampler = Sampler(h.params, r.vocab_size, h.prompt, device=dev)
        spans = [(h.prefilled, min(len(h.prompt), h.prefilled + self.prefill_chunk)) for h in hs]
        lengths = [b - a for a, b in spans]
        T = max(lengths)
        toks = torch.tensor([h.prompt[a:b] + [0] * (T - b + a) for h, (a, b) in zip(hs, spans)])   # [B, T]
        pos = torch.tensor([list(range(a, a + T)) for a, _ in spans])                              # [B, T]
        rows = torch.tensor([h.row for h in hs])
        if min(lengths) < T:
            logits = r.prefill(toks, pos, rows, lengths)                                           # [B, V]
        else:
            logits = r.prefill(toks, pos, rows)
        done = []
        for i, (h, (_, b)) in enumerate(zip(hs, spans)):
            h.prefilled = b
            if b == len(h.prompt):
                done.append(i)
        if not done:
            return
        first = [hs[i] for i in done]
        lg = logits if len(done) == len(hs) else logits.index_select(0, to_device(done, logits.device))
        ids = next_ids([h.sampler for h in first], lg)                                             # [k]
        if self.queued:                    # the first tokens stay on the device for the next step
            self.pending.append(_Step(first, ids))
        else:
            for h, tok in zip(first, ids.tolist()):
                self._emit(h, tok)

    def _decode(self) -> None:
        """Queue one decode step over the live rows, then hand out the tokens of the step before it
        (queued: the host's per-token work overlaps the GPU's step) or of this one (in order)."""
        prevs, self.pending = self.pending, []
        try:
            step = self._queue_step(prevs)
        except Exception:
            for prev in prevs:                     # their tokens were made: hand them out first
                self._emit_step(prev)
            raise
        for prev in prevs:
            self._emit_step(prev)
        if step is not None:
            if self.queued:
                for h in step.handles:             # its next token is queued: none from the host
                    h.next_token = None
                self.pending = [step]
            else:
                self._emit_step(step)

    def _queue_step(self, prevs: "list[_Step]") -> "_Step | None":
        """Queue a decode step and its sampling over the contiguous range of rows in use; the ids
        stay on the device (copied to pinned host memory behind an event).

        Rows fed a host token: requests whose last token the host has read (``next_token``). Rows
        fed ahead: requests of the steps ``prevs`` (the previous decode step, prefills' first
        tokens) not yet handed out, whose token is still on the device; a request that ends on
        that token (a stop id, a cancel) has had one step too many, whose cache slot is
        overwritten before it is read and whose id is never handed out."""
        ahead = {id(prev): [h for h in prev.handles if not h.done and not h.cancelled
                            and len(h.tokens) + 1 < h.max_new_tokens] for prev in prevs}
        fed = [h for h in self.slots if h is not None and not h.done and h.next_token is not None]
        live = sorted(fed + [h for hs in ahead.values() for h in hs], key=lambda h: h.row)
        if not live:
            return None
        r = self.runner
        lo, hi = live[0].row, live[-1].row + 1
        toks = [0] * (hi - lo)                                                        # [b]
        pos = [0] * (hi - lo)                                                         # idle rows: pos 0
        for i in range(lo, hi):
            h = self.slots[i]
            if h is not None and h.next_token is None and h.prefilled < r.max_len:
                pos[i - lo] = h.prefilled          # still prefilling: a slot its next chunk overwrites
        for h in fed:
            toks[h.row - lo] = h.next_token
            pos[h.row - lo] = len(h.prompt) + len(h.tokens) - 1    # position of the token fed back
        for hs in ahead.values():                                  # its token: the next, not yet read
            for h in hs:
                pos[h.row - lo] = len(h.prompt) + len(h.tokens)
        dev = getattr(r, "device", torch.device("cpu"))
        if any(ahead.values()):                                    # tokens [b] on the device
            toks = to_device(toks, dev)
            for prev in prevs:
                hs = ahead[id(prev)]
                if hs:
                    toks.index_copy_(0, to_device([h.row - lo for h in hs], dev),
                                     prev.ids.index_select(0, to_device([prev.at[h.row] for h in hs], dev)))
        else:
            toks = torch.tensor(toks, dtype=torch.long)
        pos = torch.tensor(pos, dtype=torch.long)
        rows = torch.arange(lo, hi)                        # host tensors: checked without a device wait
        logits = r.decode(toks, pos, rows)                                             # [b, V]
        self.steps += 1
        # plain greedy rows: one argmax for all of them (a row's own Sampler would give the same
        # id, with a launch per row); the other rows drawn on the device by their own Samplers
        # (together where the row ops allow: the same ids as one by one)
        drawn = [h for h in live if not h.params.argmax]
        if len(drawn) == hi - lo:                                  # every row of the range, in order
            ids = next_ids([h.sampler for h in drawn], logits)                          # [b]
        else:
            ids = logits.argmax(-1)                                                     # [b]
            if drawn:
                idx = to_device([h.row - lo for h in drawn], logits.device)
                ids.index_copy_(0, idx, next_ids([h.sampler for h in drawn], logits.index_select(0, idx)))
        for h in fed:
            h.next_token = None                                    # fed: its successor is queued
        return _Step(live, ids, lo)

    def _emit_step(self, step: "_Step") -> None:
        """Read a step's ids on the host (waiting for that step only) and hand them out."""
        got = step.read()
        for h in step.handles:
            if not h.done:
                self._emit(h, got[step.at[h.row]])

    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.running and not self.waiting and all(s is None for s in self.slots):
                    self.cond.wait(timeout=0.5)
                if not self.running:
                    return
                self._admit()
                filling = [h for h in self.slots
                           if h is not None and not h.done and h.prefilled < len(h.prompt)]
            for call in self._prefill_calls(filling):    # one chunk of each prompt still prefilling
                try:
                    with torch.inference_mode():
                        self._prefill(call)
                except Exception as e:
                    with self.cond:
                        for h in call:
                            self._finish(h, None, e)
            try:
                with torch.inference_mode():
                    # cancellations that arrived during the prefills free their rows before the step
                    for h in list(self.slots):
                        if h is not None and h.cancelled:
                            with self.cond:
                                self._finish(h, None)
                    self._decode()
            except Exception as e:
                with self.cond:
                    self.pending = []
                    for h in list(self.slots):           # every request past its prefill
                        if h is not None and h.prefilled >= len(h.prompt):
                            self._finish(h, None, e)


__all__ = ["BatchEngine", "Handle", "QueueFullError", "EngineStoppedError"]
