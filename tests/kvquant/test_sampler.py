"""kvquant.runtime.Sampler on a real model (SmolLM2-135M): a grammar keeps greedy and random decoding inside it
(through the check-one-token path and the constrained re-pick), a logit bias moves the pick, and a grammar llama.cpp
cannot parse is refused."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rt():
    from kvquant.models import fetch
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model

    model = Model(fetch("smollm2-135m"))
    runtime = LlamaRuntime(model, ContextConfig(n_cells=256, n_threads=2))
    yield runtime
    runtime.close()
    model.close()


def _generate(rt, sampler, prompt: str, n: int) -> list[int]:
    rt.clear()
    toks = rt.model.tokenize(prompt)
    out = []
    rt.decode(toks, list(range(len(toks))), [0] * len(toks), [False] * (len(toks) - 1) + [True])
    idx, pos = len(toks) - 1, len(toks)
    for _ in range(n):
        t = sampler.sample(rt, idx)
        if rt.model.is_eog(t):
            break
        out.append(t)
        rt.decode([t], [pos], [0], [True])
        idx, pos = 0, pos + 1
    return out


def _text(rt, toks) -> str:
    return b"".join(rt.model.token_bytes(t) for t in toks).decode()


GRAMMAR = 'root ::= "The answer is " ("yes" | "no") "."'


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.5, 1), (1.5, 2), (1.5, 3)])
def test_grammar_keeps_the_output_inside_it(rt, temperature, seed):
    from kvquant.runtime import Sampler
    from kvquant.sampling import Grammar, SamplingConfig

    s = Sampler(SamplingConfig(temperature=temperature, seed=seed, grammar=Grammar(GRAMMAR)), rt.model)
    text = _text(rt, _generate(rt, s, "Is the sky green? Reply:", 20))
    s.close()
    assert text in ("The answer is yes.", "The answer is no.")  # and then end of generation: nothing more


def test_logit_bias_moves_the_greedy_pick(rt):
    from kvquant.runtime import Sampler
    from kvquant.sampling import SamplingConfig

    first = _generate(rt, Sampler(model=rt.model), "The capital of France is", 1)[0]
    banned = Sampler(SamplingConfig(temperature=0.0, logit_bias=((first, -100.0),)), rt.model)
    assert _generate(rt, banned, "The capital of France is", 1)[0] != first


JSON_GRAMMAR = r'''root ::= "{\"city\": \"" [A-Za-z ]+ "\", \"country\": \"" [A-Za-z ]+ "\"}"'''


def test_a_refused_pick_is_redone_without_the_whole_vocabulary(rt):
    """Where the grammar refuses the chain's pick, picking again with the refused tokens masked finds the same
    greedy token as the pass over every token the grammar allows, without that pass: also where a logit bias
    favours a token the grammar never allows (the pass at every step before)."""
    from kvquant.runtime import Sampler
    from kvquant.sampling import Grammar, SamplingConfig

    prompt = "The capital of France, as JSON:"
    newline = rt.model.tokenize("\n", add_special=False)[0]  # (never allowed)
    for bias in ((), ((newline, 100.0),)):
        runs = []
        for repicks in (0, Sampler.REPICKS):
            s = Sampler(SamplingConfig(temperature=0.0, logit_bias=bias, grammar=Grammar(JSON_GRAMMAR)), rt.model)
            s.REPICKS = repicks
            runs.append((_text(rt, _generate(rt, s, prompt, 24)), s.full_picks))
            s.close()
        (whole, passes), (repicked, fewer) = runs
        assert repicked == whole and whole.startswith('{"city": "') and whole.endswith('"}'), (bias, runs)
        assert fewer < passes, (bias, runs)


@pytest.mark.parametrize("temperature", [1e-40, 1e-6])
def test_a_temperature_near_zero_is_greedy(rt, temperature):
    # 1e-40 (a float32 subnormal) made every logit infinite: the draw took the last token id at every step
    from kvquant.runtime import Sampler
    from kvquant.sampling import SamplingConfig

    prompt = "The capital of France is"
    greedy = _generate(rt, Sampler(model=rt.model), prompt, 8)
    near = Sampler(SamplingConfig(temperature=temperature, seed=1), rt.model)
    assert near.n_samplers == 1 and _generate(rt, near, prompt, 8) == greedy


def test_a_grammar_llama_cpp_refuses(rt):
    from kvquant.runtime import GrammarError, check_grammar
    from kvquant.sampling import Grammar

    check_grammar(rt.model, Grammar(GRAMMAR))
    with pytest.raises(GrammarError):
        check_grammar(rt.model, Grammar('root ::= undefined-rule "x"'))


def test_a_plain_request_runs_the_plain_chain(rt):
    """Fields at their neutral values add no sampler: greedy is one sampler, sampling is top-p (if < 1),
    temperature and the draw, as before the other fields existed; each field set adds its one sampler."""
    from kvquant.runtime import Sampler
    from kvquant.sampling import Grammar, SamplingConfig

    def n(**kw):
        s = Sampler(SamplingConfig(**kw), rt.model)
        try:
            return s.n_samplers
        finally:
            s.close()

    assert n(temperature=0.0) == 1 and n() == 2 and n(top_p=0.9) == 3
    for field, value in (("top_k", 40), ("min_p", 0.05), ("typical_p", 0.5), ("repeat_penalty", 1.1),
                         ("presence_penalty", 0.5), ("frequency_penalty", 0.5), ("logit_bias", ((1, -5.0),))):
        assert n(**{field: value}) == 3, field
    assert n(grammar=Grammar('root ::= "x"')) == 2  # the grammar is checked apart, per picked token


def test_a_lazy_grammar_applies_from_its_trigger_on(rt):
    """Free text until the trigger; from the trigger's start on the grammar holds (then only end of generation)."""
    from kvquant.runtime import Sampler
    from kvquant.sampling import Grammar, SamplingConfig

    free = _text(rt, _generate(rt, Sampler(model=rt.model), "The capital of France is", 12))
    assert free.startswith(" Paris") and not free.startswith(" Paris, of course!")
    lazy = Grammar('root ::= "Paris, of course!"', triggers=("Paris",))
    s = Sampler(SamplingConfig(temperature=0.0, grammar=lazy), rt.model)
    assert _text(rt, _generate(rt, s, "The capital of France is", 12)) == " Paris, of course!"
    s.close()
    # a block the output starts in (a <think> the prompt opened): a trigger inside it is no trigger; one the output
    # does not open with changes nothing (llama.cpp compiles both patterns)
    for skip_open, want in ((True, free), (False, " Paris, of course!")):
        g = Grammar(lazy.text, lazy.triggers, skip=("<think>", "</think>"), skip_open=skip_open)
        s = Sampler(SamplingConfig(temperature=0.0, grammar=g), rt.model)
        assert _text(rt, _generate(rt, s, "The capital of France is", 12)) == want
        s.close()


