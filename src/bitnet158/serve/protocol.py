"""OpenAI wire format: request schemas (pydantic), response builders and OpenAI-shaped errors.

    req = ChatCompletionRequest.model_validate(json_body)      # raises pydantic.ValidationError
    body = error_body("max_tokens must be >= 1", param="max_tokens", code="invalid_value")

Requests accept what the official ``openai`` client sends for ``/v1/completions`` and
``/v1/chat/completions`` and validate types strictly (a string where a number belongs is a 400, not
a silent cast). Fields OpenAI defines but this server cannot honour (``n > 1``, ``logprobs``,
``tools``, penalties other than 0) are refused with a 400 naming the parameter rather than ignored.
Unknown extra fields (e.g. from ``extra_body``) are ignored, as other OpenAI-compatible servers do;
``top_k``, ``repetition_penalty`` and ``ignore_eos`` are accepted as extras.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]


# ---------------------------------------------------------------- errors

class APIError(Exception):
    """An error the server answers with ``{"error": {...}}`` and an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "TextPart"}


def _is_type_tag(p) -> bool:
    """pydantic puts the union member tried into error locations ('int', 'list[str]', ...)."""
    return isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or p.startswith(("function-", "literal")))


def validation_error(errors: list[dict]) -> APIError:
    """Turn pydantic/FastAPI validation errors into one 400 naming the first bad parameter."""
    if not errors:
        return APIError(400, "invalid request")
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    if e.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: "
                        f"{e.get('ctx', {}).get('error', e.get('msg', 'invalid JSON'))}. (HINT: the body "
                        "must be valid JSON.)", code="invalid_json")
    param = ".".join(loc) or None
    if e.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    if not loc and e.get("type") in ("model_type", "dict_type"):
        return APIError(400, "The request body must be a JSON object.", code="invalid_type")
    got = e.get("input")
    got_s = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
    return APIError(400, f"Invalid value for '{param}': {e.get('msg', 'invalid')} (got {got_s}).",
                    param=param, code="invalid_type" if e.get("type", "").endswith("_type") else "invalid_value")


# ---------------------------------------------------------------- requests

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None                 # extra (not in OpenAI's API)
    repetition_penalty: Optional[Number] = None       # extra
    ignore_eos: Optional[StrictBool] = False          # extra: generate past end-of-text (benchmarks)
    n: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional["StreamOptions"] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Number]] = None
    user: Optional[StrictStr] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Optional[StrictBool] = False


class CompletionRequest(_Request):
    """POST /v1/completions. ``prompt``: text, or token ids, or a list of one of those."""

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    echo: Optional[StrictBool] = False
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: Optional[StrictStr] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()


def check_unsupported(req: _Request) -> None:
    """Refuse parameters this server cannot honour, naming them (OpenAI-style 400)."""
    def no(param: str, why: str):
        raise APIError(400, f"'{param}' {why}", param=param, code="unsupported_parameter")

    if req.n is not None and req.n != 1:
        no("n", f"must be 1 on this server (got {req.n}); send separate requests for more choices")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v not in (None, 0, 0.0):
            no(name, "is not supported (use the 'repetition_penalty' extra instead)")
    if req.logit_bias:
        no("logit_bias", "is not supported")
    if isinstance(req, CompletionRequest):
        if req.logprobs:
            no("logprobs", "is not supported")
        if req.echo:
            no("echo", "is not supported")
        if req.best_of not in (None, 1):
            no("best_of", "must be 1")
        if req.suffix:
            no("suffix", "is not supported")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs or req.top_logprobs:
            no("logprobs", "is not supported")
        if req.tools:
            no("tools", "(function calling) is not supported")
        rf = req.response_format
        if rf and rf.get("type", "text") != "text":
            no("response_format", "only {'type': 'text'} is supported")


# ---------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(id: str, model: str, created: int, text: str, finish_reason: str,
                        prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(id: str, model: str, created: int, text: str, finish_reason: str | None,
                     with_usage: bool) -> dict:
    d = {"id": id, "object": "text_completion", "created": created, "model": model,
         "system_fingerprint": None,
         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        d["usage"] = None
    return d


def chat_response(id: str, model: str, created: int, text: str, finish_reason: str,
                  prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(id: str, model: str, created: int, delta: dict, finish_reason: str | None,
               with_usage: bool) -> dict:
    d = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
         "system_fingerprint": None,
         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        d["usage"] = None
    return d


def usage_chunk(id: str, model: str, created: int, object: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The last chunk when ``stream_options.include_usage``: empty choices, usage filled."""
    return {"id": id, "object": object, "created": created, "model": model, "system_fingerprint": None,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def model_card(model_id: str, created: int | None = None, max_model_len: int | None = None) -> dict:
    d = {"id": model_id, "object": "model", "created": created or int(time.time()),
         "owned_by": "bitnet158"}
    if max_model_len is not None:
        d["max_model_len"] = max_model_len
    return d


__all__ = ["APIError", "error_body", "validation_error", "CompletionRequest", "ChatCompletionRequest",
           "ChatMessage", "StreamOptions", "check_unsupported", "new_id", "usage",
           "completion_response", "completion_chunk", "chat_response", "chat_chunk", "usage_chunk",
           "model_card"]
