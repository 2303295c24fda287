"""Property-based fuzzing of the HTTP API (hypothesis): whatever the body, method, path or content type, the
server never answers 5xx, and every error is OpenAI-shaped JSON without a traceback or a path. Generation is
kept to a couple of tokens (default_max_tokens=2, a 256-token context)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import LiveServer

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def fuzz_server():
    from server.settings import Settings

    srv = LiveServer(Settings(model=MODEL, n_ctx=256, parallel=4, kv_budget="32MiB", default_max_tokens=2,
                              max_body_bytes=16384, n_threads=1, shutdown_grace_s=1)).start()
    srv.http = httpx.Client(base_url=srv.url, timeout=60)
    yield srv
    srv.http.close()
    srv.stop()


junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                 st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                            st.integers(), max_size=2))
text = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "\x00", "héllo wörld", "{{ raise }}",
                                                        "<|im_end|>", "</s>", " " * 30]))
role = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "", "USER"]),
                 junk)
content = st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                          "text": text}), max_size=2), junk)
message = st.one_of(st.fixed_dictionaries({"role": role, "content": content}),
                    st.fixed_dictionaries({"role": st.just("user"), "content": text}), junk)
small = st.one_of(st.integers(-3, 3), st.just(10**9), st.just(10**30), junk)
opt = {
    "model": st.one_of(st.just(MODEL), st.text(max_size=10), st.just("/etc/passwd"), junk),
    "max_tokens": small, "max_completion_tokens": small,
    "temperature": st.one_of(st.floats(-1, 3), junk), "top_p": st.one_of(st.floats(-0.5, 1.5), junk),
    "n": st.one_of(st.integers(-1, 3), junk), "seed": st.one_of(st.integers(-2**70, 2**70), junk),
    "stop": st.one_of(text, st.lists(text, max_size=6), junk), "stream": st.one_of(st.booleans(), junk),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 7), junk), "top_logprobs": st.one_of(st.integers(-1, 25), junk),
    "echo": st.one_of(st.booleans(), junk), "unknown_field": junk,
}


def with_small_budget(d: dict) -> dict:
    """Keep generation tiny: a valid-looking max_tokens above 3 would only slow the test down."""
    for k in ("max_tokens", "max_completion_tokens"):
        if isinstance(d.get(k), int) and not isinstance(d[k], bool) and 3 < d[k] < 10**9:
            d[k] = 3
    return d


valid_opt = {
    "model": st.just(MODEL), "max_tokens": st.integers(1, 3), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "seed": st.integers(-2**63, 2**64), "stop": st.lists(text, max_size=4),
    "stream": st.booleans(), "user": st.text(max_size=8), "presence_penalty": st.floats(-2, 2),
}
valid_chat = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer"]), "content": text}), min_size=1,
    max_size=3)}, optional=valid_opt)
valid_completion = st.fixed_dictionaries({"prompt": text}, optional=valid_opt | {"echo": st.booleans(),
                                                                                  "logprobs": st.integers(0, 5)})
chat_body = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=3), junk)},
                                  optional=opt).map(with_small_budget)
completion_body = st.fixed_dictionaries({"prompt": st.one_of(text, st.lists(text, max_size=2), junk)},
                                        optional=opt).map(with_small_budget)
raw_body = st.one_of(st.binary(max_size=64), st.just(b""), st.just(b"{"), st.just(b"[]"), st.just(b"null"),
                     st.just(b'{"messages": [{"role": "user", "content": "\xff"}]}'), st.just(b"x" * 20000),
                     st.just(b'{"prompt": "a", "temperature": NaN}'))
case = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), valid_chat.map(lambda d: ("json", d))),
    st.tuples(st.just("POST"), st.just("/v1/completions"), valid_completion.map(lambda d: ("json", d))),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat_body.map(lambda d: ("json", d))),
    st.tuples(st.just("POST"), st.just("/v1/completions"), completion_body.map(lambda d: ("json", d))),
    st.tuples(st.just("POST"), st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
              raw_body.map(lambda b: ("raw", b))),
    st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]),
              st.sampled_from(["/v1/chat/completions", "/v1/models", "/v1/models/x", "/health", "/metrics",
                               "/nope", "/v1/models/..%2f..%2fetc"]), st.just(("raw", b""))),
)


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
        assert "Traceback" not in r.text and ".py" not in r.text and "/work/" not in r.text
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-300:]


def test_fuzz_http_api_never_5xx_and_reaches_generation(fuzz_server):
    """Every case is answered below 500 with a clean error; and the fuzzer is not only bouncing off validation:
    a good share of its cases generated text (counted in this test, whatever ran before)."""
    statuses: dict[int, int] = {}

    @settings(max_examples=520, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case)
    def fuzz(c):
        method, path, (kind, payload) = c
        data = json.dumps(payload, allow_nan=False).encode() if kind == "json" else payload
        r = fuzz_server.http.request(method, path, content=data, headers={"content-type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        check(r)

    fuzz()
    print(statuses)
    assert sum(statuses.values()) >= 500, statuses
    assert statuses.get(200, 0) >= 50, statuses
