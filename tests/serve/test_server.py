"""The OpenAI-compatible server through the official ``openai`` client, against a live subprocess.

Every request goes to 127.0.0.1; each test is bounded by max_tokens and client timeouts.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from .conftest import MODEL_ID, get_json, wait_idle  # noqa: E402


def post(url: str, body, timeout: float = 30.0) -> tuple[int, dict | str, dict]:
    """POST JSON (or raw bytes) with the standard library; returns (status, body, headers)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, headers = r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, headers = e.code, e.read().decode(), dict(e.headers)
    try:
        return status, json.loads(raw), headers
    except json.JSONDecodeError:
        return status, raw, headers

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]


def stream_chat(client, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=MODEL_ID, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def stream_completion(client, **kw) -> tuple[str, list]:
    chunks = list(client.completions.create(model=MODEL_ID, stream=True, **kw))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    h = get_json(server[0] + "/health")
    assert h["status"] == "ok" and h["slots"] == 8 and h["context"] == 256


def test_chat_nonstream_shape(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=12, temperature=0.9, seed=3)
    assert r.object == "chat.completion" and r.model == MODEL_ID
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("seed", [0, 7])
def test_chat_stream_equals_nonstream(client, seed):
    kw = dict(messages=CHAT, max_tokens=30, temperature=1.0, top_p=0.95, seed=seed)
    full = client.chat.completions.create(model=MODEL_ID, **kw)
    text, chunks = stream_chat(client, stream_options={"include_usage": True}, **kw)
    assert text == full.choices[0].message.content
    # role delta first, content deltas, one finish chunk, then the usage chunk (empty choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completion_stream_equals_nonstream(client):
    kw = dict(prompt="Once upon a time", max_tokens=25, temperature=0.8, seed=11)
    full = client.completions.create(model=MODEL_ID, **kw)
    assert full.object == "text_completion"
    text, chunks = stream_completion(client, **kw)
    assert text == full.choices[0].text and text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)          # no include_usage: no usage chunk


def test_sse_wire_format(server):
    """The raw event stream: `data: ...` lines, blank-line separated, ending with `data: [DONE]`."""
    body = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 5, "stream": True, "temperature": 0}
    status, raw, headers = post(server[0] + "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_seed_reproducible(client):
    kw = dict(prompt="The", max_tokens=20, temperature=1.2, ignore_eos=True)
    a = client.completions.create(model=MODEL_ID, seed=5, extra_body={"ignore_eos": True},
                                  **{k: v for k, v in kw.items() if k != "ignore_eos"})
    b = client.completions.create(model=MODEL_ID, seed=5, extra_body={"ignore_eos": True},
                                  **{k: v for k, v in kw.items() if k != "ignore_eos"})
    assert a.choices[0].text == b.choices[0].text
    others = {client.completions.create(model=MODEL_ID, seed=s, prompt="The", max_tokens=20,
                                        temperature=1.2, extra_body={"ignore_eos": True}).choices[0].text
              for s in (6, 7, 8)}
    assert len(others | {a.choices[0].text}) > 1        # different seeds do sample differently


def test_greedy_deterministic_and_top_k(client):
    a = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=15, temperature=0)
    b = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=15, temperature=0.7,
                                  extra_body={"top_k": 1})
    assert a.choices[0].text == b.choices[0].text      # top_k=1 is greedy whatever the temperature


def test_max_tokens(client):
    r = client.completions.create(model=MODEL_ID, prompt="A", max_tokens=7, temperature=0.5, seed=1,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_completion_tokens=3,
                                       temperature=0.5, seed=1, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_stop_strings(client):
    kw = dict(prompt="Once", max_tokens=40, temperature=1.0, seed=2, extra_body={"ignore_eos": True})
    text = client.completions.create(model=MODEL_ID, **kw).choices[0].text
    assert len(text) > 12, text
    stop = text[8:11]                                       # a 3-character string from the middle
    want = text[:text.find(stop)]
    r = client.completions.create(model=MODEL_ID, stop=[stop, "\x00never"], **kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed, chunks = stream_completion(client, stop=stop, **kw)
    assert streamed == want                                 # no partial stop string leaked
    assert stop not in streamed and chunks[-1].choices[0].finish_reason == "stop"


BAD = [
    ("malformed json", "/v1/chat/completions", b'{"model": "tiny-test", "messages": [', 400, None),
    ("not an object", "/v1/completions", b'[1, 2]', 400, None),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("wrong type max_tokens", "/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": "5"},
     400, "max_tokens"),
    ("wrong type temperature", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ("wrong type messages", "/v1/chat/completions", {"model": MODEL_ID, "messages": "hi"}, 400, "messages"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL_ID}, 400, "messages"),
    ("bad role", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("max_tokens 0", "/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": CHAT, "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens beyond context", "/v1/completions",
     {"model": MODEL_ID, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL_ID, "messages": []}, 400, "messages"),
    ("prompt longer than context", "/v1/completions",
     {"model": MODEL_ID, "prompt": "word " * 400, "max_tokens": 1}, 400, "prompt"),
    ("chat longer than context", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ("n > 1", "/v1/completions", {"model": MODEL_ID, "prompt": "x", "n": 2}, 400, "n"),
    ("too many stops", "/v1/completions",
     {"model": MODEL_ID, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("temperature out of range", "/v1/completions",
     {"model": MODEL_ID, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ("top_p out of range", "/v1/completions", {"model": MODEL_ID, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("token id out of vocab", "/v1/completions", {"model": MODEL_ID, "prompt": [1, 99999]}, 400, "prompt"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests(server, name, path, body, status, param):
    code, got, _ = post(server[0] + path, body)
    assert code == status, got
    err = got["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    # the server keeps serving
    code, _, _ = post(server[0] + "/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 2})
    assert code == 200


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[], max_tokens=2)
    assert e.value.param == "messages"


def test_unknown_route_is_openai_shaped(server):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server[0] + "/v1/nothing", timeout=10)
    assert e.value.code == 404 and "error" in json.loads(e.value.read())


def test_idle_after_tests(server):
    h = wait_idle(server[0])
    assert h["active"] == 0 and h["queued"] == 0
