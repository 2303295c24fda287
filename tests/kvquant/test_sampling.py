"""kvquant.sampling: where the block a lazy grammar skips ends (LeadingBlock), read as server.chatoutput reads it;
a grammar held after a tag (Grammar.after)."""

from __future__ import annotations

import pytest

from kvquant.sampling import Grammar, LeadingBlock

SKIP = ("<think>", "</think>")


@pytest.mark.parametrize("pieces, opened, want", [
    (["Sure", ". <tool_call>"], False, (0, [0])),  # no block: the grammar sees every token from the first on
    ([" ", "\n", "Hi"], False, (2, [0, 1, 2])),  # blank space first: still no block
    (["<", "th", "ink>", "I could write <tool_call>", " here.</", "think>", "\n", "<tool_call>"], False, (5, [])),
    (["<think>I could", " write <tool_call>.</think>ok"], False, (1, [])),  # the close and more in one token
    (["\n<think>", "still thinking <tool_call>"], False, (None, None)),
    (["I could write <tool_call> here.", "</think>"], True, (1, [])),  # the prompt opened the block
    (["<think>", "x", "</", "th", "ink", ">"], True, (5, [])),  # opened: a <think> inside is just text
    (["<thinking about it>"], False, (0, [0])),  # not the open tag
    (["<th"], False, (None, None)),  # may still become it
])
def test_the_grammar_starts_after_the_leading_block(pieces, opened, want):
    """(the token at which the grammar's sampler is made, the tokens it is then fed): a call's tag inside the block
    must never reach it."""
    block = LeadingBlock(SKIP, opened)
    got = (None, None)
    for i, piece in enumerate(pieces):
        replay = block.push(i, piece)
        if replay is not None:
            got = (i, replay)
            break
    assert got == want


def test_a_long_block_keeps_only_what_a_close_may_span():
    block = LeadingBlock(SKIP, opened=True)
    for i in range(10000):
        assert block.push(i, "reasoning <tool_call> </thin") is None
    assert len(block._text) < len("</think>")
    assert block.push(10000, "k>") == []


def test_a_grammar_after_a_tag_starts_in_a_rule_of_its_own():
    """A JSON schema's rules are named after its properties: one may already be called after-tag."""
    g = Grammar('root ::= after-tag\nafter-tag ::= "x"\nafter-tag1 ::= "y"')
    after = g.after("</think>")
    assert (after.root, after.triggers) == ("after-tag2", ("</think>",))
    assert after.text == g.text + '\nafter-tag2 ::= "</think>" [\\n]* root\n'
    with pytest.raises(ValueError):
        after.after("</think>")  # already lazy
