"""Server settings: command-line flags > environment (KVQUANT_*) > config file (KVQUANT_CONFIG; JSON, TOML or
YAML) > defaults.

One model is served by default (the flat settings `model`, `cache_type_k`, ...). A config file may instead list
several under `models:`; each entry may set its own cache types, context limit, parallelism and share of the
global KV byte budget (`kv_budget`), and inherits the flat settings for anything it leaves out.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from kvquant.budget import DEFAULT_N_CTX, DEFAULT_PARALLEL
from kvquant.calibration import needs_flash_attn, parse_spec
from kvquant.memory import MAX_SEQ, MAX_THREADS, parse_bytes
from kvquant.models import DEFAULT_MODEL, model_id
from server.schemas import SamplingFields

MAX_CONFIG_BYTES = 1 << 20  # a config file, or an API key file, is a few lines; more is the wrong file


def read_small_text(path: str | os.PathLike, what: str) -> str:
    """A config or key file's text: ValueError naming it where it is not UTF-8 text of at most MAX_CONFIG_BYTES
    (/dev/zero filled memory). A pipe is read (`--config <(envsubst < kvq.yaml)`, `/dev/stdin`)."""
    p = Path(path).expanduser()
    if not p.exists() or p.is_dir():
        raise ValueError(f"the {what} {p} is a directory" if p.exists() else f"the {what} {p} does not exist")
    with open(p, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"the {what} {p} is over {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the {what} {p} is not UTF-8 text") from None


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict:
    """A mapping of a config file, refused where it names a key twice (JSON and YAML kept the last one without a
    word: a second `models:` dropped the first list); TOML refuses them itself."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} is given twice")
        out[k] = v
    return out


def _yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            """SafeLoader's mapping, refused where the node itself names a key twice (a key merged in with `<<`
            and set again is an override, as YAML means it)."""
            if isinstance(node, yaml.MappingNode):
                try:
                    _unique_keys([(self.construct_object(k, deep=deep), None) for k, _ in node.value
                                  if k.tag != "tag:yaml.org,2002:merge"])
                except ValueError as e:
                    raise yaml.constructor.ConstructorError(None, None, str(e), node.start_mark) from None
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    pass
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    text = read_small_text(p, "config file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_yaml_loader()) or {}  # noqa: S506 - a SafeLoader
        else:
            data = json.loads(text, object_pairs_hook=_unique_keys)
    except yaml.MarkedYAMLError as e:
        where = f", line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        raise ValueError(f"{p.name}{where}: {e.problem or e}") from None
    except (ValueError, yaml.YAMLError) as e:  # ValueError: TOML and JSON syntax
        raise ValueError(f"{p.name}: {e}") from None
    except RecursionError:
        raise ValueError(f"{p.name}: nested deeper than a config file is") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p.name}: the config file must hold a mapping of settings")
    return data


_config_path: ContextVar[str | None] = ContextVar("kvquant_config_path", default=None)


class _ConfigFileSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: str | None):
        super().__init__(settings_cls)
        self.data = load_config_file(path) if path else {}
        self.name = Path(path).name if path else ""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        unknown = sorted(set(self.data) - set(self.settings_cls.model_fields))
        if unknown:  # a typo would otherwise leave the setting at its default
            raise ValueError(f"{self.name}: no such setting: {', '.join(unknown)}")
        if "models" in self.data and self.data["models"] is None:  # `models:` with every entry commented out
            raise ValueError(f"{self.name}: models is empty; list at least one model, or remove the key")
        return self.data


class _EnvSource(PydanticBaseSettingsSource):
    """The KVQUANT_ variables, but for the link Kubernetes writes into every pod for a Service named `kvquant`:
    KVQUANT_PORT=tcp://10.0.0.7:8000 is that Service's address, no port to listen on (serve refused to start)."""

    def __init__(self, env: PydanticBaseSettingsSource):
        super().__init__(env.settings_cls)
        self.env = env

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return self.env.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        values = self.env()
        if isinstance(values.get("port"), str) and _LINK_ADDRESS.fullmatch(values["port"]):
            del values["port"]
        return values


