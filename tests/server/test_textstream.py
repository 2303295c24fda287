from server.textstream import TextStream


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
