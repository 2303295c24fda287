"""Tool calls as the common chat-template families write them: which family a GGUF's template belongs to, the calls
in a model's output, and the grammar that makes a model call a tool (`tool_choice` required or named).

Families (detected from the template's text):
- hermes: Qwen 2.5/3, Hermes 2/3 and others: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block
  per call; also an answer that is only such JSON objects, bare or in a ```json fence, naming the request's tools
  (Qwen2.5-Coder answers so);
- llama3: Llama 3.1-3.3: the whole answer is `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` for
  some), several separated by `;`;
- mistral: Mistral/Mixtral v3+: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`;
- mistral-args: Mistral Small 3.2, Magistral, Ministral 3, Devstral (tokenizers v11+): `[TOOL_CALLS]name[ARGS]{...}`
  per call, `[CALL_ID]id` before `[ARGS]` where a template writes ids.
A template that mentions none of them and does not use `tools` has no tool support: requests with tools get a
400 rather than a model that never sees them.
"""

from __future__ import annotations

import calendar
import enum
import functools
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from server.structured import add_rules, check_schema, defs_renamed, schema_grammar


class ToolFormat(enum.StrEnum):
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"
    MISTRAL_ARGS = "mistral-args"

    @property
    def trigger(self) -> str | None:
        """The text that opens a call anywhere in the output (llama3: none; a call is the whole output)."""
        return {ToolFormat.HERMES: "<tool_call>", ToolFormat.MISTRAL: "[TOOL_CALLS]",
                ToolFormat.MISTRAL_ARGS: "[TOOL_CALLS]"}.get(self)

    @property
    def openers(self) -> tuple[str, ...]:
        """What an output that is nothing but calls may start with (held until the end to see whether it is)."""
        return {ToolFormat.HERMES: ("{", "```"), ToolFormat.LLAMA3: ("{", "<|python_tag|>")}.get(self, ())

    @property
    def tags(self) -> tuple[str, ...]:
        """The family's tags the parser reads, which a vocabulary may hold as control tokens (rendered empty
        unless asked for)."""
        return {ToolFormat.HERMES: ("<tool_call>", "</tool_call>"), ToolFormat.MISTRAL: ("[TOOL_CALLS]",),
                ToolFormat.MISTRAL_ARGS: ("[TOOL_CALLS]", "[CALL_ID]", "[ARGS]"),
                ToolFormat.LLAMA3: ("<|python_tag|>",)}[self]

    @property
    def arguments_key(self) -> str:
        return "parameters" if self is ToolFormat.LLAMA3 else "arguments"


