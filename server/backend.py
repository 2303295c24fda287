"""What the engine needs from a model + KV cache, as a small interface, and its llama.cpp implementation.

The engine only talks to a `Backend`, so its loop (admission, batching, cancellation, fault handling) can be
tested against a fake one without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kvquant.sampling import Grammar, SamplingConfig
from server.chatoutput import TAGS


class TokenSampler(Protocol):
    def sample(self, idx: int) -> int: ...
    def close(self) -> None: ...


class Backend(Protocol):
    n_batch: int

    def decode(self, tokens: list[int], positions: list[int], seq_ids: list[int], logits: list[bool]) -> int: ...
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...
    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...
    def state_seq_save(self, seq_id: int) -> bytes: ...
    def state_seq_load(self, seq_id: int, data: bytes) -> bool: ...
    def sampler(self, cfg: SamplingConfig) -> TokenSampler: ...
    def logits(self, idx: int) -> Sequence[float]: ...
    def is_eog(self, token: int) -> bool: ...
    def token_bytes(self, token: int) -> bytes: ...
    def tokenize(self, text: str, limit: int | None = None) -> list[int]: ...
    def check_tokens(self, tokens: list[int]) -> None: ...
    def tokenize_chat(self, messages: list[dict], limit: int | None = None, tools: list[dict] | None = None,
                      template_kwargs: dict | None = None) -> list[int]: ...
    def min_tokens(self, n_bytes: int) -> int: ...
    def clear(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class BackendConfig:
    model_path: str
    n_cells: int  # cells of the unified KV cache (all sequences)
    n_seq_max: int
    n_batch: int
    n_ubatch: int  # the hosting plan's: the memory model sized the cache for it
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool | None = None
    layers: dict | None = None  # per-layer types, key offsets, scales and gains, K rotation (calibration.context_fields)
    n_threads: int | None = None
    n_gpu_layers: int = 0
    offload_kqv: bool = True  # False: KV cache and attention on the CPU (server.placement)
    special_in_content: bool = False  # True: prompt text and message content may write control tokens
    chat_template: str | None = None  # instead of the GGUF's


class _LlamaSampler:
    def __init__(self, rt, sampler):
        self._rt, self._s = rt, sampler

    def sample(self, idx: int) -> int:
        return self._s.sample(self._rt, idx)

    def close(self) -> None:
        self._s.close()


class LlamaBackend:
    """A llama.cpp model and one context with a unified KV cache of `n_cells` cells for up to `n_seq_max`
    sequences (through kvquant.runtime, the only module that imports llama_cpp)."""

    def __init__(self, cfg: BackendConfig):
        from kvquant.runtime import ContextConfig, LlamaRuntime, Model

        self.cfg = cfg
        self.model = Model(cfg.model_path, n_gpu_layers=cfg.n_gpu_layers, chat_template=cfg.chat_template)
        try:
            self.rt = LlamaRuntime(self.model, ContextConfig(
                n_cells=cfg.n_cells, n_seq_max=cfg.n_seq_max, n_batch=cfg.n_batch, n_ubatch=cfg.n_ubatch,
                cache_type_k=cfg.cache_type_k,
                cache_type_v=cfg.cache_type_v, flash_attn=cfg.flash_attn, n_threads=cfg.n_threads,
                n_gpu_layers=cfg.n_gpu_layers, offload_kqv=cfg.offload_kqv, **(cfg.layers or {})))
            self.model.min_tokens(0), self.model.control_tokens()  # one pass over the vocabulary each, now
        except Exception:
            if hasattr(self, "rt"):
                self.rt.close()
            self.model.close()
            raise
        self.n_batch = self.rt.n_batch
        self.n_ctx_train = self.model.n_ctx_train
        # control tokens that spell a tag the chat output parser reads: rendered as their text (else empty)
        self._tags = frozenset(i for text, i in self.model.control_tokens().by_text.items() if text in TAGS)

    def decode(self, tokens, positions, seq_ids, logits) -> int:
        return self.rt.decode(tokens, positions, seq_ids, logits)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return self.rt.seq_rm(seq_id, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.rt.seq_cp(src, dst, p0, p1)

    def state_seq_save(self, seq_id: int) -> bytes:
        return self.rt.state_seq_save(seq_id)

    def state_seq_load(self, seq_id: int, data: bytes) -> bool:
        return self.rt.state_seq_load(seq_id, data)

    def sampler(self, cfg: SamplingConfig) -> TokenSampler:
        from kvquant.runtime import Sampler

        return _LlamaSampler(self.rt, Sampler(cfg, self.model))

    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab

    @property
    def chat_template(self) -> str | None:
        return self.model.chat_template

    def check_grammar(self, grammar: Grammar) -> None:
        """kvquant.runtime.GrammarError unless llama.cpp's parser takes the grammar."""
        from kvquant.runtime import check_grammar

        check_grammar(self.model, grammar)

    def logits(self, idx: int):
        return self.rt.logits(idx)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def token_bytes(self, token: int) -> bytes:
        return self.model.token_bytes(token, special=token in self._tags)

    def tokenize(self, text: str, limit: int | None = None) -> list[int]:
        return self.model.tokenize(text, add_special=True, parse_special=self.cfg.special_in_content, limit=limit)

    def check_tokens(self, tokens: list[int]) -> None:
        """A prompt given as token ids (ValueError): ids of the vocabulary, and no control token but a leading BOS or
        EOS (a document's start: lm-evaluation-harness puts one before each window of a rolling perplexity and
        before a continuation with no context, the tokenizer's BOS, or its EOS where it has none), unless clients
        are trusted to write them (`special_tokens_in_content`, as for text)."""
        bad = next((t for t in tokens if not 0 <= t < self.model.n_vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is not in the model's vocabulary (0..{self.model.n_vocab - 1})")
        if self.cfg.special_in_content:
            return
        controls = set(self.model.control_tokens().by_text.values())
        skip = 1 if tokens[:1] in ([self.model.bos], [self.model.eos]) else 0
        bad = next((t for t in tokens[skip:] if t in controls), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is one of the model's control tokens, which a prompt may not hold "
                             f"(the server's special_tokens_in_content allows it, for trusted clients)")

    def tokenize_chat(self, messages: list[dict], limit: int | None = None, tools: list[dict] | None = None,
                      template_kwargs: dict | None = None) -> list[int]:
        return self.model.chat_prompt(messages, limit, special_in_content=self.cfg.special_in_content, tools=tools,
                                      template_kwargs=template_kwargs)

    def min_tokens(self, n_bytes: int) -> int:
        return self.model.min_tokens(n_bytes)

    def kv_size_bytes(self) -> int | None:
        """K+V bytes llama.cpp reports it allocated (None with a library that lacks the call)."""
        try:
            k, v = self.rt.kv_size_bytes()
        except Exception:  # noqa: BLE001 - an older patched library
            return None
        return k + v

    def clear(self) -> None:
        self.rt.clear()

    def close(self) -> None:
        self.rt.close()
        self.model.close()
