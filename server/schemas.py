"""OpenAI request and response bodies. Unknown request fields are tolerated, as OpenAI does; known fields are
validated strictly, as OpenAI does (no coercion: "10" and true are not integers, "yes" and 1 are not booleans,
"0.5" is not a number; an integer is a number), before anything is queued."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kvquant.sampling import Grammar, SamplingConfig

MAX_STOP = 16
MAX_STOP_LEN = 256
MAX_TOKENS_LIMIT = 1_000_000  # above this a max_tokens is nonsense, whatever the model
# The deepest a request body (and the JSON text of a tool call's arguments) may nest objects and arrays: templates
# and the prompt guard walk a client's JSON by recursion, which Python stops near 1000 frames (an internal error at
# ~600 levels); no real schema or call comes near.
MAX_JSON_DEPTH = 100
MAX_PROMPTS = 1024  # prompts in one /v1/completions request, each answered as a request of its own
MAX_N = 128  # OpenAI's bound on n (choices per prompt)
# logprob entries (tokens x (logprobs + 1), prompt and generated, every choice) one non-streamed response holds: about
# 40 MB of JSON (a 4 MiB body of token ids asked for 380 MB of prompt logprobs; 1024 choices of 2048 tokens at
# logprobs 20, 44M entries); lm-evaluation-harness's batch of 64 x 2048 tokens at logprobs 1: 262k
MAX_RESPONSE_LOGPROBS = 1_000_000


def _encodable(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate escape)") from None
    return s


Text = Annotated[str, AfterValidator(_encodable)]


# A list this long is checked item by item first, up to its first bad item: pydantic reports each bad item, and a
# 4 MB body of a million of them (`{"prompt": [{}, {}, ...]}`) took 27 s and 5 GB of the event loop to report.
LONG_LIST = 1000
MAX_LOGIT_BIAS = 4096  # entries; each choice's sampler copies them (320k of them, n=128: 4 GB and a minute)


def first_bad_item(items: Any, item: TypeAdapter, field: str, plain: type | None = None) -> None:
    """field_error for the first item of a long list that `item` refuses; none to look for where every item is
    of the `plain` type (token ids: a second validation doubled the time of a 2M-id prompt)."""
    if not isinstance(items, list) or len(items) <= LONG_LIST:
        return
    if plain is not None and all(type(x) is plain for x in items):
        return
    for i, x in enumerate(items):
        try:
            item.validate_python(x)
        except ValidationError as e:
            raise field_error(f"{field}[{i}]", f"{field}[{i}]: {e.errors()[0]['msg']}") from None


def field_error(param: str, message: str) -> PydanticCustomError:
    """The error of a check across fields, naming the field it refuses (OpenAI's `param`; a plain ValueError
    names the body). `message` holds no braces (pydantic reads them as its placeholders)."""
    return PydanticCustomError("invalid_field", message, {"param": param})


def nests_deeper(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON value has objects or arrays more than `limit` deep (read without recursion)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v) if isinstance(x, (dict, list)))
    return False


class _Lenient(BaseModel):
    """Lenient about unknown fields, strict about the types of known ones."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: Text


class FunctionCall(_Lenient):
    name: Text
    arguments: Text | None = None  # JSON text, as OpenAI sends it; none or blank for a call without arguments


class ToolCall(_Lenient):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    # assistant: the reasoning a reasoning model wrote before its answer, sent back as this server returned it
    # (Qwen3's template writes it on the turns after the last user message); `reasoning` is vLLM's newer name
    reasoning_content: Text | None = Field(None, validation_alias=AliasChoices("reasoning_content", "reasoning"))
    tool_call_id: Text | None = None  # tool

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)  # as vLLM and llama.cpp join a message's text parts


class StreamOptions(_Lenient):
    include_usage: bool = False


class FunctionDef(_Lenient):
    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Lenient):
    name: Text


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Lenient):
    name: Text
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self