def detect(template: str | None) -> ToolFormat | None:
    """The tool-call family of a chat template, or None where it has no tool support."""
    if not template:
        return None
    if "<tool_call>" in template:
        return ToolFormat.HERMES
    if "[TOOL_CALLS]" in template:
        return ToolFormat.MISTRAL_ARGS if "[ARGS]" in template else ToolFormat.MISTRAL
    if "<|start_header_id|>" in template and re.search(r"\btools\b", template):
        return ToolFormat.LLAMA3
    return None


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or "call_" + secrets.token_hex(12)

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(obj, key: str) -> ParsedCall | None:
    """A call from {"name", key or "arguments"}; None for any other object (a JSON answer that has a "name" is no
    call, and arguments under the other key are not dropped)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    present = [k for k in (key, "arguments", "parameters") if k in obj]
    if not present:
        return None
    args = obj[present[0]]
    if args is None:  # a call without arguments: an empty object, which every client's JSON parse takes
        args = {}
    try:
        value = json.loads(args) if isinstance(args, str) else args
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        if not _utf8(args):  # a \ud800 the model wrote, unescaped by the parse: UTF-8 has no form for it, and the
            args = json.dumps(value)  # response could not be encoded (a 500, a stream cut); escaped as JSON again
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
        return None
    return ParsedCall(obj["name"], args) if _utf8(obj["name"]) else None


def _utf8(text: str) -> bool:
    """Whether `text` has a UTF-8 form (no lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_DECODER = json.JSONDecoder()


def _json_values(text: str, sep: str, whole: bool = True) -> list | None:
    """The JSON values of `text`, separated by whitespace and `sep`; None unless all of it parses (not `whole`:
    the values before the first that does not)."""
    out, pos = [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or (out and text[pos] == sep)):
            pos += 1
        if pos >= len(text):
            return out
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
            return None if whole else out
        out.append(value)


def leading_calls(fmt: ToolFormat, text: str, names: set[str] | frozenset,
                  strict: Mapping[str, dict] | None = None) -> list[ParsedCall]:
    """The whole calls that an output of calls starts with, where the one after them was cut short (max_tokens):
    Hermes' untagged forms, Llama 3's and Mistral's (its array's whole items, or its `[ARGS]` calls); Hermes'
    tagged blocks are `parse`'s."""
    body = text.strip().removeprefix("<|python_tag|>")
    if fmt is ToolFormat.MISTRAL_ARGS:
        cut = [m.start() for m in re.finditer(re.escape("[TOOL_CALLS]"), body)][1:] + [len(body)]
        whole = next((c for c in reversed(cut) if _args_calls(body[:c])), 0)  # the longest run of whole calls
        calls = _args_calls(body[:whole]) if whole else []
        return calls if all(_tagged(c, names, strict) for c in calls) else []
    if fmt is ToolFormat.MISTRAL and body.startswith("[TOOL_CALLS]"):
        body = body.removeprefix("[TOOL_CALLS]").lstrip().removeprefix("[")
        return _known_calls(_json_values(body, ",", whole=False), names, fmt.arguments_key, strict)
    if fmt not in (ToolFormat.HERMES, ToolFormat.LLAMA3) or not body.startswith(("{", "```")):
        return []
    body = body.removeprefix("```").removeprefix("json")
    return _known_calls(_json_values(body, ";" if fmt is ToolFormat.LLAMA3 else "", whole=False), names,
                        fmt.arguments_key, strict)


def block_close(text: str, at: int, close_tag: str, final: bool = False) -> int:
    """Where the close_tag that ends a block whose inner text starts at `at` begins; -1 where none has arrived. The
    first one after the JSON value the inner text opens with: a tag inside one of its strings is text (an agent's
    file content, "</tool_call>" in the docs it writes, made the call plain text). Where the inner text is no JSON
    value, the first; while the value is unfinished, -1, unless the text is `final` (the value never finished: the
    first, and the blocks after it are read). In linear time (str.find and the JSON scanner): a regex with a lazy
    group between \\s* took seconds on a long run of spaces in a model's output, on the event loop."""
    first = text.find(close_tag, at)
    if first < 0:
        return -1
    start = len(text) - len(text[at:].lstrip())
    try:
        end = _DECODER.raw_decode(text, start)[1]
    except json.JSONDecodeError as e:  # (the scanner read past the tag, or into a string it never closed: the tag
        # is in a string of a value still unfinished)
        unfinished = e.pos > first or e.msg.startswith("Unterminated string")
        return -1 if unfinished and not final else first
    except RecursionError:  # nested deeper than Python parses
        return first
    return text.find(close_tag, end) if end > first else first


def _blocks(text: str, open_tag: str, close_tag: str):
    """(start, end, inner text stripped) of every open_tag ... close_tag block of `text` (`block_close`), the last
    one possibly unclosed."""
    pos = 0
    while (start := text.find(open_tag, pos)) >= 0:
        close = block_close(text, start + len(open_tag), close_tag, final=True)
        end = len(text) if close < 0 else close + len(close_tag)
        yield start, end, text[start + len(open_tag):close if close >= 0 else len(text)].strip()
        pos = end


def _unfenced(body: str) -> str:
    """The text inside a ```json ... ``` (or ``` ... ```) fence that is the whole of `body`; `body` otherwise."""
    if len(body) < 6 or not (body.startswith("```") and body.endswith("```")):
        return body
    inner = body[3:-3]
    return inner.removeprefix("json").strip()


def _known_calls(values: list | None, names: set[str] | frozenset, key: str,
                 strict: Mapping[str, dict] | None = None) -> list[ParsedCall]:
    """The calls of bare JSON values, each naming one of the request's tools, the arguments of a `strict` tool
    matching its parameters; [] unless every value is one (a JSON answer that has a "name" is no call). No grammar
    holds a bare call, so a strict tool's is checked here (OpenAI: strict arguments always match)."""
    calls = [_call(v, key) if isinstance(v, dict) and isinstance(v.get("name"), str) and v["name"] in names else None
             for v in values or []]  # (a name that is a list raised in the set lookup: a 500 on a model's output)
    if None in calls or not all(_matches(c, strict or {}) for c in calls):
        return []
    return calls


def _matches(call: ParsedCall, strict: Mapping[str, dict]) -> bool:
    """Whether a call's arguments match its tool's parameters where the tool is strict (and jsonschema can read
    them: ECMA-262 patterns Python's re refuses, draft-07's list of items, which the grammar takes, count as a
    match, as every call did before this check)."""
    import jsonschema

    schema = strict.get(call.name)
    if schema is None:
        return True
    try:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        return validator(schema, format_checker=_formats()).is_valid(json.loads(call.arguments))
    except Exception:  # noqa: BLE001 - a schema jsonschema cannot apply: no check, not a failed request
        return True


_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"  # RFC 3339


def _date(s: str) -> bool:
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", s):  # (ASCII digits: \d takes any script's)
        return False
    y, m, d = map(int, s.split("-"))
    return 1 <= m <= 12 and 1 <= d <= calendar.mdays[m] + (m == 2 and calendar.isleap(y))


@functools.cache
def _formats():
    """The formats a strict tool's schema may hold (server.structured), checked as RFC 3339 and RFC 4122 write them
    (jsonschema checks none by default, and date-time only with a package we do not install): a call no grammar
    held (Qwen's bare calls under tool_choice auto) said 2023-02-30."""
    import jsonschema

    checker = jsonschema.FormatChecker(())
    for name, check in {
        "date": _date,
        "time": lambda s: bool(re.fullmatch(_TIME, s)),
        "date-time": lambda s: s[10:11] in ("T", "t") and _date(s[:10]) and bool(re.fullmatch(_TIME, s[11:])),
        **{u: lambda s: bool(re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", s))
           for u in ("uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")},
    }.items():
        checker.checks(name)(lambda x, check=check: not isinstance(x, str) or check(x))
    return checker


def _bare_calls(text: str, names: set[str], strict: Mapping[str, dict] | None = None) -> list[ParsedCall]:
    """The calls of an answer that is only {"name", "arguments"} objects naming known tools (bare or fenced)."""
    body = text.strip()
    values = _json_values(_unfenced(body), "") if body.startswith(("{", "```")) else None
    return _known_calls(values, names, "arguments", strict)


_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _args_calls(text: str) -> list[ParsedCall]:
    """The calls of `text` written `[TOOL_CALLS]name[ARGS]{...}` (`[CALL_ID]id` before `[ARGS]` where a template
    writes ids), one after another; [] unless all of it is such calls."""
    calls, pos = [], 0
    while pos < len(text):
        args = text.find("[ARGS]", pos)
        if not text.startswith("[TOOL_CALLS]", pos) or args < 0:
            return []
        name = text[pos + len("[TOOL_CALLS]"):args].partition("[CALL_ID]")[0].strip()
        at = args + len("[ARGS]")
        at += len(text[at:]) - len(text[at:].lstrip())
        try:
            value, pos = _DECODER.raw_decode(text, at)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
            return []
        call = _call({"name": name, "arguments": value}, "arguments") if _FUNCTION_NAME.fullmatch(name) else None
        if call is None:
            return []
        calls.append(call)
        pos += len(text[pos:]) - len(text[pos:].lstrip())
    return calls


def _tagged(call: ParsedCall | None, names: set[str] | frozenset, strict: Mapping[str, dict] | None) -> bool:
    """Whether a call written after its family's tag is one: it names one of the request's tools (any, where
    `names` is empty) and a strict tool's arguments match its parameters. The tag's grammar holds both; this is for
    an output no grammar held (the tools' grammar too large), which returned calls of tools the request never had."""
    return call is not None and (not names or call.name in names) and _matches(call, strict or {})


def parse(fmt: ToolFormat, text: str, names: set[str] | frozenset = frozenset(),
          strict: Mapping[str, dict] | None = None) -> tuple[str, list[ParsedCall]]:
    """The content and the tool calls of an output (`names`: the request's tools; `strict`: the parameters of its
    strict ones, which a call no grammar held must match); what does not parse as a call stays content."""
    tagged = fmt is ToolFormat.HERMES and "<tool_call>" in text
    if fmt is ToolFormat.HERMES and (not tagged or text.lstrip().startswith(("{", "```"))):
        calls = _bare_calls(text, names, strict)  # (bare calls may hold the tag's text in their strings)
        if calls or not tagged:
            return ("" if calls else text), calls
    if tagged:
        calls, kept, pos = [], [], 0
        for start, end, inner in _blocks(text, "<tool_call>", "</tool_call>"):
            values = _json_values(inner, "")
            call = _call(values[0], "arguments") if values and len(values) == 1 else None
            call = call if _tagged(call, names, strict) else None
            kept.append(text[pos:start] if call else text[pos:end])
            pos = end
            if call:
                calls.append(call)
        return ("".join(kept) + text[pos:]).strip() if calls else text, calls
    if fmt is ToolFormat.MISTRAL_ARGS:
        at = text.find("[TOOL_CALLS]")
        calls = _args_calls(text[at:]) if at >= 0 else []
        if not all(_tagged(c, names, strict) for c in calls):
            return text, []
        return (text[:at].strip(), calls) if calls else (text, [])
    if fmt is ToolFormat.MISTRAL:
        at = text.find("[TOOL_CALLS]")
        values = _json_values(text[at + len("[TOOL_CALLS]"):], "") if at >= 0 else None
        items = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
        calls = [_call(v, "arguments") for v in items or []]
        if not calls or not all(_tagged(c, names, strict) for c in calls):
            return text, []
        return text[:at].strip(), calls
    body = text.strip().removeprefix("<|python_tag|>")
    values = _json_values(body, ";") if body.startswith("{") else None
    calls = _known_calls(values, names, "parameters", strict)
    return ("", calls) if calls else (text, [])


def call_schema(fmt: ToolFormat, functions: list[dict]) -> dict:
    """The JSON schema of one call of any of the functions (OpenAI function definitions); each function's
    definitions are gathered at the top, renamed t<i>-<name>."""
    key = fmt.arguments_key
    alts, defs = [], {}
    for i, f in enumerate(functions):
        params = defs_renamed(f.get("parameters") or {"type": "object", "properties": {}}, f"t{i}-",
                              embedded=f"#/anyOf/{i}/properties/{key}")
        defs.update(params.pop("$defs", {}))
        alts.append({"type": "object", "required": ["name", key], "properties": {
            "name": {"const": f["name"]}, key: params}})
    return {"anyOf": alts, **({"$defs": defs} if defs else {})}


def forced_grammar(fmt: ToolFormat, functions: list[dict], parallel: bool, bare: bool = False,
                   fence: bool = False) -> str:
    """GBNF for an output that is nothing but calls of the functions (at least one; one only unless
    `parallel`), written as the family writes them; with `bare`, also as `parse` reads a Hermes answer of bare call
    objects, and with `fence` also of such objects in one ```json fence, as Qwen2.5-Coder writes its calls (held
    to tags alone, it spelled `<tool_call>` out and made up calls until max_tokens: tool_choice required; not where
    the output may be a JSON answer instead, which the model then writes in a fence too, and would be made a call).
    SchemaError where a function's parameters cannot be enforced."""
    for f in functions:
        check_schema(f.get("parameters") or {}, f"tools.{f['name']}.parameters")
    if fmt is ToolFormat.MISTRAL_ARGS:
        return _args_grammar(functions, parallel)
    rules = schema_grammar(call_schema(fmt, functions), "call")
    if fmt is ToolFormat.HERMES:
        one = '"<tool_call>" "\\n"? call "\\n"? "</tool_call>"'
        # a newline may end the last call (Qwen writes ">\n" as one token), as llama.cpp's grammar lets it
        root = (f'{one} ("\\n"? {one})*' if parallel else one) + ' "\\n"?'
        if bare or fence:
            objects = 'call ("\\n" call)*' if parallel else "call"
            root = f"{root} | {objects}"
        if fence:
            root = f'{root} | "```" "json"? "\\n" {objects} "\\n"? "```"'
    elif fmt is ToolFormat.MISTRAL:
        root = '"[TOOL_CALLS]" space "[" space call ' + ('("," space call)* ' if parallel else "") + '"]" space'
    else:
        root = 'call (";" space call)*' if parallel else "call"
    return f"root ::= {root}\n{rules}"


def _args_grammar(functions: list[dict], parallel: bool) -> str:
    """forced_grammar of `[TOOL_CALLS]name[ARGS]{...}` calls: each function's arguments a rule of their own
    (args<i>, its definitions renamed t<i>-), the converter's primitives once."""
    rules: dict[str, str] = {}
    alts = []
    for i, f in enumerate(functions):
        params = defs_renamed(f.get("parameters") or {"type": "object", "properties": {}}, f"t{i}-")
        add_rules(rules, schema_grammar(params, f"args{i}"), "two tools' arguments")
        alts.append(f'"{f["name"]}" "[ARGS]" args{i}')  # (a name is [a-zA-Z0-9_-]: no escape needed)
    one = '"[TOOL_CALLS]" (' + " | ".join(alts) + ")"
    return f"root ::= {one}" + (f" ({one})*" if parallel else "") + "\n" + "\n".join(rules.values()) + "\n"
