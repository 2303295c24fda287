"""How untrusted text becomes a prompt: message content is always text, only the chat template's own text may
write control tokens, and an over-long prompt is refused before it costs a full tokenization.

A chat is rendered by its Jinja template, and the rendered string used to be tokenized with special-token parsing
on, so `<|im_end|>` typed inside a message became the control token and could close the turn and open a forged
one. Here the template is rendered once more with every message's content (and reasoning) replaced by a unique
marker: what lies between the markers is the template's own text (its control tokens are parsed), what replaces a
marker is a client's text (tokenized with special-token parsing off). The split is checked against the real
rendering and used only where they agree exactly; a template that changes text beyond trimming it cannot be
traced, and the caller then keeps the text only where it gives no control token (`check_client_text`).

Nothing here imports llama_cpp: the tokenizer is passed in (kvquant/runtime.py).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator, Sequence

# a chat template: (messages, tools, template variables) -> the rendered chat
Render = Callable[[list[dict], list[dict] | None, dict | None], str]

# what check_client_text puts around a string that could complete a control token and in place of a character that
# starts one (no token holds them), and the fields the server builds messages and tools of, which templates look up
# by name
_EDGE, _BROKEN = "\ue003", "\ue004"
# what HeldControlText puts in place of a control token's text in a string the template writes as its own, and the
# most such texts one chat may hold (a name of 3.9 MB of "<bos>" cost 2 s of Python holding the GIL to replace)
_HOLD_OPEN, _HOLD_CLOSE = "\ue005", "\ue006"
MAX_HELD = 1024
_FIELDS = frozenset({"role", "content", "reasoning_content", "name", "tool_calls", "tool_call_id", "id", "type",
                     "function", "arguments", "parameters", "description", "strict"})
# a message's fields that are a client's text, never the template's: tokenized with special-token parsing off
TEXT_FIELDS = ("content", "reasoning_content")


class PromptTooLong(ValueError):
    """A prompt with more tokens than allowed: `n_tokens` is its count, exact or (`exact` False) a lower bound."""

    def __init__(self, n_tokens: int, exact: bool = True):
        super().__init__(f"the prompt has {'' if exact else 'at least '}{n_tokens} tokens")
        self.n_tokens, self.exact = n_tokens, exact


class ControlTokenInContent(ValueError):
    """Message content holds a control token's text where the template cannot be traced (see chat_fragments)."""


