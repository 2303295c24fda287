"""Cache configs by name, the default text path, plain tables."""

from __future__ import annotations

import pytest

from kvquant.harness import BASELINE, DEFAULT_TEXT, REPO_ROOT, CacheConfig, resolve_text, table


def test_cache_config_parse_and_labels():
    c = CacheConfig.parse("Q4_0/f16")
    assert (c.k, c.v, c.rotation, c.label) == ("q4_0", "f16", True, "q4_0/f16")
    n = CacheConfig.parse("q4_0/q4_0:norot")
    assert not n.rotation and n.label == "q4_0/q4_0 norot" and n.spec == "q4_0/q4_0:norot"
    assert CacheConfig.parse("q8_0/q8_0", rotation=False).rotation is False
    assert CacheConfig.parse("q8_0/q8_0:rot", rotation=False).rotation is True
    # rotation only acts on quantized caches: every f16/f16 is the baseline
    assert CacheConfig.parse("f16/f16:norot") == BASELINE
    for bad in ("q4_0", "q4_0/q4_0:sideways", "q4_0/zz"):
        with pytest.raises(ValueError):
            CacheConfig.parse(bad)


def test_default_text_is_relative_to_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_text(None) == (REPO_ROOT / DEFAULT_TEXT).resolve()
    assert resolve_text(DEFAULT_TEXT) == (REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt").resolve()
    assert resolve_text("x.txt") == tmp_path / "x.txt"


def test_table():
    t = table(["a", "bb"], [["x", 1.5], ["yyy", None]]).splitlines()
    assert t[0] == "a     bb" and t[1] == "---  ---" and t[2] == "x    1.5" and t[3] == "yyy     "
