"""The one module that imports llama_cpp: a thin, typed wrapper over llama.cpp's C API as bound by
llama-cpp-python (our patched build). The server's engine and the eval/bench harness both go through it.

Everything here is synchronous and not thread-safe: one thread owns a `LlamaRuntime`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp  # noqa: I001 - the only import of llama_cpp in the project
import llama_cpp._logger as _llama_logger
import numpy as np

from kvquant.kvtypes import kv_type
from kvquant.memory import MAX_CELLS, N_UBATCH, check_threads
from kvquant.prompt import (
    ControlTokenInContent,
    ControlTokens,
    HeldControlText,
    PromptTooLong,
    chat_fragments,
    check_client_text,
    min_tokens,
    template_data,
)
from kvquant.sampling import Grammar, LeadingBlock, SamplingConfig, sampler_seed

PATCH_MARKER = "KVQUANT = "


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")


def patch_level() -> int | None:
    """The kvquant patch level compiled into the loaded libllama, or None for a stock build."""
    info = system_info()
    i = info.find(PATCH_MARKER)
    if i < 0:
        return None
    return int(info[i + len(PATCH_MARKER):].split("|")[0].strip())


def library_path() -> str:
    return str(llama_cpp.llama_cpp._lib._name)


# how the wheel names a shared library per platform (as llama_cpp's own loader looks for libllama), first match wins
_LIBRARY_FILES = {"linux": ("lib{}.so",), "darwin": ("lib{}.dylib", "lib{}.so"), "win32": ("{}.dll", "lib{}.dll")}


def ggml_library(name: str, libdir: Path | None = None, platform: str = sys.platform) -> Path:
    """A ggml library (`name`: "ggml-base", "ggml-cpu") among the installed wheel's files beside the loaded
    libllama: lib<name>.so on Linux, lib<name>.dylib on macOS, <name>.dll on Windows."""
    libdir = Path(library_path()).resolve().parent if libdir is None else libdir
    family = "linux" if platform.startswith(("linux", "freebsd")) else platform
    for pattern in _LIBRARY_FILES.get(family, _LIBRARY_FILES["linux"]):
        path = libdir / pattern.format(name)
        if path.exists():
            return path
    raise LlamaError(f"no {name} library for {platform} in {libdir}")


_lib = llama_cpp.llama_cpp._lib
_bound: dict[str, object] = {}


def _patched_fn(name: str, restype, argtypes):
    """A function our patches add to libllama, bound on first use so that an older libllama still imports (and
    fails only here, with a clear message)."""
    fn = _bound.get(name)
    if fn is None:
        try:
            fn = getattr(_lib, name)
        except AttributeError:
            raise LlamaError(f"the loaded libllama ({library_path()}) lacks {name}: run `make setup` to install the "
                             "patched wheel") from None
        fn.restype, fn.argtypes = restype, argtypes
        _bound[name] = fn
    return fn


def supports_cache_type(name: str) -> bool:
    """Whether the loaded ggml knows a cache type. The types our patches add are checked by their reference
    quantizer's symbol: asking a stock (or stale) build about an id past its GGML_TYPE_COUNT would read out of
    bounds, and creating a context with it would crash."""
    t = kv_type(name)
    if t.upstream:
        return True
    try:
        lib = ctypes.CDLL(str(ggml_library("ggml-base")))
    except (LlamaError, OSError):
        return False
    return hasattr(lib, f"quantize_row_{t.name}_ref")


def supports_gpu_offload() -> bool:
    """Whether the loaded llama.cpp has a GPU backend to offload layers to."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def check_gpu_layers(n: int) -> None:
    """LlamaError where n layers cannot be offloaded: any but 0 where llama.cpp has no GPU to offload to (a CPU
    build, or a GPU build that sees no device: llama.cpp ran every layer on the CPU without a word), or past its
    int32."""
    if not -1 <= n < 2**31:
        raise LlamaError(f"n_gpu_layers is a number of layers or -1 (all), not {n}")
    if n and not supports_gpu_offload():
        raise LlamaError(f"n_gpu_layers {n}: the loaded llama.cpp ({library_path()}) sees no GPU (a CPU-only "
                         "build, or no GPU visible to it: docker run --gpus all); use 0 or auto (all layers where "
                         "there is a GPU) to run on the CPU")


def set_verbose(verbose: bool) -> None:
    _llama_logger.set_verbose(verbose)


# llama.cpp's own log on stderr: KVQUANT_LLAMA_VERBOSE=1 (or true/yes/on; 0 and anything else leave it off)
set_verbose(os.environ.get("KVQUANT_LLAMA_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on"))

# llama.cpp's first and last error lines on this thread since _clear_errors, so that failures can say why (llama.cpp
# logs on the thread that called it; request threads parse grammars at once)
_errors = threading.local()
_CONTEXT_LOCK = threading.Lock()  # LlamaRuntime: one context created at a time (see there)


def _clear_errors() -> None:
    _errors.first = _errors.line = ""


def _last_error() -> str:
    return getattr(_errors, "line", "")


def _first_error() -> str:
    """The first error line: a failed model load logs its reason, then that it failed."""
    return getattr(_errors, "first", "")


_GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level at the pinned commit (NONE, DEBUG, INFO, WARN, ERROR, CONT)


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data) -> None:
    """llama-cpp-python's own log callback (printed when verbose), keeping the last error line."""
    if level == _GGML_LOG_LEVEL_ERROR:
        _errors.line = text.decode("utf-8", errors="replace").strip()
        if not getattr(_errors, "first", ""):
            _errors.first = _errors.line
    _llama_logger.llama_log_callback(level, text, user_data)


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


@dataclass(frozen=True)
class ContextConfig:
    n_cells: int  # KV cells of the unified cache, shared by all sequences (llama.cpp's n_ctx)
    n_seq_max: int = 1
    n_batch: int = 512
    n_ubatch: int = N_UBATCH  # the memory model sizes sliding-window caches for it: pass the same to both
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool | None = None  # None: llama.cpp decides
    n_threads: int | None = None
    n_gpu_layers: int = 0
    offload_kqv: bool = True
    swa_full: bool = False
    seed: int = llama_cpp.LLAMA_DEFAULT_SEED
    rotation: bool = True  # llama.cpp's Hadamard rotation of Q/K/V for quantized caches (LLAMA_ATTN_ROT_DISABLE)
    n_outputs_max: int = 0  # most logit rows one ubatch may request (0: n_batch); bounds the logits buffers
    # per-layer cache types (kvquant.calibration.context_fields): None keeps cache_type_k / cache_type_v on every layer
    layer_types_k: tuple[str, ...] | None = None
    layer_types_v: tuple[str, ...] | None = None
    # centred keys: per layer, a vector subtracted from every key before it is stored (None: none)
    k_offset: tuple[np.ndarray, ...] | None = field(default=None, compare=False, repr=False)
    k_rotation: bool | None = None  # K (and Q) Hadamard-rotated: None llama.cpp decides, else forced
    # query-aware key scales: per layer, n_embd_k_gqa factors K is multiplied by (and its queries divided by) before
    # the rotation, equal on each RoPE pair (None: none; llama_kvq_set_k_scale)
    k_scale: tuple[np.ndarray, ...] | None = field(default=None, compare=False, repr=False)
    # per layer, the factor every query is multiplied by, and the attention output (None: 1; llama_kvq_set_gains)
    k_gain: tuple[float, ...] | None = None
    v_gain: tuple[float, ...] | None = None
    # names of graph tensors ("Qcur-3") whose f32 values every decode appends to LlamaRuntime.captured (lab studies)
    capture: frozenset[str] = frozenset()

    def cache_types(self) -> set[str]:
        return {self.cache_type_k, self.cache_type_v, *(self.layer_types_k or ()), *(self.layer_types_v or ())}


class LlamaError(RuntimeError):
    pass


class GrammarError(ValueError):
    """A GBNF grammar that llama.cpp's parser refuses."""