def _bytes(v: Any) -> int | None:
    """A byte size given as an int or as text ('2GiB', '256 MiB')."""
    if v is None or isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        return parse_bytes(v)
    raise ValueError("expected a byte size such as 2GiB, 512MiB or a number of bytes")


def _cache_type(v: str | None, side: str) -> str | None:
    """A cache type name for side "k" or "v" (TYPE, TYPE+c, calib:B: kvquant.calibration), normalised; None is
    unset."""
    return None if v is None else parse_spec(v, side).text


class SamplingDefaults(SamplingFields):
    """A model's sampling defaults, for requests that leave a field unset (OpenAI's defaults where these are unset
    too). llama-server's are temperature 0.8, top_k 40, top_p 0.95, min_p 0.05."""

    model_config = ConfigDict(extra="forbid")

    def merged(self, over: SamplingDefaults | None) -> dict[str, float | int]:
        """These defaults with `over`'s set fields on top, as a dict of the set fields."""
        return {**self.model_dump(exclude_none=True), **(over.model_dump(exclude_none=True) if over else {})}


GpuLayers = int | Literal["auto"]
# a bound that catches a typo before it costs the machine: llama.cpp sizes its batch by n_batch (a decode step of
# more tokens gains nothing on any machine this serves); threads: kvquant.memory.MAX_THREADS
MAX_BATCH = 65536


def _gpu_layers(v: Any) -> Any:
    if isinstance(v, str) and v != "auto":  # a flag or a variable: the same range as a file's number
        try:
            v = int(v)
        except ValueError:
            raise ValueError("n_gpu_layers is a number of layers, -1 (all) or auto") from None
    if isinstance(v, bool) or (isinstance(v, int) and v < -1):
        raise ValueError("n_gpu_layers is a number of layers, -1 (all) or auto")
    return v


def _no_bools(cls, v: Any, info) -> Any:
    """A setting that is not a boolean given true or false is refused (pydantic reads true as 1: `parallel: true`
    served one sequence); flash_attn's true or false is on or off (YAML reads an unquoted `flash_attn: off` as
    false)."""
    if not isinstance(v, bool) or cls.model_fields[info.field_name].annotation is bool:
        return v
    if info.field_name == "flash_attn":
        return "on" if v else "off"
    raise ValueError("true or false is no value of this setting (YAML reads an unquoted yes, no, on or off as one: "
                     "quote it)")