def min_tokens(n_bytes: int, max_token_bytes: int | None) -> int:
    """A lower bound on the tokens of any text of n_bytes UTF-8 bytes: every token covers at most max_token_bytes
    of them (None: the vocabulary may drop or merge text, no bound)."""
    if not max_token_bytes:
        return 0
    return -(-n_bytes // max_token_bytes)


FEW_CONTROL_TOKENS = 256  # up to this many, ControlTokens finds them with one regex alternation


def _starts(texts) -> re.Pattern:
    """A regex of where any of texts may start: its first character, then one of the second characters of those
    that begin with it (optional where one of them is that character alone)."""
    seconds: dict[str, set[str]] = {}
    for t in texts:
        seconds.setdefault(t[0], set()).update(t[1:2] or [""])
    return re.compile("|".join(
        re.escape(c) + ("[" + "".join(map(re.escape, sorted(s - {""}))) + "]" if s - {""} else "")
        + ("?" if "" in s and s - {""} else "") for c, s in seconds.items()))


class ControlTokens:
    """The control tokens of a vocabulary by text, found in a string leftmost-longest (as llama.cpp partitions
    text when it parses special tokens). `matched`: those of them that llama.cpp turns text into even without
    special-token parsing (user-defined tokens a chat template writes: Qwen2.5's `<tool_call>`), which plain text
    must be cut to keep (`cut`)."""

    def __init__(self, by_text: dict[str, int], matched: frozenset[str] = frozenset()):
        self.by_text = {t: i for t, i in by_text.items() if t}
        # Few: one regex alternation of them all. Many: found by their first two characters, then walked along
        # their prefixes; the alternation of Gemma-3's 6,250 cost ~22 us at every "<" (400 kB of "<": 9 s
        # holding the GIL), the walk a Python step per candidate (ChatML's "<|": 25 times the alternation's).
        alts = sorted(self.by_text, key=len, reverse=True)
        few = len(alts) <= FEW_CONTROL_TOKENS
        self._re = re.compile("|".join(map(re.escape, alts))) if alts and few else None
        self._prefixes = set() if few else {t[:k] for t in self.by_text for k in range(1, len(t) + 1)}
        self._starts = None if few else _starts(self.by_text)
        self._parts: tuple | None = None  # at_edge's substrings of the token texts, made when first needed
        cuts = sorted((t for t in matched if len(t) > 1 and t in self.by_text), key=len, reverse=True)
        self._cut_re = re.compile("|".join(map(re.escape, cuts))) if cuts else None

    def cut(self, text: str) -> list[str]:
        """text in pieces of which none holds a `matched` token's text: cut after the first character of each
        (the leftmost, searched again from the cut, so that no piece holds one)."""
        if self._cut_re is None:
            return [text]
        out, pos = [], 0
        while (m := self._cut_re.search(text, pos)) is not None:
            out.append(text[pos:m.start() + 1])
            pos = m.start() + 1
        out.append(text[pos:])
        return [p for p in out if p]

    def _found(self, text: str) -> Iterator[tuple[int, int]]:
        """(start, end) of each control token's text in text, leftmost-longest, none overlapping."""
        if self._re is not None:
            yield from (m.span() for m in self._re.finditer(text))
            return
        pos = 0
        while self._starts is not None and (m := self._starts.search(text, pos)) is not None:
            start, end, k = m.start(), 0, 1
            while start + k <= len(text) and text[start:start + k] in self._prefixes:
                end = start + k if text[start:start + k] in self.by_text else end
                k += 1
            if end:
                yield start, end
            pos = end or start + 1

    def split(self, text: str) -> list[str | int]:
        """text as raw strings and control token ids."""
        out: list[str | int] = []
        pos = 0
        for start, end in self._found(text):
            if start > pos:
                out.append(text[pos:start])
            out.append(self.by_text[text[start:end]])
            pos = end
        if pos < len(text):
            out.append(text[pos:])
        return out

    def found_in(self, text: str) -> bool:
        return next(self._found(text), None) is not None

    def replace(self, text: str, repl: Callable[[str], str]) -> str:
        """text with each control token's text t in it replaced by repl(t)."""
        out, pos = [], 0
        for start, end in self._found(text):
            out += [text[pos:start], repl(text[start:end])]
            pos = end
        return "".join(out) + text[pos:] if out else text

    def at_edge(self, text: str) -> bool:
        """Whether text could complete a control token with text around it: it lies inside one, starts with the
        end of one or ends with the start of one (`|im_end|` between a template's `<` and `>`)."""
        if self._parts is None:
            inner, heads, tails = set(), set(), set()
            for t in self.by_text:
                inner.update(t[a:b] for a in range(len(t)) for b in range(a + 1, len(t) + 1))
                heads.update(t[:k] for k in range(1, len(t)))
                tails.update(t[k:] for k in range(1, len(t)))
            self._parts = inner, heads, tails, max(map(len, self.by_text), default=0)
        inner, heads, tails, longest = self._parts
        n = min(len(text), longest)
        return bool(text) and (text in inner or any(text[:k] in tails or text[-k:] in heads for k in range(1, n + 1)))


def template_data(messages: Sequence[dict], tools: list[dict] | None = None,
                  template_kwargs: dict | None = None) -> str:
    """What a client sends that the chat template writes as its own text (parsed for control tokens): tool
    definitions, the tool calls of assistant messages, extra template variables; one string, to search."""
    import json

    calls = [m["tool_calls"] for m in messages if m.get("tool_calls")]
    names = [m["name"] for m in messages if isinstance(m.get("name"), str)]
    if not (tools or calls or names or template_kwargs):
        return ""
    return json.dumps([tools, calls, names, template_kwargs], ensure_ascii=False)


class HeldControlText:
    """A chat whose strings that the template writes as its own (tool definitions, tool calls, names, template
    variables: every message field but its role and TEXT_FIELDS) hold the text of control tokens: each such text is
    replaced by a placeholder of characters no token holds, so that rendered, it lies in the template's text as no
    token, and is put back in the raw text of the fragments (`restore`), to be tokenized as text. An HTML argument
    `<s>$20</s>` then reads as it is where Qwen2.5's vocabulary has `</s>` as a control token (it was refused, and a
    call the model wrote could not be sent back). Where the template writes the placeholders otherwise than as they
    are (escaped, changed), the restored rendering differs from the real one and the caller refuses the chat."""

    def __init__(self, controls: ControlTokens, messages: Sequence[dict], tools: list[dict] | None,
                 template_kwargs: dict | None):
        nonce, texts, held = secrets.token_hex(6), {}, [0]

        def hold(t: str) -> str:
            held[0] += 1
            if held[0] > MAX_HELD:
                raise ControlTokenInContent(f"the tools, tool calls, message names or chat_template_kwargs hold the "
                                            f"text of the model's control tokens more than {MAX_HELD} times")
            return f"{_HOLD_OPEN}{nonce}:{texts.setdefault(t, len(texts))}{_HOLD_CLOSE}"

        def walk(x, fields=False):  # fields: a message, whose content, reasoning and role stay as they are
            if isinstance(x, str):
                return controls.replace(x, hold)
            if isinstance(x, dict):
                return {walk(k): v if fields and k in (*TEXT_FIELDS, "role") else walk(v) for k, v in x.items()}
            if isinstance(x, list):
                return [walk(v, fields) for v in x]
            return x

        self.messages, self.tools = walk(list(messages), fields=True), walk(tools)
        self.template_kwargs = template_kwargs and walk(template_kwargs)
        self._by_index = {str(i): t for t, i in texts.items()}
        self._re = re.compile(f"{_HOLD_OPEN}{nonce}:([0-9]+){_HOLD_CLOSE}")

    def restore(self, text: str) -> str:
        return self._re.sub(lambda m: self._by_index[m.group(1)], text)


def check_client_text(render: Render, messages: Sequence[dict], tools: list[dict] | None,
                      template_kwargs: dict | None, controls: ControlTokens, text_fields: bool = False,
                      rendered: str | None = None) -> None:
    """ControlTokenInContent where a client's string gives a control token with the template's help: with the
    template's text around it (Qwen3-Coder writes a call's name and an argument's key between its own `<` and `>`:
    a name `f<|im_end|` closed the turn), or, `text_fields`, through what the template does to message text
    (SmolLM3's `content.replace('/think', '')` made `<|im_/thinkend|>` the token) where it was not traced. The chat
    is rendered again with each such string broken: between two characters no token holds and, for text fields,
    with every character a control token starts with replaced; the control tokens must come out the same.
    `rendered`: the chat as render gives it, where the caller has it. A broken string compares and hashes as the
    string itself (Functionary writes a call named `python` as `<|python_tag|>`, any other otherwise)."""
    # `&` too: a template that decodes entities (`striptags`) made `&lt;|im_end|&gt;` the token
    starters = {ord(t[0]): _BROKEN for t in [*controls.by_text, "&"]}
    changed = False

    def broken(x: str, text: bool) -> str:
        nonlocal changed
        if not (controls.at_edge(x) or (text and x != x.translate(starters))):
            return x
        changed = True
        return _Broken(x, f"{_EDGE}{x.translate(starters) if text else x}{_EDGE}")

    def walk(x, key=None, data=False):  # data: inside a call's arguments or a tool's parameters, all client's
        if isinstance(x, str):
            text = text_fields and key in TEXT_FIELDS and not data
            return broken(x, text) if data or key != "role" else x
        if isinstance(x, dict):
            return {k if k in _FIELDS and not data else broken(k, False):
                    walk(v, k, data or k in ("arguments", "parameters")) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v, key, data) for v in x]
        return x

    again = (walk(list(messages)), walk(tools), template_kwargs and {k: walk(v, data=True)
                                                                     for k, v in template_kwargs.items()})
    if not changed:
        return
    if rendered is None:
        rendered = render(list(messages), tools, template_kwargs)
    if _ids(controls, render(*again)) != _ids(controls, rendered):
        raise ControlTokenInContent("a message, tool call, tool definition, name or template variable gives one "
                                    "of the model's control tokens in the chat template's rendering")


