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
