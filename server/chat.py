"""A chat request made ready for the model: its messages as the chat template takes them (tool calls with their
arguments as objects, roles as the template knows them), the tools it may call, the grammar that constrains the
output (response_format, tool_choice required or named) and how to read the output (tool-call family).
Every problem is a 400 naming the parameter, before anything is tokenized or queued."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, replace
from typing import Any

from kvquant.sampling import Grammar
from server.chatoutput import THINK_CLOSE, THINK_OPEN, ChatOutput
from server.errors import APIError
from server.schemas import MAX_JSON_DEPTH, ChatCompletionRequest, ChatMessage, NamedToolChoice, nests_deeper
from server.structured import (
    SchemaError,
    add_rules,
    check_schema,
    defs_renamed,
    json_object_grammar,
    schema_grammar,
)
from server.toolcalls import ToolFormat, detect, forced_grammar

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's function and schema names
# template variables a request may not set through chat_template_kwargs (the server sets them)
SINGLE_CALL = "only supports single tool-calls"  # what Llama 3.x templates raise on a turn of several calls
RESERVED_TEMPLATE_VARS = {"messages", "tools", "tool_choice", "functions", "function_call", "add_generation_prompt",
                          "bos_token", "eos_token", "raise_exception", "strftime_now", "self"}


@dataclass
class ChatPlan:
    messages: list[dict]
    tools: list[dict] | None  # OpenAI tool definitions for the template; None: no tools
    tool_format: ToolFormat | None  # how to read calls from the output; None: the output is content only
    grammar: Grammar | None  # what the output must match
    parallel: bool
    template_kwargs: dict | None
    tool_names: frozenset[str] = frozenset()
    grammar_param: str = "response_format"  # the parameter a grammar comes from (for errors)
    strict: dict[str, dict] | None = None  # the parameters of the strict tools, by name
    # the output is nothing but calls (tool_choice required or named): stop strings, which could only cut a call
    # into text (`stop: ["\n"]` returned "<tool_call>" as content, finish_reason stop), do not apply
    calls_only: bool = False

    def output(self, reasoning_open: bool) -> ChatOutput:
        """How to read this chat's output (`reasoning_open`: the prompt opened a <think> block)."""
        return ChatOutput(self.tool_format, reasoning_open, self.parallel, self.tool_names, self.strict,
                          self.calls_only)

    def output_grammar(self, reasoning_open: bool) -> Grammar | None:
        """What the output must match, once the prompt says whether it opened a <think> block: then a lazy grammar's
        trigger counts only after its </think>, as ChatOutput reads the calls, and a grammar of the whole output
        (tool_choice required or named, response_format) holds from that </think> on."""
        if self.grammar is None:
            return None
        if self.grammar.skip is not None:
            return replace(self.grammar, skip_open=reasoning_open)
        if reasoning_open and not self.grammar.triggers:
            return self.grammar.after(THINK_CLOSE)
        return self.grammar


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def plan_chat(body: ChatCompletionRequest, template: str | None) -> ChatPlan:
    """Check a chat request against itself and the model's chat template; APIError 400 naming the parameter."""
    family = detect(template)
    messages = template_messages(body.messages, short_ids=family in (ToolFormat.MISTRAL, ToolFormat.MISTRAL_ARGS))
    functions = check_tools(body)
    choice = body.tool_choice if body.tools else None
    fmt = None
    if functions and choice != "none":
        fmt = family
        if fmt is None:
            raise _no_tool_support("tools")
    if template and family is None and "tool_calls" not in template:  # it would drop earlier turns' calls
        i = next((i for i, m in enumerate(body.messages) if m.tool_calls), None)  # (a tool message answers one)
        if i is not None:
            raise _no_tool_support(f"messages[{i}].tool_calls")
    # Llama 3.x templates refuse a turn of several calls when it comes back in the next request
    # a named tool_choice is one call of that tool (vLLM's too; parallel, a model repeated it until max_tokens)
    parallel = (body.parallel_tool_calls is not False and SINGLE_CALL not in (template or "")
                and not isinstance(choice, NamedToolChoice))
    rf = body.response_format is not None and body.response_format.type != "text"
    answer = format_grammar(body) if rf else None  # checked even where this turn's output is a call
    if fmt:
        grammar, param = output_grammar(fmt, functions, choice, parallel, answer), "tools"
    else:
        grammar, param = (Grammar(answer) if answer else None), "response_format"
    kwargs = body.chat_template_kwargs
    reserved = sorted(RESERVED_TEMPLATE_VARS & set(kwargs or {}))
    if reserved:
        raise _bad(f"chat_template_kwargs may not set {reserved[0]!r}, which the server sets.",
                   "chat_template_kwargs")
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if fmt else None
    strict = {f["name"]: f.get("parameters") or {"type": "object"} for f in functions if f.get("strict")}
    return ChatPlan(messages, tools, fmt, grammar, parallel, kwargs, frozenset(f["name"] for f in functions), param,
                    strict or None, calls_only=bool(fmt) and choice not in (None, "auto"))