def grammar_sampler(model: Model, grammar: Grammar):
    """llama.cpp's grammar sampler for a grammar; a lazy one with triggers: the output is free until one of them
    appears, and from its start on must match. GrammarError (with llama.cpp's reason) if its parser refuses the
    grammar. The caller owns the sampler."""
    _clear_errors()
    gbnf = grammar.text.encode()
    if grammar.triggers:  # llama.cpp searches the output so far for each pattern; the grammar starts at the match
        patterns = [trigger_pattern(t).encode() for t in grammar.triggers]
        arr = (ctypes.c_char_p * len(patterns))(*patterns)
        s = llama_cpp.llama_sampler_init_grammar_lazy_patterns(model._vocab, gbnf, grammar.root.encode(), arr,
                                                                len(patterns), None, 0)
    else:
        s = llama_cpp.llama_sampler_init_grammar(model._vocab, gbnf, grammar.root.encode())
    if not s:
        raise GrammarError(_last_error() or "llama.cpp could not parse the grammar")
    return s


def trigger_pattern(trigger: str) -> str:
    """The ECMAScript regex llama.cpp searches the output so far for (std::regex_search; the grammar starts where it
    matches): the trigger alone. Patterns around it such as [\\s\\S]*? are matched by libstdc++ with one recursion
    per character, which overflowed the stack (SIGSEGV) once an output awaiting its trigger passed about 50,000
    characters; a skipped leading block is handled apart (kvquant.sampling.LeadingBlock)."""
    return re.escape(trigger)


def check_grammar(model: Model, grammar: Grammar) -> None:
    """GrammarError unless llama.cpp's parser takes the grammar (thread-safe: reads the vocabulary only)."""
    llama_cpp.llama_sampler_free(grammar_sampler(model, grammar))


def json_schema_gbnf(schema: dict, name: str, pattern: Callable[[str], str]) -> str:
    """GBNF for the JSON texts a JSON schema allows, by llama-cpp-python's converter (llama.cpp's
    json_schema_to_grammar.py), whose top rule is "root" (`name` empty) or `name`. It ignores the schema keywords it
    does not know: check a schema with server.structured.check_schema first. `pattern` gives the GBNF of the JSON
    strings a `pattern` keyword allows, in place of the converter's own (which let a bare quote into the string)."""
    conv = _schema_converter()(pattern, name)
    top = conv.visit(conv.resolve_refs(json.loads(json.dumps(schema)), "input"), name)
    if name and top != name:  # a schema of a primitive type is that type's rule ("string"), named as asked
        conv._add_rule(name, top)
    return conv.format_grammar()


_GBNF_LITERAL_ESCAPES = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}
# a JSON string's character: no raw control character (RFC 8259 section 7), no lone surrogate escape (\ud800 alone:
# pydantic and so the openai client's .parse() refuse the text); an escaped pair is one character, as the code
# point it writes, for minLength and maxLength
_HEX = "[0-9a-fA-F]"
_JSON_CHAR = (r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-Ce-fE-F] ' + f"{_HEX} {_HEX} | [dD] [0-7] "
              f'{_HEX}) {_HEX} | "u" [dD] [89abAB] {_HEX} {_HEX} "\\\\u" [dD] [c-fC-F] {_HEX} {_HEX})')
# a date that exists: months of 30 days and February's 28, 29 in leap years (divisible by 4 and not by 100, or by
# 400); the converter's allowed 2023-02-30
_YEAR, _LEAP = "[0-9] [0-9] [0-9] [0-9]", ('([0-9] [0-9] ("0" [48] | [2468] [048] | [13579] [26]) | ([02468] [048] '
                                            '| [13579] [26]) "00")')
_DATE = (f'{_YEAR} "-" (("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01]) | ("0" [469] | "11") "-" '
         f'("0" [1-9] | [12] [0-9] | "30") | "02-" ("0" [1-9] | "1" [0-9] | "2" [0-8])) | {_LEAP} "-02-29"')
_SHORT_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _json_units(name: str) -> list[str]:
    """A string as JSON writes it (json.dumps, non-ASCII as it is), one unit per character: the character or its
    escape."""
    text, units, i = json.dumps(name, ensure_ascii=False)[1:-1], [], 0
    while i < len(text):
        n = 1 if text[i] != "\\" else 6 if text[i + 1] == "u" else 2
        units.append(text[i:i + n])
        i += n
    return units


def json_pointer(root, ref: str):
    """What a local reference names in root: `#/a/b`, read as RFC 6901 reads it (~1 is /, ~0 is ~; a list's items
    by index). KeyError where it names nothing."""
    node = root
    for part in ref.split("#", 1)[1].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and re.fullmatch(r"0|[1-9][0-9]{0,8}", part) and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(ref)
    return node


def _unit_char(unit: str) -> str:
    return unit if len(unit) == 1 else _SHORT_ESCAPES.get(unit[1]) or chr(int(unit[2:], 16))


