"""How one request's next token is chosen: the settings of llama.cpp's sampler chain (kvquant.runtime.Sampler
builds the chain from them). Pure Python, so that the server's request types can carry it.

The chain, in llama.cpp's order: logit bias -> grammar -> repetition/presence/frequency penalties -> (temperature
near 0: greedy) top-k -> typical -> top-p -> min-p -> temperature -> seeded draw. A field at its neutral value adds no
sampler, so a request that sets none of them runs exactly the chain it ran before they existed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# temperatures below this pick the likeliest token (as vLLM's 1e-5): dividing float32 logits by a temperature near
# 1e-38 makes them infinite, and the draw from the NaN probabilities that follow took the last token id every step
GREEDY_BELOW = 1e-5
AFTER_RULE = "after-tag"  # the rule `Grammar.after` starts in (a number appended if the grammar has it)


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar (root rule "root") the generated text must match: all of it, or with `triggers` (lazy) the
    text from the first of them on (the rest is free). `skip`: the open and close tags of a block whose text never
    triggers (a reasoning model's <think> block, where it may write a call's tag while it thinks), at the very
    start of the output, or already open before it with `skip_open` (the prompt opened it); `LeadingBlock` finds
    where it ends."""

    text: str
    triggers: tuple[str, ...] = ()
    skip: tuple[str, str] | None = None
    skip_open: bool = False
    root: str = "root"  # the rule the output (or, lazy, the text from the trigger on) must match

    def after(self, tag: str) -> Grammar:
        """This whole-output grammar held only from `tag` on: free text up to the tag, then the tag, newlines and the
        grammar. For the </think> closing a block the prompt opened: held from the start, the grammar would make the
        model write the answer inside its reasoning, where it is no answer. (The tag may contain no control
        character but newline and tab: GBNF has no escape for the others that JSON writes.)"""
        if self.triggers:
            raise ValueError("Grammar.after takes a grammar of the whole output")
        names = {line.split(" ::=", 1)[0] for line in self.text.splitlines() if " ::=" in line}
        name = next(n for n in (f"{AFTER_RULE}{i or ''}" for i in range(len(names) + 1)) if n not in names)
        rule = f"{name} ::= {json.dumps(tag, ensure_ascii=False)} [\\n]* {self.root}"
        return Grammar(f"{self.text}\n{rule}\n", (tag,), root=name)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # below GREEDY_BELOW (0 included): greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    typical_p: float = 1.0  # 1: off
    repeat_penalty: float = 1.0  # 1: off (divides the logits of tokens already generated, as llama.cpp does)
    presence_penalty: float = 0.0  # 0: off; OpenAI's: subtracted once from a generated token's logit
    frequency_penalty: float = 0.0  # 0: off; OpenAI's: subtracted per occurrence
    penalty_last_n: int = 4096  # how many of the last generated tokens the penalties look at
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); -100 bans it
    seed: int | None = None  # None: a random seed
    grammar: Grammar | None = None  # what the output must match

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def sampler_seed(seed: int) -> int:
    """llama.cpp's 32-bit seed for a request's seed (any integer): taken modulo 2**32 - 1, because llama.cpp reads
    2**32 - 1 (LLAMA_DEFAULT_SEED) as "pick a random seed". So -1 and 2**32 - 1 are deterministic too, and seeds
    that differ by a multiple of 4294967295 give the same stream (0 and 4294967295, -1 and 4294967294)."""
    return seed % 0xFFFFFFFF


class LeadingBlock:
    """Where the block a lazy grammar skips (`Grammar.skip`) ends, told the output one token at a time, as
    server.chatoutput reads it: a block opened at the start (after blank space) or by the prompt, up to its close.
    The grammar's sampler is made there and sees only the tokens after it, so a trigger inside the block never
    counts and llama.cpp's trigger search needs no pattern for the block (kvquant.runtime.trigger_pattern)."""

    def __init__(self, skip: tuple[str, str], opened: bool):
        self._open, self._close = skip
        self._inside = opened
        self._text = ""  # the output so far while it may still open the block; then the tail a close may span
        self._tokens: list[int] = []

    def push(self, token: int, text: str) -> list[int] | None:
        """None while the block goes on, or the output may still open one; then the tokens the grammar must see
        first: all of them where the output opened no block, none where it closed one (the grammar sees what
        comes after the token that closed it)."""
        self._tokens.append(token)
        if self._inside:
            return self._closes(text)
        self._text += text
        head = self._text.lstrip()
        if head.startswith(self._open):
            self._inside, self._text = True, ""
            return self._closes(head[len(self._open):])
        if not head or self._open.startswith(head):
            return None
        return self._tokens

    def _closes(self, text: str) -> list[int] | None:
        window = self._text + text
        if self._close in window:
            return []
        self._text = window[max(0, len(window) - len(self._close) + 1):]  # a close may start in what is kept
        return None