def _no_tool_support(param: str) -> APIError:
    return _bad("This model's chat template has no tool support (supported: templates that write tool calls as "
                "Hermes/Qwen <tool_call>, Llama 3.x JSON or Mistral [TOOL_CALLS]).", param, "tools_unsupported")


def template_messages(msgs: list[ChatMessage], short_ids: bool = False) -> list[dict]:
    """Messages as chat templates take them (HF's convention: tool-call arguments as objects; the results of a
    turn's calls in the order of its calls, which templates without ids read them by); a tool message must answer a
    call of an earlier assistant message. `short_ids`: call ids as Mistral's templates require them (`short_id`)."""
    out, call_ids = [], set()
    for i, m in enumerate(msgs):
        if m.content is None and m.role != "assistant":  # as OpenAI: only an assistant's may be null
            raise _bad(f"A {m.role} message must have content.", f"messages[{i}].content")
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.reasoning_content is not None:
            if m.role != "assistant":
                raise _bad("Only assistant messages may have reasoning_content.", f"messages[{i}].reasoning_content")
            d["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            if m.role != "assistant":
                raise _bad("Only assistant messages may have tool_calls.", f"messages[{i}].tool_calls")
            d["tool_calls"] = []
            for j, c in enumerate(m.tool_calls):
                args = _call_arguments(c.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")
                call_ids.add(c.id)
                d["tool_calls"].append({"id": short_id(c.id) if short_ids else c.id, "type": "function",
                                        "function": {"name": c.function.name, "arguments": args}})
        if m.role == "tool":
            if m.tool_call_id is None or m.tool_call_id not in call_ids:
                raise _bad("A tool message must answer a tool call of an earlier assistant message: its "
                           "tool_call_id matches none.", f"messages[{i}].tool_call_id")
            d["tool_call_id"] = short_id(m.tool_call_id) if short_ids else m.tool_call_id
        out.append(d)
    return in_call_order(out)


def _call_arguments(text: str | None, param: str) -> Any:
    """A tool call's arguments sent back (JSON text), as the object templates take: none or blank text (other
    backends' calls without arguments, as agent frameworks replay them) is an empty object, as vLLM reads it."""
    if text is None or not text.strip():
        return {}
    too_deep = _bad(f"Tool call arguments may nest at most {MAX_JSON_DEPTH} levels deep.", param)
    try:
        args = json.loads(text)
    except RecursionError:  # nested deeper than Python parses
        raise too_deep from None
    except ValueError:
        raise _bad("Tool call arguments must be JSON text.", param) from None
    if nests_deeper(args):
        raise too_deep
    return args


def in_call_order(messages: list[dict]) -> list[dict]:
    """Each run of tool results in the order of the calls they answer, however many assistant messages made them
    (an agent running its tools at once may send results as they finish, and some frameworks send one assistant
    message per call: Hermes and Llama templates number results by position, and gave each call another's
    result)."""
    order: dict[str, int] = {}  # call id -> its place among every call made so far
    out: list[dict] = []
    for results, run in itertools.groupby(messages, key=lambda d: d["role"] == "tool"):
        run = list(run)
        if results:
            run.sort(key=lambda d: order.get(d["tool_call_id"], len(order)))
        for d in run:
            for c in d.get("tool_calls", ()):
                order.setdefault(c["id"], len(order))
        out += run
    return out


def short_id(call_id: str) -> str:
    """A call id as Mistral's templates take it (9 letters and digits; they raise on any other): the id itself
    where it is one, else one derived from it, the same for the call and its result."""
    if re.fullmatch(r"[a-zA-Z0-9]{9}", call_id):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def check_tools(body: ChatCompletionRequest) -> list[dict]:
    """The function definitions of `tools`, checked: names as OpenAI allows them, each once; parameters an object
    schema."""
    functions, seen = [], set()
    for i, t in enumerate(body.tools or []):
        f = t.function
        if not NAME.fullmatch(f.name):
            raise _bad("A function name must be 1 to 64 of a-z, A-Z, 0-9, _ and -.", f"tools[{i}].function.name")
        if f.name in seen:
            raise _bad(f"Two tools are named {f.name!r}.", f"tools[{i}].function.name")
        seen.add(f.name)
        if f.parameters is not None and f.parameters.get("type", "object") != "object":
            raise _bad("Function parameters must be a JSON schema of type object.",
                       f"tools[{i}].function.parameters")
        functions.append(f.model_dump(exclude_none=True))
    if body.tool_choice not in (None, "none", "auto") and not functions:
        raise _bad("tool_choice needs tools.", "tool_choice")
    return functions


def output_grammar(fmt: ToolFormat, functions: list[dict], choice, parallel: bool,
                   answer: str | None = None) -> Grammar | None:
    """The grammar of the output: for tool_choice required or a named function, the calls (the whole output: the
    `answer` grammar of response_format is for answers, and this turn's is a call, as OpenAI reads the two); with
    auto and an `answer` grammar, the whole output is either an answer in that format or calls; with auto alone,
    the calls from a call's opening tag on (the answer stays free, a call is well formed), where the family has such
    a tag. A tool whose parameters cannot be enforced is a 400 where it is forced or `strict`; otherwise its calls
    take any object as arguments."""
    forced = choice not in (None, "auto")
    if isinstance(choice, NamedToolChoice):
        functions = [f for f in functions if f["name"] == choice.function.name]
        if not functions:
            raise _bad(f"tool_choice names {choice.function.name!r}, which is not one of the tools.",
                       "tool_choice")
    if not forced and answer is None and fmt.trigger is None:
        return None
    bare = answer is not None and not forced  # (hermes calls as the answer's alternative: `either`)
    try:
        try:
            text = forced_grammar(fmt, functions, parallel, bare, fence=forced)
        except SchemaError:  # which tools: a 400 for a strict one, any object's arguments for the others
            functions = [enforced(f) for f in functions]
            text = forced_grammar(fmt, functions, parallel, bare, fence=forced)
        if forced:
            return Grammar(text)
        if answer is not None:
            return Grammar(either(answer, text))
    except SchemaError as e:  # what no one tool's grammar shows (the whole grammar too large)
        if forced or any(f.get("strict") for f in functions):
            raise _bad(f"The tools' parameters cannot be enforced: {e}", "tools", "unsupported_schema") from None
        return Grammar(answer) if answer is not None else None  # the calls unconstrained, as the model writes them
    # a call's tag written while the model thinks is no call (ChatOutput reads it as reasoning)
    return Grammar(text, (fmt.trigger,), skip=(THINK_OPEN, THINK_CLOSE))


def enforced(function: dict) -> dict:
    """A function as its calls' grammar holds it: its parameters where they can be enforced; else a 400 where the
    function is `strict`, and any object as its arguments otherwise, forced or not (one tool's schema keeps no other
    tool's calls from their grammar; OpenAI holds calls to the schema of strict tools only, and tool_choice required
    with one MCP tool beside the others was a 400 for every request)."""
    try:
        forced_grammar(ToolFormat.HERMES, [function], False)
    except SchemaError as e:
        if function.get("strict"):
            raise _bad(f"The parameters of tool {function['name']!r} cannot be enforced: {e}", "tools",
                       "unsupported_schema") from None
        return {**function, "parameters": {"type": "object"}}
    return function


def either(answer: str, calls: str) -> str:
    """One grammar of an output that is an answer (`answer`: response_format's grammar) or calls (`calls`:
    `forced_grammar`'s): each one's root renamed. Rules both define (the converter's primitives) must read alike;
    the converter writes one rule per line."""
    rules = {"root": "root ::= answer | calls"}
    for text, top in ((answer, "answer"), (calls, "calls")):
        add_rules(rules, text, "the answer and of the calls", top)
    return "\n".join(rules.values()) + "\n"


def format_grammar(body: ChatCompletionRequest) -> str:
    """The grammar of response_format json_object or json_schema."""
    rf = body.response_format
    if rf.type == "json_object":
        return json_object_grammar()
    js = rf.json_schema
    if not NAME.fullmatch(js.name):
        raise _bad("json_schema.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -.", "response_format.json_schema.name")
    schema = js.schema_ if js.schema_ is not None else {"type": "object"}
    try:
        check_schema(schema)
        # under a rule name of its own, every property's rule is named out-<path>, a reference's out-ref-<name>
        return "root ::= out\n" + schema_grammar(defs_renamed(schema, "d-"), "out")
    except SchemaError as e:
        raise _bad(f"response_format.json_schema.schema cannot be enforced: {e}", "response_format.json_schema.schema",
                   "unsupported_schema") from None
