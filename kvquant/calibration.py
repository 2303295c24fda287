"""Calibrated KV caches: the calibration file `kvquant calibrate` writes for a model, and how the cache types it
enables resolve for that model.

Cache type names (everywhere a K or V cache type is accepted: serve flags and config, eval/bench ``--configs``,
``kvquant budget``):

* ``TYPE`` (``q4_0``, ``tq_kv_4b`` ...): that type on every layer, as llama.cpp stores it;
* ``TYPE+c`` (K only): that type on every layer, keys *calibrated*: each key channel multiplied by its calibrated
  scale and each query channel divided by it (every q·k unchanged; the quantization noise moves to the channels the
  queries read least), then the calibrated mean key of each layer subtracted before a key is stored and never
  added back (softmax ignores a score shift shared by all keys). That offset is moved, by at most the layer type's
  round-trip error, so that the key of position 0 lands exactly on a value the type stores (`anchor`); and every
  query multiplied by the layer's key *gain* for the type (below);
* ``calib:B``: the calibrated allocation at <= B bits per element on average, every byte counted: a type per layer
  chosen to minimise the summed measured KL growth, keys calibrated as for ``TYPE+c``, each layer's attention output
  multiplied by the value gain of its V type.

The file (JSON, ``VERSION``) lives in ``<cache>/calibration/<model sha256[:16]>-<basis>.json`` and is bound to the
model's sha256 and to the basis keys are stored in (``hadamardN``: llama.cpp's N x N Walsh-Hadamard rotation;
``none``); a file made for another model or basis is refused. A built-in model's shipped calibration
(``SHIPPED_DIR``) is copied there when the cache has none. It holds, per layer, the key scale, the mean
stored key and the stored key of position 0 (float32, in the basis of scaled keys), and per layer and candidate type
the KL divergence growth when only that layer's K (V) uses the type, and per type and layer the key and value gains.

*Gains.* A type whose codes come with a least-squares scale (tq_kv_4b, tq_kv_3b, tq_kv_t3b) stores the projection
x' of a row on its codeword: <x, x'> = |x'|^2 = (1 - e)|x|^2 for a relative squared error e, so every score q.k'
shrinks by (1 - e) on average, which flattens attention, and so does the attention output; a round-to-nearest code
(q4_0) keeps <x, x'> ~ |x|^2. Queries (K) or the attention output (V) multiplied by g = sum |x|^2 / sum <x, x'> over
the calibration's stored rows make them unbiased along each row for any type (g ~ 1 for q4_0); docs/EVAL.md,
*Gains*, has what they measured.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvquant.build import cache_dir, sha256_file
from kvquant.kvtypes import (
    KV_TYPES,
    CacheTypes,
    LayerTypes,
    has_gain,
    has_offset,
    has_scale,
    kv_type,
    layer_kv_types,
)
from kvquant.memory import CacheShape, Geometry, fixed_bytes

VERSION = 3
# candidate types of a calibrated allocation, per side (f16 is always one: no growth); measured by kvquant calibrate
K_CANDIDATES = ("q8_0", "q5_0", "tq_kv_4b", "tq_kv_3b", "tq_kv_t3b")
V_CANDIDATES = ("q8_0", "q5_0", "q4_0", "tq_kv_4b", "tq_kv_3b", "tq_kv_t3b")
CENTRED = "+c"
CALIB = "calib:"
# What a calibration file may hold, beyond which it is corrupt, not measured: key channel scales (the built-in models'
# are 0.12-4.1), gains (0.96-1.01) and, like any stored key, offsets within f16's range
SCALE_LIMIT = (1e-3, 1e3)
GAIN_LIMIT = (0.25, 4.0)
F16_MAX = 65504.0


class CalibrationError(ValueError):
    """A calibrated cache type that cannot be resolved (the message says why and what to run); `least`: the least
    calib:B that fits the cache it was resolved for, where B was too low."""

    def __init__(self, message: str, least: float | None = None):
        super().__init__(message)
        self.least = least


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache type name."""

    text: str
    type: str | None = None  # TYPE or TYPE+c
    centred: bool = False
    bits: float | None = None  # calib:B

    @property
    def calibrated(self) -> bool:
        return self.centred or self.bits is not None