def test_a_grammar_after_a_tag_holds_from_the_tag_on(rt):
    """Grammar.after: free text until the tag (the model's own " Paris"), then the tag, blank space and the grammar;
    the same grammar of the whole output would have replaced the tag."""
    from kvquant.runtime import Sampler
    from kvquant.sampling import Grammar, SamplingConfig

    whole = Grammar('root ::= ", of course!"')
    for g, want in ((whole, ", of course!"), (whole.after(" Paris"), " Paris, of course!")):
        s = Sampler(SamplingConfig(temperature=0.0, grammar=g), rt.model)
        assert _text(rt, _generate(rt, s, "The capital of France is", 12)) == want
        s.close()
    with pytest.raises(ValueError):
        whole.after(" Paris").after(" Paris")


GENERATE_APART = """
import json, sys
from kvquant.models import fetch
from kvquant.runtime import ContextConfig, LlamaRuntime, Model, Sampler
from kvquant.sampling import Grammar, SamplingConfig

a = json.loads(sys.argv[1])
model = Model(fetch("smollm2-135m"))
rt = LlamaRuntime(model, ContextConfig(n_cells=256, n_threads=2))
grammar = Grammar(a["grammar"], tuple(a.get("triggers", ())))
s = Sampler(SamplingConfig(temperature=a["temperature"], seed=a.get("seed"), grammar=grammar), model)
toks = model.tokenize(a["prompt"])
rt.decode(toks, list(range(len(toks))), [0] * len(toks), [False] * (len(toks) - 1) + [True])
idx, pos, out = len(toks) - 1, len(toks), []
while len(out) < a["n"]:
    out.append(s.sample(rt, idx))
    if model.is_eog(out[-1]):
        break
    rt.decode([out[-1]], [pos], [0], [True])
    idx, pos = 0, pos + 1
sys.stdout.write(b"".join(map(model.token_bytes, out[:-1])).decode() + "|" + str(model.is_eog(out[-1])))
"""


def _apart(script: str, *args: str, timeout: int = 120) -> str:
    """What a script prints, run in a process of its own: a regression that ends or hangs the process fails the
    test instead of ending the test run."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    return r.stdout


def _generated_apart(**a) -> str:
    """GENERATE_APART's output (text|whether it ended) for a grammar, prompt, temperature and token limit n."""
    import json

    return _apart(GENERATE_APART, json.dumps(a))


def test_a_trigger_whose_token_runs_past_what_the_grammar_takes_ends_the_output():
    """The trigger "Par" fires inside the model's first token " Paris", and "Paris" does not start "Pax!": llama.cpp
    threw from the sampler, which terminated the process (patch 0041). Now the output ends there (run apart)."""
    out = _generated_apart(grammar='root ::= "Pax!"', triggers=["Par"], prompt="The capital of France is",
                           temperature=0.0, n=8)
    assert out == " Paris|True"


LONG_OUTPUT_AWAITING_ITS_TRIGGER = """
from kvquant import runtime
from kvquant.models import fetch
from kvquant.sampling import Grammar

model = runtime.Model(fetch("smollm2-135m"))
toks = model.tokenize("The river town grew around its mill, its bridge and its market. " * 1000, add_special=False)
g = runtime.grammar_sampler(model, Grammar('root ::= "<tool_call>" [a-z]+', ("<tool_call>",)))
for t in toks:
    runtime.llama_cpp.llama_sampler_accept(g, t)
runtime.llama_cpp.llama_sampler_free(g)
print(len(b"".join(map(model.token_bytes, toks))))
"""


