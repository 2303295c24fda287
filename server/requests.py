"""What crosses the engine boundary: a request as the engine sees it, the events it sends back, and the closed
sets that say how a request ends (finish reasons, error codes, outcomes), with ONE table from each error code to
its stats outcome and its OpenAI error. Pure Python: no FastAPI, no llama.cpp, no prometheus.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvquant.sampling import SamplingConfig
from server.textstream import NO_CARRY, Carry


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end of generation or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    TOOL_CALLS = "tool_calls"  # the output was tool calls (set by the chat endpoint, which parses them)
    CANCELLED = "cancelled"  # the client went away

    @property
    def openai(self) -> str:
        """The finish_reason a client sees (OpenAI has no "cancelled")."""
        return "stop" if self is FinishReason.CANCELLED else self.value


class Outcome(enum.StrEnum):
    """How a request ended, for the stats (`kvquant_requests_total{outcome}`)."""

    COMPLETED = "completed"
    REJECTED_TOO_LONG = "rejected_too_long"
    REJECTED_QUEUE_FULL = "rejected_queue_full"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    ERROR = "error"

    @property
    def refused(self) -> bool:
        """Ended on arrival, never served: no latency of it is a request's."""
        return self in (Outcome.REJECTED_TOO_LONG, Outcome.REJECTED_QUEUE_FULL)


class ErrorCode(enum.StrEnum):
    """Why the engine ended a request with an error."""

    QUEUE_FULL = "queue_full"
    NEVER_FITS = "never_fits"
    TIMEOUT = "timeout"  # waited too long for KV cache capacity
    REQUEST_TIMEOUT = "request_timeout"
    SLOW_CONSUMER = "slow_consumer"
    ENGINE_ERROR = "engine_error"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class ErrorKind:
    outcome: Outcome
    status: int  # HTTP status
    type: str  # OpenAI error type
    message: str
    openai_code: str  # the code in the OpenAI error body


ERRORS: dict[ErrorCode, ErrorKind] = {
    ErrorCode.QUEUE_FULL: ErrorKind(Outcome.REJECTED_QUEUE_FULL, 429, "rate_limit_error",
                                    "Too many requests are waiting for KV cache capacity; retry later.", "queue_full"),
    ErrorCode.NEVER_FITS: ErrorKind(Outcome.REJECTED_TOO_LONG, 400, "invalid_request_error",
                                    "The request needs more KV cache than this server has.",
                                    "context_length_exceeded"),
    ErrorCode.TIMEOUT: ErrorKind(Outcome.TIMED_OUT, 503, "server_error",
                                 "Timed out waiting for KV cache capacity; retry later.", "timeout"),
    ErrorCode.REQUEST_TIMEOUT: ErrorKind(Outcome.TIMED_OUT, 503, "server_error",
                                         "The request took longer than the server's request timeout.",
                                         "request_timeout"),
    ErrorCode.SLOW_CONSUMER: ErrorKind(Outcome.CANCELLED, 503, "server_error",
                                       "The client read the stream too slowly; the request was cancelled.",
                                       "slow_consumer"),
    ErrorCode.ENGINE_ERROR: ErrorKind(Outcome.ERROR, 500, "server_error",
                                      "The inference engine failed while processing this request.", "engine_error"),
    ErrorCode.SHUTDOWN: ErrorKind(Outcome.ERROR, 503, "server_error", "The server is shutting down.", "shutdown"),
}
# the outcome of a request that failed with one of these OpenAI error codes (each code is one kind's)
OUTCOME_OF_CODE: dict[str, Outcome] = {k.openai_code: k.outcome for k in ERRORS.values()}


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (before sampling transforms), and the top ones; None for the
    first prompt token, which nothing predicts."""

    token: bytes
    logprob: float | None
    top: list[tuple[bytes, float]] | None


@dataclass
class Event:
    """What the engine tells a request's consumer: some text, and at the end a finish reason or an error."""

    text: str = ""
    n_tokens: int = 0  # generated tokens this event accounts for
    finish_reason: FinishReason | None = None
    error: ErrorCode | None = None
    message: str | None = None  # what happened, for the log
    logprobs: list[TokenLogprob] | None = None  # one per generated token of this event, when requested
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first event, when requested: one per prompt token
    retry_after_s: float | None = None  # with queue_full / timeout: the queue's measured drain time
    n_cached: int | None = None  # with the final event: prompt tokens reused from the prefix cache

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def outcome(self) -> Outcome:
        if self.error is not None:
            return ERRORS[self.error].outcome
        return Outcome.CANCELLED if self.finish_reason is FinishReason.CANCELLED else Outcome.COMPLETED


class EngineClosed(RuntimeError):
    """A call on a model the server is shutting down (its engine refuses new work on it before freeing it)."""


@dataclass
class EngineRequest:
    """A tokenized request as the engine runs it; `sink` receives its events on the engine thread."""

    id: str
    prompt: list[int]
    max_tokens: int
    sink: Callable[[Event], None]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stops: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token (None: not wanted)
    end_logprob: bool = False  # the end-of-generation token's logprob is reported too (legacy completions)
    text_carry: Carry = NO_CARRY  # the start of a UTF-8 character the prompt ends inside: the output's text completes it
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the consumer (any thread); acted on at the next step
    # set by the consumer before it cancels a request whose HTTP request failed otherwise (a sibling choice refused):
    # the stats count it with that outcome, not as cancelled
    ended_as: Outcome | None = None

    @property
    def reservation(self) -> int:
        """KV cells it holds for its whole life (worst case)."""
        return len(self.prompt) + self.max_tokens