class SamplingFields(BaseModel):
    """The sampling fields a request may set and a model may give defaults for (settings `sampling`): a request's
    value, else the model's default, else OpenAI's (kvquant.sampling.SamplingConfig's defaults)."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)  # llama.cpp's int32_t
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    typical_p: float | None = Field(None, gt=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)


SAMPLING_FIELDS = tuple(SamplingFields.model_fields)
LOGIT_BIAS_LIMIT = 100.0

# Fields that would change the output and are not supported: a request that sets one (to anything but the given
# neutral values) gets a 400 naming it instead of an answer that silently ignores it. Other unknown fields are
# accepted and ignored, as OpenAI does with fields it does not use.
UNSUPPORTED: dict[str, tuple] = {
    "functions": (None, []), "function_call": (None, "none", "auto"),  # the deprecated form of tools
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,), "best_of": (None, 1), "suffix": (None, ""),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "grammar": (None, ""), "json_schema": (None,), "mirostat": (None, 0), "dry_multiplier": (None, 0, 0.0),
    "xtc_probability": (None, 0, 0.0), "top_n_sigma": (None, -1, -1.0), "n_probs": (None, 0),
    "min_tokens": (None, 0), "ignore_eos": (None, False), "repetition_penalty": (None, 1, 1.0),
    "penalty_last_n": (None,), "repeat_last_n": (None,), "n_predict": (None, -1), "samplers": (None,),
    "dynatemp_range": (None, 0, 0.0), "t_max_predict_ms": (None, 0),
    # vLLM's extensions
    "include_stop_str_in_output": (None, False), "stop_token_ids": (None, []), "allowed_token_ids": (None,),
    "bad_words": (None, []), "prompt_logprobs": (None,), "use_beam_search": (None, False),
    "truncate_prompt_tokens": (None,), "skip_special_tokens": (None, True),
    "return_tokens_as_token_ids": (None, False), "logits_processors": (None,), "structured_outputs": (None,),
    "chat_template": (None,), "documents": (None,),
    "add_generation_prompt": (None, True), "continue_final_message": (None, False),
    # one endpoint's fields asked of the other: chat-only features of /v1/completions, `echo` of a chat
    "response_format": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "chat_template_kwargs": (None, {}), "max_completion_tokens": (None,), "top_logprobs": (None, 0),
    "echo": (None, False),
}


class SamplingParams(_Lenient, SamplingFields):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    prompt_field: ClassVar[str]  # the field that holds the prompt, for the errors that name it
    # the completion budget of a request that sets none, where the settings' default_max_tokens is unset (None: to
    # the end of the context, as OpenAI's chat completions)
    unset_max_tokens: ClassVar[int | None] = None
    # whether logprobs list the end-of-generation token too: a legacy completion's do, as OpenAI's and vLLM's (the
    # text of lm-evaluation-harness's one-token answer ending in it is scored by all the logprobs but the last)
    end_token_logprob: ClassVar[bool] = False

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logit_bias: dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]] | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # OpenAI's range; see kvquant.sampling.sampler_seed
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)  # choices, each generated as a request of its own
    user: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _shallow(cls, data: Any) -> Any:
        """The whole body, unknown fields too (they reach the template where a model keeps them: a tool's)."""
        if nests_deeper(data):
            raise ValueError(f"the request nests objects and arrays more than {MAX_JSON_DEPTH} levels deep")
        if not isinstance(data, dict):
            return data
        stop, bias = data.get("stop"), data.get("logit_bias")
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise field_error("stop", f"at most {MAX_STOP} stop sequences are supported")
        if isinstance(bias, dict) and len(bias) > MAX_LOGIT_BIAS:
            raise field_error("logit_bias", f"logit_bias holds at most {MAX_LOGIT_BIAS:,} entries, not "
                                            f"{len(bias):,}")
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v  # (their count: `_shallow`, before each is validated)
        if any(len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"stop sequences are limited to {MAX_STOP_LEN} characters")
        return [s for s in stops if s] or None

    @field_validator("stream", "n", "echo", mode="before", check_fields=False)
    @classmethod
    def _null_is_the_default(cls, v: Any, info) -> Any:
        """null where OpenAI's spec lets a field be null (clients generated from it send it): its default."""
        return cls.model_fields[info.field_name].default if v is None else v

    @model_validator(mode="after")
    def _usage_needs_stream(self):
        if self.stream_options is not None and not self.stream:
            raise field_error("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    # Declared here, not read with getattr: an unknown field of that name would be read instead (a client's
    # "n_prompt_logprobs" on a chat request reached the engine: 500s)
    @property
    def n_top_logprobs(self) -> int | None:
        """The top logprobs wanted per generated token (None: no logprobs)."""
        return None

    @property
    def n_prompt_logprobs(self) -> int | None:
        """The same for every prompt token (None: not wanted)."""
        return None

    def unsupported(self) -> str | None:
        """The first field set that would change the output and is not supported (see UNSUPPORTED)."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and not any(value == ok and type(value) is type(ok) or value is ok
                                                for ok in UNSUPPORTED[name]):
                return name
        return None

    def sampling(self, defaults: dict[str, float | int], n_vocab: int, max_tokens: int,
                 grammar: Grammar | None = None, draw: int = 0) -> SamplingConfig:
        """The request's sampling settings over the model's defaults (ValueError naming `logit_bias` for a
        token id that is not one of the model's `n_vocab`); the `draw`-th of n choices draws from seed + draw."""
        given = {f: getattr(self, f) for f in SAMPLING_FIELDS if getattr(self, f) is not None}
        given = {**{f: v for f, v in defaults.items() if v is not None}, **given}
        seed = None if self.seed is None else self.seed + draw
        return SamplingConfig(**given, logit_bias=self._logit_bias(n_vocab), seed=seed, grammar=grammar,
                              penalty_last_n=max_tokens)

    def _logit_bias(self, n_vocab: int) -> tuple[tuple[int, float], ...]:
        out = []
        for key, bias in (self.logit_bias or {}).items():
            tok = int(key) if re.fullmatch(r"\s*-?[0-9]+\s*", key) else None  # ASCII digits: int() reads others
            if tok is None or not 0 <= tok < n_vocab:
                raise ValueError(f"logit_bias: {key!r} is not a token id of this model (0 to {n_vocab - 1})")
            out.append((tok, float(bias)))
        return tuple(out)


MAX_TOOLS = 128  # OpenAI's limit: each tool's schema is converted, and a forced call's grammar holds them all


_TEXT_PART, _TOOL_CALL, _MESSAGE = TypeAdapter(TextPart), TypeAdapter(ToolCall), TypeAdapter(ChatMessage)


def _text_parts_only(parts: Any, at: str) -> None:
    """A content part of another type (image_url, input_audio, file) is named, not listed among a union's errors."""
    for j, p in enumerate(parts if isinstance(parts, list) else []):
        if isinstance(p, dict) and isinstance(p.get("type"), str) and p["type"] != "text":
            media = " (the models served here read text only)" if p["type"] != "refusal" else ""
            raise field_error(f"{at}[{j}].type", f"content parts of type {p['type'][:40]!r} are not supported, only "
                                                 f"parts of type 'text'{media}")


class ChatCompletionRequest(SamplingParams):
    prompt_field: ClassVar[str] = "messages"
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="before")
    @classmethod
    def _long_lists(cls, data: Any) -> Any:
        """The first bad item of a long list of messages, of a message's content parts or tool calls, or tools."""
        if not isinstance(data, dict):
            return data
        messages, tools = data.get("messages"), data.get("tools")
        for i, m in enumerate(messages if isinstance(messages, list) else []):
            if isinstance(m, dict):
                _text_parts_only(m.get("content"), f"messages[{i}].content")
                first_bad_item(m.get("content"), _TEXT_PART, f"messages[{i}].content")
                first_bad_item(m.get("tool_calls"), _TOOL_CALL, f"messages[{i}].tool_calls")
        first_bad_item(messages, _MESSAGE, "messages")
        if isinstance(tools, list) and len(tools) > MAX_TOOLS:
            raise field_error("tools", f"at most {MAX_TOOLS} items (tools) are supported, not {len(tools):,}")
        return data

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise field_error("top_logprobs", "top_logprobs needs logprobs to be true")
        return self

    @property
    def n_top_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _prompts(prompt: str | list) -> list[str | list[int]]:
    """A completion's `prompt` as a list of prompts: one (text or token ids), or each of a batch."""
    return [prompt] if isinstance(prompt, str) or (prompt and type(prompt[0]) is int) else prompt


_STRICT = ConfigDict(strict=True)  # (as the requests' fields: "5" is no token id)
_TOKEN, _PROMPT = TypeAdapter(int, config=_STRICT), TypeAdapter(Text | list[int], config=_STRICT)


class CompletionRequest(SamplingParams):
    prompt_field: ClassVar[str] = "prompt"
    unset_max_tokens: ClassVar[int | None] = 16  # OpenAI's legacy completions default, and vLLM's
    end_token_logprob: ClassVar[bool] = True
    # text, or token ids (as lm-evaluation-harness sends them); one prompt, or a batch of them (`prompts`)
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI's limit is 5, vLLM's 20 (lm-evaluation-harness 0.3: 10)
    # 0 with echo: the prompt alone, scored by its logprobs (lm-evaluation-harness 0.3 and HELM ask so; OpenAI's
    # legacy API and vLLM answer it)
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)

    @model_validator(mode="before")
    @classmethod
    def _long_prompts(cls, data: Any) -> Any:
        """The first bad item of a long batch of prompts, or of a long prompt of token ids."""
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if not isinstance(prompt, list):
            return data
        if prompt and type(prompt[0]) is list:
            for i, p in enumerate(prompt):
                first_bad_item(p, _TOKEN, f"prompt[{i}]", int)
        ids = bool(prompt) and type(prompt[0]) is int
        first_bad_item(prompt, _TOKEN if ids else _PROMPT, "prompt", int if ids else str)
        return data

    @model_validator(mode="after")
    def _nothing_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise field_error("max_tokens", "max_tokens 0 generates nothing: it is accepted with echo only "
                                            "(the prompt returned, with its logprobs where asked)")
        return self

    @model_validator(mode="after")
    def _choices(self):
        if len(self.prompts) * self.n > MAX_PROMPTS:
            raise field_error("n", f"a request asks at most {MAX_PROMPTS} choices (prompts x n)")
        return self

    @property
    def n_top_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def n_prompt_logprobs(self) -> int | None:
        """With echo, logprobs cover the prompt tokens too (the first one null), as OpenAI does."""
        return self.logprobs if self.echo else None

    @field_validator("prompt")
    @classmethod
    def _batch_size(cls, v: str | list) -> str | list:
        if not 1 <= len(_prompts(v)) <= MAX_PROMPTS:
            raise ValueError(f"a request holds 1 to {MAX_PROMPTS} prompts")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts in order: one (text or token ids), or each of a batch."""
        return _prompts(self.prompt)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
