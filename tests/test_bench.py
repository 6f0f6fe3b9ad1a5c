"""The benchmark harness: rounds added up faithfully, and a run stopped by
the user stops everything it started."""

import signal
import subprocess
import sys
import time

import psutil

from benchmarks.phases import merge_rounds
from tests.support import ROOT


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


def test_a_second_interrupt_still_stops_every_process():
    """Ctrl-C twice in a row, as a user presses it, leaves nothing of the
    run behind, and the run says it stopped everything."""
    run = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "nats"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The brokers and the probe are up by then, the bare RPUSH loop starting.
        for line in run.stdout:
            if line.startswith("redis-py ceiling"):
                break
        started = psutil.Process(run.pid).children(recursive=True)
        run.send_signal(signal.SIGINT)
        time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        _, errors = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()

    assert run.returncode == 130
    assert "interrupted (SIGINT); every process started was stopped" in errors
    assert len(started) >= 3  # nats-server, valkey and the probe at least
    assert [p.pid for p in started if _alive(p)] == []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
