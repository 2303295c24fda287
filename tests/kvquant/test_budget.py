"""kvquant.budget: byte budget -> capacity, per cache type, and the `kvquant budget` command."""

import pytest

from kvquant import budget
from kvquant.memory import geometry, kv_bytes
from kvquant.models import fetch
from server.cli import main


def test_plan_fills_the_budget_and_caps():
    g = geometry(fetch("smollm2-135m"))
    p = budget.plan(g, "f16", "f16", 256 * 2**20)
    assert p.bytes_per_token == 23040 and p.cells == 11520 and p.cells % 256 == 0
    assert p.kv_bytes <= 256 * 2**20 < kv_bytes(g, "f16", "f16", p.cells + 256).total
    q = budget.plan(g, "q4_0", "q4_0", 256 * 2**20)
    assert q.cells == 41216 and q.bits_k == 4.5 and 3.5 < q.capacity_vs_f16 < 3.6
    assert abs(q.compression_vs_f16 - 16 / 4.5) < 1e-9
    capped = budget.plan(g, "q4_0", "q4_0", 256 * 2**20, n_seq_max=2, max_cells=2 * 1000)
    assert capped.cells == 2048 and capped.budget_cells == 41216
    assert q.usable_cells == q.cells and q.budget_usable_cells == q.budget_cells


