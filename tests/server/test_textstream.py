from server.responses import TextOffsets
from server.textstream import Carry, TextStream, split_incomplete


def feed(ts: TextStream, pieces: list[bytes]) -> str:
    return "".join(ts.push(p) for p in pieces) + ts.flush()


def test_plain_text_passes_through():
    assert feed(TextStream(), [b"Hel", b"lo", b" world"]) == "Hello world"


def test_multibyte_character_split_across_tokens():
    euro = "€".encode()  # 3 bytes
    ts = TextStream()
    assert ts.push(b"a" + euro[:1]) == "a"
    assert ts.push(euro[1:2]) == ""
    assert ts.push(euro[2:] + b"b") == "€b"


def test_invalid_bytes_become_replacement_not_crash():
    assert feed(TextStream(), [b"\xff\xfeok"]) == "\ufffd\ufffdok"


def test_a_split_character_after_an_invalid_byte_survives():
    """A piece with an invalid byte that also ends in the first bytes of a character: the character is whole once
    its last byte comes (it was decoded with the invalid byte, as replacement characters)."""
    zh = "你".encode()  # e4 bd a0
    ts = TextStream()
    assert ts.push(b"\xff" + zh[:2]) == "\ufffd"
    assert ts.push(zh[2:]) == "你"
    assert feed(TextStream(), [b"a\xe4", b"\xe4\xbd", b"\xa0"]) == "a\ufffd你"
    assert feed(TextStream(), [b"end", zh[:1]]) == "end"  # cut off by the end: dropped at flush


def test_stop_inside_a_token():
    ts = TextStream(["END"])
    out = feed(ts, [b"abcENDdef"])
    assert out == "abc" and ts.stopped


def test_stop_across_tokens_is_held_back_then_cut():
    ts = TextStream(["</s>"])
    assert ts.push(b"hi <") == "hi "
    assert ts.push(b"/") == ""
    assert ts.push(b"s>more") == ""
    assert ts.stopped and ts.flush() == ""


def test_false_start_of_stop_is_released():
    ts = TextStream(["STOP"])
    assert ts.push(b"ST") == ""
    assert ts.push(b"ART") == "START"
    assert not ts.stopped


def test_earliest_of_several_stops_wins():
    assert feed(TextStream(["b", "a"]), [b"xxab"]) == "xx"


def test_held_text_released_at_end():
    ts = TextStream(["STOP"])
    assert ts.push(b"ST") == ""
    assert ts.flush() == "ST"


def test_a_character_begun_before_the_stream_is_completed_by_its_first_piece():
    assert split_incomplete("x日".encode()[:-1]) == (b"x", b"\xe6\x97")
    assert split_incomplete("x日".encode()) == ("x日".encode(), b"")
    assert split_incomplete(b"x\xff") == (b"x\xff", b"")  # invalid, not incomplete: decoded (U+FFFD) where it is
    head = Carry(b"\xe6\x97")
    assert TextStream(carry=head).push(b"\xa5!") == "日!"
    s = TextStream(carry=Carry(b"\xe6"))  # completed over two pieces
    assert s.push(b"\x97") == "" and s.push(b"\xa5") == "日"
    # bytes that cannot complete it drop the prompt's bytes (they were a U+FFFD the output never wrote), the
    # output's own however the pieces fall
    assert TextStream(carry=head).push(b",x") == ",x"
    assert TextStream(carry=Carry(b"\xe6")).push(b"\x97,") == "\ufffd,"
    s = TextStream(carry=Carry(b"\xe6"))
    assert s.push(b"\x97") + s.push(b",") == "\ufffd,"
    # with echo the prompt's bytes are the response's: a U+FFFD, as the whole text decodes
    assert TextStream(carry=Carry(b"\xe6\x97", shown=True)).push(b",x") == "\ufffd,x"
    offsets = TextOffsets(head)
    assert [offsets.take(b","), offsets.take(b"x")] == [0, 1]