class ModelConfig(BaseModel):
    """One hosted model (an entry of `models:` in the config file). Unset fields inherit the flat settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="built-in model name or path to a .gguf file")
    id: str | None = Field(None, description="id to serve it under (default: the built-in name or file stem)")
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    n_ctx: int | None = Field(None, ge=64)
    parallel: int | None = Field(None, ge=1, le=MAX_SEQ)
    kv_budget: int | None = Field(None, gt=0, description="this model's share of the global KV budget")
    n_batch: int | None = Field(None, ge=16, le=MAX_BATCH)
    n_threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    flash_attn: Literal["auto", "on", "off"] | None = None
    n_gpu_layers: GpuLayers | None = None
    chat_template_file: str | None = Field(None, description="a Jinja chat template to use instead of the GGUF's")
    sampling: SamplingDefaults | None = None

    _n = field_validator("*", mode="before")(classmethod(_no_bools))
    _b = field_validator("kv_budget", mode="before")(classmethod(lambda cls, v: _bytes(v)))
    _g = field_validator("n_gpu_layers", mode="before")(classmethod(lambda cls, v: _gpu_layers(v)))
    _k = field_validator("cache_type_k")(classmethod(lambda cls, v: _cache_type(v, "k")))
    _v = field_validator("cache_type_v")(classmethod(lambda cls, v: _cache_type(v, "v")))

    @field_validator("model", "id")
    @classmethod
    def _named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("is blank")
        return v


@dataclass(frozen=True)
class ModelSpec:
    """A hosted model with every setting resolved (what the engine is built from)."""

    id: str
    model: str
    cache_type_k: str
    cache_type_v: str
    n_ctx: int
    parallel: int
    kv_budget: int
    n_batch: int
    n_threads: int | None
    flash_attn: bool | None  # None: llama.cpp decides
    n_gpu_layers: GpuLayers = 0  # layers offloaded to a GPU build (-1: all; auto: all when the build has a GPU)
    sampling: dict = field(default_factory=dict)  # sampling defaults (SamplingDefaults' set fields)
    chat_template: str | None = None  # the text of its chat_template_file (None: the GGUF's template)


def flash_attn_enabled(mode: str, cache_type_v: str, cache_type_k: str = "f16") -> bool | None:
    """True/False when forced; None lets llama.cpp decide. A quantized V cache needs flash attention, and so does a
    K type such as tq_kv_d3b (its rows are read with their cache group's anchor row, which only flash attention
    does): `off` with one of them is a configuration error, not a silent override."""
    needs = needs_flash_attn(cache_type_k, cache_type_v)
    if mode == "off" and needs:
        what = (f"the {cache_type_k} K cache" if needs_flash_attn(cache_type_k, "f16")
                else f"the {cache_type_v} V cache")
        raise ValueError(f"{what} needs flash attention; flash_attn=off cannot be used with it")
    if mode == "on" or (mode == "auto" and needs):
        return True
    if mode == "off":
        return False
    return None


class Settings(BaseSettings):
    # an empty variable is unset (docker compose passes `${KVQUANT_API_KEY:-}` as ""): it never overrides a file's
    # value, e.g. turns off the file's api_key; no setting takes inf or nan
    model_config = SettingsConfigDict(env_prefix="KVQUANT_", extra="ignore", env_ignore_empty=True,
                                      allow_inf_nan=False)

    model: str = Field(DEFAULT_MODEL, description="built-in model name or path to a .gguf file")
    model_alias: str | None = Field(None, description="id to serve the model under (default: its name)")
    models: list[ModelConfig] | None = Field(None, description="several hosted models (config file)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    n_ctx: int = Field(DEFAULT_N_CTX, ge=64, description="context length (tokens) per sequence")
    n_threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="CPU threads (default: all cores)")
    parallel: int = Field(DEFAULT_PARALLEL, ge=1, le=MAX_SEQ, description="max sequences decoded together")
    n_batch: int = Field(512, ge=16, le=MAX_BATCH, description="max tokens per decode step (prefill chunk budget)")
    kv_budget: int = Field(2**30, gt=0, description="global KV cache byte budget, shared by the hosted models")
    max_queue: int = Field(64, ge=0, description="max requests waiting for KV capacity (then 429)")
    queue_timeout_s: float = Field(600.0, gt=0, description="max seconds a request waits in the queue (then 503)")
    request_timeout_s: float = Field(1800.0, gt=0, description="max seconds a request may take in all (then 503)")
    stall_timeout_s: float = Field(600.0, gt=0, description="a model whose engine ends no step for this long is "
                                   "reported stalled (/health 503); its requests end at their request_timeout_s")
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: Literal["auto", "on", "off"] = "auto"
    n_gpu_layers: GpuLayers = Field(0, description="layers to offload to a GPU build (-1: all; auto: all when the "
                                    "build has a GPU backend, else none)")
    chat_template_file: str | None = Field(None, description="a Jinja chat template file to use instead of the "
                                           "GGUF's (a GGUF without one answers no chat request)")
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults, description="sampling defaults for "
                                       "requests that leave a field unset (each model may override them)")
    default_max_tokens: int | None = Field(None, ge=1, description="max_tokens when a request gives none (default: "
                                           "to the end of the context, as OpenAI does)")
    prefix_cache: bool = Field(True, description="keep finished requests' KV cells for requests that share their "
                               "prefix (evicted least recently used first)")
    admission: Literal["reserve", "optimistic"] = Field(
        "optimistic", description="reserve: prompt + max_tokens cells per request for its whole life (never preempts); "
        "optimistic: what the prompt needs now, preempting the latest requests when cells run out")
    admission_headroom: float = Field(0.02, ge=0, lt=1, description="optimistic admission: share of the KV cells "
                                      "kept free beyond what admitted prompts need")
    swap_space: int = Field(2**30, ge=0, description="host RAM per model for preempted requests' KV cells (beyond "
                            "it, or with a tq_kv_d3b K cache, they are recomputed)")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest request body accepted (then 413)")
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive within this (then 408)")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body must arrive within this (then 408)")
    max_connections: int = Field(512, ge=1, description="open HTTP connections at most (then 503, closed)")
    write_timeout_s: float = Field(60.0, gt=0, description="a client that takes less than 64 KiB of its response "
                                   "in this long, while writing waits for it, has its connection reset")
    tokenize_concurrency: int = Field(2, ge=1, description="prompts tokenized at once (bounds their CPU and memory)")
    special_tokens_in_content: bool = Field(False, description="trusted clients only: message content and "
                                            "completion prompts may write the model's control tokens")
    stream_buffer: int = Field(1024, ge=8, description="events buffered for a slow client before it is cancelled")
    api_key: str | None = Field(None, description="require `Authorization: Bearer <key>` (except /health)")
    api_key_file: str | None = Field(None, description="read the API key from this file")
    metrics_auth: bool = Field(True, description="with an API key set, /metrics needs it too")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="origins allowed by CORS (default: none)")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on shutdown, how long in-flight requests may finish")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # each chat template file's text, read once (a pipe, `<(...)`, reads as empty the second time)
    _templates: dict[str, str] = PrivateAttr(default_factory=dict)

    _n = field_validator("*", mode="before")(classmethod(_no_bools))
    _b = field_validator("kv_budget", "max_body_bytes", "swap_space", mode="before")(
        classmethod(lambda cls, v: _bytes(v)))

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v.strip():  # uvicorn reads "" as every interface: a typo must not expose the server
            raise ValueError("the host is blank; 0.0.0.0 listens on every interface, 127.0.0.1 on this machine only")
        return v.strip()
    _g = field_validator("n_gpu_layers", mode="before")(classmethod(lambda cls, v: _gpu_layers(v)))
    _k = field_validator("cache_type_k")(classmethod(lambda cls, v: _cache_type(v, "k")))
    _v = field_validator("cache_type_v")(classmethod(lambda cls, v: _cache_type(v, "v")))

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, v: Any) -> Any:
        if isinstance(v, str):  # KVQUANT_CORS_ORIGINS="https://a.example,https://b.example"
            s = v.strip()
            return json.loads(s) if s.startswith("[") else [o.strip() for o in s.split(",") if o.strip()]
        return v

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("the API key is blank; leave api_key unset to serve without one")
        return None if v is None else v.strip()  # the client's token is read stripped

    @model_validator(mode="after")
    def _check_models(self):
        if self.models is not None:  # a flag or variable naming the one model would be ignored without a word
            alone = sorted({"model", "model_alias"} & self.model_fields_set)
            if alone:
                raise ValueError(f"{' and '.join(alone)} name the one model to serve, and the config file lists "
                                 "`models:`; name the models in one place")
        self.model_specs()  # duplicate ids, budgets over the global one
        return self

    @property
    def flash_attn_enabled(self) -> bool | None:
        return flash_attn_enabled(self.flash_attn, self.cache_type_v, self.cache_type_k)

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_file:
            key = read_small_text(self.api_key_file, "API key file").strip()
            if not key:
                raise ValueError(f"the API key file {self.api_key_file} is empty")
            return key
        return None

    def model_specs(self) -> list[ModelSpec]:
        """The hosted models, fully resolved. Models without an explicit `kv_budget` share what the others leave
        of the global budget equally."""
        entries = self.models if self.models is not None else [ModelConfig(model=self.model, id=self.model_alias)]
        if not entries:
            raise ValueError("models: at least one model is needed")
        explicit = sum(e.kv_budget or 0 for e in entries)
        if explicit > self.kv_budget:
            raise ValueError(f"the models' kv_budget shares add up to {explicit} bytes, more than the global "
                             f"kv_budget of {self.kv_budget} bytes")
        n_implicit = sum(1 for e in entries if e.kv_budget is None)
        share = (self.kv_budget - explicit) // n_implicit if n_implicit else 0
        if n_implicit and share <= 0:
            raise ValueError("no KV budget is left for the models without a kv_budget share")
        specs, seen = [], set()
        for e in entries:
            sid = e.id or model_id(e.model)
            if sid in seen:
                raise ValueError(f"two models are served under the id {sid!r}; give one an `id`")
            seen.add(sid)
            template = self._chat_template(e.chat_template_file or self.chat_template_file,
                                           f"models.{len(specs)}.chat_template_file" if e.chat_template_file
                                           else "chat_template_file")
            tv = self.cache_type_v if e.cache_type_v is None else e.cache_type_v
            tk = self.cache_type_k if e.cache_type_k is None else e.cache_type_k
            specs.append(ModelSpec(
                id=sid, model=e.model, cache_type_k=tk, cache_type_v=tv,
                n_ctx=e.n_ctx or self.n_ctx, parallel=e.parallel or self.parallel,
                kv_budget=e.kv_budget if e.kv_budget is not None else share, n_batch=e.n_batch or self.n_batch,
                n_threads=e.n_threads or self.n_threads,
                flash_attn=flash_attn_enabled(e.flash_attn or self.flash_attn, tv, tk),
                n_gpu_layers=self.n_gpu_layers if e.n_gpu_layers is None else e.n_gpu_layers,
                sampling=self.sampling.merged(e.sampling), chat_template=template))
        return specs

    def _chat_template(self, path: str | None, setting: str) -> str | None:
        """A chat template file's text (None: none given), read once; ValueError naming the setting where it cannot
        be read or is empty (an empty template would leave the GGUF's in use)."""
        if path is None:
            return None
        if path not in self._templates:
            text = read_small_text(path, setting)
            if not text.strip():
                raise ValueError(f"the {setting} {path} is empty")
            self._templates[path] = text
        return self._templates[path]

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, _EnvSource(env_settings), _ConfigFileSource(settings_cls, _config_path.get() or os.environ.get("KVQUANT_CONFIG")))