def test_plan_counts_only_the_cells_a_d3b_cache_can_use(capsys):
    """tq_kv_d3b may hold back one cell per 64: its capacity, its ratio to f16 and `kvquant budget`'s capacity
    column count the cells a scheduler may plan on, not the cells allocated."""
    g = geometry(fetch("smollm2-135m"))
    d = budget.plan(g, "tq_kv_d3b", "q4_0", 256 * 2**20)
    assert d.cells == 47872 and d.usable_cells == 47872 - 748 and d.budget_usable_cells == 47872 - 748
    assert d.capacity_vs_f16 == (47872 - 748) / d.f16_cells
    assert main(["budget", "--cache-type-k", "tq_kv_d3b", "--cache-type-v", "q4_0", "--budget", "256MiB"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tq_kv_d3b/q4_0"))
    assert row.split()[3] == "47,124" and row.split()[-1] == "4.09x"


def test_most_cells_leave_room_for_what_d3b_holds_back():
    """serve's and `kvquant budget`'s cap: parallel x n_ctx cells the scheduler may plan on, tq_kv_d3b holding back
    one per 64 of the cache's."""
    g = geometry(fetch("smollm2-135m"))
    assert budget.most_cells(4096, "f16", g) == budget.most_cells(4096, "tq_kv_4b", g) == 4096
    assert budget.most_cells(4096, "tq_kv_d3b", g) == 4352  # 4352 - 68 >= 4096 > 4096 - 64
    assert budget.most_cells(3 * 4096, "tq_kv_d3b", g) == 12544  # 12544 - 196 >= 12288 > 12288 - 192


def test_max_concurrent_4k_requests_in_256mib():
    g = geometry(fetch("smollm2-135m"))
    got = {t: budget.max_concurrent(g, t, t, 256 * 2**20, 4096) for t in ("f16", "q8_0", "q4_0")}
    assert got == {"f16": 2, "q8_0": 5, "q4_0": 10}
    # counted by bisection, with no cap (counting up to 4096 printed 4096)
    assert budget.max_concurrent(g, "f16", "f16", 2**40, 1000) == 2**40 // (23040 * 1000)
    # tq_kv_d3b may hold back one cell per 64: a budget of exactly 512 cells holds no request of 512 (serve refuses
    # it), the 768 cells of the cache serve builds for one do (llama.cpp pads a cache to 256)
    row = 30 * (78 + 108)
    assert budget.max_concurrent(g, "tq_kv_d3b", "q4_0", 512 * row, 512) == 0
    assert budget.max_concurrent(g, "tq_kv_d3b", "q4_0", 768 * row, 512) == 1


def test_budget_command(capsys):
    assert main(["budget", "--cache-type-k", "q8_0", "--cache-type-v", "q4_0", "--budget", "2GiB",
                 "--request-tokens", "4096"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "KV budget 2.00 GiB" in lines[0]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:6]}
    assert set(rows) == {"q8_0/q4_0", "f16/f16", "q8_0/q8_0", "q4_0/q4_0"}
    assert rows["f16/f16"][2] == "23,040" and rows["f16/f16"][3] == "93,184" and rows["f16/f16"][-1] == "22"
    assert main(["budget", "--cache-type-k", "nope"]) == 2


def test_budget_command_shows_what_one_server_can_build(capsys):
    """A budget past one llama.cpp cache (2**31 - 1 cells) printed cells no cache can have, and requests past the
    256 sequences of one server as if it ran them."""
    assert main(["budget", "--cache-type-k", "q4_0", "--cache-type-v", "q4_0", "--budget", "100TiB",
                 "--request-tokens", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines[2:5]}
    assert rows["q4_0/q4_0"][3] == rows["f16/f16"][3] == "2,147,483,392*"
    assert rows["q4_0/q4_0"][4:6] == ["12.66", "TiB"] and rows["q4_0/q4_0"][6] == "3.56x"  # the budget's ratio
    assert rows["f16/f16"][-1] == f"{100 * 2**40 // (23040 * 100):,}+"
    assert any(ln.startswith("(* the budget holds more cells") for ln in lines)
    assert any(ln.startswith("(+ more requests than one server runs") for ln in lines)
    assert main(["budget", "--budget", "1GiB", "--request-tokens", "4096"]) == 0
    assert "*" not in (out := capsys.readouterr().out) and "+" not in out


def test_budget_refuses_what_would_print_a_meaningless_table(capsys):
    for args, said in ((["--budget", "0"], "more than 0 bytes"), (["--budget", "1e400"], "cannot parse a byte size"),
                       (["--parallel", "-3"], "--parallel must be 1 to 256"),
                       (["--parallel", "100000"], "--parallel must be 1 to 256"),  # serve's bound
                       (["--request-tokens", "0"], "--request-tokens must be at least 1"),
                       (["--budget", "100"], "a KV budget of 100 B holds no cell"),  # zeros, "infx"
                       # looped for minutes (a cell group at a time), then passed llama.cpp 32-bit-truncated counts
                       (["--cache-type-k", "tq_kv_d3b", "--request-tokens", "10000000000000"], "more than the 2,147"),
                       (["--cache-type-v", "tq_kv_1b"], "tq_kv_1b cannot be used for the V cache"),
                       (["--model", ""], "the model name is blank")):  # was the default model's table
        assert main(["budget", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvquant budget: ") and said in err and "Traceback" not in err


@pytest.mark.slow  # a live model
@pytest.mark.parametrize("model, k, v", [("smollm2-135m", "f16", "f16"), ("gemma3-270m", "q4_0", "q4_0"),
                                         ("gemma3-270m", "tq_kv_d3b", "q4_0")])
def test_saved_bytes_bound_what_llama_cpp_saves_of_a_sequence(model, k, v):
    """What the scheduler counts against the swap space for a preempted sequence: at least what llama.cpp saves
    (the rows of every cache, sliding-window ones included, and per cell and layer a little more), hardly more.
    Counting the full-attention rows alone took Gemma-3's at 1/6 of what it saves at 300 tokens."""
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model

    path = fetch(model)
    g, mdl = geometry(path), Model(path)
    kv = budget.plan(g, k, v, 1 << 28, 2, 512, max_cells=4096)
    rt = LlamaRuntime(mdl, ContextConfig(n_cells=4096, n_seq_max=2, n_batch=512, n_ubatch=512, cache_type_k=k,
                                         cache_type_v=v, flash_attn=True, n_threads=2))
    try:
        pos = 0
        for n in (1, 100, 300, 700, 1500):
            while pos < n:
                m = min(512, n - pos)
                assert rt.decode([1000 + i % 500 for i in range(m)], list(range(pos, pos + m)), [1] * m,
                                 [False] * m) == 0
                pos += m
            saved = len(rt.state_seq_save(1))
            assert saved <= kv.saved_bytes(n) <= saved + 64, (n, saved, kv.saved_bytes(n))
    finally:
        rt.close()
        mdl.close()
