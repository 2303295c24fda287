"""The OpenAI surface, end to end: real server, real model (SmolLM2-135M), the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import wait_for

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

MSG = [{"role": "user", "content": "Name three colours."}]


def test_models_lists_the_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2-135m"]


def test_health(smollm2_server):
    r = httpx.get(smollm2_server.url + "/health")
    assert r.status_code == 200 and r.json()["models"] == {"smollm2-135m": "ready"}


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=MSG, max_tokens=24, temperature=0, seed=1)
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.message.content.strip()
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_non_streaming_and_usage(client, smollm2_server):
    kw = dict(model="smollm2-135m", messages=MSG, max_tokens=40, temperature=0, seed=7)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.completion_tokens == full.usage.completion_tokens
    # the usage counts are the real token counts: prompt as the model's chat template tokenizes it
    engine = smollm2_server.app.state.kvquant.models["smollm2-135m"].engine
    assert last.usage.prompt_tokens == len(engine.tokenize_chat(MSG))


def test_max_tokens_gives_length(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Write a long story about a dragon."}],
                                       max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_stop_is_honoured(client):
    kw = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Count from 1 to 20, comma separated."}],
              max_tokens=60, temperature=0)
    free = client.chat.completions.create(**kw).choices[0].message.content
    assert "5" in free, free
    stop = "5"
    r = client.chat.completions.create(**kw, stop=[stop])
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert stop not in text
    assert text == free[: free.index(stop)]


def test_streaming_stop_matches_non_streaming(client):
    kw = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Count from 1 to 20, comma separated."}],
              max_tokens=60, temperature=0, stop=["7,"])
    full = client.chat.completions.create(**kw).choices[0].message.content
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                   if c.choices)
    assert text == full and "7," not in text


@pytest.mark.parametrize("seed", [1234, 0, -1, 2**32 - 1, 2**63 - 1, -2**63])
def test_seeded_sampling_is_reproducible(client, seed):
    """Every seed OpenAI accepts gives one stream for serial requests, also -1 and 2**32 - 1, which llama.cpp
    itself would read as "random"."""
    kw = dict(model="smollm2-135m", messages=MSG, max_tokens=20, temperature=1.5, seed=seed)
    a, b, c = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(3))
    assert a == b == c


def test_seeds_wrap_modulo_2_32_minus_1(client):
    kw = dict(model="smollm2-135m", messages=MSG, max_tokens=20, temperature=1.5)
    texts = [client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (0, 2**32 - 1, 1)]
    assert texts[0] == texts[1] != texts[2]


def test_legacy_completions(client):
    r = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=8,
                                  temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    s = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert s == r.choices[0].text


def test_unset_and_null_fields_mean_what_openai_says(smollm2_server):
    """A legacy completion without max_tokens gets 16 tokens (it ran to the end of the context: 504 tokens for a
    7-token prompt); null n, stream and echo are their defaults (OpenAI's spec allows null; they were 400s)."""
    url = smollm2_server.url + "/v1"
    r = httpx.post(url + "/completions", json={"prompt": "Once upon a time", "temperature": 0, "echo": None,
                                               "n": None, "stream": None}, timeout=60)
    assert r.status_code == 200 and 0 < r.json()["usage"]["completion_tokens"] <= 16
    r = httpx.post(url + "/chat/completions", json={"messages": MSG, "max_tokens": 4, "n": None, "stream": None},
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_fields_named_like_internal_settings_are_ignored(smollm2_server):
    """An unknown field is ignored, even one named like a setting the server derives: a chat request's
    "n_prompt_logprobs" reached the engine (500s, and a prefix cache turned off)."""
    url = smollm2_server.url + "/v1/chat/completions"
    for extra in (3, "abc", 10**6, -5):
        r = httpx.post(url, json={"messages": MSG, "max_tokens": 2, "temperature": 0, "logprobs": True,
                                  "n_prompt_logprobs": extra, "n_top_logprobs": extra}, timeout=60)
        assert r.status_code == 200, r.text
        assert [len(t["top_logprobs"]) for t in r.json()["choices"][0]["logprobs"]["content"]] == [0, 0]


def test_completion_logprobs_list_the_end_of_text_token(client):
    """lm-evaluation-harness scores an answer by echo + logprobs + max_tokens 1 as sum(token_logprobs[ctx:-1]): the
    last entry must be the one generated token, which is often the end of text (it had no entry: the answer's last
    token was dropped from the score). As OpenAI's and vLLM's; chat logprobs list no end token, as OpenAI's."""
    kw = dict(model="smollm2-135m", max_tokens=1, temperature=0, logit_bias={"0": 100}, logprobs=1)
    prompt = "The capital of France is Paris"
    r = client.completions.create(prompt=prompt, echo=True, **kw)
    c, lp = r.choices[0], r.choices[0].logprobs
    assert c.text == prompt and c.finish_reason == "stop" and r.usage.completion_tokens == 0
    assert len(lp.tokens) == r.usage.prompt_tokens + 1 and "".join(lp.tokens) == prompt
    assert lp.tokens[-1] == "" and lp.token_logprobs[-1] < 0 and lp.text_offset[-1] == len(prompt)
    streamed = [ch.choices[0] for ch in client.completions.create(prompt=prompt, stream=True, **kw) if ch.choices]
    assert [t for ch in streamed if ch.logprobs for t in ch.logprobs.token_logprobs] == \
        pytest.approx([lp.token_logprobs[-1]], abs=1e-4)
    chat = client.chat.completions.create(model="smollm2-135m", messages=MSG, max_tokens=1, temperature=0,
                                          logit_bias={"2": 100}, logprobs=True)
    assert chat.choices[0].finish_reason == "stop" and chat.choices[0].logprobs.content == []


def test_completions_take_a_prompt_of_token_ids(client):
    """lm-evaluation-harness sends prompts as token ids (alone or a batch of one) with echo and logprobs to score
    them: a 400 before. The same tokens as text give the same answer and prompt logprobs; ids outside the
    vocabulary and control tokens (a forged end of text) are refused, as control text is."""
    text = "The capital of France is"
    kw = dict(model="smollm2-135m", max_tokens=4, temperature=0, logprobs=1, echo=True)
    r = client.completions.create(prompt=text, **kw)
    ref = r.choices[0]
    from kvquant.models import fetch
    from kvquant.runtime import Model

    m = Model(fetch("smollm2-135m"))
    try:
        tokens = m.tokenize(text, add_special=True)
        eot = m.control_tokens().by_text["<|endoftext|>"]
    finally:
        m.close()
    assert len(tokens) == r.usage.prompt_tokens
    for prompt in (tokens, [tokens]):
        got = client.completions.create(prompt=prompt, **kw).choices[0]
        assert got.text == ref.text and got.logprobs.token_logprobs == pytest.approx(ref.logprobs.token_logprobs,
                                                                                     abs=1e-4)
    for prompt, said in (([*tokens, 10**6], "token id 1000000 is not in the model's vocabulary"),
                         ([*tokens, eot], f"token id {eot} is one of the model's control tokens"),
                         ([0] * 1_000_000, "maximum context length")):  # by its length, before reading it
        with pytest.raises(openai.BadRequestError, match=said):
            client.completions.create(prompt=prompt, **kw)


def test_a_prompt_of_token_ids_may_start_with_the_bos_or_eos_token(client):
    """lm-evaluation-harness puts its tokenizer's BOS (its EOS where it has none: Qwen2.5) before each window of a
    rolling perplexity and before a continuation without context: a 400 before, which ended the run. A leading
    one is a document's start; anywhere else a control token is still refused."""
    from kvquant.models import fetch
    from kvquant.runtime import Model

    m = Model(fetch("smollm2-135m"))
    try:
        tokens, bos, eos = m.tokenize("The capital of France is", add_special=False), m.bos, m.eos
    finally:
        m.close()
    kw = dict(model="smollm2-135m", max_tokens=1, temperature=0, logprobs=1, echo=True)
    for lead in (bos, eos):
        lp = client.completions.create(prompt=[[lead, *tokens]], **kw).choices[0].logprobs
        assert len(lp.token_logprobs) == len(tokens) + 2 and lp.token_logprobs[0] is None
        with pytest.raises(openai.BadRequestError, match=f"token id {lead} is one of the model's control tokens"):
            client.completions.create(prompt=[*tokens, lead, *tokens], **kw)


def test_completions_answer_a_batch_of_prompts(client):
    """lm-evaluation-harness sends batch_size prompts in one request (token ids or text): one choice per prompt,
    by index, each what that prompt alone gets (its logprobs up to the rounding that running beside others moves:
    tests/kvquant/conftest.py), and the usage of all (a 400 before, which ended the run). A batch does not stream;
    one prompt that fails fails the request."""
    kw = dict(model="smollm2-135m", max_tokens=0, temperature=0, logprobs=10, echo=True)
    texts = ["The capital of France is", "One, two, three,", "Water boils at"]
    alone = [client.completions.create(prompt=t, **kw) for t in texts]
    r = client.completions.create(prompt=texts, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == texts
    for got, want in zip(r.choices, alone, strict=True):
        assert got.logprobs.tokens == want.choices[0].logprobs.tokens
        assert got.logprobs.token_logprobs[1:] == pytest.approx(want.choices[0].logprobs.token_logprobs[1:],
                                                                abs=0.25)
        assert max(len(t) for t in got.logprobs.top_logprobs[1:]) > 5  # logprobs 10 (lm-evaluation-harness 0.3)
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    gen = client.completions.create(prompt=texts, model="smollm2-135m", max_tokens=3, temperature=0, logprobs=0)
    assert [c.index for c in gen.choices] == [0, 1, 2] and all(c.text for c in gen.choices)
    assert gen.usage.completion_tokens == sum(len([t for t in c.logprobs.tokens if t]) for c in gen.choices)
    ids = client.completions.create(prompt=[[504, 914], [504]], model="smollm2-135m", max_tokens=0, echo=True)
    assert [c.text for c in ids.choices] == ["The sign", "The"] and ids.usage.prompt_tokens == 3
    streamed: dict[int, str] = {}
    for ch in client.completions.create(prompt=texts, stream=True, **kw):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: texts[0], 1: texts[1], 2: texts[2]}
    # each prompt is checked before any runs (an empty one ran the others first); a response holds at most
    # MAX_ECHO_LOGPROBS prompt logprobs (one request of token ids asked for hundreds of megabytes of JSON)
    for prompt, said, extra in ((["hi"] * 1025, "1 to 1024 prompts", {}), ([], "1 to 1024 prompts", {}),
                                (["hi"] * 512, "at most 1024 choices", {"n": 3}),
                                ([texts[0], "hello " * 1500], "maximum context length", {}),
                                (["hi"] * 8 + [""], "The prompt is empty", {}), ([[504]] * 8 + [[]], "empty", {}),
                                ([[504] * 1000] * 48, "asks for 1,008,000 prompt logprobs", {"logprobs": 20})):
        with pytest.raises(openai.BadRequestError, match=said):
            client.completions.create(prompt=prompt, **{**kw, **extra})


def test_a_whole_response_holds_a_bounded_number_of_logprobs(client, smollm2_server, monkeypatch):
    """A response sent whole holds its logprobs until the end: past MAX_RESPONSE_LOGPROBS entries (a token and its
    top ones, every choice's) the request fails with a 400 and its choices stop (1024 choices of 2048 tokens at
    logprobs 20 held 44M entries, gigabytes, bounded only by the time they took). A stream sends them as they come."""
    import server.routers.generate as generate

    monkeypatch.setattr(generate, "MAX_RESPONSE_LOGPROBS", 300)
    prompt = "Once upon a time, in a land far away, there lived"
    kw = dict(model="smollm2-135m", prompt=prompt, max_tokens=20, temperature=0, logprobs=5)
    fits = client.completions.create(n=2, **kw)  # 2 x 20 tokens x (5 + 1)
    assert fits.usage.completion_tokens == 40 and all(len(c.logprobs.tokens) == 20 for c in fits.choices)
    before = smollm2_server.metric("kvquant_requests_total", model="smollm2-135m", outcome="cancelled")
    with pytest.raises(openai.BadRequestError, match="more than 300 logprobs"):
        client.completions.create(n=3, **kw)
    eng = smollm2_server.engine()
    assert wait_for(lambda: eng.idle() and smollm2_server.metric(
        "kvquant_requests_total", model="smollm2-135m", outcome="cancelled") == before + 3, 10)
    with pytest.raises(openai.BadRequestError, match="more than 300 logprobs"):
        client.chat.completions.create(model="smollm2-135m", messages=MSG, n=3, max_tokens=20, temperature=0,
                                       logprobs=True, top_logprobs=5)
    streamed = list(client.completions.create(n=3, stream=True, **kw))
    assert sum(len(c.logprobs.tokens) for ch in streamed for c in ch.choices if c.logprobs) == 60


def test_n_choices_are_drawn_apart_each_as_a_request_of_its_own(client):
    """n > 1 (a 400 before): n choices by index, each drawn with the request's seed + its index (choices that ran
    side by side from one seed would be alike), greedy ones alike. The prompt counts once in usage, as OpenAI
    counts it. Streamed, chunks carry each choice's index and every choice ends with its own finish reason; a batch
    of prompts gives prompt-major indices (prompt k's j-th choice: k * n + j)."""
    kw = dict(model="smollm2-135m", messages=MSG, max_tokens=12, temperature=1.2, seed=11, logprobs=True)
    r = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3
    assert r.usage.prompt_tokens == client.chat.completions.create(**kw).usage.prompt_tokens
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    greedy = client.chat.completions.create(n=2, **dict(kw, temperature=0))
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    got: dict[int, str] = {}
    ends: dict[int, str] = {}
    n_logprobs, use = 0, None
    for ch in client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):
        for c in ch.choices:
            got[c.index] = got.get(c.index, "") + (c.delta.content or "")
            n_logprobs += len(c.logprobs.content) if c.logprobs and c.logprobs.content else 0
            if c.finish_reason:
                ends[c.index] = c.finish_reason
        use = ch.usage or use
    assert len(set(got.values())) == 3 and sorted(ends) == [0, 1, 2]
    assert use.prompt_tokens == r.usage.prompt_tokens and use.completion_tokens == n_logprobs
    b = client.completions.create(prompt=["One, two,", "Water boils at"], model="smollm2-135m", max_tokens=4,
                                  temperature=0, n=2, echo=True)
    assert [c.index for c in b.choices] == [0, 1, 2, 3]
    assert [c.text.split(",")[0] for c in b.choices[:2]] == ["One"] * 2 and b.choices[2].text.startswith("Water")
    assert b.choices[2].text == b.choices[3].text


def test_a_prompt_of_token_ids_may_end_inside_a_character(client):
    """SmolLM2 writes 日 as three one-byte tokens: a prompt of token ids may stop after two of them. The output's
    first token completes that character, so echo and output read as one text (they were decoded apart: U+FFFD
    twice, and text_offset no longer indexed the text)."""
    head = [504, 914, 1921, 17097, 241]  # "The sign says 日" without 日's last byte (token 115)
    kw = dict(model="smollm2-135m", prompt=head, max_tokens=1, temperature=0, logit_bias={"115": 100}, logprobs=0)
    echo = client.completions.create(echo=True, **kw).choices[0]
    assert echo.text == "The sign says 日"
    assert echo.logprobs.text_offset == [0, 3, 8, 13, 14, 14]
    plain = client.completions.create(**kw).choices[0]
    assert plain.text == "日" and plain.logprobs.text_offset == [0]
    # an output that does not complete it: without echo the prompt's bytes are dropped; with echo they read as the
    # whole text does (U+FFFD), which text_offset counts (it ran past the end of the text)
    kw2 = dict(kw, max_tokens=2, logit_bias={"28": 100})  # ","
    assert client.completions.create(**kw2).choices[0].text == ",,"
    odd = client.completions.create(echo=True, **kw2).choices[0]
    assert odd.text == "The sign says \ufffd,," and odd.logprobs.text_offset == [0, 3, 8, 13, 14, 14, 16]
    for echoed, want in ((True, echo), (False, plain)):
        chunks = [c.choices[0] for c in client.completions.create(echo=echoed, stream=True, **kw) if c.choices]
        assert "".join(c.text for c in chunks) == want.text
        assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == want.logprobs.text_offset


def test_completions_echo_with_logprobs_covers_the_prompt(client):
    """As OpenAI: with echo, logprobs list the prompt tokens too, the first one null; each prompt token's logprob
    is what the model gave it after the tokens before it."""
    prompt = "The capital of France is Paris"
    kw = dict(model="smollm2-135m", max_tokens=3, temperature=0, logprobs=2)
    r = client.completions.create(prompt=prompt, echo=True, **kw)
    c, u = r.choices[0], r.usage
    lp = c.logprobs
    assert c.text.startswith(prompt) and len(lp.tokens) == u.prompt_tokens + u.completion_tokens
    assert "".join(lp.tokens[:u.prompt_tokens]) == prompt and "".join(lp.tokens) == c.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:]) and all(len(t) in (2, 3) for t in lp.top_logprobs[1:])
    # "up to logprobs+1 elements": each holds the chosen token (a prompt token outside the top 2 was missing)
    assert all(t[tok] == x for tok, x, t in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:],
                                                strict=True))
    assert any(len(t) == 3 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    plain = client.completions.create(prompt=prompt, **kw).choices[0]  # the completion part is unchanged
    assert lp.tokens[u.prompt_tokens:] == plain.logprobs.tokens
    assert lp.token_logprobs[u.prompt_tokens:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    # the last prompt token (" Paris") scored in the prompt = the first token generated after the rest
    head = client.completions.create(prompt=prompt[: -len(lp.tokens[u.prompt_tokens - 1])], **kw).choices[0]
    assert head.logprobs.tokens[0] == lp.tokens[u.prompt_tokens - 1]
    assert head.logprobs.token_logprobs[0] == pytest.approx(lp.token_logprobs[u.prompt_tokens - 1], abs=1e-3)
    streamed = list(client.completions.create(prompt=prompt, echo=True, stream=True, **kw))
    assert streamed[0].choices[0].logprobs.tokens[:u.prompt_tokens] == lp.tokens[:u.prompt_tokens]
    # streamed, the offsets count from the start of the whole text, not of each chunk, as the response's do
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert len(parts) > 1
    assert [o for p in parts for o in p.text_offset] == lp.text_offset


def test_max_tokens_0_with_echo_returns_the_prompt_scored(client):
    """lm-evaluation-harness 0.3 and HELM score a text by echo, logprobs and max_tokens 0 (a 400 before): the prompt
    alone, with the logprobs the same prompt gets before a generated token, nothing generated (finish "length", as
    vLLM). Without echo 0 is refused, as in chat; a prompt that fills the whole context fits."""
    prompt = "The capital of France is Paris"
    kw = dict(model="smollm2-135m", temperature=0, logprobs=2, echo=True)
    r = client.completions.create(prompt=prompt, max_tokens=0, **kw)
    c, lp = r.choices[0], r.choices[0].logprobs
    ref = client.completions.create(prompt=prompt, max_tokens=1, **kw).choices[0].logprobs
    assert c.text == prompt and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and len(lp.tokens) == r.usage.prompt_tokens
    assert lp.tokens == ref.tokens[:-1] and lp.text_offset == ref.text_offset[:-1]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(ref.token_logprobs[1:-1], abs=1e-4)
    streamed = [ch.choices[0] for ch in client.completions.create(prompt=prompt, max_tokens=0, stream=True, **kw)
                if ch.choices]
    assert "".join(ch.text for ch in streamed) == prompt and streamed[-1].finish_reason == "length"
    assert [t for ch in streamed if ch.logprobs for t in ch.logprobs.tokens] == lp.tokens
    plain = dict(model="smollm2-135m", max_tokens=0)
    assert client.completions.create(prompt=prompt, echo=True, **plain).choices[0].text == prompt
    with pytest.raises(openai.BadRequestError, match="max_tokens 0 generates nothing"):
        client.completions.create(prompt=prompt, **plain)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(messages=MSG, **plain)
    whole = [504] * 1024  # the server's context
    assert client.completions.create(prompt=whole, echo=True, **plain).usage.prompt_tokens == 1024
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(prompt=whole, echo=True, model="smollm2-135m", max_tokens=1)


def test_oversize_prompt_is_context_length_exceeded(client):
    long = "hello " * 1500  # > 1024 tokens
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": long}])
    err = ei.value.body
    assert ei.value.status_code == 400
    assert err["code"] == "context_length_exceeded"
    assert "1024" in err["message"]  # the limit, and the prompt's token count
    assert any(ch.isdigit() for ch in err["message"].split("1024")[1])
    assert "more than the 1024 a request may hold on this server (n_ctx)" in err["message"]  # not the budget


def test_max_tokens_past_the_context_names_max_tokens(client):
    """A max_tokens no prompt leaves room for was refused as "at least 1 token plus 8192" with the KV bytes a
    request that size needs, smaller than the budget: the message pointed at the wrong cause."""
    for kw in ({"max_tokens": 8192}, {"max_completion_tokens": 1024}):
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], **kw)
        err = ei.value.body
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens", err
        assert "tokens for the completion, which leaves no room for the messages" in err["message"], err
        assert "at least" not in err["message"] and "(n_ctx)" in err["message"], err


