"""Generation on token ids: prefill, decode loop, stop handling, streaming of ids and text.

    gen = generate(model, prompt_ids, SamplingParams(max_new_tokens=32))   # model or runner
    for tok in gen:                        # yields new token ids (a stop token is not yielded)
        ...
    gen.finish_reason, gen.prompt_tokens, gen.completion_tokens      # "stop" | "length"

    text = generate_text(model, tokenizer, "Once upon a time", max_new_tokens=32)
    for piece in stream_text(model, tokenizer, prompt_ids, params):  # UTF-8 safe pieces
        print(piece, end="", flush=True)

    session = Session(model)               # batch-1 runner that keeps its KV cache between calls:
    session.generate(turn1_ids, params)    # a later prompt that shares a prefix with what the
    session.generate(turn2_ids, params)    # cache holds only prefills the part that differs

Context rule (HF's): prompt + completion never exceed the context (the runner's ``max_len``, at
most the model's ``max_position_embeddings``). A prompt that leaves no room for one new token raises
:class:`ContextLengthError` naming both lengths; otherwise ``max_new_tokens`` is clamped to the room
left, and generation that ends there reports ``finish_reason == "length"`` (``gen.clamped`` is True).
Stop ids default to the model config's eos ids; the text helpers default to ``tokenizer.stop_ids``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from ..errors import ContextLengthError
from ..sampling_params import GenerationError, SamplingParams

if TYPE_CHECKING:
    from .runner import Runner


def _is_runner(obj) -> bool:
    return hasattr(obj, "prefill") and hasattr(obj, "decode") and hasattr(obj, "max_len")


def _params(params: SamplingParams | None, kw: dict) -> SamplingParams:
    params = params or SamplingParams()
    return params.replace(**kw) if kw else params


def _numpy_runner(runner) -> bool:
    """A runner whose calls take and return numpy arrays (the torch-free CPU engine)."""
    return getattr(runner, "arrays", None) == "numpy"


def _sampler(params: SamplingParams, runner, prompt: list[int]) -> Callable:
    """logits [V] -> next id. Numpy runners sample greedily with numpy (no torch in the process);
    anything else goes through the engine's torch :class:`~.sampling.Sampler` (same draws per seed)."""
    if _numpy_runner(runner):
        if params.greedy and params.repetition_penalty == 1.0:
            import numpy as np
            return lambda logits: int(np.argmax(logits))
        import torch

        from .sampling import Sampler
        s = Sampler(params, runner.vocab_size, prompt)
        return lambda logits: s(torch.from_numpy(logits))
    from .sampling import Sampler
    return Sampler(params, runner.vocab_size, prompt, device=runner.device)


def _queued(runner) -> bool:
    """A CUDA runner: decode steps are queued ahead of the host (``Generation._steps_queued``)."""
    dev = getattr(runner, "device", None)
    return not _numpy_runner(runner) and getattr(dev, "type", None) == "cuda"