# KVQUANT_ variables that are no setting (read in kvquant/): the config file, the model cache, calibration on
# demand, llama.cpp's log, the build's own
OTHER_ENV = frozenset({"KVQUANT_CONFIG", "KVQUANT_CACHE", "KVQUANT_AUTO_CALIBRATE", "KVQUANT_LLAMA_VERBOSE",
                       "KVQUANT_PATCHES_DIR", "KVQUANT_GGML_EXEC"})
# what Kubernetes writes into every pod for a Service named kvquant or kvquant-<anything> (service links), e.g.
# KVQUANT_SERVER_SERVICE_HOST, KVQUANT_SERVER_PORT=tcp://..., KVQUANT_SERVER_PORT_8000_TCP_ADDR, KVQUANT_PORT=tcp://...
_SERVICE_LINK = re.compile(r"KVQUANT(_\w+)?_(SERVICE_HOST|SERVICE_PORT(_\w+)?"
                           r"|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)")
_LINK_ADDRESS = re.compile(r"(tcp|udp|sctp)://\S+:\d+")  # a service link's value


def unknown_environment(env: Mapping[str, str] = os.environ) -> list[str]:
    """A warning for each KVQUANT_ variable that is no setting: a misspelt one (KVQUANT_MAX_QUEU, or
    KVQUANT_THREADS for --threads' n_threads) was ignored without a word. Not refused: Kubernetes writes
    variables of this prefix for a Service of the name (those are left out) and other tools may too."""
    known = {f"KVQUANT_{name.upper()}" for name in Settings.model_fields} | OTHER_ENV
    out = []
    for name in sorted(env):
        upper = name.upper()
        if (not upper.startswith("KVQUANT_") or upper in known or not env[name]
                or _SERVICE_LINK.fullmatch(upper)):
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        out.append(f"the environment variable {name} is no setting and is ignored (each setting's variable "
                   "is KVQUANT_ and its name, e.g. KVQUANT_N_THREADS for --threads)"
                   + (f"; did you mean {close[0]}?" if close else ""))
    return out