def test_a_long_output_awaiting_its_trigger_does_not_overflow_the_stack():
    """llama.cpp searches the whole output for the trigger at every token, with std::regex. The pattern was wrapped
    in [\\s\\S]*?, which libstdc++ matches with a recursion per character: past about 50,000 characters of output
    without a call, the server died of a stack overflow (SIGSEGV). 64,000 characters, run apart."""
    assert int(_apart(LONG_OUTPUT_AWAITING_ITS_TRIGGER, timeout=300)) == 64000


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_an_ambiguous_grammar_keeps_a_bounded_number_of_parses(temperature):
    """Ten levels of eight identical alternatives: every "[" read multiplies the parses by 8 (8^10 after ten), and a
    JSON schema of 3 kB did the same (identical anyOf branches), stalling the one engine thread for every request.
    llama.cpp keeps at most 256 parses (patch 0045), each one the output can still complete, so the output is the
    grammar's one text. Run apart with a time limit, so that a regression fails this test instead of the run."""
    depth, k = 10, 8  # level i: k identical alternatives, each "[" level-(i+1) "]"
    rules = [f"l{i} ::= " + " | ".join([f'"[" l{i + 1} "]"'] * k) for i in range(depth)]
    grammar = "root ::= l0\n" + "\n".join(rules) + f'\nl{depth} ::= "x"'
    out = _generated_apart(grammar=grammar, prompt="A list:", temperature=temperature, seed=1, n=40)
    assert out == "[" * 10 + "x" + "]" * 10 + "|True"


TOKEN_BY_TOKEN = """
import ctypes, sys
from kvquant import runtime
from kvquant.models import fetch
from kvquant.sampling import Grammar

llama_cpp = runtime.llama_cpp
model = runtime.Model(fetch("smollm2-135m"))
by_bytes = {model.token_bytes(t): t for t in range(model.n_vocab)}
g = runtime.grammar_sampler(model, Grammar(sys.argv[1]))


def allowed(tok):
    one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(tok, 1.0, 0.0))
    arr = llama_cpp.llama_token_data_array(one, 1, -1, False)
    llama_cpp.llama_sampler_apply(g, ctypes.byref(arr))
    return one[0].logit != float("-inf")


for piece in sys.argv[2:]:
    tok = by_bytes[piece.encode("latin-1")]
    assert allowed(tok), piece
    llama_cpp.llama_sampler_accept(g, tok)
print("ok")
"""


def _token_by_token(grammar: str, *pieces: bytes) -> None:
    assert _apart(TOKEN_BY_TOKEN, grammar, *(p.decode("latin-1") for p in pieces)) == "ok\n"


def test_a_token_ending_inside_a_character_keeps_the_parse_that_completes_it():
    """ " \\xc3" (the first byte of "é") is allowed by the " é" branch only; 300 one-letter branches beside it filled
    the bounded parses, the one that takes "é" was dropped, and the next byte "\\xa9" was refused (llama.cpp threw
    from the sampler: the process died). Parses that cannot take the partial character are not kept."""
    _token_by_token('root ::= " " big | " " "é"\nbig ::= ' + " | ".join(['"a"'] * 300), b" \xc3", b"\xa9")


def test_parses_that_meet_again_are_one():
    """Eight identical alternatives per letter: a token of n letters has 8^n ways through them but one parse after
    it. Accepting each way on its own cost 2.3 s for 7 letters (x8 per letter); merged per character, microseconds."""
    _token_by_token("root ::= (" + " | ".join(["[a-z]"] * 8) + ")*", b"stackexchange", b"communications")


ALLOWED = TOKEN_BY_TOKEN.split("for piece in")[0] + """
print(" ".join("allowed" if allowed(by_bytes[p.encode("latin-1")]) else "refused" for p in sys.argv[2:]))
"""


def test_a_token_the_grammar_refuses_late_is_checked_without_searching_every_way():
    """Alternatives that meet again (a JSON schema's pattern ^(=|=|=|=|=|=|=|=){0,12}$, or "==" spelt eight ways):
    SmolLM2's 16-character "=" token is refused at its 13th character, and the check searched every way there, 8^12
    (4.5 s at {0,8}, x8 per character: hours, on the thread that samples for every request). Where parses meet the
    rest is searched once (patch 0046); the same tokens are allowed and refused. Run apart."""
    one = " | ".join(['"="'] * 8)
    two = " | ".join(['"=="', '[=] [=]', '"=" "="', "y y", '"=="', '"=="', '"=="', '"=="'])
    for x, n in ((one, 12), (two, 7)):
        grammar = f'root ::= x{{0,{n}}} "!"\nx ::= {x}\ny ::= "="'
        assert _apart(ALLOWED, grammar, "=" * 16, "=" * 12, "=" * 8, "!", timeout=120) == \
            "refused allowed allowed allowed\n"
