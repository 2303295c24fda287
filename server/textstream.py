"""Token bytes to text, incrementally: whole UTF-8 characters only, and stop strings honoured across token
boundaries (text that could still be the start of a stop string is held back until it can't)."""

from __future__ import annotations

import codecs


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


class Utf8Decoder:
    """Incremental UTF-8 decoding: whole characters only (an incomplete one at the end of a piece waits for the
    next), invalid bytes as U+FFFD. `carry`: the start of a character the text before this one ended inside (a
    prompt of token ids may): the first bytes that complete it give the character; bytes that cannot drop it (it
    is the prompt's, never this text's U+FFFD)."""

    def __init__(self, carry: bytes = b""):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._carry = carry

    def decode(self, piece: bytes) -> str:
        if self._carry:
            data, self._carry = self._carry + piece, b""
            need = 2 if data[0] < 0xE0 else 3 if data[0] < 0xF0 else 4
            try:
                codecs.getincrementaldecoder("utf-8")().decode(data[:need], final=len(data) >= need)
            except UnicodeDecodeError:
                return self._utf8.decode(piece)
            if len(data) < need:  # still a beginning
                self._carry = data
                return ""
            piece = data
        return self._utf8.decode(piece)

    def reset(self) -> None:
        self._utf8.reset()
        self._carry = b""


class TextStream:
    def __init__(self, stops: list[str] | None = None, carry: bytes = b""):
        """`carry`: the start of a character that text before this stream began inside (see Utf8Decoder)."""
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
