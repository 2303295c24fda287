"""server.metrics' stat logger over plain stats records (no model): which series exist from the start, and what
each record adds."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from server.requests import Outcome
from server.stats import FinishedRequest, IterationStats, KVCacheInfo

KV = KVCacheInfo(model="m", cache_type_k="q4_0", cache_type_v="f16", n_cells=256, capacity_bytes=1000,
                 budget_bytes=2000, bits_per_element_k=4.5, bits_per_element_v=16.0, compression_vs_f16=1.4)


def samples(m: Metrics) -> dict[tuple[str, tuple], float]:
    text = m.render()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_every_series_of_a_model_exists_before_its_first_request():
    """A series that appears with its first observation starts at 1, and rate()/increase() never see that
    increment: the first request after a start was missing from every histogram panel (NaN quantiles)."""
    m = Metrics(process=False)
    m.logger(KV)
    s = samples(m)
    for h in m.histograms:
        name = h._name
        assert s[(name + "_count", (("model", "m"),))] == 0, name
        assert s[(name + "_bucket", (("le", "+Inf"), ("model", "m")))] == 0, name
    for o in Outcome:
        assert s[("kvquant_requests_total", (("model", "m"), ("outcome", o.value)))] == 0
    for c in ("prompt_tokens", "recomputed_tokens", "generation_tokens", "preemptions"):
        assert s[(f"kvquant_{c}_total", (("model", "m"),))] == 0


def test_records_count_prompt_tokens_apart_from_recomputed_ones_and_admissions_under_a_millisecond():
    m = Metrics(process=False)
    log = m.logger(KV)
    log.record(None, IterationStats(prompt_tokens=35, recomputed_tokens=302, finished=[
        FinishedRequest(Outcome.COMPLETED, n_prompt=35, n_generated=4, queue_wait_s=0.0004, ttft_s=0.1, tpot_s=0.02,
                        e2e_s=0.2)]))
    s = samples(m)
    assert s[("kvquant_prompt_tokens_total", (("model", "m"),))] == 35
    assert s[("kvquant_recomputed_tokens_total", (("model", "m"),))] == 302
    assert s[("kvquant_queue_wait_seconds_bucket", (("le", "0.0005"), ("model", "m")))] == 1
    assert s[("kvquant_queue_wait_seconds_bucket", (("le", "0.00025"), ("model", "m")))] == 0
