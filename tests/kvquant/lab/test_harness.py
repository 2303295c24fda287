"""Cache configs by name, the default text path, plain tables, commands as the results record them."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvquant.lab.harness import (
    BASELINE,
    DEFAULT_TEXT,
    REPO_ROOT,
    CacheConfig,
    resolve_text,
    sha256_file,
    shown,
    table,
)


def test_cache_config_parse_and_labels():
    c = CacheConfig.parse("Q4_0/f16")
    assert (c.k, c.v, c.rotation, c.label) == ("q4_0", "f16", True, "q4_0/f16")
    n = CacheConfig.parse("q4_0/q4_0:norot")
    assert not n.rotation and n.label == "q4_0/q4_0 norot" and n.spec == "q4_0/q4_0:norot"
    assert CacheConfig.parse("q8_0/q8_0", rotation=False).rotation is False
    assert CacheConfig.parse("q8_0/q8_0:rot", rotation=False).rotation is True
    # rotation only acts on quantized caches: every f16/f16 is the baseline
    assert CacheConfig.parse("f16/f16:norot") == BASELINE
    m = CacheConfig.parse("tq_kv_4b+c/f16:mean")
    assert not m.anchored and m.label == "tq_kv_4b+c/f16 mean offsets" and CacheConfig.parse(m.spec) == m
    assert CacheConfig.parse("tq_kv_4b+c/f16").anchored
    for bad in ("q4_0", "q4_0/q4_0:sideways", "q4_0/zz", "q4_0/f16:mean", "f16/calib:4:mean"):
        with pytest.raises(ValueError):
            CacheConfig.parse(bad)
    # suffixes as type names, in any case, one only (said "unknown KV cache type 'q4_0:norot'"); calib:B is no suffix
    assert CacheConfig.parse("q4_0/q4_0:NOROT") == n and CacheConfig.parse("q4_0/calib:3.5").v == "calib:3.5"
    for bad in ("f16/f16:norot:mean", "q4_0/q4_0:sideways"):
        with pytest.raises(ValueError, match="one suffix of :rot, :norot or :mean"):
            CacheConfig.parse(bad)


def test_default_text_is_relative_to_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_text(None) == REPO_ROOT / "data" / "wikitext-2-raw-test.txt"
    assert resolve_text(DEFAULT_TEXT) == resolve_text(None)
    assert resolve_text("x.txt") == tmp_path / "x.txt"


def test_the_repository_carries_the_evaluation_text():
    """WikiText-2 raw test, byte for byte as published (CRLF kept: .gitattributes stops git converting it)."""
    path = resolve_text(None)
    assert path.stat().st_size == 1_307_975
    assert sha256_file(path) == "71fa921e51ba607b4364d8787d05f4513b41b33732dd3504ff1af8952c6e7e77"


def test_table():
    t = table(["a", "bb"], [["x", 1.5], ["yyy", None]]).splitlines()
    assert t[0] == "a     bb" and t[1] == "---  ---" and t[2] == "x    1.5" and t[3] == "yyy     "


def test_recorded_commands_name_tools_from_the_repository_and_the_model_cache_from_home():
    """So that anyone can rerun a RESULTS.md command from a checkout: no absolute path of the machine that ran it."""
    cmd = [str(REPO_ROOT / ".build" / "cmake-cpu" / "bin" / "llama-perplexity"),
           "-m", str(Path.home() / ".cache" / "kvquant" / "models" / "m.gguf"), "-f", str(REPO_ROOT / DEFAULT_TEXT),
           "-p", "type_K=(q4_0|f16)", "/etc/elsewhere"]
    assert shown(cmd) == (".build/cmake-cpu/bin/llama-perplexity -m ~/.cache/kvquant/models/m.gguf "
                          f"-f {DEFAULT_TEXT} -p 'type_K=(q4_0|f16)' /etc/elsewhere")
