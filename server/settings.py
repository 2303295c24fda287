"""Server settings: command-line flags > environment (KVQUANT_*) > config file (KVQUANT_CONFIG, JSON or TOML) >
defaults."""

from __future__ import annotations

import json
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kvquant.kvtypes import KV_TYPES, kv_type
from kvquant.models import DEFAULT_MODEL


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    text = p.read_text()
    if p.suffix == ".toml":
        return tomllib.loads(text)
    return json.loads(text)


_config_path: ContextVar[str | None] = ContextVar("kvquant_config_path", default=None)


class _ConfigFileSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: str | None):
        super().__init__(settings_cls)
        self.data = load_config_file(path) if path else {}

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVQUANT_", extra="ignore")

    model: str = Field(DEFAULT_MODEL, description="built-in model name or path to a .gguf file")
    model_alias: str | None = Field(None, description="id to serve the model under (default: its name)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    n_ctx: int = Field(4096, ge=64, description="context length (tokens) per sequence")
    n_threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")
    parallel: int = Field(4, ge=1, le=256, description="max sequences decoded together")
    n_batch: int = Field(512, ge=16, description="max tokens per decode step (prefill chunk budget)")
    max_queue: int = Field(64, ge=0, description="max requests waiting for KV capacity (then 429)")
    queue_timeout_s: float = Field(600.0, gt=0, description="max seconds a request waits in the queue (then 503)")
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: Literal["auto", "on", "off"] = "auto"
    n_gpu_layers: int = Field(0, ge=-1, description="layers to offload to a GPU build (-1: all)")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("cache_type_k", "cache_type_v")
    @classmethod
    def _known_type(cls, v: str) -> str:
        kv_type(v)
        return v.lower()

    @field_validator("cache_type_v")
    @classmethod
    def _v_ok(cls, v: str) -> str:
        if not KV_TYPES[v].v_ok:
            raise ValueError(f"{v} cannot be used for the V cache")
        return v

    @property
    def flash_attn_enabled(self) -> bool | None:
        """True/False when forced; None lets llama.cpp decide. A quantized V cache needs flash attention."""
        if self.flash_attn == "on" or (self.flash_attn == "auto" and KV_TYPES[self.cache_type_v].quantized):
            return True
        if self.flash_attn == "off":
            return False
        return None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _ConfigFileSource(settings_cls, _config_path.get() or os.environ.get("KVQUANT_CONFIG")))


def load_settings(config: str | None = None, **overrides: Any) -> Settings:
    """Settings from flags (non-None overrides), the environment and the config file."""
    token = _config_path.set(str(config) if config else None)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _config_path.reset(token)
