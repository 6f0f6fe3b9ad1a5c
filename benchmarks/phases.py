"""The phases of a run: one load against one set of processes, measured.

Every phase appends one row to ``Bench.rows``: what was sent, what the
probe saw arrive, the rate and latency of the arrivals, errors, and the CPU
seconds and peak RSS of every process involved (gateway, brokers, probe,
generator), so a row shows which process ran out of CPU first.
"""

import json
import math
import shutil
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from benchmarks.gateways import start_consumers, start_http, start_ws
from benchmarks.servers import (
    LOOPBACK,
    Brokers,
    Fleet,
    HarnessError,
    Monitor,
    ProbeClient,
    Proc,
    base_env,
    run_bounded,
    run_together,
)

HERE = Path(__file__).resolve().parent
HTTP_CONNS = 64  # wrk connections at maximum rate
HTTP_PACED_CONNS = 16  # wrk connections at a fixed rate
HTTP_BULK = 100  # messages per request in the bulk phase
WS_CONNS, WS_WINDOW = 8, 100  # connections, frames in flight on each
SOAK_SHARE = 0.1  # of each ingress's maximum, offered during the soak
SOAK_MOST = 1000  # messages/s per ingress at most during the soak
PACED_SPARE = 2  # seconds a paced wrk run lasts past its schedule
ROUNDS = 3  # alternating rounds of a maximum-rate row and its ceiling
ROUND_LEAST = 2.0  # seconds, the shortest such round
SETTLE_QUIET = 3.0  # seconds without a new arrival that end a phase
BACKLOG_KEY = "bench:backlog"
QUEUED_NOTE = "latency includes the time a message waited queued behind the others"


class Bench:
    """What every phase shares: the plan, processes, brokers, probe, rows."""

    def __init__(self, plan, fleet: Fleet, brokers: Brokers, probe: ProbeClient):
        self.plan = plan
        self.fleet = fleet
        self.brokers = brokers
        self.probe = probe
        self.infra = {
            "nats-server": brokers.nats,
            "valkey": brokers.redis,
            "probe": probe.proc,
        }
        self.rows: list[dict] = []
        self.soak: dict | None = None

    def row(self, name: str) -> dict:
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(name)


def _result(run: dict) -> dict:
    """The JSON line a generator printed last, or why there is none."""
    for line in reversed(run["output"].splitlines()):
        if line.startswith("{"):
            if run["returncode"] != 0:
                break
            result = json.loads(line)
            # A Python generator's own figure leaves out its start and
            # imports (before the load); wrk's comes from its exit status.
            result["generator_cpu_s"] = result.pop("cpu_s", run["cpu_s"])
            result["generator_process_cpu_s"] = run["cpu_s"]
            if "socket_errors" in result:  # wrk's summary
                result["errors"] = _wrk_errors(result)
                result["elapsed"] = result["duration_s"]
            return result
    raise HarnessError(
        f"load generator exited with {run['returncode']}; see {run['log']}"
    )


def _wrk_errors(result: dict) -> int:
    """Messages not accepted, from the summary ``post.lua`` prints.

    A bulk answer is 200 whatever it refused, so post.lua counts the
    refused results itself, and every message of an answer other than 200.
    A request that got no answer (socket error, timeout) loses them all.
    """
    bulk = result["bulk"]
    failed = result["socket_errors"] + result["timeouts"]
    if bulk == 1:
        return failed + result["status_errors"]
    return result["refused"] + failed * bulk


def loads_command(
    kind: str,
    url: str,
    topic: str,
    count: int,
    seconds: float,
    rate: float = 0,
    *extra: str,
) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.loads", kind, url,
        "--topic", topic, "--count", str(count), "--seconds", f"{seconds:g}",
        "--rate", f"{rate:g}", *extra,
    ]  # fmt: skip


def wrk_job(
    port: int, topic: str, seconds: float, count: int, rate: float, bulk: int = 1
) -> tuple:
    """wrk, one thread, POSTing envelopes; ``rate`` 0 means as fast as it can.

    ``count`` and ``rate`` are in messages; ``bulk`` above 1 sends that many
    envelopes per request, as a JSON array.
    """
    env = base_env()
    env.update(BENCH_TOPIC=topic, BENCH_COUNT=str(count), BENCH_RATE=f"{rate:g}",
               BENCH_BULK=str(bulk))  # fmt: skip
    conns = HTTP_PACED_CONNS if rate else HTTP_CONNS
    # Paced, wrk idles once it has sent its count; the spare seconds let
    # the answers in flight come back before -d ends it.
    duration = math.ceil(seconds) + (PACED_SPARE if rate else 0)
    command = [
        shutil.which("wrk") or "wrk", "-t1", f"-c{conns}",
        f"-d{duration}s", "--timeout", "10s",
        "-s", str(HERE / "post.lua"), f"http://{LOOPBACK}:{port}/MESSAGES",
    ]  # fmt: skip
    return ("wrk", command, env)