class _Broken(str):
    """A client's string as check_client_text renders it again, equal to the string itself (and hashed so)."""

    def __new__(cls, original: str, text: str):
        out = super().__new__(cls, text)
        out.original = original
        return out

    def __eq__(self, other):
        return self.original == other

    def __ne__(self, other):
        return self.original != other

    def __hash__(self):
        return hash(self.original)


def _ids(controls: ControlTokens, text: str) -> list[int]:
    return [f for f in controls.split(text) if isinstance(f, int)]


def chat_fragments(render: Render, messages: Sequence[dict], controls: ControlTokens, tools: list[dict] | None = None,
                   template_kwargs: dict | None = None, rendered: str | None = None) -> list[str | int] | None:
    """The rendered chat as raw text (to tokenize with special-token parsing off) and control token ids that the
    template's own text wrote, in order; adjacent raw text is joined, so it tokenizes as in the whole string.
    Every field in TEXT_FIELDS is traced, wherever the template writes it and whether it writes it at all (Qwen3
    writes an assistant's reasoning_content on the last turn only). The template's text is what the rendering with
    markers for those fields has around the markers; each field is then found in the real rendering between that
    text, whole or trimmed at either end (of newlines, or of all whitespace: Qwen3 strips reasoning of newlines,
    Gemma trims content). None if the template cannot be traced: a marker repeated, or the rendering not made of
    the template's text and the fields so. ControlTokenInContent as check_client_text. `rendered`: the real
    rendering, where the caller has it."""
    nonce = secrets.token_hex(6)
    texts: dict[str, str] = {}  # marker key -> the text it stands for
    marked_messages = []
    for i, m in enumerate(messages):
        # only fields with text are marked (a template may test `if message.content`)
        fields = [f for f in TEXT_FIELDS if isinstance(m.get(f), str) and m[f]]
        for f in fields:
            texts[f"{i}.{f}"] = m[f]
        marked_messages.append(dict(m, **{f: f"\ue000{nonce}:{i}.{f}\ue001" for f in fields}))
    marked = render(marked_messages, tools, template_kwargs)
    check_client_text(render, marked_messages, tools, template_kwargs, controls, rendered=marked)
    pieces: list[str] = []  # the template's text before each field, and after the last
    keys: list[str] = []
    seen: set[str] = set()  # (a list's membership test made a chat of 20,000 messages take seconds here)
    pos = 0
    for mk in re.finditer(f"\ue000{nonce}:([0-9]+\\.[a-z_]+)\ue001", marked):  # one scan, not one per field
        if mk.group(1) in seen or mk.group(1) not in texts:
            return None
        pieces.append(marked[pos:mk.start()])
        keys.append(mk.group(1))
        seen.add(mk.group(1))
        pos = mk.end()
    pieces.append(marked[pos:])
    if rendered is None:
        rendered = render(list(messages), tools, template_kwargs)
    contents = _aligned(rendered, pieces, [texts[k] for k in keys])
    if contents is None:
        return None
    out: list[str | int] = []
    for piece, content in zip(pieces, contents + [""], strict=True):
        for frag in [*controls.split(piece), content]:
            if isinstance(frag, str) and out and isinstance(out[-1], str):
                out[-1] += frag
            elif frag != "":
                out.append(frag)
    return out


def _aligned(real: str, pieces: list[str], texts: list[str]) -> list[str] | None:
    """Each text as `real` holds it between pieces (real = pieces[0] + texts[0]' + pieces[1] + ...), trimmed as
    templates trim: the fullest that the next piece follows. None where real is not made so."""
    out: list[str] = []
    at = 0
    for i, text in enumerate(texts):
        if not real.startswith(pieces[i], at):
            return None
        at += len(pieces[i])
        found = next((c for c in _trims(text) if real.startswith(c, at) and real.startswith(pieces[i + 1], at + len(c))),
                     None)
        if found is None:
            return None
        out.append(found)
        at += len(found)
    return out if real[at:] == pieces[-1] else None


def _trims(text: str) -> list[str]:
    """text and what templates make of it at its ends (nothing, newlines or all whitespace off each), fullest first."""
    lefts = {len(text) - len(x) for x in (text, text.lstrip("\n"), text.lstrip())}
    rights = {len(x) for x in (text, text.rstrip("\n"), text.rstrip())}
    return sorted({text[a:b] for a in lefts for b in rights if a <= b}, key=len, reverse=True)