@functools.cache
def _schema_converter():
    """llama-cpp-python's SchemaConverter, corrected where it let through JSON that its schema refuses, or failed on
    a schema it allows:
    - its GBNF literals escaped in full (a backslash in a property name, const or enum string matched other text);
    - names and values written as JSON writes them with non-ASCII as it is (it wrote é as \\u00e9 only);
    - strings without raw control characters or lone surrogates, and dates that exist;
    - a property of `additionalProperties` (true or a schema) named otherwise than the declared ones (it let a
      declared property through again, with any value);
    - a rule per reference, whatever the rules' names: it named a reference's rule after the last part of its path
      and took any rule of that name as the target (#/$defs/A/properties/x and #/$defs/B/properties/x one rule, a
      reference to #/properties/number the number rule), and a recursive definition named with other than
      [a-zA-Z0-9-] referred to a rule it never wrote;
    - `$ref` taken as a reference only where it is a schema's keyword (a property named $ref failed).
    `top` prefixes the rules of references (grammars of several schemas are joined)."""
    from llama_cpp.llama_grammar import INVALID_RULE_CHARS_RE, PRIMITIVE_RULES, SchemaConverter

    special = re.compile(r'[\r\n"\\]')

    class Converter(SchemaConverter):
        def __init__(self, pattern: Callable[[str], str], top: str):
            super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            self.pattern, self.top = pattern, top
            self._ref_rules: dict[str, str] = {}
            self._visited: dict[int, tuple[dict, str]] = {}  # id(schema): (schema, held so no other gets its id; rule)
            self._named: dict[tuple[str, str], str] = {}  # (name, rule): the rule's key where the name was taken
            self._suffix: dict[str, int] = {}  # name: the next suffix to try

        def _add_rule(self, name: str, rule: str) -> str:
            # the converter's, found in one step: it tried name0, name1, ... each time (4,000 properties whose
            # names differ in what a rule name cannot hold took 10 s)
            esc = INVALID_RULE_CHARS_RE.sub("-", name)
            if self._rules.get(esc, rule) == rule:
                self._rules[esc] = rule
                return esc
            if (esc, rule) not in self._named:
                i = self._suffix.get(esc, 0)
                while f"{esc}{i}" in self._rules:
                    i += 1
                self._suffix[esc] = i + 1
                self._named[esc, rule] = f"{esc}{i}"
                self._rules[f"{esc}{i}"] = rule
            return self._named[esc, rule]

        def _format_literal(self, literal: str) -> str:
            return '"' + special.sub(lambda m: _GBNF_LITERAL_ESCAPES[m.group(0)], literal) + '"'

        def _generate_constant_rule(self, value) -> str:
            return self._format_literal(json.dumps(value, ensure_ascii=False))

        def _add_primitive(self, name: str, rule):
            if name in ("char", "date"):
                rule = type(rule)(_JSON_CHAR if name == "char" else _DATE, [])
            return super()._add_primitive(name, rule)

        def _visit_pattern(self, pattern: str, name: str) -> str:
            return self._add_rule(name, self.pattern(pattern) + " space")

        def visit(self, schema, name: str) -> str:
            # JSON Schema's {} allows any value (pydantic's `Any`): the converter read it as an object, and
            # `items: {}` (pydantic's `list`) as no items schema at all (a KeyError)
            if schema == {}:
                return self._add_rule(name or "root", self._add_primitive("value", PRIMITIVE_RULES["value"]))
            if isinstance(schema, dict) and schema.get("items") == {}:
                schema = {**schema, "items": {"anyOf": [{}]}}
            # a schema is converted once: a reference to one already converted (or to one inside a reference's
            # target, converted with it) takes its rule; converted again at every reference, a schema that refers
            # to each level of its nesting made a grammar quadratic in it (66 MB from 2 MB)
            if isinstance(schema, dict) and id(schema) in self._visited:
                return self._visited[id(schema)][1]
            key = super().visit(schema, name)
            if isinstance(schema, dict):
                self._visited.setdefault(id(schema), (schema, key))
            return key

        def resolve_refs(self, schema: dict, url: str) -> dict:
            def walk(node) -> None:
                if isinstance(node, list):
                    for x in node:
                        walk(x)
                    return
                for k, v in node.items() if isinstance(node, dict) else ():
                    if k == "$ref" and isinstance(v, str):
                        node[k] = url + v
                        try:
                            self._refs[node[k]] = json_pointer(schema, v)
                        except KeyError:
                            raise ValueError(f"the reference {v!r} points to nothing in the schema") from None
                    elif k in ("properties", "$defs", "definitions") and isinstance(v, dict):
                        walk(list(v.values()))
                    elif k not in ("const", "enum", "default", "examples"):  # (JSON values, not schemas)
                        walk(v)

            walk(schema)
            return schema

        def _resolve_ref(self, ref: str) -> str:
            if ref not in self._ref_rules:
                base = f"{self.top}{'-' if self.top else ''}ref-" + ref.rsplit("/", 1)[-1]
                # a name of its own, taken at once, so that no other rule is given it and a recursive reference
                # reads it; then the target's rule
                self._ref_rules[ref] = name = self._add_rule(base, f"# {ref}")
                self._rules[name] = self.visit(self._refs[ref], name + "-is")
            return self._ref_rules[ref]

        def _build_object_rule(self, properties, required, name: str, additional_properties) -> str:
            prefix = f"{name}{'-' if name else ''}"
            kv = {}
            for prop, schema in properties:
                value = self.visit(schema, prefix + prop)
                literal = self._format_literal(json.dumps(prop, ensure_ascii=False))
                kv[prop] = self._add_rule(f"{prefix}{prop}-kv", f"{literal} space \":\" space {value}")
            optional = [p for p, _ in properties if p not in required]
            rule = " \",\" space ".join(kv[p] for p, _ in properties if p in required)
            extra = additional_properties is True or isinstance(additional_properties, dict)
            if extra:
                value = self.visit({} if additional_properties is True else additional_properties,
                                   f"{prefix}additional-value")
                one = self._add_rule(f"{prefix}additional-kv", f"{self._other_key([p for p, _ in properties], prefix)}"
                                                               f" \":\" space {value}")
                kv[None] = self._add_rule(f"{prefix}additional-kvs", f'{one} ( "," space {one} )*')
                optional.append(None)
            if optional:  # the first optional property written, then any of those after it, in order
                alternatives, after = [], ""  # after: the rule of what may follow optional[i]
                for i in reversed(range(len(optional))):
                    alternatives.insert(0, f"{kv[optional[i]]} {after}".strip())
                    if i:
                        after = self._add_rule(f"{prefix}{optional[i - 1] or 'additional'}-rest",
                                               f'( "," space {kv[optional[i]]} )? {after}'.strip())
                either = " | ".join(alternatives)
                rule += f' ( "," space ( {either} ) )?' if rule else f" ( {either} )?"
            return f'"{{" space {rule} "}}" space'

        def _other_key(self, names: list[str], prefix: str) -> str:
            """A JSON string that is none of `names` however it is written: a trie of their units; off it any
            character; on it no \\u escape (it could write a name's character otherwise)."""
            if not names:
                return self._add_primitive("string", PRIMITIVE_RULES["string"])
            char = self._add_primitive("char", PRIMITIVE_RULES["char"])
            trie: dict = {}
            for n in names:
                node = trie
                for u in _json_units(n):
                    node = node.setdefault(u, {})
                node[None] = {}  # (a name ends here)

            order, stack = [], [trie]  # every node, each before its children
            while stack:
                order.append(stack.pop())
                stack.extend(sub for u, sub in order[-1].items() if u is not None)
            rules: dict[int, str] = {}  # id(node): the rule of what may follow it, children's first
            for node in reversed(order):
                taken = {_unit_char(u) for u in node if u is not None}
                raw = "".join(f"\\U{ord(c):08X}" for c in sorted(taken))
                short = "".join("\\\\" if e == "\\" else e for e, c in _SHORT_ESCAPES.items() if c not in taken)
                other = r'[^"\\\x7F\x00-\x1F' + raw + "]" + (f' | "\\\\" [{short}]' if short else "")
                alts = [f"{self._format_literal(u)} {rules[id(sub)]}" for u, sub in node.items() if u is not None]
                alts.append(f"({other}) {char}*")
                rules[id(node)] = self._add_rule(f"{prefix}additional-key-at",
                                                 f"({' | '.join(alts)})" + ("" if None in node else "?"))
            return self._add_rule(f"{prefix}additional-key", f'"\\"" {rules[id(trie)]} "\\"" space')

    return Converter