class _Done:
    """An event stand-in where the work is done in order (a CPU runner)."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _prompt_list(prompt_ids) -> list[int]:
    torch = sys.modules.get("torch")        # a tensor prompt means torch is loaded already
    if torch is not None and isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 1:
            raise GenerationError(f"prompt_ids: expected a 1-D sequence of token ids, got shape "
                                  f"{tuple(prompt_ids.shape)}")
        return prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)):
        raise GenerationError("prompt_ids: expected token ids, got text (encode it with the tokenizer, "
                              "or use generate_text)")
    ids = list(prompt_ids)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise GenerationError("prompt_ids: every entry must be an integer token id")
    return ids


class Generation:
    """One request on one runner row; iterate it for the new token ids.

    After (or during) iteration: ``finish_reason`` ("stop" | "length", None while running or if
    the consumer stopped early), ``prompt_tokens``, ``cached_tokens`` (prompt tokens already in the
    cache, not recomputed), ``completion_tokens``, ``tokens`` (the yielded ids), ``prefill_s``,
    ``decode_s`` / ``decode_steps`` (time in the runner and sampler after the prefill), ``cache_tokens`` (ids the cache row holds).
    """

    def __init__(self, runner: Runner, prompt_ids, params: SamplingParams, *, cached: int = 0,
                 row: int = 0, context: int | None = None, on_done: Callable[[], None] | None = None):
        prompt = _prompt_list(prompt_ids)
        if not prompt:
            raise GenerationError("prompt_ids: the prompt is empty (give at least one token, e.g. BOS)")
        vocab = runner.vocab_size
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise GenerationError(f"prompt_ids: token id {bad} outside the vocabulary [0, {vocab})")
        ctx = min(context or runner.max_len, runner.max_len)
        P = len(prompt)
        if P >= ctx:
            raise ContextLengthError(f"prompt of {P} tokens does not fit the context of {ctx} tokens "
                                     f"(it must leave room for at least one new token)")
        self.runner = runner
        self.params = params
        self.prompt = prompt
        self.row = row
        if runner.batch == 1 and row == 0:
            self.rows = None
        elif _numpy_runner(runner):
            self.rows = [row]
        else:
            import torch
            self.rows = torch.tensor([row])                 # on the host: checked without a device wait
        self.max_new_tokens = min(params.max_new_tokens, ctx - P)
        self.clamped = self.max_new_tokens < params.max_new_tokens
        stop = params.stop_ids
        if stop is None:
            cfg = getattr(runner, "config", None) or getattr(getattr(runner, "model", None), "config", None)
            stop = cfg.eos_token_ids if cfg is not None else ()
        self.stop_ids = frozenset(stop)
        self.cached_tokens = max(0, min(cached, P - 1))  # at least one token is prefilled for logits
        self.prompt_tokens = P
        self.completion_tokens = 0
        self.tokens: list[int] = []
        self.cache_tokens: list[int] = prompt[:self.cached_tokens]
        self.finish_reason: str | None = None
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.decode_steps = 0
        self._on_done = on_done
        self._it = self._run()

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        return next(self._it)

    def close(self) -> None:
        """Stop early (finish_reason stays None)."""
        self._it.close()
        self._done()

    def _done(self) -> None:
        done = getattr(self, "_on_done", None)
        if done is not None:
            self._on_done = None
            done()

    def __del__(self):  # never iterated: still give the runner back
        self._done()

    def run(self) -> list[int]:
        """Exhaust the generation; return the new token ids."""
        for _ in self:
            pass
        return self.tokens

    def _run(self) -> Iterator[int]:
        try:
            yield from self._steps()
        finally:                                  # exhausted, closed, failed or garbage-collected
            self._done()

    def _steps(self) -> Iterator[int]:
        r, P, start = self.runner, self.prompt_tokens, self.cached_tokens
        sample = _sampler(self.params, r, self.prompt)
        if _numpy_runner(r):
            import numpy as np
            no_grad = contextlib.nullcontext
            toks = np.array([self.prompt[start:]], dtype=np.int32)                        # [1, T]
            pos = np.arange(start, P, dtype=np.int32)[None]                                # [1, T]
            tok_buf, pos_buf = np.empty(1, dtype=np.int32), np.empty(1, dtype=np.int32)  # [1]
            fill = np.ndarray.fill
        else:
            import torch
            no_grad = torch.inference_mode
            # inputs stay on the host: the runner checks them there and copies them without waiting
            # for the device, so the only synchronization of a step is the sampler's
            toks = torch.tensor([self.prompt[start:]], dtype=torch.long)                  # [1, T]
            pos = torch.arange(start, P, dtype=torch.long)[None]                         # [1, T]
            tok_buf = torch.empty(1, dtype=torch.long)                                   # [1]
            pos_buf = torch.empty(1, dtype=torch.long)
            fill = torch.Tensor.fill_
        with no_grad():
            t0 = time.perf_counter()
            logits = r.prefill(toks, pos, self.rows)[0]                                    # [V]
            self.cache_tokens = list(self.prompt)
            if _queued(r):
                yield from self._steps_queued(logits, sample, pos_buf, fill, t0)
                return
            tok = sample(logits)
            self.prefill_s = time.perf_counter() - t0
        while True:
            if tok in self.stop_ids:
                self.finish_reason = "stop"
                return
            self.tokens.append(tok)
            self.completion_tokens += 1
            if self.completion_tokens >= self.max_new_tokens:
                self.finish_reason = "length"
                yield tok
                return
            yield tok
            t0 = time.perf_counter()
            with no_grad():
                fill(tok_buf, tok)
                fill(pos_buf, P + self.completion_tokens - 1)   # position of the token just sampled
                logits = r.decode(tok_buf, pos_buf, self.rows)[0]
                self.cache_tokens.append(tok)
                tok = sample(logits)
            self.decode_s += time.perf_counter() - t0
            self.decode_steps += 1

    def _steps_queued(self, logits, sample, pos_buf, fill, t0: float) -> Iterator[int]:
        """Decode on a GPU with the next step queued before the host reads this token.

        The sampled id (``Sampler.next_id``: the argmax, or a draw of the request's generator)
        stays on the device and feeds the next step; each token comes back through a pinned copy
        behind an event, so the host waits for the step that made it, not for the one queued
        after it, and handles the token (stop test, the consumer's work) while the GPU runs that
        next step. A token that turns out to be a stop id has had one step queued for it (and
        one more draw): that step writes a cache slot past ``cache_tokens``, which is never read
        before it is overwritten. Same tokens as the synchronous loop (same logits, same draws
        in the same order)."""
        import torch
        r, P = self.runner, self.prompt_tokens
        cuda = r.device.type == "cuda"                                 # else in order (the tests' CPU)
        host = torch.empty(2, dtype=torch.long, pin_memory=cuda)       # the tokens of two steps
        done = [torch.cuda.Event(), torch.cuda.Event()] if cuda else [_Done(), _Done()]
        # the runner's device's stream: an event records on the current device's by default, and
        # the model may sit on another GPU than the current one
        stream = torch.cuda.current_stream(r.device) if cuda else None
        with torch.inference_mode():
            cur = sample.next_id(logits)                               # [1] the first new token
            host[0:1].copy_(cur, non_blocking=True)
            done[0].record(stream)
        done[0].synchronize()                                          # the prefill's time: to this token
        self.prefill_s = time.perf_counter() - t0
        k = 0
        while True:
            t0 = time.perf_counter()
            c = self.completion_tokens                                 # ``cur`` is token c of the reply
            queued = c + 1 < self.max_new_tokens
            if queued:                                                 # its step, at position P + c
                with torch.inference_mode():
                    fill(pos_buf, P + c)
                    cur = sample.next_id(r.decode(cur, pos_buf, self.rows)[0])
                    host[1 - k:2 - k].copy_(cur, non_blocking=True)
                    done[1 - k].record(stream)
                self.decode_steps += 1
            done[k].synchronize()
            tok = int(host[k])
            self.decode_s += time.perf_counter() - t0
            if tok in self.stop_ids:
                self.finish_reason = "stop"
                return
            self.tokens.append(tok)
            self.completion_tokens += 1
            if not queued:
                self.finish_reason = "length"
                yield tok
                return
            self.cache_tokens.append(tok)
            yield tok
            k = 1 - k

    @property
    def decode_tok_s(self) -> float:
        """Decode steps per second (the first token comes from the prefill)."""
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0


_runner_lock = threading.Lock()


class _RunnerSlot:
    """The runner kept on a model (``model._engine_runner``); copies of the model start empty."""

    def __init__(self, key=None):
        self.key, self.runner, self.busy = key, None, True

    def __deepcopy__(self, memo):
        return _RunnerSlot()

    def __copy__(self):
        return _RunnerSlot()

    def __reduce__(self):
        return (_RunnerSlot, ())


def _runner_for(model_or_runner, needed: int, backend: str = "auto") -> tuple[Runner, Callable[[], None] | None]:
    """(runner, release) for a model. A packed model keeps one batch-1 runner (``_engine_runner``)
    re-used while it is free, so fast engines build their weight layout once; a concurrent request
    gets its own runner. After editing a packed model's weights in place, ``del model._engine_runner``.
    """
    if _is_runner(model_or_runner):
        return model_or_runner, None
    model = model_or_runner
    ctx = model.config.max_position_embeddings
    need = min(max(needed, 1), ctx)
    from .runner import make_runner
    if not getattr(model, "packed", False):      # training weights change: no runner copy kept
        return make_runner(model, batch=1, max_len=need), None
    key = (backend, str(model.device), model.dtype)
    with _runner_lock:
        slot = getattr(model, "_engine_runner", None)
        if slot is not None and slot.runner is not None and not slot.busy and slot.key == key \
                and slot.runner.max_len >= need:
            slot.busy = True
        else:
            if slot is not None and slot.busy:                     # in use: a private runner
                return make_runner(model, batch=1, max_len=need, backend=backend), None
            if slot is not None and slot.key == key and slot.runner is not None:
                need = max(need, slot.runner.max_len)              # grow, never shrink
            slot = _RunnerSlot(key)
            object.__setattr__(model, "_engine_runner", slot)
    if slot.runner is None:
        try:
            slot.runner = make_runner(model, batch=1, max_len=need, backend=backend)
        except BaseException:
            slot.busy = False
            raise

    def release() -> None:
        slot.busy = False
    return slot.runner, release


def generate(model_or_runner, prompt_ids: Sequence[int], params: SamplingParams | None = None,
             **kw) -> Generation:
    """Generate after ``prompt_ids`` with a model (a fresh batch-1 runner) or a runner (its row 0).

    Returns a :class:`Generation`: iterate it for the new ids. ``kw`` overrides fields of ``params``.
    """
    params = _params(params, kw)
    prompt = _prompt_list(prompt_ids)
    if not _is_runner(model_or_runner):
        ctx = model_or_runner.config.max_position_embeddings
        if len(prompt) >= ctx:
            raise ContextLengthError(f"prompt of {len(prompt)} tokens does not fit the context of "
                                     f"{ctx} tokens (it must leave room for at least one new token)")
    runner, release = _runner_for(model_or_runner, len(prompt) + params.max_new_tokens)
    try:
        return Generation(runner, prompt, params, on_done=release)
    except BaseException:
        if release is not None:
            release()
        raise


class Session:
    """A batch-1 runner that remembers the ids its KV cache holds and re-uses the longest common prefix.

    Used by multi-turn chat: the next turn's prompt extends the conversation, so only the new part
    is prefilled.
    """

    def __init__(self, model_or_runner, max_len: int | None = None, backend: str = "auto"):
        if _is_runner(model_or_runner):
            self.runner = model_or_runner
        else:
            from .runner import make_runner
            self.runner = make_runner(model_or_runner, batch=1, max_len=max_len, backend=backend)
        self._last: Generation | None = None
        self._tokens: list[int] = []

    @property
    def max_len(self) -> int:
        return self.runner.max_len

    @property
    def tokens(self) -> list[int]:
        """Token ids whose keys/values the cache holds, in order from position 0."""
        return self._last.cache_tokens if self._last is not None else self._tokens

    def reset(self) -> None:
        self._last, self._tokens = None, []
        self.runner.reset()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, **kw) -> Generation:
        params = _params(params, kw)
        prompt = _prompt_list(prompt_ids)
        held = self.tokens
        n = 0
        for a, b in zip(held, prompt):
            if a != b:
                break
            n += 1
        self._tokens = held[:n]
        self._last = None
        gen = Generation(self.runner, prompt, params, cached=n)
        self._last = gen
        return gen


# ---------------------------------------------------------------- text

class TextStream:
    """Iterate printable text pieces of a :class:`Generation` (multi-byte UTF-8 kept whole).

    ``.generation`` gives finish_reason and token counts; ``.text`` the text so far.
    """

    def __init__(self, generation: Generation, tokenizer):
        self.generation = generation
        self.tokenizer = tokenizer
        self.text = ""
        self._it = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def _run(self) -> Iterator[str]:
        dec = self.tokenizer.stream_decoder()
        for tok in self.generation:
            piece = dec.push(tok)
            if piece:
                self.text += piece
                yield piece
        tail = dec.flush()
        if tail:
            self.text += tail
            yield tail

    def __getattr__(self, name):  # finish_reason, prompt_tokens, completion_tokens, ...
        if name.startswith("_") or name in ("generation", "tokenizer", "text"):
            raise AttributeError(name)
        return getattr(self.generation, name)


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Text -> ids with BOS; a list of chat messages -> chat template ids; ids pass through."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_bos=True)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return tokenizer.encode_chat(prompt, add_generation_prompt=True)
    return prompt


def _with_stops(params: SamplingParams, tokenizer) -> SamplingParams:
    if params.stop_ids is None:
        return params.replace(stop_ids=frozenset(tokenizer.stop_ids))
    return params


def stream_text(model_or_runner, tokenizer, prompt_ids: Iterable[int] | str | list[dict],
                params: SamplingParams | None = None, **kw) -> TextStream:
    """Stream decoded text. ``prompt_ids`` may also be a string or a list of chat messages."""
    params = _with_stops(_params(params, kw), tokenizer)
    gen = generate(model_or_runner, encode_prompt(tokenizer, prompt_ids), params)
    return TextStream(gen, tokenizer)


def generate_text(model_or_runner, tokenizer, prompt: str | list[dict] | Iterable[int],
                  params: SamplingParams | None = None, **kw) -> str:
    """The completion of ``prompt`` (text gets BOS; a list of messages gets the chat template)."""
    return "".join(stream_text(model_or_runner, tokenizer, prompt, params, **kw))


__all__ = ["Generation", "generate", "Session", "TextStream", "stream_text", "generate_text",
           "encode_prompt"]