def _wrk(bench: Bench, job: tuple, seconds: float) -> dict:
    return _result(run_together(bench.fleet, [job], seconds + 30)[0])


def _python_load(bench: Bench, command: list[str], seconds: float) -> dict:
    name = f"load-{command[3]}"  # the generator kind: ws, redis or nats
    return _result(run_bounded(bench.fleet, name, command, seconds + 60))


def _llen(bench: Bench, key: str) -> int:
    return bench.brokers.client.llen(key)


def measure(bench: Bench, *args, **kwargs) -> dict:
    """Run a load, wait for its messages at the probe, record the row
    (the arguments of :func:`observe`)."""
    return record(bench, observe(bench, *args, **kwargs))


def observe(
    bench: Bench,
    row: dict,
    gateway: dict[str, Proc],
    load: Callable[[], dict],
    settle_timeout: float = 60.0,
) -> dict:
    """``row`` filled in with one run of ``load()``, not yet recorded."""
    topic = row["topic"]
    monitor = Monitor({**gateway, **bench.infra})
    audit0, dead0 = _llen(bench, "MESSAGES:log"), _llen(bench, "MESSAGES:dead")
    sent = load()
    bench.probe.settle(topic, sent["sent"], settle_timeout, SETTLE_QUIET)
    stats = bench.probe.stats(topic)
    window = stats.get("last", 0) - stats.get("first", 0)
    usage = monitor.finish(window if window > 0 else None)
    row.update(
        sent=sent["sent"],
        answered=sent.get("answered"),
        delivered=stats["count"],
        lost=sent["sent"] - stats["count"],
        errors=sent.get("errors", 0),
        rate=_arrival_rate(stats),
        latency_ms=stats["latency_ms"],
        http_latency_ms=sent.get("http_latency_ms"),
        audit_entries=_llen(bench, "MESSAGES:log") - audit0,
        dead_lettered=_llen(bench, "MESSAGES:dead") - dead0,
        processes=usage,
        load_window_s=round(window, 3),
        slow_consumer_errors=stats.get("slow_consumer_errors", 0),
    )
    _generator_figures(row, sent, monitor)
    # The audit log is checked above; emptying it keeps valkey's memory flat.
    bench.brokers.client.unlink("MESSAGES:log")
    return row


def record(bench: Bench, row: dict) -> dict:
    """Add a filled-in row to the run and print it; a row that nothing got
    through means the harness broke."""
    bench.rows.append(row)
    _print_row(row)
    if row.get("delivered") is None:  # a ceiling: counted by its answers
        if not row["answered"]:
            raise HarnessError(f"{row['name']}: the ceiling answered nothing")
    elif not row["delivered"]:
        raise HarnessError(f"{row['name']}: no message arrived at the probe")
    return row


def _generator_figures(row: dict, sent: dict, monitor: Monitor) -> None:
    """The generator's CPU share, and what the rest of the host used."""
    cpu = sent.get("generator_cpu_s") or 0.0
    row["generator"] = {
        "cpu_s": cpu,
        "cpu_share": round(cpu / sent["elapsed"], 3) if sent.get("elapsed") else None,
        "elapsed_s": round(sent.get("elapsed") or 0.0, 3),
    }
    ours = cpu + sum(usage["cpu_s"] for usage in row["processes"].values())
    # Other engineers' tests may share this machine; this shows how much.
    row["host_cpu_s"] = monitor.host_cpu_s
    row["other_cpu_s"] = round(max(0.0, monitor.host_cpu_s - ours), 3)


def _arrival_rate(stats: dict) -> float:
    """Messages a second between the first and the last arrival."""
    span = stats.get("last", 0) - stats.get("first", 0)
    if stats["count"] < 2 or span <= 0:
        return 0.0
    return round((stats["count"] - 1) / span, 1)


