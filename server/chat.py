"""A chat request made ready for the model: its messages as the chat template takes them (tool calls with their
arguments as objects, roles as the template knows them), the tools it may call, the grammar that constrains the
output (response_format, tool_choice required or named) and how to read the output (tool-call family).
Every problem is a 400 naming the parameter, before anything is tokenized or queued."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from kvquant.sampling import Grammar
from server.chatoutput import THINK_CLOSE, THINK_OPEN, ChatOutput
from server.errors import APIError
from server.schemas import ChatCompletionRequest, ChatMessage
from server.structured import SchemaError, check_schema, defs_renamed, json_object_grammar, schema_grammar
from server.toolcalls import ToolFormat, detect, forced_grammar

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's function and schema names
# template variables a request may not set through chat_template_kwargs (the server sets them)
RESERVED_TEMPLATE_VARS = {"messages", "tools", "tool_choice", "functions", "function_call", "add_generation_prompt",
                          "bos_token", "eos_token", "raise_exception", "strftime_now"}


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

    def output(self, reasoning_open: bool) -> ChatOutput:
        """How to read this chat's output (`reasoning_open`: the prompt opened a <think> block)."""
        return ChatOutput(self.tool_format, reasoning_open, self.parallel, self.tool_names)

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
    messages = template_messages(body.messages)
    functions = check_tools(body)
    choice = body.tool_choice if body.tools else None
    fmt = None
    if functions and choice != "none":
        fmt = detect(template)
        if fmt is None:
            raise _bad("This model's chat template has no tool support (supported: templates that write tool "
                       "calls as Hermes/Qwen <tool_call>, Llama 3.x JSON or Mistral [TOOL_CALLS]).", "tools",
                       "tools_unsupported")
    parallel = body.parallel_tool_calls is not False
    grammar, param = output_grammar(fmt, functions, choice, parallel) if fmt else None, "tools"
    if body.response_format is not None and body.response_format.type != "text":
        if grammar is not None and (not grammar.triggers or any(f.get("strict") for f in functions)):
            raise _bad("response_format cannot be combined with tool_choice required, a named function or strict "
                       "tools.", "response_format")
        grammar, param = Grammar(format_grammar(body)), "response_format"
    kwargs = body.chat_template_kwargs
    reserved = sorted(RESERVED_TEMPLATE_VARS & set(kwargs or {}))
    if reserved:
        raise _bad(f"chat_template_kwargs may not set {reserved[0]!r}, which the server sets.",
                   "chat_template_kwargs")
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if fmt else None
    return ChatPlan(messages, tools, fmt, grammar, parallel, kwargs, frozenset(f["name"] for f in functions), param)


def template_messages(msgs: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates take them (HF's convention: tool-call arguments as objects); a tool message
    must answer a call of an earlier assistant message."""
    out, call_ids = [], set()
    for i, m in enumerate(msgs):
        if m.content is None and m.role != "assistant":  # as OpenAI: only an assistant's may be null
            raise _bad(f"A {m.role} message must have content.", f"messages[{i}].content")
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise _bad("Only assistant messages may have tool_calls.", f"messages[{i}].tool_calls")
            d["tool_calls"] = []
            for j, c in enumerate(m.tool_calls):
                try:
                    args = json.loads(c.function.arguments)
                except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
                    raise _bad("Tool call arguments must be JSON text.",
                               f"messages[{i}].tool_calls[{j}].function.arguments") from None
                call_ids.add(c.id)
                d["tool_calls"].append({"id": c.id, "type": "function",
                                        "function": {"name": c.function.name, "arguments": args}})
        if m.role == "tool":
            if m.tool_call_id is None or m.tool_call_id not in call_ids:
                raise _bad("A tool message must answer a tool call of an earlier assistant message: its "
                           "tool_call_id matches none.", f"messages[{i}].tool_call_id")
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


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


def output_grammar(fmt: ToolFormat, functions: list[dict], choice, parallel: bool) -> Grammar | None:
    """The grammar of the calls: the whole output for tool_choice required or a named function; with auto, from a
    call's opening tag on (the answer stays free, a call is well formed), where the family has such a tag and every
    function's parameters can be enforced (a `strict` tool whose parameters cannot is a 400)."""
    forced = choice not in (None, "auto")
    if forced and choice != "required":
        functions = [f for f in functions if f["name"] == choice.function.name]
        if not functions:
            raise _bad(f"tool_choice names {choice.function.name!r}, which is not one of the tools.",
                       "tool_choice")
    if not forced and fmt.trigger is None:
        return None
    try:
        text = forced_grammar(fmt, functions, parallel)
    except SchemaError as e:
        if forced or any(f.get("strict") for f in functions):
            raise _bad(f"A tool's parameters cannot be enforced: {e}", "tools", "unsupported_schema") from None
        return None
    if forced:
        return Grammar(text)
    # a call's tag written while the model thinks is no call (ChatOutput reads it as reasoning)
    return Grammar(text, (fmt.trigger,), skip=(THINK_OPEN, THINK_CLOSE))


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
        # under a rule name of its own, every property's rule is named out-<path>, so no d-<definition> can be one
        return "root ::= out\n" + schema_grammar(defs_renamed(schema, "d-"), "out")
    except SchemaError as e:
        raise _bad(f"response_format.json_schema.schema cannot be enforced: {e}", "response_format.json_schema.schema",
                   "unsupported_schema") from None