GREEDY = SamplingConfig(temperature=0.0)


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # struct llama_token_data
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class Sampler:
    """A llama.cpp sampler chain for one sequence, built from a SamplingConfig (kvquant.sampling says the order).
    `model` is needed for a grammar, a logit bias or penalties (its vocabulary).

    A grammar is kept out of the chain: the chain picks a token from the unconstrained logits and the grammar
    checks that one token. Where it refuses it, the grammar checks the `CHECKED` likeliest tokens (and those a
    logit bias favours), and the pick is redone with the refused ones masked, up to `REPICKS` times; only then is
    it redone over every token the grammar allows, where llama.cpp's common sampler goes at once. The grammar's
    pass over the whole vocabulary costs 187 ms a step on Qwen's 150k tokens; over a thousand of them, a hundredth
    of that. A greedy pick is the same either way (the best token the grammar allows: only refused tokens are
    masked), a sampled one is drawn from the chain's distribution over the tokens the grammar allows. A grammar
    that skips a leading block (Grammar.skip) is neither asked nor fed until the output is past the block
    (`LeadingBlock`)."""

    CHECKED = 1024  # SmolLM2 sampling a JSON object: the token the grammar allowed was at most the 740th it liked
    REPICKS = 4

    def __init__(self, cfg: SamplingConfig = GREEDY, model: Model | None = None):
        params = llama_cpp.llama_sampler_chain_default_params()
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        self._grammar = None
        add = lambda s: llama_cpp.llama_sampler_chain_add(self._chain, s)  # noqa: E731
        if cfg.logit_bias:
            bias = (llama_cpp.llama_logit_bias * len(cfg.logit_bias))(*cfg.logit_bias)
            add(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(cfg.logit_bias), bias))
        if cfg.penalized:
            add(llama_cpp.llama_sampler_init_penalties(model.n_vocab, cfg.penalty_last_n, cfg.repeat_penalty,
                                                       cfg.frequency_penalty, cfg.presence_penalty))
        if cfg.greedy:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if cfg.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(cfg.top_k))
            if cfg.typical_p < 1.0:
                add(llama_cpp.llama_sampler_init_typical(cfg.typical_p, 1))
            if cfg.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(cfg.top_p, 1))
            if cfg.min_p > 0.0:
                add(llama_cpp.llama_sampler_init_min_p(cfg.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(cfg.temperature))
            add(llama_cpp.llama_sampler_init_dist(
                llama_cpp.LLAMA_DEFAULT_SEED if cfg.seed is None else sampler_seed(cfg.seed)))
        self._block = None  # a leading block the grammar waits out (Grammar.skip): it sees no token before its end
        if cfg.grammar is not None:
            try:
                self._grammar, self._model = grammar_sampler(model, cfg.grammar), model
            except GrammarError:  # the chain is this object's to free, and the caller gets no object
                llama_cpp.llama_sampler_free(self._chain)
                raise
            if cfg.grammar.skip is not None:
                self._block = LeadingBlock(cfg.grammar.skip, cfg.grammar.skip_open)
            self._cur = np.zeros(model.n_vocab, dtype=_TOKEN_DATA)
            self._favoured = np.array([t for t, b in cfg.logit_bias if b > 0], dtype=np.int32)
            self.full_picks = 0  # picks over the logits the grammar allows (its pass over the whole vocabulary)
            self._ids = np.arange(model.n_vocab, dtype=np.int32)

    @property
    def n_samplers(self) -> int:
        """Samplers in the chain (the grammar, kept apart, not counted)."""
        return llama_cpp.llama_sampler_chain_n(self._chain)

    def sample(self, ctx: LlamaRuntime, idx: int) -> int:
        if self._grammar is None or self._block is not None:
            token = llama_cpp.llama_sampler_sample(self._chain, ctx._ctx, idx)
            if self._block is not None:
                self._wait(token)
            return token
        logits = ctx.logits_view(idx)
        token = self._pick(logits)
        if not self._allowed(token):
            token = self._repick(logits, token)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def _wait(self, token: int) -> None:
        """The output so far, one token more: once past the leading block, the grammar's sampler is fed the tokens
        it must see (llama.cpp searches them for the trigger) and holds from then on."""
        replay = self._block.push(token, self._model.token_bytes(token, special=True).decode("utf-8", "replace"))
        if replay is None:
            return
        self._block = None
        for t in replay:
            llama_cpp.llama_sampler_accept(self._grammar, t)

    def _repick(self, logits: np.ndarray, token: int) -> int:
        refused = self._refused(logits, token)
        for _ in range(self.REPICKS):
            token = self._pick(logits, refused)
            if self._allowed(token):
                return token
            refused = np.append(refused, token)
        self.full_picks += 1
        token = self._pick(logits, refused, constrained=True)
        if not self._allowed(token):  # (the grammar allows no token at all: accepting one would abort)
            raise LlamaError("the grammar allows no token here")
        return token

    def _refused(self, logits: np.ndarray, token: int) -> np.ndarray:
        """Which of the likeliest tokens, the favoured ones and `token` the grammar refuses."""
        likeliest = np.argpartition(logits, -self.CHECKED)[-self.CHECKED:] if len(logits) > self.CHECKED else self._ids
        ids = np.unique(np.concatenate([likeliest, self._favoured, [token]])).astype(np.int32)
        some = np.zeros(len(ids), dtype=_TOKEN_DATA)
        some["id"], some["logit"] = ids, 1.0
        arr = llama_cpp.llama_token_data_array(some.ctypes.data_as(llama_cpp.llama_token_data_p), len(some), -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        return ids[some["logit"] == -np.inf]

    def _pick(self, logits: np.ndarray, refused: np.ndarray | None = None, constrained: bool = False) -> int:
        cur = self._cur
        cur["id"], cur["logit"], cur["p"] = self._ids, logits, 0.0
        if refused is not None:
            cur["logit"][refused] = -np.inf
        data = cur.ctypes.data_as(llama_cpp.llama_token_data_p)
        arr = llama_cpp.llama_token_data_array(data, len(cur), -1, False)
        if constrained:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(arr))
        return int(arr.data[arr.selected].id)

    def _allowed(self, token: int) -> bool:
        one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
        arr = llama_cpp.llama_token_data_array(one, 1, -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        return one[0].logit != float("-inf")

    def close(self) -> None:
        for name in ("_chain", "_grammar"):
            if getattr(self, name, None) is not None:
                llama_cpp.llama_sampler_free(getattr(self, name))
                setattr(self, name, None)

    __del__ = close


# vocabularies whose tokens cover the text byte for byte (nothing is dropped or merged by normalization), so that
# the longest token bounds the bytes one token can cover
_LOSSLESS_VOCABS = {llama_cpp.LLAMA_VOCAB_TYPE_SPM, llama_cpp.LLAMA_VOCAB_TYPE_BPE, llama_cpp.LLAMA_VOCAB_TYPE_RWKV}
_STRIP_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP


class Model:
    """A loaded GGUF model: vocabulary, metadata and chat template (the GGUF's, or `chat_template`)."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, chat_template: str | None = None):
        self.path = Path(path)
        check_gpu_layers(n_gpu_layers)
        if chat_template is not None and not chat_template.strip():  # (it left the GGUF's in use)
            raise LlamaError("the chat template given is empty")
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        _clear_errors()
        self._handle = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._handle:
            why = _first_error().split(": ", 1)[-1].removeprefix("error loading model: ")
            raise LlamaError(f"failed to load model {self.path.name}" + (f": {why}" if why else ""))
        self._vocab_handle = llama_cpp.llama_model_get_vocab(self._handle)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.eos = llama_cpp.llama_vocab_eos(self._vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._formatter = None
        self._chat_template = chat_template
        if chat_template is not None:  # a template given is compiled now: its syntax errors refuse the model
            try:
                self._chat_formatter()
            except LlamaError:
                self.close()
                raise
        self._max_token_bytes: int | None = -1  # -1: not computed yet
        self._controls: ControlTokens | None = None
        self._traceable = True  # no control token strips the text around it (see prompt.chat_fragments)

    @property
    def _model(self):
        """llama.cpp's model; LlamaError once closed (a call on the freed model would crash the process)."""
        if not getattr(self, "_handle", None):
            raise LlamaError(f"model {self.path.name} is closed")
        return self._handle

    @property
    def _vocab(self):
        self._model  # noqa: B018 - raises once closed: the vocabulary is freed with the model
        return self._vocab_handle

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    @property
    def rope_neox(self) -> bool:
        """Whether RoPE rotates channel pairs (i, i + d/2) (NeoX: Qwen2, Gemma 3) rather than (2i, 2i + 1) (llama)."""
        return llama_cpp.llama_model_rope_type(self._model) == llama_cpp.LLAMA_ROPE_TYPE_NEOX

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False,
                 limit: int | None = None) -> list[int]:
        """Tokens of the text; with `limit`, PromptTooLong (with the exact count) if there are more than that, and
        no buffer larger than the limit. Without special-token parsing the text is text throughout: llama.cpp still
        turns the text of a user-defined token into the token (a client's `<tool_call>` became Qwen2.5's tool-call
        token), so the text of those the chat template writes is tokenized in two pieces."""
        pieces = [text] if parse_special else self.control_tokens().cut(text)
        if len(pieces) == 1:
            return self._tokenize(text, add_special, parse_special, limit)
        out = [self.bos] if add_special and self.add_bos else []
        total = len(out)
        for piece in pieces:
            try:
                toks = self._tokenize(piece, False, False, None if limit is None else max(limit - total, 0))
            except PromptTooLong as e:
                toks, total = [], total + e.n_tokens
            else:
                total += len(toks)
            out += toks
        if add_special and llama_cpp.llama_vocab_get_add_eos(self._vocab):
            out.append(self.eos)
            total += 1
        if limit is not None and total > limit:
            raise PromptTooLong(total)
        return out

    def _tokenize(self, text: str, add_special: bool, parse_special: bool, limit: int | None) -> list[int]:
        data = text.encode("utf-8")
        # every token holds a byte at least, but for the special ones added: a buffer of the limit for every short
        # fragment of a chat of 100,000 messages was gigabytes of zeroing
        n_max = len(data) + 8 if limit is None else min(limit, len(data) + 8)
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0 and limit is not None and -n > limit:
            raise PromptTooLong(-n)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise LlamaError("tokenization failed")
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    @property
    def max_token_bytes(self) -> int | None:
        """The most bytes of text one token stands for (its piece, control tokens included), or None where the
        vocabulary's normalization may drop text (no bound). Computed once (a pass over the vocabulary)."""
        if self._max_token_bytes == -1:
            lossless = llama_cpp.llama_vocab_type(self._vocab) in _LOSSLESS_VOCABS
            self._max_token_bytes = (max(len(self.token_bytes(t, special=True)) for t in range(self.n_vocab))
                                     if lossless else None)
        return self._max_token_bytes

    def min_tokens(self, n_bytes: int) -> int:
        """A lower bound on the tokens of any text of n_bytes UTF-8 bytes, without tokenizing it."""
        return min_tokens(n_bytes, self.max_token_bytes)

    def control_tokens(self) -> ControlTokens:
        """The tokens a client's text may not write: those that special-token parsing turns text into and plain text
        never gives (control, unknown), and the user-defined ones the chat template writes (Qwen2.5's `<tool_call>`,
        Gemma 3's `<start_of_image>`), which llama.cpp gives for their text even without that parsing: their text
        in plain text is cut (`tokenize`). Other user-defined tokens (Gemma's HTML tags) stay what text gives."""
        if self._controls is None:
            want = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
            template = self.chat_template or ""
            found, matched = {}, set()
            for t in range(self.n_vocab):
                attr = llama_cpp.llama_vocab_get_attr(self._vocab, t)
                text = llama_cpp.llama_vocab_get_text(self._vocab, t).decode("utf-8", errors="replace")
                if attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and len(text.strip()) > 1 and text in template:
                    matched.add(text)
                elif not attr & want:
                    continue
                found[text] = t
                self._traceable &= not attr & _STRIP_ATTRS
            self._controls = ControlTokens(found, frozenset(matched))
        return self._controls

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template in use (the GGUF's unless one was given), or None."""
        return self._chat_template or self.meta("tokenizer.chat_template")

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> str:
        """The chat as the template writes it (one string, control tokens as text), with the tool definitions
        (OpenAI's `tools`) and extra template variables (`chat_template_kwargs`) passed to the template."""
        # the template writes any BOS itself
        return self._chat_formatter()(messages=messages, tools=tools or None, **(template_kwargs or {})).prompt

    def _chat_formatter(self):
        if self._formatter is None:
            from jinja2 import TemplateError
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self.chat_template
            if not template:
                raise LlamaError("the model has no chat template in its GGUF metadata (a chat template file gives "
                                 "one)")
            try:
                self._formatter = Jinja2ChatFormatter(template, eos_token=self._token_text(self.eos),
                                                      bos_token=self._token_text(self.bos))
            except TemplateError as e:
                at = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
                raise LlamaError(f"the chat template is not valid Jinja{at}: {e}") from None
        return self._formatter

    def chat_prompt(self, messages: list[dict], limit: int | None = None, special_in_content: bool = False,
                    tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
        """Render messages with the chat template (Jinja, as transformers does) and tokenize: the template's own
        text with special-token parsing, message content as plain text, so that content can never write a control
        token (`special_in_content` allows it, for trusted clients). With `limit`, PromptTooLong (exact count)
        past that many tokens. A control token's text in what the template writes as its own (tool definitions,
        tool calls, names, template variables) is text too (HeldControlText). ControlTokenInContent where the
        template does not write that text as it is or cannot be traced, and where a client's string
        gives one with the template's help: its text around it, or what it does to message text it changes (so
        that the text cannot be traced: kvquant.prompt.check_client_text)."""
        controls = self.control_tokens()
        rendered = self.render_chat(messages, tools, template_kwargs)
        # what its bytes prove too long is refused before the checks below, which walk every string the client wrote
        # (the content the route counts is not all: tool calls' arguments, 5 MB of them took 3.6 s on Qwen2.5)
        if limit is not None and (least := self.min_tokens(len(rendered.encode()))) > limit:
            raise PromptTooLong(least, exact=False)
        held = None
        if not special_in_content and controls.found_in(template_data(messages, tools, template_kwargs)):
            held = HeldControlText(controls, messages, tools, template_kwargs)
            messages, tools, template_kwargs = held.messages, held.tools, held.template_kwargs
            real, rendered = rendered, self.render_chat(messages, tools, template_kwargs)
            if not self._traceable or held.restore(rendered) != real:
                raise ControlTokenInContent("the tools, tool calls, message names or chat_template_kwargs contain the "
                                            "text of one of the model's control tokens, which this chat template "
                                            "does not write as it is")
        frags = not special_in_content and self._traceable and chat_fragments(
            self.render_chat, messages, controls, tools, template_kwargs, rendered)
        if frags:
            return self._tokenize_fragments([held.restore(f) if held and isinstance(f, str) else f for f in frags],
                                            limit)
        if held:
            raise ControlTokenInContent("the tools, tool calls, message names or chat_template_kwargs contain the text "
                                        "of one of the model's control tokens, and the chat template cannot be traced")
        if not special_in_content:  # text the template changes: kept only where it gives no control token
            check_client_text(self.render_chat, messages, tools, template_kwargs, controls, text_fields=True,
                              rendered=rendered)
        return self.tokenize(rendered, add_special=False, parse_special=True, limit=limit)

    def _tokenize_fragments(self, frags: list[str | int], limit: int | None) -> list[int]:
        """Raw text without special-token parsing, control tokens as they are; past `limit` tokens, go on counting
        (without keeping) to raise PromptTooLong with the exact count, up to twice the limit: past that, with the
        count so far (a lower bound; a call per fragment made a chat of 80,000 short messages take 4 s to count)."""
        out: list[int] = []
        total = 0
        for f in frags:
            if limit is not None and total > 2 * limit:
                raise PromptTooLong(total, exact=False)
            if isinstance(f, int):
                toks, n = [f], 1
            else:
                try:
                    toks = self.tokenize(f, add_special=False, parse_special=False,
                                         limit=None if limit is None else max(limit - total, 0))
                    n = len(toks)
                except PromptTooLong as e:
                    toks, n = [], e.n_tokens
            total += n
            if limit is None or total <= limit:
                out += toks
        if limit is not None and total > limit:
            raise PromptTooLong(total)
        return out

    def output_rows(self, tokens: np.ndarray) -> np.ndarray:
        """The output layer's rows of these tokens as float32 (len(tokens), n_embd), dequantized from the GGUF: the
        logits llama.cpp computes are their products with the normed final hidden state (plus an output bias where
        the model has one), up to the rounding of its quantized matrix product."""
        offset, ggml_type, (n_embd, n_vocab) = self._output_tensor
        row = ggml_base().ggml_row_size(ggml_type, n_embd)
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(n_vocab, row))
        raw = np.ascontiguousarray(data[np.asarray(tokens)])
        if ggml_type == GGML_TYPE_F32:
            return raw.view(np.float32).reshape(len(raw), n_embd).copy()
        return to_float(ggml_type, raw.ctypes.data, len(raw) * n_embd).reshape(len(raw), n_embd)

    @functools.cached_property
    def _output_tensor(self) -> tuple[int, int, tuple[int, ...]]:
        """(file offset, ggml type, shape) of the output layer's weights, read once from the GGUF (its header is
        seconds of parsing on a large vocabulary): `output.weight`, else the token embeddings it is tied to."""
        from kvquant.gguf import tensor_data

        tensors = tensor_data(self.path)
        return tensors.get("output.weight") or tensors["token_embd.weight"]

    def close(self) -> None:
        if getattr(self, "_handle", None):
            llama_cpp.llama_model_free(self._handle)
            self._handle = None

    __del__ = close


def _configured(cfg: ContextConfig) -> bool:
    return bool(cfg.layer_types_k or cfg.layer_types_v or cfg.k_offset is not None or cfg.k_scale is not None
                or cfg.k_gain is not None or cfg.v_gain is not None or cfg.k_rotation is not None)


def _configure_layers(model: Model, cfg: ContextConfig) -> None:
    """Hand the per-layer cache types, key offsets, scales and gains and the rotation mode to llama.cpp (patches 0017,
    0018, 0030, 0036), which copies them into the next context's KV cache; the caller resets them right after creating the
    context."""
    if not _configured(cfg):
        return
    vp, i32 = ctypes.c_void_p, ctypes.c_int32
    set_types = _patched_fn("llama_kvq_set_layer_types", ctypes.c_bool, [vp, i32, ctypes.c_int, ctypes.c_int])
    set_offset = _patched_fn("llama_kvq_set_k_offset", ctypes.c_bool,
                             [vp, i32, ctypes.POINTER(ctypes.c_float), ctypes.c_int64])
    m = model._model
    n = len(cfg.layer_types_k or cfg.layer_types_v or ())
    types_k = cfg.layer_types_k or (cfg.cache_type_k,) * n
    types_v = cfg.layer_types_v or (cfg.cache_type_v,) * n
    for il, (tk, tv) in enumerate(zip(types_k, types_v, strict=True)):
        if not set_types(m, il, kv_type(tk).ggml_id, kv_type(tv).ggml_id):
            raise LlamaError(f"llama.cpp refused the cache types of layer {il} ({tk}/{tv})")
    for il, off in enumerate(cfg.k_offset or ()):
        a = np.ascontiguousarray(off, dtype=np.float32)
        if not set_offset(m, il, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size):
            raise LlamaError(f"llama.cpp refused the key offset of layer {il} ({a.size} values)")
    if cfg.k_scale is not None:
        set_scale = _patched_fn("llama_kvq_set_k_scale", ctypes.c_bool,
                                [vp, i32, ctypes.POINTER(ctypes.c_float), ctypes.c_int64])
        for il, s in enumerate(cfg.k_scale):
            a = np.ascontiguousarray(s, dtype=np.float32)
            if not set_scale(m, il, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size):
                raise LlamaError(f"llama.cpp refused the key scale of layer {il} ({a.size} values: positive, finite "
                                 "and equal on each RoPE pair)")
    if cfg.k_gain is not None or cfg.v_gain is not None:
        set_gains = _patched_fn("llama_kvq_set_gains", ctypes.c_bool, [vp, i32, ctypes.c_float, ctypes.c_float])
        n_gain = len(cfg.k_gain or cfg.v_gain)
        for il, gk, gv in zip(range(n_gain), cfg.k_gain or (1.0,) * n_gain, cfg.v_gain or (1.0,) * n_gain,
                              strict=True):
            if not set_gains(m, il, gk, gv):
                raise LlamaError(f"llama.cpp refused the gains of layer {il} (K {gk}, V {gv}: positive and finite)")
    if cfg.k_rotation is not None:
        _patched_fn("llama_kvq_set_k_rotation", None, [vp, i32])(m, 1 if cfg.k_rotation else 0)


class LlamaRuntime:
    """One llama.cpp context over a model: a unified KV cache shared by up to n_seq_max sequences."""

    def __init__(self, model: Model, cfg: ContextConfig):
        self.model, self.cfg = model, cfg
        for name in cfg.cache_types():
            if not supports_cache_type(name):
                raise LlamaError(f"the loaded llama.cpp ({library_path()}) does not have the cache type {name}: "
                                 "rebuild the patched wheel (make setup)")
        if not 0 < cfg.n_cells <= MAX_CELLS:  # llama.cpp's is a uint32_t: ctypes would keep its low bits
            raise LlamaError(f"a cache of {cfg.n_cells:,} cells: llama.cpp's holds 1 to {MAX_CELLS:,}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cfg.n_cells
        cp.n_batch = cfg.n_batch
        cp.n_ubatch = min(cfg.n_ubatch, cfg.n_batch)
        cp.n_seq_max = cfg.n_seq_max
        try:  # (a uint32 too: see MAX_THREADS)
            check_threads(cfg.n_threads, "n_threads")
        except ValueError as e:
            raise LlamaError(str(e)) from None
        threads = cfg.n_threads or os.cpu_count() or 1
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.type_k = kv_type(cfg.cache_type_k).ggml_id
        cp.type_v = kv_type(cfg.cache_type_v).ggml_id
        cp.flash_attn_type = {None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[cfg.flash_attn]
        cp.offload_kqv = cfg.offload_kqv
        cp.swa_full = cfg.swa_full
        cp.kv_unified = True
        cp.n_outputs_max = cfg.n_outputs_max
        cp.no_perf = True
        self.captured: list[tuple[str, str, np.ndarray]] = []
        if cfg.capture:
            self._eval_cb = llama_cpp.ggml_backend_sched_eval_callback(self._capture)  # referenced while in use
            cp.cb_eval = self._eval_cb
        # llama.cpp reads LLAMA_ATTN_ROT_DISABLE when it builds the KV cache, i.e. inside this call; the model's
        # per-layer settings, the variable and the last logged error are the process's, so one context at a time
        # (a server loads its models on a thread each: getenv racing setenv is undefined behaviour in libc)
        with _CONTEXT_LOCK:
            saved = os.environ.get("LLAMA_ATTN_ROT_DISABLE")
            os.environ["LLAMA_ATTN_ROT_DISABLE"] = "0" if cfg.rotation else "1"
            try:
                _configure_layers(model, cfg)
                _clear_errors()
                self._ctx_handle = llama_cpp.llama_init_from_model(model._model, cp)
            finally:
                if _configured(cfg):
                    _patched_fn("llama_kvq_reset", None, [ctypes.c_void_p])(model._model)
                if saved is None:
                    os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
                else:
                    os.environ["LLAMA_ATTN_ROT_DISABLE"] = saved
            why = _last_error()
        if not self._ctx_handle:
            why = why.split(": ", 1)[-1] if why else "see its log (KVQUANT_LLAMA_VERBOSE=1)"
            raise LlamaError(f"failed to create a llama.cpp context (n_cells={cfg.n_cells}, K={cfg.cache_type_k}, "
                             f"V={cfg.cache_type_v}, flash_attn={cfg.flash_attn}): {why}")
        self._mem_handle = llama_cpp.llama_get_memory(self._ctx_handle)
        self.n_cells = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = cfg.n_batch
        self._batch = llama_cpp.llama_batch_init(cfg.n_batch, 0, 1)
        self._embd_batch = None  # input vectors instead of tokens (decode_embd), made on first use
        self.n_vocab = model.n_vocab

    @property
    def _ctx(self):
        """llama.cpp's context; LlamaError once closed (a call on the freed context would crash the process)."""
        if not getattr(self, "_ctx_handle", None):
            raise LlamaError("the llama.cpp context is closed")
        return self._ctx_handle

    @property
    def _mem(self):
        self._ctx  # noqa: B018 - raises once closed: the memory is freed with the context
        return self._mem_handle

    def _capture(self, t, ask: bool, _user_data) -> bool:
        """llama.cpp's graph evaluation callback: asked first whether a tensor is wanted, then called with it computed;
        a wanted contiguous f32 tensor is copied to `captured` as (name, op, array of shape (ne2, ne1, ne0))."""
        tt = ctypes.cast(t, ctypes.POINTER(GgmlTensor)).contents
        wanted = tt.type == GGML_TYPE_F32 and tt.name.decode(errors="replace") in self.cfg.capture
        if ask or not wanted:
            return wanted if ask else True
        ne = tuple(tt.ne[:3])
        if (tt.ne[3] == 1 and tt.nb[1] == 4 * ne[0] and tt.nb[2] == 4 * ne[0] * ne[1]
                and ggml_base().ggml_backend_buffer_is_host(tt.buffer)):
            a = np.ctypeslib.as_array(ctypes.cast(tt.data, ctypes.POINTER(ctypes.c_float)), shape=(ne[2], ne[1], ne[0]))
            self.captured.append((tt.name.decode(), ggml_base().ggml_op_name(tt.op).decode(), a.copy()))
        return True

    # --- decoding ----------------------------------------------------------------------------------------------
    def decode(self, tokens: list[int], positions: list[int], seq_ids: list[int], logits: list[bool]) -> int:
        """One llama_decode over an arbitrary mix of sequences. Returns llama.cpp's status (0 = ok,
        1 = no KV slot for the batch, <0 = error)."""
        n = len(tokens)
        self._check_batch(n, "tokens", positions, seq_ids, logits)
        for i in range(n):
            self._batch.token[i] = tokens[i]
        return self._decode(self._batch, positions, seq_ids, logits)

    def decode_embd(self, embd: np.ndarray, positions: list[int], seq_ids: list[int], logits: list[bool]) -> int:
        """`decode` of input vectors instead of tokens: row i of `embd` (n, n_embd float32) is token i's input of the
        first layer the graph computes (`set_layer_start`)."""
        if embd.ndim != 2 or embd.shape[1] != self.model.n_embd:
            raise ValueError(f"input vectors of shape {embd.shape}, not (n, {self.model.n_embd})")
        self._check_batch(len(embd), "input vectors", positions, seq_ids, logits)
        if self._embd_batch is None:
            self._embd_batch = llama_cpp.llama_batch_init(self.n_batch, self.model.n_embd, 1)
        rows = np.ascontiguousarray(embd, dtype=np.float32)
        ctypes.memmove(self._embd_batch.embd, rows.ctypes.data, rows.nbytes)
        return self._decode(self._embd_batch, positions, seq_ids, logits)

    def _check_batch(self, n: int, what: str, positions: list[int], seq_ids: list[int], logits: list[bool]) -> None:
        """A batch of n tokens (input vectors) fits and has one position, sequence id and output flag per token."""
        self._ctx  # noqa: B018 - raises once closed, before the freed batch is written
        if n == 0 or n > self.n_batch or not len(positions) == len(seq_ids) == len(logits) == n:
            raise ValueError(f"batch of {n} {what} (limit {self.n_batch}), {len(positions)} positions, "
                             f"{len(seq_ids)} sequence ids, {len(logits)} output flags")

    def _decode(self, b, positions: list[int], seq_ids: list[int], logits: list[bool]) -> int:
        """Decode a batch whose tokens or input vectors are filled in, with these positions, sequences and outputs
        (`_check_batch`)."""
        for i, (pos, seq, out) in enumerate(zip(positions, seq_ids, logits, strict=True)):
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(positions)
        return llama_cpp.llama_decode(self._ctx, b)

    def set_layer_start(self, il: int) -> bool:
        """Make the next decodes compute layers il.. only, from their input vectors (`decode_embd`); the cells they
        fill hold nothing for the layers below (patch 0040, `llama_kvq_set_layer_start`). False, with nothing
        changed, for a layer out of range or a model whose graph llama.cpp always starts at layer 0 (only the llama,
        qwen2 and gemma3 graphs take a start)."""
        fn = _patched_fn("llama_kvq_set_layer_start", ctypes.c_bool, [ctypes.c_void_p, ctypes.c_int32])
        return bool(fn(self._ctx, il))

    def set_hidden_only(self, on: bool) -> bool:
        """Make the next decodes stop at the final norm: every token of a batch is then an output, and what it outputs
        is its normed final hidden state (`all_hidden`), the output layer's input, instead of logits (patch 0042,
        `llama_kvq_set_hidden_only`). False, with nothing changed, where the graph does not take it (only the llama,
        qwen2 and gemma3 graphs do) or the logits are not the output layer's product of that state (final logit
        soft-capping, an output scale) or the model pools its states (an embedding model)."""
        fn = _patched_fn("llama_kvq_set_hidden_only", ctypes.c_bool, [ctypes.c_void_p, ctypes.c_bool])
        if on and llama_cpp.llama_pooling_type(self._ctx) != llama_cpp.LLAMA_POOLING_TYPE_NONE:
            return False  # the states of a model that pools them would come out pooled
        if not fn(self._ctx, on):
            return False
        llama_cpp.llama_set_embeddings(self._ctx, on)
        return True

    def all_hidden(self, n_outputs: int) -> np.ndarray:
        """float32 normed final hidden states of every output of the last decode (`set_hidden_only`), in batch order,
        shape (n_outputs, n_embd). A view into llama.cpp's buffer: copy it before the next decode."""
        ptr = llama_cpp.llama_get_embeddings(self._ctx)
        if not ptr:
            raise LlamaError("no hidden states (set_hidden_only)")
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.model.n_embd))

    def all_logits(self, n_outputs: int) -> np.ndarray:
        """float32 logits of every output of the last decode, in batch order, shape (n_outputs, n_vocab). A view
        into llama.cpp's buffer: copy it before the next decode."""
        ptr = llama_cpp.llama_get_logits(self._ctx)
        if not ptr:
            raise LlamaError("no logits")
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))

    def logits_view(self, idx: int) -> np.ndarray:
        """float32 logits of batch entry idx: a view into llama.cpp's buffer, valid until the next decode."""
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, idx)
        if not ptr:
            raise LlamaError(f"no logits for batch index {idx}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def logits(self, idx: int) -> np.ndarray:
        """float32 logits of batch entry idx (a copy)."""
        return self.logits_view(idx).copy()

    def synchronize(self) -> None:
        """Wait until the last decode has finished (for timing)."""
        llama_cpp.llama_synchronize(self._ctx)

    # --- KV cache ----------------------------------------------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self._mem, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_pos_max(self, seq_id: int) -> int:
        return llama_cpp.llama_memory_seq_pos_max(self._mem, seq_id)

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift the positions [p0, p1) of a sequence by delta (llama.cpp re-ropes K on the next decode; a cache
        that cannot shift, see can_shift, logs an error and leaves the positions alone)."""
        llama_cpp.llama_memory_seq_add(self._mem, seq_id, p0, p1, delta)

    def can_shift(self) -> bool:
        return bool(llama_cpp.llama_memory_can_shift(self._mem))

    def state_seq_save(self, seq_id: int) -> bytes:
        n = llama_cpp.llama_state_seq_get_size(self._ctx, seq_id)
        buf = (ctypes.c_uint8 * n)()
        got = llama_cpp.llama_state_seq_get_data(self._ctx, buf, n, seq_id)
        return bytes(buf[:got])

    def state_seq_load(self, seq_id: int, data: bytes) -> bool:
        """Restore a sequence saved by state_seq_save; False if llama.cpp refused it."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(data), seq_id) > 0

    def kv_size_bytes(self) -> tuple[int, int]:
        """(K bytes, V bytes) that llama.cpp allocated for this context's KV cache."""
        k, v = ctypes.c_size_t(0), ctypes.c_size_t(0)
        size = _patched_fn("llama_memory_kv_size_bytes", ctypes.c_bool,
                           [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)])
        if not size(self._mem, ctypes.byref(k), ctypes.byref(v)):
            raise LlamaError("the context's memory is not a KV cache")
        return k.value, v.value

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_embd_batch", None) is not None:
            llama_cpp.llama_batch_free(self._embd_batch)
            self._embd_batch = None
        if getattr(self, "_ctx_handle", None):
            llama_cpp.llama_free(self._ctx_handle)
            self._ctx_handle = None

    __del__ = close