def _print_row(row: dict) -> None:
    """One progress line; a ceiling has no arrivals, only answers."""
    # A backlog's or burst's latency is mostly time queued: not shown.
    p99 = None if row.get("latency_note") else (row.get("latency_ms") or {}).get("p99")
    arrived = row.get("delivered")
    counted = (
        f"answered {row['answered']:,}" if arrived is None else f"arrived {arrived:,}"
    )
    rounds = " / ".join(f"{rate:,.0f}" for rate in row.get("round_rates", ()))
    print(
        f"  {row['name']:<28} {row['rate']:>10,.0f} msg/s"
        f"  p99 {'-' if p99 is None else f'{p99:.2f} ms':>9}"
        f"  sent {row['sent']:,} {counted}  errors {row['errors']}"
        + (f"  (rounds {rounds})" if rounds else ""),
        flush=True,
    )


def new_row(name: str, ingress: str, mode: str, processes: int, **extra) -> dict:
    return {
        "name": name,
        "ingress": ingress,
        "mode": mode,
        "process_count": processes,
        **extra,
    }


def measure_ceiling(bench: Bench, *args) -> dict:
    """Run a ceiling's load and record its row (see :func:`observe_ceiling`)."""
    return record(bench, observe_ceiling(bench, *args))


def observe_ceiling(
    bench: Bench, row: dict, procs: dict[str, Proc], load: Callable[[], dict]
) -> dict:
    """``row`` filled in with one run of a ceiling's ``load()``: a ceiling
    has no probe, its rate is what its generator got through."""
    monitor = Monitor({**procs, **bench.infra})
    sent = load()
    usage = monitor.finish(sent["elapsed"])
    row.update(
        load_window_s=round(sent["elapsed"], 3),
        sent=sent["sent"],
        answered=sent["answered"],
        errors=sent.get("errors", 0),
        rate=round(sent["answered"] / sent["elapsed"], 1) if sent["elapsed"] else 0,
        latency_ms=None,
        http_latency_ms=sent.get("http_latency_ms"),
        processes=usage,
    )
    _generator_figures(row, sent, monitor)
    return row


def alternate(bench: Bench, *turns: tuple[Callable, Callable]) -> list[dict]:
    """Measure rows compared with each other in :data:`ROUNDS` alternating
    rounds, in the order given in even rounds and the reverse in odd ones;
    record each as one row, and return them in that order.

    A turn is ``(observe, load)``: :func:`observe` or :func:`observe_ceiling`,
    and a function that gives a new row, the processes to measure and the
    load for one round. On this machine a rate drifts by a tenth within a
    minute, and rows compared with each other used to be measured a minute
    apart: the HTTP ratio read 0.82, 0.61 and 0.70 in three runs of the
    same code. Alternating gives the rows the same drift, and reversing the
    order cancels much of a drift that keeps its direction.
    """
    rounds: list[list[dict]] = [[] for _ in turns]
    for index in range(ROUNDS):
        order = list(zip(rounds, turns, strict=True))
        for done, (observed, load) in order if index % 2 == 0 else reversed(order):
            done.append(observed(bench, *load()))
    return [record(bench, merge_rounds(done)) for done in rounds]


def round_seconds(plan) -> float:
    """How long each alternating round lasts."""
    return max(ROUND_LEAST, plan.seconds / ROUNDS)