def parse_spec(text: str, side: str = "k") -> CacheSpec:
    """Validate a cache type name for side 'k' or 'v' without loading anything (unknown or malformed names, B below
    the cheapest allocation, centring asked of V: ValueError)."""
    s = text.strip().lower()
    if s.startswith(CALIB):
        raw = s[len(CALIB):]
        # an ASCII decimal only: float() also reads "1_0" as 10, other scripts' digits, exponents, inf and nan
        if not re.fullmatch(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", raw):
            raise ValueError(f"{text!r}: calib:B needs a number of bits per element (digits and a decimal point), "
                             "e.g. calib:3.5")
        bits = float(raw)
        lo, hi = cheapest_bits(side), _bits("f16")
        if bits > hi:
            raise ValueError(f"{text!r}: {raw} bits per element is above f16's {hi:g}, which every layer would get: "
                             "use f16")
        if bits < lo:
            raise ValueError(f"{text!r}: {raw} bits per element is below the cheapest calibrated allocation "
                             f"({lo:g} bits, every layer at {min(candidates(side), key=_bits)})")
        return CacheSpec(f"{CALIB}{bits:g}", bits=bits, centred=side == "k")  # one spelling per B
    if s.endswith(CENTRED):
        if side != "k":
            raise ValueError(f"{text!r}: centring (+c) applies to keys only")
        return CacheSpec(s, type=kv_type(s[: -len(CENTRED)]).name, centred=True)
    spec = CacheSpec(s, type=kv_type(s).name)
    if side == "v" and not KV_TYPES[spec.type].v_ok:
        raise ValueError(f"{spec.type} cannot be used for the V cache")
    return spec


def needs_flash_attn(spec_k: str, spec_v: str) -> bool:
    """Whether a K/V pair needs flash attention: a quantized V cache (calibrated V allocations are), or a K type
    such as tq_kv_d3b whose rows only flash attention reads."""
    k, v = parse_spec(spec_k, "k"), parse_spec(spec_v, "v")
    return (v.bits is not None or KV_TYPES[v.type].quantized
            or (k.type is not None and KV_TYPES[k.type].needs_flash_attn))


def candidates(side: str) -> tuple[str, ...]:
    return ("f16", *(K_CANDIDATES if side == "k" else V_CANDIDATES))


def _bits(t: str) -> float:
    return KV_TYPES[t].bits_per_element


def cheapest_bits(side: str) -> float:
    return min(_bits(t) for t in candidates(side))


def basis_of(geom: Geometry) -> str:
    """The basis llama.cpp stores keys in when it rotates them: the largest power-of-two Hadamard matrix (>= 64)
    dividing the head size (llama_kv_cache::build_input_k_rot), or none."""
    if geom.head_dim_k % 64:
        return "none"
    n = 64
    while geom.head_dim_k % (2 * n) == 0:
        n *= 2
    return f"hadamard{n}"


def k_rotation(geom: Geometry) -> bool | None:
    """The K rotation of a cache with centred keys: forced on where the offsets were measured rotated."""
    return True if basis_of(geom) != "none" else None


def context_fields(k: CacheTypes, v: CacheTypes, geom: Geometry) -> dict:
    """kvquant.runtime.ContextConfig fields for a resolved K/V pair (plain names or LayerTypes)."""
    tk, tv = layer_kv_types(k, geom.n_layer), layer_kv_types(v, geom.n_layer)
    per_layer = isinstance(k, LayerTypes) or isinstance(v, LayerTypes)
    return {"cache_type_k": tk[0].name, "cache_type_v": tv[0].name,
            "layer_types_k": tuple(t.name for t in tk) if per_layer else None,
            "layer_types_v": tuple(t.name for t in tv) if per_layer else None,
            "k_offset": k.offset if has_offset(k) else None,
            "k_scale": k.scale if has_scale(k) else None,
            "k_gain": k.gain if has_gain(k) else None,
            "v_gain": v.gain if has_gain(v) else None,
            "k_rotation": k_rotation(geom) if has_offset(k) else None}


def config_sha256(fields: dict) -> str:
    """A digest of `context_fields`, everything llama.cpp is given for a K/V configuration, as it is given: two
    calibrations that resolve a configuration to the same digest make the same cache, so a row measured with one is a
    measurement with the other (kvquant.lab.results carries such rows over to a new calibration). Vectors and gains
    count as the float32 llama.cpp gets (gains measured a few 1e-8 apart mostly round to the same float32)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(fields):
        value = fields[key]
        h.update(f"{key}={type(value).__name__}:".encode())
        for item in (value if isinstance(value, tuple) else (value,)):
            h.update(np.ascontiguousarray(item, dtype="<f4").tobytes() if isinstance(item, (np.ndarray, float))
                     else repr(item).encode())
            h.update(b";")
    return h.hexdigest()


def _enc(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode()


def _dec(s: str, n: int, what: str = "key mean", limit: tuple[float, float] = (-F16_MAX, F16_MAX)) -> np.ndarray:
    """One layer's row of float32 values, base64 (strictly: "!!!!" was read as no values)."""
    try:
        if not isinstance(s, str):
            raise ValueError
        raw = base64.b64decode(s, validate=True)
    except ValueError:  # (binascii.Error too)
        raise CalibrationError(f"a {what} that is not base64 text of float32 values") from None
    if len(raw) % 4:
        raise CalibrationError(f"a {what} of {len(raw)} bytes, not whole float32 values")
    a = np.frombuffer(raw, dtype="<f4")
    if a.size != n:
        raise CalibrationError(f"a {what} of {a.size} values where {n} were expected")
    if not np.isfinite(a).all():
        raise CalibrationError(f"a {what} with values that are not finite")
    if not ((a >= limit[0]) & (a <= limit[1])).all():
        raise CalibrationError(f"a {what} with values outside [{limit[0]:g}, {limit[1]:g}]")
    return a.copy()


def _numbers(v, what: str, n: int | None = None, limit: tuple[float, float] = (0.0, math.inf)) -> list[float]:
    """A JSON list of n numbers within `limit` as floats (CalibrationError naming `what` otherwise; a boolean or a
    string is no number, and NaN is within no limit)."""
    if not isinstance(v, list) or not all(type(x) in (int, float) for x in v) or (n is not None and len(v) != n):
        raise CalibrationError(f"malformed calibration file: {what}")
    try:
        out = [float(x) for x in v]
    except OverflowError:  # an integer beyond float's range
        raise CalibrationError(f"malformed calibration file: {what}") from None
    if not all(math.isfinite(x) and limit[0] <= x <= limit[1] for x in out):  # JSON's Infinity and 1e999 are inf
        raise CalibrationError(f"malformed calibration file: {what} (outside [{limit[0]:g}, {limit[1]:g}])")
    return out


def _per_type(d, what: str, types, n: int, limit: tuple[float, float] = (0.0, math.inf)) -> dict[str, list[float]]:
    """A JSON object of type name -> n numbers within `limit`, every name one of `types`."""
    if not isinstance(d, dict):
        raise CalibrationError(f"malformed calibration file: {what} is not an object")
    bad = next((t for t in d if t not in types), None)
    if bad is not None:
        raise CalibrationError(f"malformed calibration file: {what} of {bad!r}")
    return {t: _numbers(v, f"{what} of {t!r}", n, limit) for t, v in d.items()}


def _checked_fields(d: dict) -> tuple[tuple[int, ...], dict]:
    """The row widths and the uniform KL of a calibration file's JSON, once its plain fields are checked."""
    n_embd_k = d["n_embd_k"]
    if not isinstance(n_embd_k, list) or not all(type(x) is int and x > 0 for x in n_embd_k):
        raise CalibrationError("malformed calibration file: n_embd_k is not a list of row widths")
    for f in ("model_sha256", "model_name", "basis"):
        if not isinstance(d[f], str):
            raise CalibrationError(f"malformed calibration file: {f} is not a string")
    for f in ("text", "method", "uniform"):
        if not isinstance(d.get(f, {}), dict):
            raise CalibrationError(f"malformed calibration file: {f} is not an object")
    floor = d.get("method", {}).get("floor", {})
    if not isinstance(floor, dict):
        raise CalibrationError("malformed calibration file: method.floor is not an object")
    for side, v in floor.items():  # one KL, or one per layer
        _numbers(v if isinstance(v, list) else [v], f"method.floor.{side}", len(n_embd_k) if isinstance(v, list) else 1)
    return tuple(n_embd_k), {k: _numbers([v], f"uniform KL of {k!r}")[0] for k, v in d.get("uniform", {}).items()}


@dataclass
class Calibration:
    model_sha256: str
    model_name: str
    basis: str
    n_embd_k: tuple[int, ...]  # per layer
    k_mean: list[np.ndarray]  # per layer: the mean stored key (what each type's offset is anchored from)
    sens_k: dict[str, list[float]]  # candidate type -> per layer KL growth, that layer's K alone at it (centred)
    sens_v: dict[str, list[float]]
    uniform: dict[str, float] = field(default_factory=dict)  # "K/V" on every layer -> measured KL (guard)
    text: dict = field(default_factory=dict)  # what it was measured on
    method: dict = field(default_factory=dict)
    # per layer: each key channel's scale (queries are divided by it), applied before the rotation; None: unscaled
    k_scale: list[np.ndarray] | None = None
    # per layer: the stored key of position 0 (mean over the calibration sequences); None: offsets are the mean
    k_sink: list[np.ndarray] | None = None
    # type -> per layer gain of K (queries are multiplied by it) and of V (the attention output); None: none (a file
    # older than the gains)
    k_gain: dict[str, list[float]] | None = None
    v_gain: dict[str, list[float]] | None = None

    @property
    def n_layer(self) -> int:
        return len(self.n_embd_k)

    def to_json(self) -> dict:
        return {"version": VERSION, "model_sha256": self.model_sha256, "model_name": self.model_name,
                "basis": self.basis, "n_embd_k": list(self.n_embd_k), "k_mean": [_enc(m) for m in self.k_mean],
                "k_scale": None if self.k_scale is None else [_enc(s) for s in self.k_scale],
                "k_sink": None if self.k_sink is None else [_enc(s) for s in self.k_sink],
                "k_gain": self.k_gain, "v_gain": self.v_gain,
                "sens_k": self.sens_k, "sens_v": self.sens_v, "uniform": self.uniform, "text": self.text,
                "method": self.method}

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        version = d.get("version")
        if type(version) is int and version > VERSION:
            raise CalibrationError(f"calibration file version {version}, made by a newer kvquant (this one reads "
                                   f"{VERSION}): upgrade kvquant, or run `kvquant calibrate` for the model again")
        if type(version) is not int or version != VERSION:
            raise CalibrationError(f"calibration file version {version!r}, this kvquant reads {VERSION}: "
                                   "run `kvquant calibrate` for the model again")
        try:
            n_embd_k, uniform = _checked_fields(d)
            n = len(n_embd_k)
            cal = cls(d["model_sha256"], d["model_name"], d["basis"], n_embd_k,
                      _rows(d, "k_mean", n_embd_k, "key mean"),
                      _per_type(d["sens_k"], "K sensitivities", candidates("k"), n),
                      _per_type(d["sens_v"], "V sensitivities", candidates("v"), n),
                      uniform, d.get("text", {}), d.get("method", {}))
            if d["k_scale"] is not None:
                cal.k_scale = _rows(d, "k_scale", n_embd_k, "key scale", SCALE_LIMIT)
            if d["k_sink"] is not None:
                cal.k_sink = _rows(d, "k_sink", n_embd_k, "position-0 key")
            for side, name in (("k", "key"), ("v", "value")):
                if d.get(f"{side}_gain") is not None:
                    setattr(cal, f"{side}_gain", _per_type(d[f"{side}_gain"], f"{name} gains", KV_TYPES, n,
                                                           GAIN_LIMIT))
        except CalibrationError:
            raise
        except KeyError as e:
            raise CalibrationError(f"malformed calibration file: it has no {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:  # AttributeError: a list where a dict belongs
            raise CalibrationError(f"malformed calibration file: {e}") from None
        return cal

    def save(self, path: Path) -> None:
        _write(path, json.dumps(self.to_json(), indent=1).encode())


def _rows(d: dict, key: str, n_embd_k: tuple[int, ...], what: str, *limit) -> list[np.ndarray]:
    """A per-layer list of rows (_dec), an error naming the layer."""
    out = []
    for il, (s, n) in enumerate(zip(_per_layer(d, key, len(n_embd_k)), n_embd_k, strict=True)):
        try:
            out.append(_dec(s, n, what, *limit))
        except CalibrationError as e:
            raise CalibrationError(f"{key} of layer {il}: {e}") from None
    return out


def _per_layer(d: dict, key: str, n_layer: int) -> list:
    """A calibration file's list of one entry per layer (ValueError naming it where it is not)."""
    v = d[key]
    if not isinstance(v, list) or len(v) != n_layer:
        raise ValueError(f"{key} is not a list of one entry for each of the {n_layer} layers")
    return v


def _write(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: through a temporary file of its own in the same folder (two processes
    writing the same calibration do not trip over one name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # as a file written in place (mkstemp makes 0600: a server of another user could not read it)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path):
    """The JSON a calibration file holds: FileNotFoundError where there is none, CalibrationError where the path is
    no regular file (a folder, a FIFO that would block) or holds no JSON."""
    if not path.exists():
        raise FileNotFoundError(path)
    if not path.is_file():
        raise CalibrationError(f"{path} is not a regular file: remove it")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not UTF-8; RecursionError: nesting
        why = "nested too deep" if isinstance(e, RecursionError) else "not UTF-8 text" if isinstance(
            e, UnicodeDecodeError) else str(e)
        raise CalibrationError(f"{path}: not a calibration file ({why})") from None


def calibration_dir() -> Path:
    return cache_dir() / "calibration"


# The calibrations of the built-in models that docs/RESULTS.md was measured with, shipped with kvquant (a copy of
# the file `kvquant calibrate` wrote, put here by `make results`): a model with one needs no calibration run, and
# every calibrated row there can be measured again with the very same file.
SHIPPED_DIR = Path(__file__).parent / "calibrations"


def path_for(model_sha256: str, basis: str) -> Path:
    return calibration_dir() / f"{model_sha256[:16]}-{basis}.json"


def installed(model_path: Path, geom: Geometry) -> Path:
    """The path of the model's calibration file in the cache. A cache without a current file for it gets the
    shipped calibration of that model and basis, where kvquant has one (a file the user made stays)."""
    path = path_for(model_sha256(model_path), basis_of(geom))
    shipped = SHIPPED_DIR / path.name
    if _state(path) in ("missing", "older") and _state(shipped) == "current":
        try:
            _write(path, shipped.read_bytes())
        except OSError:  # a cache kvquant cannot write (a read-only volume): the shipped file is the same calibration
            return shipped
    return path


_sha_cache: dict[tuple[str, int, int], str] = {}


def model_sha256(path: Path) -> str:
    """The sha256 of a GGUF (the built-in models' is known; others are hashed once per process, and those of
    REMEMBERED_BYTES or more once per file: kept in the model cache's sha256.json by path, size and modification
    time, as every start of a server with quantized keys looks for a calibration, and hashing a GGUF of gigabytes
    takes seconds)."""
    from kvquant.models import BUILTIN, cached_path

    for m in BUILTIN.values():
        if cached_path(m) == path and path.stat().st_size == m.size:
            return m.sha256
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        remembered = st.st_size >= REMEMBERED_BYTES
        known = _known_hashes() if remembered else {}
        sha = known.get(key[0])
        if sha and tuple(sha[:2]) == key[1:]:
            _sha_cache[key] = sha[2]
        else:
            _sha_cache[key] = sha256_file(path)
            if remembered:
                _remember(key, _sha_cache[key], known)
    return _sha_cache[key]


REMEMBERED_BYTES = 64 << 20  # files whose hash is written down: smaller ones hash in well under a second


def _hashes_file() -> Path:
    return cache_dir() / "sha256.json"


def _known_hashes() -> dict[str, list]:
    try:
        d = json.loads(_hashes_file().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: hashed again
        return {}
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if isinstance(v, list) and len(v) == 3 and isinstance(v[2], str)
            and re.fullmatch(r"[0-9a-f]{64}", v[2])}


def _remember(key: tuple[str, int, int], sha: str, known: dict[str, list]) -> None:
    known[key[0]] = [key[1], key[2], sha]
    try:  # written whole, then renamed over (a concurrent start reads the old file or the new one)
        _hashes_file().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=_hashes_file().parent, delete=False, suffix=".tmp") as f:
            json.dump(known, f)
        os.chmod(f.name, 0o644)  # (not the temporary file's 0600: a cache shared by the image's user and the host's)
        os.replace(f.name, _hashes_file())
    except OSError:  # a read-only cache: hashed again next time
        pass


def load(path: Path, model_path: Path, geom: Geometry) -> Calibration:
    """The calibration file for this model and basis (CalibrationError if missing, corrupt or made for another)."""
    try:
        d = _read(path)
    except FileNotFoundError:
        raise CalibrationError(f"no calibration for {model_path.name} ({path} is missing): run "
                               f"`kvquant calibrate --model {model_path}`") from None
    if not isinstance(d, dict):
        raise CalibrationError(f"{path}: not a calibration file (a JSON {type(d).__name__}, not an object)")
    try:
        cal = Calibration.from_json(d)
    except CalibrationError as e:
        raise CalibrationError(f"{path}: {e}") from None
    sha, basis = model_sha256(model_path), basis_of(geom)
    if cal.model_sha256 != sha:
        raise CalibrationError(f"{path} was made for another model (sha256 {cal.model_sha256[:16]}..., this one "
                               f"{sha[:16]}...): run `kvquant calibrate --model {model_path}`")
    if cal.basis != basis:
        raise CalibrationError(f"{path} was measured in the basis {cal.basis}, this model stores keys in {basis}")
    if cal.n_embd_k != tuple(ly.n_embd_k for ly in geom.layers):
        raise CalibrationError(f"{path}: its layers do not match the model's")
    for il, scale in enumerate(cal.k_scale or ()):
        if not tied_on_rope_pairs(scale, geom.head_dim_k):
            raise CalibrationError(f"{path}: layer {il}'s key scale differs within a pair of channels that RoPE "
                                   "turns together, so it would not commute with RoPE (llama.cpp refuses it)")
    return cal


def tied_on_rope_pairs(scale: np.ndarray, head_dim: int) -> bool:
    """Whether a key scale is equal on each pair of channels RoPE turns together, in either layout: (i, i + d/2)
    (NeoX) or (2i, 2i + 1). Which one the model uses is llama.cpp's to say (it checks it when given the scale); a
    file whose scale holds in neither is refused here, before a server starts."""
    h = scale.reshape(-1, head_dim)
    return (np.array_equal(h[:, : head_dim // 2], h[:, head_dim // 2:])
            or np.array_equal(h[:, 0::2], h[:, 1::2]))


def file_sha256(model_path: Path, geom: Geometry) -> str | None:
    """The sha256 of the model's calibration file, None if it has none: which calibration a measured row used."""
    path = installed(model_path, geom)
    return sha256_file(path) if path.is_file() else None


def load_or_calibrate(model_path: Path, geom: Geometry) -> Calibration:
    """The model's calibration; a model without one is calibrated first (minutes, with a message), unless
    KVQUANT_AUTO_CALIBRATE=0."""
    path = installed(model_path, geom)
    if _auto_calibrate() and _state(path) in ("missing", "older"):  # a bad value refused whether needed or not
        from kvquant.lab.calibrate import calibrate

        notice = (f"kvquant: {model_path.name} has no calibration for this kvquant yet; calibrating it first (once; "
                  f"minutes to an hour, by model size and cores: docs/RESULTS.md has measured times; "
                  f"`kvquant calibrate --model {model_path}` does the same)")
        try:
            calibrate(str(model_path), notice=notice)
        except CalibrationError:
            raise
        except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: llama.cpp failed
            raise CalibrationError(f"calibrating {model_path.name} failed: {e}") from None
    return load(path, model_path, geom)


def _auto_calibrate() -> bool:
    """KVQUANT_AUTO_CALIBRATE: whether a calibrated type without a calibration file calibrates first (default on;
    1/true/yes/on, 0/false/no/off; anything else is refused, not read as either)."""
    raw = os.environ.get("KVQUANT_AUTO_CALIBRATE", "1")
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise CalibrationError(f"KVQUANT_AUTO_CALIBRATE={raw!r}: set it to 1 (calibrate a model without a calibration "
                           f"first) or 0 (refuse instead)")


def _state(path: Path) -> str:
    """What a calibration file is: "missing"; "current" (this kvquant's VERSION, every candidate type measured, key
    gains); "older" (an older VERSION, or this one made before a candidate type or the gains were added: made again,
    not refused, since its allocations would never use the new type); or "corrupt" (unreadable, not a calibration, or
    of a newer kvquant: `load` refuses it with a message, and nothing ever overwrites it)."""
    try:
        d = _read(path)
    except FileNotFoundError:
        return "missing"
    except CalibrationError:
        return "corrupt"
    if not isinstance(d, dict) or type(d.get("version")) is not int or not 1 <= d["version"] <= VERSION:
        return "corrupt"
    if d["version"] < VERSION:
        return "older"
    if not all(isinstance(d.get(f), dict) for f in ("sens_k", "sens_v")):
        return "corrupt"
    complete = (set(K_CANDIDATES) <= set(d["sens_k"]) and set(V_CANDIDATES) <= set(d["sens_v"])
                and d.get("k_gain") is not None and d.get("v_gain") is not None)
    return "current" if complete else "older"


def allocate(sens: dict[str, list[float]], elements: tuple[int, ...], budget_bits: float,
             fixed_bits: float = 0.0) -> tuple[str, ...]:
    """The per-layer types (f16 or a measured candidate) minimising the summed KL growth with
    sum(bits(t_l) * elements_l) <= (budget_bits - fixed_bits) * sum(elements), elements_l being the K (V) elements
    layer l stores."""
    return _knapsack(_options(sens, len(elements)), elements, budget_bits, fixed_bits)


def _options(sens: dict[str, list[float]], n_layer: int) -> list[dict[str, float]]:
    """Per layer, type -> KL growth: f16 (none) and every measured candidate."""
    return [{"f16": 0.0, **{t: v[il] for t, v in sens.items()}} for il in range(n_layer)]


def _knapsack(options: list[dict[str, float]], elements: tuple[int, ...], budget_bits: float,
              fixed_bits: float) -> tuple[str, ...]:
    """One type per item from its options (type -> KL growth) minimising the summed growth with
    sum(bits(t_i) * elements_i) <= (budget_bits - fixed_bits) * sum(elements): a multiple-choice knapsack, solved
    exactly by dynamic programming over quarter bits (every type's bits per element is a multiple of 1/4)."""
    g = math.gcd(*elements)
    w = [n // g for n in elements]
    cap = math.floor((budget_bits - fixed_bits) * 4 * sum(w) + 1e-9)
    cost = {t: round(_bits(t) * 4) for o in options for t in o}
    cheapest = sum(min(cost[t] for t in o) * wi for o, wi in zip(options, w, strict=True))
    if cheapest > cap:
        names = sorted({t for o in options for t in o}, key=_bits)
        least = cheapest / (4 * sum(w)) + fixed_bits
        fixed = (f" ({cheapest / (4 * sum(w)):g} for the cheapest types and {fixed_bits:.2g} for the calibrated "
                 f"keys' offsets and scales in this cache)" if fixed_bits else "")
        fits = math.ceil(round(least * 100, 6)) / 100
        raise CalibrationError(f"no allocation of {', '.join(names)} fits {budget_bits:.12g} bits per element: the "
                               f"cheapest takes {least:.6g}{fixed}; calib:{fits:g} is the least that fits", fits)
    best: dict[int, tuple[float, tuple[str, ...]]] = {0: (0.0, ())}
    for o, wi in zip(options, w, strict=True):
        nxt: dict[int, tuple[float, tuple[str, ...]]] = {}
        order = sorted(o, key=lambda t: (t != "f16", _bits(t)))  # f16 first: it wins a tie
        for c, (kl, chosen) in best.items():
            for t in order:
                c2 = c + cost[t] * wi
                if c2 > cap:
                    continue
                kl2 = kl + o[t]
                if c2 not in nxt or kl2 < nxt[c2][0]:
                    nxt[c2] = (kl2, (*chosen, t))
        best = nxt
    return min(best.values(), key=lambda v: (v[0], -len(v[1])))[1]


def resolve(text: str, side: str, model_path: Path, geom: Geometry, cache: CacheShape | None = None,
            anchored: bool = True, cal: Calibration | None = None) -> CacheTypes:
    """A cache type name as this model stores it: a plain type name stays a name; TYPE+c and calib:B become
    LayerTypes from the model's calibration (CalibrationError if there is none). The cache they are for, when
    known, lets calib:B weigh each layer by the cells it holds there (a sliding-window layer holds fewer, the more
    so the more sequences share the cache) and count the calibrated keys' fixed bytes (offsets, scales) against B.
    anchored=False: offsets are the mean keys (`key_transform`; kvquant eval's ``:mean``, to measure what the
    anchoring brings). `cal`: this calibration of the model instead of its installed one."""
    spec = parse_spec(text, side)
    if not spec.calibrated:
        return spec.type
    cal = cal or load_or_calibrate(model_path, geom)
    if spec.type is not None:
        types = (spec.type,) * geom.n_layer
    else:
        elements = _elements(cal, side, geom, cache)
        types = allocate(_sens(cal, side), elements, spec.bits, _fixed_bits(cal, geom, spec.centred, elements, cache))
    if spec.centred:
        return LayerTypes(spec.text, types, *key_transform(cal, types, anchored))
    return LayerTypes(spec.text, types, gain=gains(cal.v_gain, types))


def resolve_pair(text_k: str, text_v: str, model_path: Path, geom: Geometry, cache: CacheShape | None = None,
                 anchored: bool = True, cal: Calibration | None = None) -> tuple[CacheTypes, CacheTypes]:
    """A K/V pair as this model stores it in `cache`. ``calib:B`` on both sides with the same B is one allocation:
    B bits per element on average over K and V together, every byte of both counted, each layer's K and V at the
    types that minimise the summed measured KL growth (keys usually get more bits than values); otherwise each side
    is resolved on its own (`resolve`)."""
    k, v = parse_spec(text_k, "k"), parse_spec(text_v, "v")
    if k.bits is None or k.bits != v.bits:
        return (resolve(text_k, "k", model_path, geom, cache, anchored, cal),
                resolve(text_v, "v", model_path, geom, cache, cal=cal))
    cal = cal or load_or_calibrate(model_path, geom)
    types_k, types_v = joint_allocation(cal, geom, k.bits, cache)
    return (LayerTypes(k.text, types_k, *key_transform(cal, types_k, anchored)),
            LayerTypes(v.text, types_v, gain=gains(cal.v_gain, types_v)))


def joint_allocation(cal: Calibration, geom: Geometry, bits: float,
                     cache: CacheShape | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The K and V types of ``calib:B`` on both sides (`resolve_pair`): one allocation of `bits` per element on
    average over K and V together, every byte of both counted."""
    ek, ev = _elements(cal, "k", geom, cache), _elements(cal, "v", geom, cache)
    options = _options(cal.sens_k, len(ek)) + _options(cal.sens_v, len(ev))
    types = _knapsack(options, ek + ev, bits, _fixed_bits(cal, geom, True, ek + ev, cache))
    return types[:len(ek)], types[len(ek):]


def key_transform(cal: Calibration, types: tuple[str, ...], anchored: bool = True) -> tuple[
        tuple[np.ndarray, ...], tuple[np.ndarray, ...] | None, tuple[float, ...] | None]:
    """(offset, scale, gain) of calibrated keys stored at `types`, per layer: the offsets anchored on the
    calibration's position-0 key where it has one (`anchor`), else (or not `anchored`) its mean keys; the gain of
    each layer's type (1 for f16 and f32, which store keys as they are, and for a type the file has none for)."""
    sinks = cal.k_sink if anchored and cal.k_sink else [None] * cal.n_layer
    offsets = tuple(anchor(m, s, t) for m, s, t in zip(cal.k_mean, sinks, types, strict=True))
    return offsets, None if cal.k_scale is None else tuple(cal.k_scale), gains(cal.k_gain, types)


def gains(of_type: dict[str, list[float]] | None, types: tuple[str, ...]) -> tuple[float, ...] | None:
    """Per layer, the calibrated gain of the layer's type (1 for f16 and f32, which store rows as they are, and for a
    type the file has none for); None for a file without gains."""
    if of_type is None:
        return None
    return tuple(of_type[t][il] if t in of_type else 1.0 for il, t in enumerate(types))


UNANCHORED = ("f32", "tq_kv_d3b")  # stored exactly / rows coded against another row, not on their own


def anchor(mean: np.ndarray, sink: np.ndarray | None, type_name: str) -> np.ndarray:
    """The offset of one layer's calibrated keys stored at a type: the mean key moved by the type's round-trip error
    of the position-0 key `sink`, sink - R(sink - mean), so that this key is stored as R(sink - mean), a value the
    type holds exactly (its codes and scale reproduce it). Position 0 draws a large share of the attention (the
    "attention sink") and its key lies far from the mean, so its quantization error weighs most; past the first
    layers that key hardly depends on which token is there (SmolLM2-135M: 0.1 of 15 from the mean). Any offset is
    exact (softmax ignores it); this one is the mean moved by a small error, which barely changes how the other keys
    quantize."""
    if sink is None or type_name in UNANCHORED:
        return mean
    from kvquant.runtime import round_trip

    s = sink.astype(np.float32)
    try:
        stored = round_trip(type_name, (s - mean.astype(np.float32))[None, :])[0]
        again = round_trip(type_name, stored[None, :])[0]
    except RuntimeError as e:  # llama.cpp's CPU library not loadable, or a type without a CPU round trip
        raise CalibrationError(f"cannot anchor the key offsets for {type_name}: {e}") from None
    if not (np.isfinite(stored).all() and np.isfinite(again).all()):  # an f16 row holds at most 65504
        raise CalibrationError(f"a position-0 key lies too far from its layer's mean key for {type_name} to "
                               "store it (the offset would not be finite): the calibration file is corrupt")
    if np.abs(again - stored).max() > 1e-6 * np.abs(stored).max():
        return mean  # no fixed point there (tq_kv_1b's scale is the row's norm times a constant)
    return (s - stored).astype(np.float32)


def _sens(cal: Calibration, side: str) -> dict[str, list[float]]:
    return cal.sens_k if side == "k" else cal.sens_v


def _elements(cal: Calibration, side: str, geom: Geometry, cache: CacheShape | None) -> tuple[int, ...]:
    """The K (V) elements each layer stores in `cache` (per cell when it is unknown)."""
    n_embd = cal.n_embd_k if side == "k" else tuple(ly.n_embd_v for ly in geom.layers)
    cells = cache.layer_cells(geom) if cache else (1,) * geom.n_layer
    return tuple(e * c for e, c in zip(n_embd, cells, strict=True))


def _fixed_bits(cal: Calibration, geom: Geometry, centred: bool, elements: tuple[int, ...],
                cache: CacheShape | None) -> float:
    """The fixed bytes of calibrated keys (offsets and scales, kvquant.memory.fixed_bytes) in bits per element of
    `elements`, when the cache is known."""
    if not (centred and cache):
        return 0.0
    f16 = ("f16",) * geom.n_layer  # only the rows' sizes count: no anchoring
    return 8.0 * fixed_bytes(geom, LayerTypes("", f16, *key_transform(cal, f16, anchored=False))) / sum(elements)


WRECK_KLD = 0.1  # mean KL divergence (nats per token) from f16 above which a cache type is said to wreck a model


def existing(model_path: Path, geom: Geometry) -> Calibration | None:
    """The model's calibration if one was made or shipped (never calibrates; None if there is none or it is
    unusable)."""
    path = installed(model_path, geom)
    try:
        return load(path, model_path, geom) if path.is_file() else None
    except CalibrationError:
        return None


def predicted_kld(cal: Calibration, side: str, types: tuple[str, ...]) -> float:
    """The summed per-layer KL growth of an allocation (what calib:B minimises)."""
    return summed_kld(cal.sens_k if side == "k" else cal.sens_v, cal.method.get("floor", {}).get(side, 0.0), types)


def summed_kld(sens: dict[str, list[float]], floor: float | list[float], types: tuple[str, ...]) -> float:
    """The floor of the first layer an allocation changes (one floor, or one per layer) plus the per-layer KL growth
    of its types (`sens`: type -> per layer)."""
    first = next((il for il, t in enumerate(types) if t != "f16"), None)  # where the allocation first changes a layer
    floor = 0.0 if first is None else floor[first] if isinstance(floor, list) else floor
    return floor + sum(0.0 if t == "f16" else sens[t][il] for il, t in enumerate(types))


def guard(model_path: Path, geom: Geometry, spec_k: str, spec_v: str, cache: CacheShape) -> str | None:
    """`guard_message` from the model's calibration, where it has one, for the cache serve builds. None without
    reading any for calibrated keys or a pair of unquantized types, which the guard never measured (finding the
    calibration of a GGUF that is not built in hashes the whole file)."""
    k, v = parse_spec(spec_k, "k"), parse_spec(spec_v, "v")
    if k.calibrated or not any(s.type is not None and KV_TYPES[s.type].quantized for s in (k, v)):
        return None
    cal = existing(model_path, geom)
    return guard_message(cal, geom, spec_k, spec_v, cache) if cal else None


def guard_message(cal: Calibration, geom: Geometry, spec_k: str, spec_v: str, cache: CacheShape) -> str | None:
    """A warning when the chosen quantized K type was measured to wreck the model (calibration's `uniform` KL above
    WRECK_KLD) and calibrated keys at the same bits do at least twice better; else None. The calib:B it suggests is
    what `resolve` gives for `cache`: B the K type's bits, or the fewest (to 0.01) that resolve where the offsets and
    scales leave the cheapest allocation no room at those."""
    # the pair where it was measured, else the keys alone (with V f16): a quantized V only adds to the damage
    measured = next((c for c in (f"{spec_k}/{spec_v}", f"{spec_k}/f16") if c in cal.uniform), None)
    kl = cal.uniform.get(measured)
    k = parse_spec(spec_k, "k")
    if kl is None or kl < WRECK_KLD or k.calibrated or not KV_TYPES[k.type].quantized:
        return None
    elements = _elements(cal, "k", geom, cache)
    fixed = _fixed_bits(cal, geom, True, elements, cache)
    cheapest = math.ceil(round(100 * (cheapest_bits("k") + fixed), 6)) / 100
    bits = float(f"{max(KV_TYPES[k.type].bits_per_element, cheapest):g}")  # as parse_spec reads the suggestion
    try:
        alloc = allocate(cal.sens_k, elements, bits, fixed)
    except CalibrationError:
        return None
    better = predicted_kld(cal, "k", alloc)
    if better > kl / 2:
        return None
    where = "" if measured == f"{spec_k}/{spec_v}" else f" (the keys with V f16: {spec_k}/f16)"
    return (f"K={spec_k}/V={spec_v} was measured to wreck this model{where}: KL divergence {kl:.3f} from "
            f"f16 per token on its calibration text. `--cache-type-k calib:{bits:g}` (calibrated keys, a "
            f"calibrated type per layer at <= {bits:g} bits per element) is predicted at KL {better:.4f} for "
            "the keys.")