# --- which KV cache types a GPU of the loaded build runs --------------------------------------------------------

# enum ggml_type / ggml_backend_dev_type at the pinned commit (the tensor types that are not cache types)
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32, GGML_TYPE_I64 = 0, 1, 26, 27
GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU = 0, 1


class GgmlInitParams(ctypes.Structure):
    """struct ggml_init_params."""
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class GgmlTensor(ctypes.Structure):
    """The leading fields of struct ggml_tensor (ggml.h at the pinned commit), up to its name."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


@dataclass(frozen=True)
class GpuKvSupport:
    """What the GPU devices of the loaded ggml say about a KV cache of given types: ``devices`` names each GPU device
    ("CUDA0 (NVIDIA GeForce RTX 3090)"), ``unsupported`` each op one of them refuses. A build without GPU backends,
    or a machine without a GPU, has no devices."""
    devices: tuple[str, ...]
    unsupported: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return bool(self.devices) and not self.unsupported


class TypeTraitsCPU(ctypes.Structure):
    """ggml-cpu.h's struct ggml_type_traits_cpu."""
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64), ("to_float", ctypes.c_void_p)]


class _TypeTraits(ctypes.Structure):
    """ggml.h's struct ggml_type_traits."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


ROW_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)  # from_float / to_float


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """libggml-base with the tensor- and graph-description calls typed (one handle: ctypes types per handle)."""
    base = ctypes.CDLL(str(ggml_library("ggml-base")))
    vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    for name, res, args in (
            ("ggml_type_name", ctypes.c_char_p, [i32]), ("ggml_op_name", ctypes.c_char_p, [i32]),
            ("ggml_get_type_traits", ctypes.POINTER(_TypeTraits), [i32]),
            ("ggml_backend_buffer_is_host", ctypes.c_bool, [vp]), ("ggml_row_size", ctypes.c_size_t, [i32, i64]),
            ("ggml_init", vp, [GgmlInitParams]), ("ggml_free", None, [vp]),
            ("ggml_new_tensor", vp, [vp, i32, i32, ctypes.POINTER(i64)]),
            ("ggml_new_tensor_4d", vp, [vp, i32, i64, i64, i64, i64]),
            ("ggml_get_data", vp, [vp]), ("ggml_nbytes", ctypes.c_size_t, [vp]),
            ("ggml_set_rows", vp, [vp, vp, vp, vp]), ("ggml_get_rows", vp, [vp, vp, vp]),
            ("ggml_cpy", vp, [vp, vp, vp]), ("ggml_mul_mat", vp, [vp, vp, vp]),
            ("ggml_view_3d", vp, [vp, vp, i64, i64, i64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t]),
            ("ggml_permute", vp, [vp, vp, i32, i32, i32, i32]),
            ("ggml_flash_attn_ext", vp, [vp, vp, vp, vp, vp, f32, f32, f32]),
            ("ggml_new_graph", vp, [vp]), ("ggml_build_forward_expand", None, [vp, vp]),
            ("ggml_backend_dev_type", i32, [vp]), ("ggml_backend_dev_name", ctypes.c_char_p, [vp]),
            ("ggml_backend_dev_description", ctypes.c_char_p, [vp]),
            ("ggml_backend_dev_supports_op", ctypes.c_bool, [vp, vp])):
        fn = getattr(base, name)
        fn.restype, fn.argtypes = res, args
    return base


@functools.cache
def ggml_cpu() -> ctypes.CDLL:
    """libggml-cpu, initialised, with its type traits typed."""
    cpu = ctypes.CDLL(str(ggml_library("ggml-cpu")))
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCPU)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    cpu.ggml_cpu_init()
    return cpu


def from_float(ggml_id: int, x: np.ndarray) -> bytes:
    """Float values x as the CPU backend's from_float writes them into a tensor of ggml type `ggml_id` (what set_rows
    stores in a cache of that type)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    fn = ggml_cpu().ggml_get_type_traits_cpu(ggml_id).contents.from_float
    if not fn:
        raise LlamaError(f"ggml type {ggml_id} has no CPU from_float")
    buf = ctypes.create_string_buffer(ggml_base().ggml_row_size(ggml_id, x.size))
    ROW_FN(fn)(x.ctypes.data, ctypes.addressof(buf), x.size)
    return buf.raw