# Counts and CPU seconds that the rounds of one row add up to.
SUMMED = (
    "sent", "answered", "delivered", "lost", "errors", "audit_entries",
    "dead_lettered", "slow_consumer_errors", "host_cpu_s", "other_cpu_s",
    "requests",
)  # fmt: skip


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from the rounds of one phase.

    Counts and CPU seconds are added up and the rate is over the rounds'
    load windows together; peak RSS is the highest, and of the latencies
    the median p50 and the worst p99 and max are kept.
    """
    row = dict(rounds[0])
    for key in SUMMED:
        if row.get(key) is not None:
            row[key] = round(sum(r[key] for r in rounds), 3)
    window = sum(r["load_window_s"] for r in rounds)
    row["load_window_s"] = round(window, 3)
    weighted = sum(r["rate"] * r["load_window_s"] for r in rounds)
    row["rate"] = round(weighted / window, 1) if window else 0.0
    row["round_rates"] = [r["rate"] for r in rounds]
    row["processes"] = {}
    for name in rounds[0]["processes"]:
        usages = [r["processes"][name] for r in rounds]
        cpu = round(sum(u["cpu_s"] for u in usages), 3)
        row["processes"][name] = {
            "cpu_s": cpu,
            "cpu_share": round(cpu / window, 3) if window else 0.0,
            "peak_rss_mib": max(u["peak_rss_mib"] for u in usages),
        }
    cpu = round(sum(r["generator"]["cpu_s"] for r in rounds), 3)
    elapsed = round(sum(r["generator"]["elapsed_s"] for r in rounds), 3)
    row["generator"] = {
        "cpu_s": cpu,
        "cpu_share": round(cpu / elapsed, 3) if elapsed else None,
        "elapsed_s": elapsed,
    }
    for key in ("latency_ms", "http_latency_ms"):
        row[key] = _merged_latency([r.get(key) for r in rounds])
    return row


def _merged_latency(figures: list[dict | None]) -> dict | None:
    known = [f for f in figures if f and f.get("p99") is not None]
    if not known:
        return figures[0]
    return {
        "p50": statistics.median(f["p50"] for f in known),
        "p99": max(f["p99"] for f in known),
        "max": max(f["max"] for f in known),
    }


def redis_ceiling(bench: Bench) -> None:
    """The bare pipelined redis-py RPUSH loop, to a list nobody consumes:
    measured once, as no target is a ratio to it."""
    plan, brokers = bench.plan, bench.brokers
    command = loads_command(
        "redis", brokers.redis_url, "ceiling.redis", plan.max_count, plan.seconds,
        0, "--key", "bench:ceiling", "--prebuilt",
    )  # fmt: skip
    row = new_row("ceiling redis-py rpush", "redis", "ceiling", 1)
    measure_ceiling(bench, row, {},
                    lambda: _python_load(bench, command, plan.seconds))  # fmt: skip
    brokers.client.unlink("bench:ceiling")


def nats_ceiling_load(
    bench: Bench, seconds: float
) -> tuple[dict, dict[str, Proc], Callable[[], dict]]:
    """A new row and the load of one round of the bare nats-py publish loop:
    one prebuilt message, to a subject nobody subscribes to, the broker's
    and the client's cost alone."""
    plan = bench.plan
    command = loads_command(
        "nats", bench.brokers.nats_url, "ceiling.nats", plan.max_count, seconds,
        0, "--subject", "ceiling.nats", "--prebuilt",
    )  # fmt: skip
    row = new_row("ceiling nats-py publish", "nats", "ceiling", 1)
    return row, {}, lambda: _python_load(bench, command, seconds)


def http_phase(bench: Bench, proc: Proc, port: int, workers: int, rate: float):
    """At ``rate`` messages a second, for the plan's seconds."""
    return measure(bench, *http_load(bench, proc, port, workers, rate))


def http_load(
    bench: Bench,
    proc: Proc,
    port: int,
    workers: int,
    rate: float,
    seconds: float | None = None,
) -> tuple[dict, dict[str, Proc], Callable[[], dict]]:
    """A new row, the processes measured and the load of one HTTP phase:
    as fast as it can (``rate`` 0), or paced."""
    plan = bench.plan
    seconds = seconds or plan.seconds
    mode = "half" if rate else "max"
    topic = f"bench.http.{mode}.w{workers}"
    count = int(rate * seconds) if rate else plan.max_count
    job = wrk_job(port, topic, seconds, count, rate)
    row = new_row(f"http {mode} w{workers}", "http", mode, workers, topic=topic,
                  offered_rate=rate or None)  # fmt: skip
    return row, {"fanout-http": proc}, lambda: _wrk(bench, job, seconds)


def http_bulk_load(
    bench: Bench, proc: Proc, port: int, workers: int, seconds: float
) -> tuple[dict, dict[str, Proc], Callable[[], dict]]:
    """A new row, the processes measured and the load of a bulk round: as
    fast as it can, :data:`HTTP_BULK` envelopes per request."""
    topic = f"bench.http.bulk.w{workers}"
    job = wrk_job(port, topic, seconds, bench.plan.max_count, 0, HTTP_BULK)
    row = new_row(f"http bulk w{workers}", "http", "bulk", workers, topic=topic,
                  bulk=HTTP_BULK)  # fmt: skip

    def load() -> dict:
        sent = _wrk(bench, job, seconds)
        row["requests"] = sent["requests"]
        return sent

    return row, {"fanout-http": proc}, load