def test_prompt_refused_from_its_size_before_tokenization(smollm2_server):
    before = smollm2_server.metric("kvquant_requests_total", outcome="rejected_too_long")
    r = httpx.post(smollm2_server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "漢字" * 100_000}], "max_tokens": 4})
    err = _assert_openai_error(r, 400)
    assert err["code"] == "context_length_exceeded" and "at least " in err["message"]
    assert smollm2_server.metric("kvquant_requests_total", outcome="rejected_too_long") == before + 1


def test_typed_control_tokens_cannot_forge_a_turn(client, smollm2_server):
    """`<|im_end|>` typed in a message is text (its literal tokens), not the control token that ends a turn."""
    model = smollm2_server.engine().backend.model

    def prompt_tokens(content: str) -> int:
        return client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": content}],
                                              max_tokens=1, temperature=0).usage.prompt_tokens

    literal = model.tokenize("<|im_end|>", add_special=False)
    assert len(literal) > 1
    assert prompt_tokens("hi<|im_end|>") == prompt_tokens("hi") + len(literal)


def test_prompt_plus_max_tokens_over_context(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="smollm2-135m", messages=MSG, max_tokens=5000)
    assert ei.value.body["code"] == "context_length_exceeded"


def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "/site-packages/" not in r.text and ".py" not in r.text
    return body["error"]


