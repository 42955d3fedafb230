"""The OpenAI-compatible HTTP server (FastAPI): routes, request checks, SSE streaming.

    app = create_app(model, tokenizer, model_id="my-model", max_batch=8, max_queue=64)
    uvicorn.run(app, host="127.0.0.1", port=8000)        # or: bitnet158 serve MODEL

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /health``. Every request runs on one shared
:class:`~bitnet158.engine.batch.BatchEngine` (continuous batching over ``max_batch`` KV-cache rows);
a client that disconnects cancels its request and frees its row before the next decode step. Errors
are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): 400 bad request, 401 bad
API key, 404 unknown model/route, 429 queue full, 500 engine failure.

Streaming follows OpenAI exactly: ``data: {chunk}\\n\\n`` events, the chat role delta first, content
deltas, a chunk with ``finish_reason``, a usage chunk (empty ``choices``) when
``stream_options.include_usage`` is set, then ``data: [DONE]``. Stop strings never leak: text that
could still become a stop string is held back until it cannot.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..checkpoint import generation_defaults
from ..engine.batch import BatchEngine, EngineStoppedError, QueueFullError
from ..engine.runner import make_runner
from ..engine.sampling import SamplingError, SamplingParams
from ..errors import BitNetError, ContextLengthError
from . import protocol as P
from .stops import MAX_STOPS, StopStrings


class Server:
    """What the routes share: the model's id, tokenizer, context and the batch engine."""

    def __init__(self, model, tokenizer, model_id: str, max_batch: int = 8, max_queue: int = 64,
                 max_len: int | None = None, backend: str = "auto", api_key: str | None = None,
                 prefill_chunk: int = 512, defaults: dict | None = None, prefill_together: bool = False):
        self.model_id = model_id
        self.defaults = dict(defaults or {})   # sampling defaults for fields a request leaves out
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.created = int(time.time())
        runner = make_runner(model, batch=max_batch, max_len=max_len, backend=backend)
        self.max_len = runner.max_len
        self.engine = BatchEngine(runner, max_queue=max_queue, stop_ids=frozenset(tokenizer.stop_ids),
                                  prefill_chunk=prefill_chunk, prefill_together=prefill_together)

    # ------------------------------------------------------------ request -> prompt ids + params
    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            raise P.APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                             code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise P.APIError(404, f"The model '{name}' does not exist; this server serves "
                             f"'{self.model_id}' (see GET /v1/models).", param="model",
                             code="model_not_found")

    def chat_prompt(self, req: P.ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise P.APIError(400, "'messages' must contain at least one message.", param="messages",
                             code="invalid_value")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages]
        try:
            return self.tokenizer.encode_chat(msgs, add_generation_prompt=True)
        except BitNetError as e:
            raise P.APIError(400, f"could not apply the chat template: {e}", param="messages") from None

    def completion_prompt(self, req: P.CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise P.APIError(400, f"'prompt' holds {len(p)} prompts; this server takes one per "
                                 "request.", param="prompt", code="unsupported_parameter")
            p = p[0]
        if isinstance(p, str):
            return self.tokenizer.encode(p, add_bos=True)
        ids = list(p)
        if not ids:
            raise P.APIError(400, "'prompt' is an empty list of token ids.", param="prompt",
                             code="invalid_value")
        V = self.engine.runner.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise P.APIError(400, f"'prompt' token id {bad[0]} is outside the vocabulary [0, {V}).",
                             param="prompt", code="invalid_value")
        return ids

    def sampling(self, req, n_prompt: int, prompt_param: str) -> tuple[SamplingParams, list[str]]:
        ctx = self.max_len
        if n_prompt >= ctx:
            raise P.APIError(400, f"This model's maximum context length is {ctx} tokens. However, your "
                             f"{prompt_param} is {n_prompt} tokens, which leaves no room for a "
                             "completion. Please shorten it.", param=prompt_param,
                             code="context_length_exceeded")
        name, max_tokens = "max_tokens", req.max_tokens
        if isinstance(req, P.ChatCompletionRequest) and req.max_completion_tokens is not None:
            name, max_tokens = "max_completion_tokens", req.max_completion_tokens
        if max_tokens is None:
            max_tokens = min(ctx - n_prompt, self.defaults.get("max_tokens", ctx))
        elif max_tokens < 1:
            raise P.APIError(400, f"'{name}' must be at least 1 (got {max_tokens}).", param=name,
                             code="invalid_value")
        elif n_prompt + max_tokens > ctx:
            raise P.APIError(400, f"This model's maximum context length is {ctx} tokens. However, you "
                             f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the "
                             f"{prompt_param}, {max_tokens} in the completion). Please reduce the "
                             f"length of the {prompt_param} or '{name}'.", param=name,
                             code="context_length_exceeded")
        stops = req.stop_list()
        if len(stops) > MAX_STOPS:
            raise P.APIError(400, f"'stop' takes at most {MAX_STOPS} sequences (got {len(stops)}).",
                             param="stop", code="invalid_value")
        d = self.defaults
        temperature = float(d.get("temperature", 1.0) if req.temperature is None else req.temperature)
        if not 0.0 <= temperature <= 2.0:
            raise P.APIError(400, f"'temperature' must be in [0, 2] (got {temperature}).",
                             param="temperature", code="invalid_value")
        checks = (("top_p", req.top_p, d.get("top_p", 1.0)), ("top_k", req.top_k, d.get("top_k", 0)),
                  ("repetition_penalty", req.repetition_penalty, d.get("repetition_penalty", 1.0)))
        kw = {k: (d if v is None else v) for k, v, d in checks}
        try:
            params = SamplingParams(temperature=temperature, top_p=float(kw["top_p"]), top_k=kw["top_k"],
                                    repetition_penalty=float(kw["repetition_penalty"]), seed=req.seed,
                                    max_new_tokens=max_tokens,
                                    stop_ids=frozenset() if req.ignore_eos else None)
        except SamplingError as e:
            param = next((k for k in kw if f".{k}=" in str(e)), None)
            raise P.APIError(400, str(e), param=param, code="invalid_value") from None
        return params, stops

    # ------------------------------------------------------------ running a request
    def submit(self, prompt: list[int], params: SamplingParams):
        """Queue on the engine; returns (handle, asyncio.Queue of ("token", id) / ("done", reason, err))."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(tok: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("token", tok))

        def on_done(reason, error) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("done", reason, error))

        try:
            handle = self.engine.submit(prompt, params, on_token, on_done)
        except QueueFullError as e:
            raise P.APIError(429, f"The server is busy: {e}. Retry later.", type="rate_limit_error",
                             code="queue_full") from None
        except ContextLengthError as e:
            raise P.APIError(400, str(e), code="context_length_exceeded") from None
        except EngineStoppedError as e:
            raise P.APIError(503, str(e), type="server_error", code="unavailable") from None
        return handle, events

    async def pieces(self, handle, events: asyncio.Queue, stops: list[str]) -> AsyncIterator[str]:
        """Text pieces of a running request (UTF-8 whole, stop strings cut); sets handle.result."""
        dec = self.tokenizer.stream_decoder()
        filt = StopStrings(stops)
        handle.result = None
        handle.used = 0           # tokens that made it into the text (usage counts these)
        while True:
            ev = await events.get()
            if ev[0] == "token":
                handle.used += 1
                out = filt.push(dec.push(ev[1]))
                if out:
                    yield out
                if filt.stopped:
                    handle.cancel()
                    handle.result = ("stop", None)
                    return
            else:
                _, reason, error = ev
                if error is not None:
                    handle.result = (None, error)
                    return
                out = filt.push(dec.flush())
                if not filt.stopped:
                    out += filt.flush()
                if out:
                    yield out
                handle.result = ("stop" if filt.stopped else reason or "stop", None)
                return


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(model, tokenizer, model_id: str, max_batch: int = 8, max_queue: int = 64,
               max_len: int | None = None, backend: str = "auto", api_key: str | None = None,
               cors_origins: list[str] | None = None, prefill_chunk: int = 512,
               defaults: dict | None = None, prefill_together: bool = False) -> FastAPI:
    """Build the app; the batch engine starts with the app (lifespan) and stops with it.

    ``defaults``: sampling values for fields a request omits (``temperature``, ``top_p``, ``top_k``,
    ``repetition_penalty``, ``max_tokens``), e.g. from :func:`generation_defaults`; OpenAI's own
    defaults (temperature 1, the rest of the context) otherwise. ``prefill_together``: prompts
    admitted together share prefill calls (:class:`BatchEngine`).
    """
    srv = Server(model, tokenizer, model_id, max_batch, max_queue, max_len, backend, api_key, prefill_chunk,
                 defaults, prefill_together)

    @asynccontextmanager
    async def lifespan(app):
        srv.engine.start()
        try:
            yield
        finally:
            srv.engine.stop()

    app = FastAPI(title="bitnet158", lifespan=lifespan)
    app.state.server = srv
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    @app.exception_handler(P.APIError)
    async def _api_error(request, exc: P.APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        e = P.validation_error(list(exc.errors()))
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(P.error_body(msg, code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.model_id, "context": srv.max_len, **srv.engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        return {"object": "list", "data": [P.model_card(srv.model_id, srv.created, srv.max_len)]}

    @app.get("/v1/models/{model_name:path}")
    async def model_info(model_name: str, request: Request):
        srv.check_auth(request)
        srv.check_model(model_name)
        return P.model_card(srv.model_id, srv.created, srv.max_len)

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        srv.check_auth(request)
        srv.check_model(req.model)
        P.check_unsupported(req)
        prompt = srv.completion_prompt(req)
        params, stops = srv.sampling(req, len(prompt), "prompt")
        return await _run(srv, request, req, prompt, params, stops, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        srv.check_auth(request)
        srv.check_model(req.model)
        P.check_unsupported(req)
        prompt = srv.chat_prompt(req)
        params, stops = srv.sampling(req, len(prompt), "messages")
        return await _run(srv, request, req, prompt, params, stops, chat=True)

    return app


async def _run(srv: Server, request: Request, req, prompt: list[int], params: SamplingParams,
               stops: list[str], chat: bool):
    handle, events = srv.submit(prompt, params)
    rid, created = P.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(srv, handle, events, stops, rid, created, chat, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def watch() -> None:               # a client that hangs up frees its row at once
        while True:
            await asyncio.sleep(0.1)
            if await request.is_disconnected():
                handle.cancel()
                return

    watcher = asyncio.create_task(watch())
    text = []
    try:
        async for piece in srv.pieces(handle, events, stops):
            text.append(piece)
    finally:
        watcher.cancel()
        handle.cancel()
    reason, error = handle.result
    if error is not None:
        raise P.APIError(500, f"generation failed: {error}", type="server_error")
    n_out = handle.used
    build = P.chat_response if chat else P.completion_response
    return build(rid, srv.model_id, created, "".join(text), reason, len(prompt), n_out)


async def _stream(srv: Server, handle, events, stops: list[str], rid: str, created: int, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    model = srv.model_id
    try:
        if chat:
            yield _sse(P.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None,
                                    include_usage))
        async for piece in srv.pieces(handle, events, stops):
            if chat:
                yield _sse(P.chat_chunk(rid, model, created, {"content": piece}, None, include_usage))
            else:
                yield _sse(P.completion_chunk(rid, model, created, piece, None, include_usage))
        reason, error = handle.result
        if error is not None:
            yield _sse(P.error_body(f"generation failed: {error}", "server_error"))
            return
        if chat:
            yield _sse(P.chat_chunk(rid, model, created, {}, reason, include_usage))
        else:
            yield _sse(P.completion_chunk(rid, model, created, "", reason, include_usage))
        if include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield _sse(P.usage_chunk(rid, model, created, obj, handle.prompt_tokens, handle.used))
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()   # client gone (generator closed/cancelled) or finished: free the row now


__all__ = ["create_app", "Server", "generation_defaults"]
