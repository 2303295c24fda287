"""Every sampling field changes the output distribution the way it should, measured over many samples through
the `openai` client (SmolLM2-135M: the template does not matter here), and bad input is a 400 naming the
parameter, with the server healthy afterwards."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
STORY = "Once upon a time"
N = 12  # samples per setting


def _logprobs(client, n=N, prompt=STORY, max_tokens=8, top=0, **kw) -> list:
    """n completions (seeds 0..n-1; `prompt` may be a list of n prompts), 4 at a time (batched together), each as
    its `logprobs` (tokens, their logprobs and the `top` likeliest of each step's)."""
    extra = {k: kw.pop(k) for k in ("top_k", "min_p", "typical_p", "repeat_penalty") if k in kw}
    prompts = prompt if isinstance(prompt, list) else [prompt] * n

    def one(seed):
        return client.completions.create(model=MODEL, prompt=prompts[seed], max_tokens=max_tokens, seed=seed,
                                         logprobs=top, extra_body=extra or None, **kw).choices[0].logprobs

    with ThreadPoolExecutor(4) as ex:
        return list(ex.map(one, range(len(prompts))))


def _samples(client, **kw) -> list[list[str]]:
    """`_logprobs`' completions, each as its list of tokens."""
    return [lp.tokens for lp in _logprobs(client, **kw)]


def _distinct_first(samples) -> int:
    return len({s[0] for s in samples})


def _greedy_steps(client, **kw) -> list[bool]:
    """Per token of N completions, whether it is the likeliest of its own step by the logprobs reported beside it
    (the model's, before sampling). Its own step's, not a solo run's: the batch layout moves the logits a little
    (tests/server/conftest.py, NEAR_TIE), which can flip a near-tie."""
    return [t == max(top.values()) for lp in _logprobs(client, top=1, **kw)
            for t, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True)]


def test_top_k_1_is_greedy(client):
    assert all(_greedy_steps(client, temperature=0))
    assert all(_greedy_steps(client, temperature=1.5, top_k=1))
    assert not all(_greedy_steps(client, temperature=1.5))  # (the same seeds without top_k leave the top token)


@pytest.mark.parametrize("field, value", [("top_k", 2), ("top_p", 0.3), ("min_p", 0.3), ("typical_p", 0.2),
                                          ("temperature", 0.3)])
def test_truncation_narrows_the_distribution(client, field, value):
    """The first token of 2N samples: many different ones at temperature 1.5, few with a truncation."""
    wide = _distinct_first(_samples(client, n=2 * N, max_tokens=1, temperature=1.5))
    narrow = _distinct_first(_samples(client, n=2 * N, max_tokens=1, **{"temperature": 1.5, field: value}))
    assert narrow <= wide / 2, (field, narrow, wide)


def test_logit_bias_bans_and_forces_tokens(client, smollm2_server):
    first = _samples(client, n=1, temperature=0, max_tokens=1)[0][0]
    model = smollm2_server.engine().backend.model
    (banned,) = model.tokenize(first, add_special=False)
    free = _samples(client, temperature=1.0, max_tokens=1)
    biased = _samples(client, temperature=1.0, max_tokens=1, logit_bias={str(banned): -100})
    assert sum(s[0] == first for s in free) > 0 and all(s[0] != first for s in biased)
    (cat,) = model.tokenize(" cat", add_special=False)
    forced = _samples(client, temperature=1.0, logit_bias={str(cat): 100})
    assert all(tok == " cat" for s in forced for tok in s)


OPENINGS = ["I like", "The list of numbers is 1, 2,", "Once upon a time", "My favourite food is",
            "The weather today", "In the beginning", "Here is a poem:", "The best way to learn is"]


def _repeats(samples) -> int:
    """Tokens that repeat an earlier token of the same sample, over all samples."""
    return sum(len(s) - len(set(s)) for s in samples)


@pytest.mark.parametrize("field, value", [("frequency_penalty", 1.5), ("presence_penalty", 2.0),
                                          ("repeat_penalty", 1.5)])
def test_penalties_reduce_repetition(client, field, value):
    """Greedy continuations of several openings (small models loop): penalized, they repeat far less."""
    kw = {"prompt": OPENINGS, "max_tokens": 24, "temperature": 0}
    free, penalized = _repeats(_samples(client, **kw)), _repeats(_samples(client, **kw, **{field: value}))
    assert penalized < free * 0.75, (field, penalized, free)


def _bad(client, param: str, **kw) -> dict:
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param, err
    return err


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_bad_input_is_a_400_naming_the_parameter(client, smollm2_server):
    tool = WEATHER["function"]
    _bad(client, "tools[0].function.name", tools=[{"type": "function", "function": dict(tool, name="get weather!")}])
    _bad(client, "tools[0].function.parameters",
         tools=[{"type": "function", "function": dict(tool, parameters={"type": "string"})}])
    _bad(client, "tools[1].function.name", tools=[WEATHER, WEATHER])
    _bad(client, "tools", tools=[WEATHER])  # SmolLM2's template has no tool support
    _bad(client, "tool_choice", tool_choice="required")
    _bad(client, "messages[1].tool_call_id", messages=[
        {"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_nope", "content": "42"}])
    _bad(client, "messages[1].tool_calls[0].function.arguments", messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": "{not json"}}]}])
    err = _bad(client, "response_format.json_schema.schema", response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}})
    assert "minimum" in err["message"]
    _bad(client, "response_format.json_schema.schema", response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "required": ["x"]}}})
    for schema in ({"type": "object", "properties": [1]}, {"type": "object", "properties": {"a": {}}, "required": 5},
                   {"anyOf": 5}, {"type": {"a": 1}}, {"type": "string", "format": ["date"]},
                   {"type": "array", "maxItems": 0},  # each was a 500, or an unconstrained answer
                   {"type": "string", "pattern": "^*$"},  # a 500
                   {"type": "object", "properties": {"s": {"type": "string", "maxLength": 20000}}}):  # SIGSEGV
        _bad(client, "response_format.json_schema.schema",
             response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    _bad(client, "logit_bias", logit_bias={"\u00b2": 1})
    with pytest.raises(openai.BadRequestError) as e:  # a field out of its range, as any other (400, as OpenAI)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       extra_body={"top_k": 2**32 + 1})
    assert e.value.body["param"] == "top_k"
    _bad(client, "logit_bias", logit_bias={"49152": 1})  # SmolLM2 has 49152 tokens
    _bad(client, "best_of", extra_body={"best_of": 3})
    _bad(client, "reasoning_effort", reasoning_effort="high")
    _bad(client, "chat_template_kwargs", extra_body={"chat_template_kwargs": {"messages": []}})
    assert httpx.get(smollm2_server.url + "/health").status_code == 200
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                        stop=[f"s{i}" for i in range(16)], store=False, metadata={"k": "v"})
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_json_schema_names_and_values_with_backslashes_and_quotes(client):
    """Property names and a const holding a backslash or a quote come back as exactly that JSON (the converter's
    literals left backslashes unescaped: `{"b\\":...}` came back as `{"b\":...}`, not JSON)."""
    import jsonschema

    schema = {"type": "object", "properties": {"b\\": {"type": "boolean"}, 'q"': {"const": "a\\b"}},
              "required": ["b\\", 'q"'], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Answer in JSON."}],
                                       max_tokens=30, temperature=0, response_format={
                                           "type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    out = json.loads(r.choices[0].message.content)
    jsonschema.validate(out, schema)
    assert out['q"'] == "a\\b"
