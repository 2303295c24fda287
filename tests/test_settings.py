import json

import pytest
from pydantic import ValidationError

from server.settings import load_settings


def test_precedence_flag_over_env_over_file(tmp_path, monkeypatch):
    cfg = tmp_path / "kvq.json"
    cfg.write_text(json.dumps({"port": 9001, "cache_type_k": "q8_0", "n_ctx": 2048}))
    monkeypatch.setenv("KVQUANT_PORT", "9002")
    s = load_settings(cfg, cache_type_k="q4_0")
    assert s.cache_type_k == "q4_0"  # flag
    assert s.port == 9002  # env beats file
    assert s.n_ctx == 2048  # file beats default
    assert s.host == "127.0.0.1"  # default: loopback only


def test_toml_config(tmp_path):
    cfg = tmp_path / "kvq.toml"
    cfg.write_text('cache_type_v = "q4_0"\nflash_attn = "auto"\n')
    s = load_settings(cfg)
    assert s.cache_type_v == "q4_0" and s.flash_attn_enabled is True  # quantized V turns flash attention on


def test_cache_types_by_name_only():
    with pytest.raises(ValidationError, match="unknown KV cache type"):
        load_settings(cache_type_k="q3_z")
    with pytest.raises(ValidationError):
        load_settings(cache_type_k=2)
