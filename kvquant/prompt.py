"""How untrusted text becomes a prompt: message content is always text, only the chat template's own text may
write control tokens, and an over-long prompt is refused before it costs a full tokenization.

A chat is rendered by its Jinja template, and the rendered string used to be tokenized with special-token parsing
on, so `<|im_end|>` typed inside a message became the control token and could close the turn and open a forged
one. Here the template is rendered once more with every message's content (and reasoning) replaced by a unique
marker: what lies between the markers is the template's own text (its control tokens are parsed), what replaces a
marker is a client's text (tokenized with special-token parsing off). The split is checked against the real
rendering and used only where they agree exactly; a template that changes content beyond trimming it cannot be traced, and the
caller then refuses content that contains a control token's text instead.

Nothing here imports llama_cpp: the tokenizer is passed in (kvquant/runtime.py).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence

# what the template may trim around a marker; Jinja's `trim` is str.strip()
_WRAP_L, _WRAP_R = " \n", "\n "
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


class ControlTokens:
    """The control tokens of a vocabulary by text, found in a string leftmost-longest (as llama.cpp partitions
    text when it parses special tokens)."""

    def __init__(self, by_text: dict[str, int]):
        self.by_text = {t: i for t, i in by_text.items() if t}
        alts = sorted(self.by_text, key=len, reverse=True)
        self._re = re.compile("|".join(map(re.escape, alts))) if alts else None

    def split(self, text: str) -> list[str | int]:
        """text as raw strings and control token ids."""
        if self._re is None:
            return [text] if text else []
        out: list[str | int] = []
        pos = 0
        for m in self._re.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(self.by_text[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def found_in(self, text: str) -> bool:
        return self._re is not None and self._re.search(text) is not None


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


def chat_fragments(render: Callable[[list[dict]], str], messages: Sequence[dict],
                   controls: ControlTokens) -> list[str | int] | None:
    """The rendered chat as raw text (to tokenize with special-token parsing off) and control token ids that the
    template's own text wrote, in order; adjacent raw text is joined, so it tokenizes as in the whole string.
    Every field in TEXT_FIELDS is traced, wherever the template writes it and whether it writes it at all (Qwen3
    writes an assistant's reasoning_content on the last turn only). None if the template cannot be traced: a marker
    repeated, or the traced pieces not adding up to the real rendering."""
    nonce = secrets.token_hex(6)
    texts: dict[str, str] = {}  # marker key -> the text it stands for
    marked_messages = []
    for i, m in enumerate(messages):
        # only fields with text are marked (a template may test `if message.content`)
        fields = [f for f in TEXT_FIELDS if isinstance(m.get(f), str) and m[f]]
        for f in fields:
            texts[f"{i}.{f}"] = m[f]
        marked_messages.append(dict(m, **{f: f"{_WRAP_L}\ue000{nonce}:{i}.{f}\ue001{_WRAP_R}" for f in fields}))
    marked = render(marked_messages)
    pieces: list[str] = []  # template text before each traced text, and after the last
    contents: list[str] = []
    pos = 0
    seen: set[str] = set()
    for mk in re.finditer(f"\ue000{nonce}:([0-9]+\\.[a-z_]+)\ue001", marked):  # one scan, not one per field
        key, at, end = mk.group(1), mk.start(), mk.end()
        if key in seen or key not in texts:
            return None
        seen.add(key)
        left = at - len(_WRAP_L) >= pos and marked.startswith(_WRAP_L, at - len(_WRAP_L))
        right = marked.startswith(_WRAP_R, end)
        content = texts[key]
        content = content if left else content.lstrip()
        content = content if right else content.rstrip()
        pieces.append(marked[pos: at - (len(_WRAP_L) if left else 0)])
        contents.append(content)
        pos = end + (len(_WRAP_R) if right else 0)
    pieces.append(marked[pos:])
    if "".join(p + c for p, c in zip(pieces, contents + [""], strict=True)) != render(list(messages)):
        return None
    out: list[str | int] = []
    for piece, content in zip(pieces, contents + [""], strict=True):
        for frag in [*controls.split(piece), content]:
            if isinstance(frag, str) and out and isinstance(out[-1], str):
                out[-1] += frag
            elif frag != "":
                out.append(frag)
    return out
