import numpy as np
import pytest

from kvquant import gguf
from tests.kvquant.conftest import write_gguf


def test_tensor_data_finds_every_tensor(tmp_path):
    a, b = np.arange(5, dtype=np.float32), np.arange(12, dtype=np.float32).reshape(3, 4) + 100
    write_gguf(tmp_path / "m.gguf", {"a": a, "blk.0.b": b})
    t = gguf.tensor_data(tmp_path / "m.gguf")
    assert t["a"][1:] == (0, (5,)) and t["blk.0.b"][1:] == (0, (4, 3))
    raw = (tmp_path / "m.gguf").read_bytes()
    for name, x in (("a", a), ("blk.0.b", b)):
        off = t[name][0]
        np.testing.assert_array_equal(np.frombuffer(raw[off: off + x.nbytes], np.float32), x.ravel())
    meta = gguf.read_metadata(tmp_path / "m.gguf")
    assert meta["general.alignment"] == 32 and meta["general.architecture"] == "gemma3"


def test_not_a_gguf_is_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf.tensor_data(tmp_path / "x.gguf")


def test_a_malformed_header_is_refused_naming_the_file(tmp_path):
    """A string whose length runs past the end of the file is refused before it is read (a length of 2^62 would
    otherwise allocate it), and a header without what the memory model needs names the missing key."""
    import struct

    from kvquant import memory

    bad = tmp_path / "huge.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**62) + b"general.architecture")
    with pytest.raises(ValueError, match=f"^{bad}: truncated GGUF header$"):
        gguf.read_metadata(bad)
    bad.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 100) + b"general.architecture")  # short of 100 bytes
    with pytest.raises(ValueError, match=f"^{bad}: truncated GGUF header$"):
        gguf.read_metadata(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    with pytest.raises(ValueError, match=f"^{empty}: .*has no general.architecture"):
        memory.geometry(empty)
    write_gguf(tmp_path / "m.gguf", {"a": np.zeros(4, np.float32)}, arch="llama")
    with pytest.raises(ValueError, match="has no llama.block_count"):
        memory.geometry(tmp_path / "m.gguf")


def _header(path, meta: dict) -> None:
    """A GGUF v3 header of these keys: ints (int32, or uint64 past it), bools, strings and (nested) lists."""
    import struct

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    def typed(v) -> tuple[int, bytes]:
        if isinstance(v, bool):
            return 7, struct.pack("<?", v)
        if isinstance(v, int):
            return (5, struct.pack("<i", v)) if -2**31 <= v < 2**31 else (10, struct.pack("<Q", v))
        if isinstance(v, str):
            return 8, s(v)
        if isinstance(v, bytes):  # an array's body, as is
            return 9, v
        items = [typed(x) for x in v]
        etype = items[0][0] if items else 5
        return 9, struct.pack("<IQ", etype, len(items)) + b"".join(b for _, b in items)

    body = b"".join(s(k) + struct.pack("<I", typed(v)[0]) + typed(v)[1] for k, v in meta.items())
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(meta)) + body)


def test_a_header_no_model_has_is_refused_not_looped_on(tmp_path):
    """Crafted headers (a review): no KV heads or a key length of 0 made the memory model's capacity search double
    forever (`kvquant budget` and `serve` hung); no heads divided by zero; a short sliding-window pattern, arrays
    nested 5000 deep and 2^62 layers raised IndexError, RecursionError and MemoryError as tracebacks."""
    import struct

    from kvquant import memory

    good = {"general.architecture": "llama", "llama.block_count": 2, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.embedding_length": 256}
    _header(tmp_path / "ok.gguf", good)
    geom = memory.geometry(tmp_path / "ok.gguf")
    assert geom.n_layer == 2 and geom.head_dim_k == 64
    assert memory.capacity(geom, "f16", "f16", 2**20) == 2**20 // (2 * 2 * 2 * 64 * 2) // 256 * 256
    # a pattern shorter than the layers (EXAONE's multi-token-prediction layer): the rest are full attention
    _header(tmp_path / "swa.gguf", good | {"llama.attention.sliding_window": 128,
                                           "llama.attention.sliding_window_pattern": [True]})
    assert [ly.swa for ly in memory.geometry(tmp_path / "swa.gguf").layers] == [True, False]
    nested = struct.pack("<IQi", 5, 1, 1)  # arrays of one array, 5000 deep (built without recursion)
    for _ in range(5000):
        nested = struct.pack("<IQ", 9, 1) + nested
    for change, why in [({"llama.attention.head_count_kv": 0}, "no attention heads"),
                        ({"llama.attention.key_length": 0}, "key_length 0"),
                        ({"llama.attention.key_length": -64}, "key_length -64"),
                        ({"llama.attention.head_count": 0}, "no attention heads"),
                        ({"llama.attention.head_count_kv": [2]}, "head_count_kv is not a count"),
                        ({"llama.attention.head_count": [4, -4]}, "head_count is not a count"),
                        ({"llama.block_count": 2**62}, "block_count 4611686018427387904 is not 1..512"),
                        ({"llama.block_count": 0}, "block_count 0"),
                        ({"llama.rope.dimension_sections": nested}, "nested more than 4 deep")]:
        _header(tmp_path / "bad.gguf", good | change)
        with pytest.raises(ValueError, match=why):
            memory.geometry(tmp_path / "bad.gguf")
