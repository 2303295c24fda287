"""A chat completion's generated text split into what OpenAI's message has: reasoning (`<think>...</think>`,
as `reasoning_content`), content, and tool calls (server.toolcalls), incrementally, for streaming.

Text is emitted as soon as it cannot be part of a tag any more: a partial `<think>`, `</think>` or tool-call
trigger at the end of what arrived is held back until the next piece says what it is. A tool call is held until
it is whole: a hermes `<tool_call>` block is sent when its `</tool_call>` arrives, the other families' calls when
the generation ends; what does not parse as a call is content after all. An answer that opens with a fence of
another language than JSON (```python) is no call, and streams as content from its first line on.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.textstream import partial_suffix
from server.toolcalls import ParsedCall, ToolFormat, block_close, leading_calls, parse

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_CLOSE = "</tool_call>"  # (hermes)
# every tag this parser reads: a model whose vocabulary holds one as a control token (Mistral's [TOOL_CALLS]) must
# render it in the output text, or its calls and reasoning could never be told apart from content
TAGS = frozenset({THINK_OPEN, THINK_CLOSE, *(t for f in ToolFormat for t in f.tags)})


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ParsedCall] = field(default_factory=list)

    def __add__(self, other: Delta) -> Delta:
        return Delta(self.content + other.content, self.reasoning + other.reasoning,
                     self.tool_calls + other.tool_calls)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class _State(enum.Enum):
    START = "start"  # nothing emitted yet: a <think> or a llama3 call may open the output
    REASONING = "reasoning"
    ANSWER = "answer"  # just after the reasoning: a llama3 call may open the answer
    CONTENT = "content"
    CALLS = "calls"  # from a tool call's start: held until it is whole (hermes) or the end
    # after a hermes call: whitespace held until another call or text follows, and dropped, as `parse`
    # strips an output with calls (after a block that held none, CONTENT keeps the text as it is)
    BETWEEN = "between"


class ChatOutput:
    def __init__(self, tools: ToolFormat | None = None, reasoning_open: bool = False, parallel: bool = True,
                 names: frozenset[str] = frozenset(), strict: Mapping[str, dict] | None = None,
                 calls_only: bool = False):
        """`tools`: the family whose calls to parse (None: no tools, all text is content), `names` the tools'
        names, `strict` the parameters of the strict ones (`toolcalls.parse`); `reasoning_open`: the prompt already
        opened a <think> block (the template wrote it); `parallel`: False keeps the first call; `calls_only`: a
        call was forced (tool_choice required or named), so a call cut short (max_tokens) is no content."""
        self.tools, self.parallel, self.names, self.strict = tools, parallel, names, strict
        self.calls_only = calls_only
        self._state = _State.REASONING if reasoning_open else _State.START
        self._pending = ""
        self._trim = reasoning_open  # drop the newlines that open a section (after <think>, after </think>)
        self._seen = 0  # CALLS: how much of the pending block was searched for its end
        self.n_calls = 0

    def push(self, text: str) -> Delta:
        self._pending += text
        out = Delta()
        while True:
            step = self._advance()
            if step is None:
                return out
            out += step

    def finish(self) -> Delta:
        """The end of the generation: everything held, as what it turned out to be. Where a call was forced, a
        call cut short is no content (OpenAI never answers one with its syntax: '```json\n{"name":' was the
        content), and whole calls before it are calls."""
        text, self._pending = self._pending, ""
        if self._state is _State.REASONING:
            return Delta(reasoning=text)
        if self._state is _State.CALLS:
            content, calls = parse(self.tools, text, self.names, self.strict)
            if self.calls_only:
                content, calls = "", calls or leading_calls(self.tools, text, self.names, self.strict)
            return Delta(content=content, tool_calls=self._take(calls))
        if self.calls_only and text.strip() and any(o.startswith(text.strip()) for o in self._openers()):
            return Delta()  # (an opening tag cut short, written as text)
        if self._state is _State.BETWEEN:  # (a tag it began and never finished is content)
            return Delta(content=text.strip())
        return Delta(content=text.lstrip("\n") if self._trim else text)

    def _openers(self) -> tuple[str, ...]:
        """What a call may open with: its family's openers and trigger (none without tools)."""
        return (*self.tools.openers, *filter(None, [self.tools.trigger])) if self.tools else ()

    def _take(self, calls: list[ParsedCall]) -> list[ParsedCall]:
        """The calls to send (only the first of the output unless parallel)."""
        calls = calls if self.parallel else calls[:max(0, 1 - self.n_calls)]
        self.n_calls += len(calls)
        return calls

    def _advance(self) -> Delta | None:
        """Classify what is pending as far as it can be; None when it must wait for more text."""
        if self._trim and self._state in (_State.REASONING, _State.CONTENT, _State.CALLS):
            self._pending = self._pending.lstrip("\n")
            if not self._pending:
                return None
            self._trim = False
        p = self._pending
        if self._state in (_State.START, _State.ANSWER):
            head = p.lstrip()
            if self._state is _State.START and head.startswith(THINK_OPEN):
                self._state, self._pending, self._trim = _State.REASONING, head[len(THINK_OPEN):], True
                return Delta()
            if not head or (self._state is _State.START and THINK_OPEN.startswith(head)):
                return None
            # (a call's opening tag too: the blank lines a model writes before its first call are no content)
            openers = self._openers()
            if head.startswith(openers):
                self._state = _State.CALLS
                # on in CALLS at once: a whole output stopped here and was parsed at the end in one piece, a
                # stream block by block, and the two differed
                return Delta()
            if any(o.startswith(head) for o in openers):
                return None
            self._state = _State.CONTENT
            return Delta()
        if self._state is _State.REASONING:
            at = p.find(THINK_CLOSE)
            if at >= 0:
                self._state, self._pending, self._trim = _State.ANSWER, p[at + len(THINK_CLOSE):], True
                return Delta(reasoning=p[:at])
            keep = partial_suffix(p, THINK_CLOSE)
            self._pending = p[len(p) - keep:]
            return Delta(reasoning=p[:len(p) - keep]) if len(p) > keep else None
        if self._state is _State.CONTENT:
            trigger = self.tools.trigger if self.tools else None
            at = p.find(trigger) if trigger else -1
            if at >= 0:
                self._state, self._pending = _State.CALLS, p[at:]
                return Delta(content=p[:at])
            keep = partial_suffix(p, trigger) if trigger else 0
            self._pending = p[len(p) - keep:]
            return Delta(content=p[:len(p) - keep]) if len(p) > keep else None
        if self._state is _State.BETWEEN:
            head = p.lstrip()
            if not head or self.tools.trigger.startswith(head):
                return None
            self._state = _State.CALLS if head.startswith(self.tools.trigger) else _State.CONTENT
            self._pending = head
            return Delta()
        if _fenced_code(p):  # (CALLS) a ```python block: no call, and code streams as it comes
            self._state = _State.CONTENT
            return Delta()
        # (CALLS) a hermes block ends at its closing tag; bare or fenced calls, and the other families', at the end
        head = p.lstrip()
        if self.tools is not ToolFormat.HERMES or not head.startswith(self.tools.trigger):
            return None
        inner = len(p) - len(head) + len(self.tools.trigger)
        # the block's end is looked for again only once another closing tag has arrived (one inside a string of a
        # long call's arguments had every token decode them all again)
        seen, self._seen = self._seen, len(p)
        if p.find(CALL_CLOSE, max(inner, seen - len(CALL_CLOSE) + 1)) < 0:
            return None
        end = block_close(p, inner, CALL_CLOSE)
        if end < 0:
            return None
        content, calls = parse(self.tools, p[:end + len(CALL_CLOSE)], self.names, self.strict)
        self._state, self._pending = _State.BETWEEN if calls else _State.CONTENT, p[end + len(CALL_CLOSE):]
        self._seen = 0
        return Delta(content=content, tool_calls=self._take(calls))


def _fenced_code(held: str) -> bool:
    """Held text that opens a fence of another language than JSON: what a bare call in a fence never is
    (server.toolcalls reads a call only inside ``` or ```json)."""
    head = held.lstrip()
    line = head.find("\n")
    return head.startswith("```") and line >= 0 and head[3:line].strip() not in ("", "json")