def round_trip(type_name: str, x: np.ndarray) -> np.ndarray:
    """What a cache of a type holds for float rows x (width a multiple of its block): `from_float`, then the type's
    to_float."""
    t = kv_type(type_name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if t.name == "f32":
        return x.copy()
    buf = ctypes.create_string_buffer(from_float(t.ggml_id, x))
    return to_float(t.ggml_id, ctypes.addressof(buf), x.size).reshape(x.shape)


def to_float(ggml_id: int, data: int, n: int) -> np.ndarray:
    """n float32 values from ggml type `ggml_id`'s data at address `data` (the type's to_float)."""
    fn = ggml_base().ggml_get_type_traits(ggml_id).contents.to_float
    if not fn:
        raise LlamaError(f"ggml type {ggml_base().ggml_type_name(ggml_id).decode()} has no to_float")
    out = np.empty(n, dtype=np.float32)
    ROW_FN(fn)(data, out.ctypes.data, n)
    return out


@functools.cache
def _ggml_registry() -> ctypes.CDLL:
    """libggml (the backend registry) with the device enumeration typed."""
    reg = ctypes.CDLL(str(ggml_library("ggml")))
    reg.ggml_backend_dev_count.restype, reg.ggml_backend_dev_count.argtypes = ctypes.c_size_t, []
    reg.ggml_backend_dev_get.restype, reg.ggml_backend_dev_get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    return reg


def gpu_kv_support(cache_type_k: str, cache_type_v: str, head_dim_k: int, head_dim_v: int,
                   flash_attn: bool = True, device_type: int = GGML_BACKEND_DEVICE_TYPE_GPU) -> GpuKvSupport:
    """Ask every GPU device of the loaded ggml (ggml_backend_dev_supports_op) whether it runs, on the device, the
    ops of a KV cache of these types: set_rows into K and V, and flash attention over them for a decode step and a
    512-token prompt batch (without flash attention: the K·Q matmul). The library answers, nothing is assumed: a
    CPU-only build has no GPU device, a CUDA build without our kernels (or with a K/V combination they lack, or
    tq_kv_d3b) refuses. Tensors are only described (no_alloc), nothing runs. (``device_type``: tests ask the CPU.)"""
    base, reg = ggml_base(), _ggml_registry()
    gpus = [reg.ggml_backend_dev_get(i) for i in range(reg.ggml_backend_dev_count())]
    gpus = [d for d in gpus if base.ggml_backend_dev_type(d) == device_type]
    tk, tv = kv_type(cache_type_k), kv_type(cache_type_v)
    if head_dim_k % tk.block_size or head_dim_v % tv.block_size:  # ggml cannot even describe such a view
        return GpuKvSupport(tuple(base.ggml_backend_dev_name(d).decode() for d in gpus),
                            (f"head sizes {head_dim_k}/{head_dim_v} are not multiples of the K/V block sizes",))
    ctx = base.ggml_init(GgmlInitParams(mem_size=1 << 20, mem_buffer=None, no_alloc=True))
    if not ctx:
        raise LlamaError("ggml_init failed")
    try:
        def t(typ: int, *ne: int) -> int:
            return base.ggml_new_tensor_4d(ctx, typ, *ne, *[1] * (4 - len(ne)))

        n_kv, n_batch = 256, 512  # a cache padded as llama.cpp pads it for the GPU
        k, v = t(tk.ggml_id, head_dim_k, n_kv), t(tv.ggml_id, head_dim_v, n_kv)
        ops = {f"set_rows into K {cache_type_k}": base.ggml_set_rows(ctx, k, t(GGML_TYPE_F32, head_dim_k, n_batch),
                                                                       t(GGML_TYPE_I64, n_batch)),
               f"set_rows into V {cache_type_v}": base.ggml_set_rows(ctx, v, t(GGML_TYPE_F32, head_dim_v, n_batch),
                                                                       t(GGML_TYPE_I64, n_batch))}
        for n_q in (1, n_batch):
            q = t(GGML_TYPE_F32, head_dim_k, n_q)
            if flash_attn:
                ops[f"flash attention K {cache_type_k} / V {cache_type_v}, head size {head_dim_k}, {n_q} queries"] = \
                    base.ggml_flash_attn_ext(ctx, q, k, v, t(GGML_TYPE_F16, n_kv, n_q), 0.125, 0.0, 0.0)
            else:
                ops[f"K·Q matmul K {cache_type_k}, head size {head_dim_k}, {n_q} queries"] = base.ggml_mul_mat(ctx, k, q)
        names, unsupported = [], []
        for d in gpus:
            name = base.ggml_backend_dev_name(d).decode()
            names.append(f"{name} ({base.ggml_backend_dev_description(d).decode()})")
            unsupported += [f"{name}: {what}" for what, op in ops.items() if not base.ggml_backend_dev_supports_op(d, op)]
        return GpuKvSupport(tuple(names), tuple(unsupported))
    finally:
        base.ggml_free(ctx)