def http_ceiling_load(
    bench: Bench, proc: Proc, port: int, workers: int, seconds: float
) -> tuple[dict, dict[str, Proc], Callable[[], dict]]:
    """A new row, the process measured and the load of a Falcon ceiling round."""
    job = wrk_job(port, "ceiling.http", seconds, bench.plan.max_count, 0)
    row = new_row(f"ceiling http w{workers}", "http", "ceiling", workers)
    return row, {"ceiling": proc}, lambda: _wrk(bench, job, seconds)


def http_rows(bench: Bench) -> None:
    """With 1 and 2 workers, the maximum beside the Falcon ceiling under the
    same gunicorn options, alternating; with one worker the bulk row joins
    them (its target is against the maximum), and half load follows on the
    same processes."""
    fleet, brokers = bench.fleet, bench.brokers
    seconds = round_seconds(bench.plan)
    for workers in (1, 2):
        ceiling, ceiling_port = start_http(fleet, brokers, workers, ceiling=True)
        proc, port = start_http(fleet, brokers, workers)
        ceiling_load = partial(
            http_ceiling_load, bench, ceiling, ceiling_port, workers, seconds
        )
        turns = [
            (observe_ceiling, ceiling_load),
            (observe, partial(http_load, bench, proc, port, workers, 0, seconds)),
        ]
        if workers == 1:
            turns.append(
                (observe, partial(http_bulk_load, bench, proc, port, workers, seconds))
            )
        top = alternate(bench, *turns)[1]
        fleet.stop(ceiling)
        if workers == 1:
            http_phase(bench, proc, port, workers, round(top["rate"] / 2))
        fleet.stop(proc)


def ws_command(port: int, topic: str, count: int, seconds: float, rate: float):
    conns = WS_CONNS if not rate else WS_CONNS // 2
    return loads_command(
        "ws", f"ws://{LOOPBACK}:{port}/MESSAGES", topic, count, seconds, rate,
        "--conns", str(conns), "--window", str(WS_WINDOW),
    )  # fmt: skip


def ws_phase(bench: Bench, proc: Proc, port: int, rate: float) -> dict:
    """At ``rate`` messages a second, for the plan's seconds."""
    return measure(bench, *ws_load(bench, proc, port, rate))


def ws_load(
    bench: Bench, proc: Proc, port: int, rate: float, seconds: float | None = None
) -> tuple[dict, dict[str, Proc], Callable[[], dict]]:
    """A new row, the processes measured and the load of one WebSocket phase."""
    plan = bench.plan
    seconds = seconds or plan.seconds
    mode = "half" if rate else "max"
    topic = f"bench.ws.{mode}"
    count = int(rate * seconds) if rate else plan.max_count
    command = ws_command(port, topic, count, seconds, rate)
    row = new_row(f"ws {mode}", "ws", mode, 1, topic=topic, offered_rate=rate or None)
    return row, {"fanout-ws": proc}, lambda: _python_load(bench, command, seconds)


def ws_ceiling_load(
    bench: Bench, proc: Proc, port: int, seconds: float
) -> tuple[dict, dict[str, Proc], Callable[[], dict]]:
    """A new row, the process measured and the load of a websockets ceiling
    round: the same generator, connections and window as the maximum."""
    command = ws_command(port, "ceiling.ws", bench.plan.max_count, seconds, 0)
    row = new_row("ceiling ws", "ws", "ceiling", 1)
    return row, {"ceiling": proc}, lambda: _python_load(bench, command, seconds)


def ws_rows(bench: Bench) -> None:
    """The maximum beside the websockets ceiling, alternating; then half load."""
    fleet, brokers = bench.fleet, bench.brokers
    seconds = round_seconds(bench.plan)
    ceiling, ceiling_port = start_ws(fleet, brokers, ceiling=True)
    proc, port = start_ws(fleet, brokers)
    top = alternate(
        bench,
        (
            observe_ceiling,
            partial(ws_ceiling_load, bench, ceiling, ceiling_port, seconds),
        ),
        (observe, partial(ws_load, bench, proc, port, 0, seconds)),
    )[1]
    fleet.stop(ceiling)
    ws_phase(bench, proc, port, round(top["rate"] / 2))
    fleet.stop(proc)