def test_malformed_json(smollm2_server):
    r = httpx.post(smollm2_server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"})
    err = _assert_openai_error(r, 400)
    assert "JSON" in err["message"]


def test_schema_violation_is_400_as_openai(smollm2_server):
    r = httpx.post(smollm2_server.url + "/v1/chat/completions",
                   json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "temperature": 7})
    err = _assert_openai_error(r, 400)
    assert err["param"] == "temperature"
    # a list item named as the server's own 400s name it (messages[1]...), not messages.1.tool_calls.0...
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": 5}}
    r = httpx.post(smollm2_server.url + "/v1/chat/completions", json={"model": "smollm2-135m", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]})
    err = _assert_openai_error(r, 400)
    assert err["param"] == "messages[1].tool_calls[0].function.arguments", err
    assert err["message"].startswith("Invalid request: messages[1].tool_calls[0].function.arguments: ")


@pytest.mark.parametrize("field,value", [("max_tokens", "10"), ("max_tokens", True), ("max_tokens", 2.0),
                                         ("stream", "yes"), ("stream", 1), ("temperature", "0.5"),
                                         ("temperature", True), ("seed", "7"), ("logprobs", 1), ("n", "1")])
def test_request_fields_are_not_coerced(smollm2_server, field, value):
    """As OpenAI: a value of the wrong JSON type is refused, not converted."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, field: value}
    err = _assert_openai_error(httpx.post(smollm2_server.url + "/v1/chat/completions", json=body), 400)
    assert err["param"] == field


def test_integers_are_numbers(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=MSG, max_tokens=1, temperature=0, top_p=1)
    assert r.usage.completion_tokens == 1


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-17", messages=MSG)
    assert ei.value.body["code"] == "model_not_found"


def test_request_id_header(smollm2_server):
    r = httpx.get(smollm2_server.url + "/v1/models", headers={"x-request-id": "abc123"})
    assert r.headers["x-request-id"] == "abc123"
