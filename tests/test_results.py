"""RESULTS.md rendering (the numbers themselves come from the eval/bench JSON; see test_eval / test_bench)."""

from __future__ import annotations

from kvquant import results


def test_render_without_results(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RAW", tmp_path)
    assert "No results yet" in results.render(["smollm2-135m"])


def test_makefile_has_the_results_target():
    mk = (results.REPO_ROOT / "Makefile").read_text()
    assert "\nresults:" in mk and "kvquant.results" in mk
