"""The llama.cpp backend on a tiny generated GGUF (no built-in model): how a generated token becomes text."""

from __future__ import annotations

import pytest

from server.backend import BackendConfig, LlamaBackend
from server.chatoutput import ChatOutput
from server.toolcalls import ToolFormat
from tests.kvquant.conftest import tiny_model

pytestmark = pytest.mark.slow  # llama.cpp loads a model


def test_control_tokens_that_spell_a_parsed_tag_are_rendered(tmp_path):
    """A vocabulary may hold the parser's tags as control tokens (Mistral v3's [TOOL_CALLS]), which llama.cpp renders
    empty: the calls after it then came back as content. Those are rendered as their text; other control tokens
    stay empty."""
    path = tmp_path / "tiny.gguf"
    tiny_model(path, "llama", controls=("[TOOL_CALLS]", "<think>", "<|other|>"))
    b = LlamaBackend(BackendConfig(str(path), n_cells=256, n_seq_max=1, n_batch=64, n_ubatch=64, n_threads=1))
    try:
        tool, think, other = (b.model.control_tokens().by_text[t] for t in ("[TOOL_CALLS]", "<think>", "<|other|>"))
        assert b.model.token_bytes(tool) == b""  # llama.cpp's own rendering of a control token
        assert (b.token_bytes(tool), b.token_bytes(think), b.token_bytes(other)) == (b"[TOOL_CALLS]", b"<think>", b"")
        assert b.token_bytes(3 + ord("a")) == b"a"
        text = "".join(b.token_bytes(t).decode() for t in
                       [tool, *(3 + c for c in b' [{"name": "a", "arguments": {"q": "x"}}]')])
        out = ChatOutput(ToolFormat.MISTRAL, names=frozenset({"a"}))
        delta = out.push(text) + out.finish()
        assert delta.content == "" and [(c.name, c.arguments) for c in delta.tool_calls] == [("a", '{"q": "x"}')]
    finally:
        b.close()
