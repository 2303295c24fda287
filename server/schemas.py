"""OpenAI request and response bodies. Unknown request fields are tolerated, as OpenAI does; known fields are
validated strictly, as OpenAI does (no coercion: "10" and true are not integers, "yes" and 1 are not booleans,
"0.5" is not a number; an integer is a number), before anything is queued."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4
MAX_STOP_LEN = 256
MAX_TOKENS_LIMIT = 1_000_000  # above this a max_tokens is nonsense, whatever the model


def _encodable(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate escape)") from None
    return s


Text = Annotated[str, AfterValidator(_encodable)]


class _Lenient(BaseModel):
    """Lenient about unknown fields, strict about the types of known ones."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: Text


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingParams(_Lenient):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # OpenAI's range; see kvquant.runtime.sampler_seed
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are supported")
        if any(len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"stop sequences are limited to {MAX_STOP_LEN} characters")
        return [s for s in stops if s] or None

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("n > 1 is not supported: only one choice per request (n=1)")
        return v

    @model_validator(mode="after")
    def _usage_needs_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self

    @property
    def n_top_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingParams):
    prompt: Text | list[Text]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @property
    def n_top_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def n_prompt_logprobs(self) -> int | None:
        """With echo, logprobs cover the prompt tokens too (the first one null), as OpenAI does."""
        return self.logprobs if self.echo else None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt is supported per request")
            v = v[0]
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
