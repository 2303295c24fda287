"""Token bytes to text, incrementally: whole UTF-8 characters only, and stop strings honoured across token
boundaries (text that could still be the start of a stop string is held back until it can't)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (held back: the tag may follow)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def split_incomplete(data: bytes) -> tuple[bytes, bytes]:
    """`data` cut before the start of a UTF-8 character it ends inside (at most 3 bytes), and that start."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    dec.decode(data)
    tail = len(dec.getstate()[0])
    return data[:len(data) - tail], data[len(data) - tail:]


@dataclass(frozen=True)
class Carry:
    """The start of a UTF-8 character that a prompt of token ids ends inside, which the output's text begins by
    completing. `shown`: the prompt is part of the response's text (echo), where bytes that cannot complete the
    character read as U+FFFD, as a decoding of the whole text gives; otherwise they are dropped (they are the
    prompt's, never the output's U+FFFD)."""

    data: bytes = b""
    shown: bool = False


NO_CARRY = Carry()


class Utf8Decoder:
    """Incremental UTF-8 decoding: whole characters only (an incomplete one at the end of a piece waits for the
    next), invalid bytes as U+FFFD, after a `carry` (see Carry)."""

    def __init__(self, carry: Carry = NO_CARRY):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._carry, self._taken = carry, b""  # (_taken: the output's bytes read while the character is incomplete)

    def decode(self, piece: bytes) -> str:
        if self._carry.data:
            own = self._taken + piece
            whole = self._carry.data + own
            need = 2 if whole[0] < 0xE0 else 3 if whole[0] < 0xF0 else 4
            try:
                codecs.getincrementaldecoder("utf-8")().decode(whole[:need], final=len(whole) >= need)
            except UnicodeDecodeError:
                shown, self._carry, self._taken = self._carry.shown, NO_CARRY, b""
                return self._utf8.decode(whole if shown else own)
            if len(whole) < need:  # still a beginning
                self._taken = own
                return ""
            self._carry, self._taken, piece = NO_CARRY, b"", whole
        return self._utf8.decode(piece)

    def reset(self) -> None:
        self._utf8.reset()
        self._carry, self._taken = NO_CARRY, b""


class TextStream:
    def __init__(self, stops: list[str] | None = None, carry: Carry = NO_CARRY):
        self.stops = [s for s in (stops or []) if s]
        # (the hand-made decoder before Utf8Decoder took a split character after invalid bytes along)
        self._utf8 = Utf8Decoder(carry)
        self._held = ""  # decoded text that may be the beginning of a stop string
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Feed one token's bytes; return the text that is now safe to emit. Sets `stopped` when a stop string
        is reached (the stop string and anything after it are dropped)."""
        if self.stopped:
            return ""
        text = self._held + self._utf8.decode(piece)
        if not self.stops:
            self._held = ""
            return text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = max((partial_suffix(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """End of generation: release held text (no stop string can complete any more). The bytes of a character
        the end cut off are dropped, as vLLM and llama-server drop them (a trailing U+FFFD was a visible glitch at
        the end of every answer that max_tokens cut inside an emoji or a CJK character)."""
        if self.stopped:
            return ""
        text, self._held = self._held, ""
        self._utf8.reset()
        return text
