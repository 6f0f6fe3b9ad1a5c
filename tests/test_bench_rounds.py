"""The benchmark adds up alternating rounds into one row faithfully."""

from benchmarks.phases import merge_rounds


def _round(rate, window, count, cpu, rss, latency):
    return {
        "name": "http max w1",
        "sent": count,
        "delivered": count,
        "errors": 1,
        "rate": rate,
        "load_window_s": window,
        "latency_ms": latency,
        "http_latency_ms": None,
        "processes": {
            "fanout-http": {"cpu_s": cpu, "cpu_share": 0, "peak_rss_mib": rss}
        },
        "generator": {"cpu_s": 0.5, "cpu_share": 0.1, "elapsed_s": window},
        "host_cpu_s": 2.0,
        "other_cpu_s": 0.25,
    }


def test_merged_rate_is_over_the_rounds_windows_together():
    """A long slow round weighs more than a short fast one; counts add up."""
    row = merge_rounds(
        [
            _round(10_000, 4.0, 40_000, 3.0, 40.0, {"p50": 1, "p99": 3, "max": 9}),
            _round(20_000, 1.0, 20_000, 1.0, 44.5, {"p50": 2, "p99": 7, "max": 8}),
            _round(16_000, 5.0, 80_000, 4.0, 41.0, {"p50": 5, "p99": 4, "max": 6}),
        ]
    )
    assert row["rate"] == 14_000.0  # 140,000 messages in 10 s
    assert row["round_rates"] == [10_000, 20_000, 16_000]
    assert (row["sent"], row["delivered"], row["errors"]) == (140_000, 140_000, 3)
    assert row["load_window_s"] == 10.0
    assert row["processes"]["fanout-http"] == {
        "cpu_s": 8.0,
        "cpu_share": 0.8,
        "peak_rss_mib": 44.5,
    }
    assert row["generator"] == {"cpu_s": 1.5, "cpu_share": 0.15, "elapsed_s": 10.0}
    assert (row["host_cpu_s"], row["other_cpu_s"]) == (6.0, 0.75)


def test_merged_latency_keeps_the_median_p50_and_the_worst_tail():
    """p50 is the rounds' median; p99 and max are the worst round's."""
    row = merge_rounds(
        [
            _round(1, 1.0, 1, 0.0, 1.0, {"p50": 1.0, "p99": 3.0, "max": 9.0}),
            _round(1, 1.0, 1, 0.0, 1.0, {"p50": 2.0, "p99": 7.0, "max": 8.0}),
            _round(1, 1.0, 1, 0.0, 1.0, {"p50": 5.0, "p99": 4.0, "max": 6.0}),
        ]
    )
    assert row["latency_ms"] == {"p50": 2.0, "p99": 7.0, "max": 9.0}
    assert row["http_latency_ms"] is None