def backlog_load(
    bench: Bench, procs: dict[str, Proc]
) -> tuple[dict, dict[str, Proc], Callable[[], dict]]:
    """A new row, the consumers and the load of one Redis backlog: a list
    filled aside now, handed to the consumers whole with RENAME."""
    plan, brokers = bench.plan, bench.brokers
    topic = f"bench.redis.backlog.c{len(procs)}"
    brokers.client.unlink(BACKLOG_KEY)
    command = loads_command(
        "redis", brokers.redis_url, topic, plan.backlog, plan.seconds * 10, 0,
        "--key", BACKLOG_KEY,
    )  # fmt: skip
    fill = _python_load(bench, command, plan.seconds * 10)

    def hand_over() -> dict:
        brokers.client.rename(BACKLOG_KEY, "MESSAGES")
        # The fill ran before the drain: its CPU is not the drain's.
        return {**fill, "generator_cpu_s": 0.0, "elapsed": None}

    row = new_row(f"redis backlog c{len(procs)}", "redis", "backlog", len(procs),
                  topic=topic, fill_rate=round(fill["sent"] / fill["elapsed"], 1),
                  fill_cpu_s=fill.get("generator_cpu_s"),
                  latency_note=QUEUED_NOTE)  # fmt: skip
    return row, procs, hand_over


def burst_load(
    bench: Bench, procs: dict[str, Proc]
) -> tuple[dict, dict[str, Proc], Callable[[], dict]]:
    """A new row, the consumers and the load of one NATS burst: published as
    fast as nats-py can, the rate is how fast the consumers drain it."""
    plan = bench.plan
    topic = f"bench.nats.burst.c{len(procs)}"
    command = loads_command(
        "nats", bench.brokers.nats_url, topic, plan.backlog, plan.seconds * 10, 0,
    )  # fmt: skip
    row = new_row(f"nats burst c{len(procs)}", "nats", "burst", len(procs),
                  topic=topic,
                  latency_note=QUEUED_NOTE)  # fmt: skip
    return row, procs, lambda: _python_load(bench, command, plan.seconds * 10)


DRAIN_LOADS = {"redis": backlog_load, "nats": burst_load}
DRAIN_SETTLE = 120.0  # seconds a drain of a large --backlog may take


def steady_phase(bench: Bench, kind: str, procs: dict[str, Proc], rate: float):
    plan = bench.plan
    topic = f"bench.{kind}.half.c{len(procs)}"
    url = bench.brokers.redis_url if kind == "redis" else bench.brokers.nats_url
    command = loads_command(kind, url, topic, int(rate * plan.seconds),
                            plan.seconds, rate)  # fmt: skip
    row = new_row(f"{kind} half c{len(procs)}", kind, "half", len(procs),
                  topic=topic, offered_rate=rate)  # fmt: skip
    return measure(bench, row, procs,
                   lambda: _python_load(bench, command, plan.seconds))  # fmt: skip


def consumer_rows(bench: Bench, kinds: list[str]) -> None:
    """The Redis and NATS consumers' rows.

    Both targets are ratios to the bare nats-py publish loop, so one
    consumer of each kind drains its backlog or burst in rounds alternating
    with that loop (see :func:`alternate`); measured once, minutes before
    the burst, the loop put the NATS ratio at 0.297 to 0.312 in full runs
    and 0.31 to 0.35 in runs of NATS alone, of the same code. The
    consumers of the other kind idle meanwhile. Then each is measured at
    half its rate, and two consumers of each kind drain once.
    """
    fleet, brokers = bench.fleet, bench.brokers
    singles = {kind: start_consumers(fleet, brokers, kind, 1) for kind in kinds}
    observe_drain = partial(observe, settle_timeout=DRAIN_SETTLE)
    seconds = round_seconds(bench.plan)
    turns = [(observe_ceiling, partial(nats_ceiling_load, bench, seconds))]
    for kind in kinds:
        load = partial(DRAIN_LOADS[kind], bench, singles[kind])
        turns.append((observe_drain, load))
    tops = alternate(bench, *turns)[1:]
    for kind, top in zip(kinds, tops, strict=True):
        steady_phase(bench, kind, singles[kind], round(top["rate"] / 2))
        fleet.stop(*singles[kind].values())
    for kind in kinds:
        procs = start_consumers(fleet, brokers, kind, 2)
        measure(bench, *DRAIN_LOADS[kind](bench, procs), settle_timeout=DRAIN_SETTLE)
        fleet.stop(*procs.values())