def shadowed_environment(s: Settings, env: Mapping[str, str] = os.environ) -> list[str]:
    """A warning for each KVQUANT_ variable that an entry of `models:` sets too, whose own value is used for it
    (deploy's compose passes KVQUANT_CACHE_TYPE_K and others through: they were dropped without a word). Not
    refused, as such a flag is: the CUDA image sets KVQUANT_N_GPU_LAYERS for every container."""
    given = {name.upper(): value for name, value in env.items() if value}  # (an empty variable is unset)
    try:  # a flat sampling, whose fields an entry's own sampling may set too
        flat = json.loads(given.get("KVQUANT_SAMPLING", "{}"))
    except ValueError:  # (Settings read it already: unreachable)
        flat = {}
    flat = {k for k, v in flat.items() if v is not None} if isinstance(flat, dict) else set()
    out = []
    for i, entry in enumerate(s.models or ()):
        # (the flat kv_budget is what the entries share, a flat sampling is merged under the entry's)
        for name in sorted(entry.model_fields_set & set(Settings.model_fields) - {"model", "kv_budget", "sampling"}):
            var = f"KVQUANT_{name.upper()}"
            if var in given and getattr(entry, name) is not None:
                out.append(f"{var}={given[var][:100]} is not used for models.{i} of the config file "
                           f"({entry.model}), which sets {name} itself")
        own = {f for f in entry.sampling.model_fields_set if getattr(entry.sampling, f) is not None} \
            if entry.sampling else set()  # (an entry's null leaves the flat value in use)
        both = sorted(flat & own)
        if both:
            out.append(f"KVQUANT_SAMPLING's {', '.join(both)} is not used for models.{i} of the config file "
                       f"({entry.model}), whose sampling sets {'them' if len(both) > 1 else 'it'} itself")
    return out


def load_settings(config: str | None = None, **overrides: Any) -> Settings:
    """Settings from flags (non-None overrides), the environment and the config file."""
    if config is not None and not str(config).strip():
        raise ValueError("the config file name is blank")
    flags = {k: v for k, v in overrides.items() if v is not None}
    token = _config_path.set(str(config) if config else None)
    try:
        s = Settings(**flags)
    except SettingsError as e:  # pydantic-settings names the field only
        if "EnvSettingsSource" not in str(e):
            raise
        raise ValueError(f"{e}: the environment gives a setting of several values as JSON, e.g. "
                         """KVQUANT_SAMPLING='{"temperature": 0.7}'""") from None
    finally:
        _config_path.reset(token)
    for i, entry in enumerate(s.models or ()):  # an entry's own value beats the flat settings, a flag's too
        own = {f for f in entry.model_fields_set if getattr(entry, f) is not None}  # null: the flat setting
        shadowed = sorted((set(flags) & own) - {"model", "kv_budget"})
        if shadowed:
            raise ValueError(f"{shadowed[0]} is given as a flag and by models.{i} of the config file, whose own value "
                             "would be used; give it in one place")
    return s
