"""The load benchmark: ``python -m benchmarks.run [--quick] [--soak-seconds N]
[--only INGRESS]``.

One run starts its own nats-server and valkey (in memory) on free loopback
ports, then measures, one after the other, each front end next to its
ceiling:

* the ceilings: a do-nothing Falcon app under the same gunicorn options and
  a websockets server that only parses and answers (each in rounds that
  alternate with its front end's maximum-rate row), a bare nats-py publish
  loop and a bare pipelined RPUSH loop (before the Redis and NATS rows);
* each ingress at its maximum rate, with 1 and 2 processes where the
  gateway scales by processes, and at half that maximum for latency;
* HTTP at its maximum rate with 100 messages per request (bulk), on the
  one-worker processes;
* with ``--soak-seconds`` above 0 (the full run's default is 600), all four
  ingresses together at a moderate rate: RSS at start and end, and whether
  every message sent arrived.

Throughput and latency are what a separate subscriber process (the probe)
saw arrive, not what was sent. Figures below their targets are printed,
never treated as failure: the exit status is non-zero only when the
harness itself broke (a process did not start, nothing arrived).
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import phases, report, soak
from benchmarks.servers import ROOT, Brokers, Fleet, HarnessError, ProbeClient

RESULTS = Path(__file__).resolve().parent / "results"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
BACKLOG_LEAST = 1000  # messages; a smaller burst drains too fast to time
WRK_MISSING = (
    "wrk is not installed; it drives the HTTP load. Install it with\n"
    "  sudo apt-get update && sudo apt-get install -y wrk\n"
    "or run benchmarks/setup.sh."
)


@dataclass(frozen=True)
class Plan:
    """How long and how much each phase loads the gateway."""

    mode: str
    seconds: float  # each maximum-rate and half-rate phase
    backlog: int  # messages in each Redis backlog and each NATS burst
    max_count: int  # the count bound of a phase bounded by time
    soak_seconds: float
    only: tuple[str, ...] = ()  # front ends to measure; empty: all four


INGRESSES = ("http", "ws", "redis", "nats")
QUICK = Plan("quick", seconds=3, backlog=30_000, max_count=1_000_000, soak_seconds=0)
FULL = Plan("full", seconds=15, backlog=150_000, max_count=5_000_000, soak_seconds=600)


def parse_args(argv: list[str]) -> Plan:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument(
        "--quick", action="store_true", help="short phases, no soak (CI smoke test)"
    )
    parser.add_argument(
        "--soak-seconds",
        type=float,
        default=None,
        help="length of the soak phase; 0 skips it (default: 600, --quick: 0)",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=None,
        help="messages in each Redis backlog and each NATS burst "
        "(default: 150000, --quick: 30000)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=INGRESSES,
        help="measure only this front end and its ceiling (repeatable); no "
        "soak, and the results go to benchmarks/results/partial.json",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.only:
        plan = Plan(**{**asdict(plan), "only": tuple(args.only), "soak_seconds": 0})
    if args.backlog is not None:
        if args.backlog < BACKLOG_LEAST:
            parser.error(
                f"--backlog must be {BACKLOG_LEAST} or more; a smaller backlog "
                "drains too fast to time"
            )
        plan = Plan(**{**asdict(plan), "backlog": args.backlog})
    if args.soak_seconds is not None:
        if args.soak_seconds < 0:
            parser.error("--soak-seconds must be 0 or more")
        if args.only and args.soak_seconds > 0:
            parser.error("the soak loads all four front ends; not with --only")
        plan = Plan(**{**asdict(plan), "soak_seconds": args.soak_seconds})
    return plan


def measure_all(bench: phases.Bench) -> None:
    """Every phase, each front end next to the ceiling it is compared with:
    figures on a shared machine drift over minutes, so each ceiling is
    measured in rounds alternating with the rows compared with it (see
    phases.alternate)."""
    wanted = bench.plan.only or INGRESSES
    for ingress, ingress_rows in (("http", phases.http_rows), ("ws", phases.ws_rows)):
        if ingress in wanted:
            print(f"{ingress} ingress")
            ingress_rows(bench)
    consumers = [kind for kind in ("redis", "nats") if kind in wanted]
    if consumers:
        print("redis-py ceiling")
        phases.redis_ceiling(bench)
        print(f"{' and '.join(consumers)} ingress, beside the nats-py ceiling")
        phases.consumer_rows(bench, consumers)
    if bench.plan.soak_seconds > 0:
        print(f"soak: {bench.plan.soak_seconds:.0f} s, all four ingresses")
        soak.soak(bench)


def run(plan: Plan, work_dir: Path) -> dict:
    started = time.monotonic()
    host = report.machine()  # its load average is the one at the start
    fleet = Fleet(work_dir)
    try:
        brokers = Brokers(fleet, work_dir / "data")
        probe = ProbeClient(fleet, brokers.nats_url)
        bench = phases.Bench(plan, fleet, brokers, probe)
        measure_all(bench)
    finally:
        # A second Ctrl-C must not cut the stopping short: the processes not
        # yet stopped would run on, each in a session of its own.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        fleet.stop_all()
    return {
        "mode": plan.mode,
        "plan": asdict(plan),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runtime_s": round(time.monotonic() - started, 1),
        "machine": host,
        "load_average_at_end": os.getloadavg(),
        "commit": report.source_commit(ROOT),
        "rows": bench.rows,
        "soak": bench.soak,
    }


class Interrupted(Exception):
    """A stop signal arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupted(signum, frame):
    # The harness is a plain loop, not a server: unwinding through the
    # finally blocks is what stops every process it started.
    raise Interrupted(signum)


def _on_stop_signals() -> None:
    """INT, TERM and HUP (a closed terminal) stop the run; a HUP that is
    ignored already (nohup) stays ignored."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _interrupted)


class _Copied:
    """Standard output, copied to a file as it is written."""

    def __init__(self, stream, copy):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.copy.flush()
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(sys.argv[1:] if argv is None else argv)
    if "http" in (plan.only or INGRESSES) and shutil.which("wrk") is None:
        print(WRK_MISSING, file=sys.stderr)
        return 2
    _on_stop_signals()
    RESULTS.mkdir(exist_ok=True)
    if plan.only:
        return _run_and_report(plan)

    # What the terminal shows of a run over all four front ends becomes
    # latest.txt (quick.txt for a quick run), once the run completes.
    text = RESULTS / f"{_stem(plan)}.txt.tmp"
    with text.open("w") as copy:
        terminal, sys.stdout = sys.stdout, _Copied(sys.stdout, copy)
        try:
            status = _run_and_report(plan)
        finally:
            sys.stdout = terminal
    if status == 0:
        text.replace(RESULTS / f"{_stem(plan)}.txt")
    else:
        text.unlink()
    return status


def _stem(plan: Plan) -> str:
    """The results' file name: ``latest`` for a full run, the figures the
    README shows; a quick run's go beside them, not over them."""
    return "latest" if plan.mode == "full" else plan.mode


def _run_and_report(plan: Plan) -> int:
    work_dir = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    print(f"logs in {work_dir} (removed after a run that completes)")
    try:
        results = run(plan, work_dir)
    except HarnessError as exc:
        print(f"benchmark harness failed: {exc}", file=sys.stderr)
        print(f"logs kept in {work_dir}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(
            f"interrupted ({signal.Signals(exc.signum).name}); every process "
            f"started was stopped; logs kept in {work_dir}",
            file=sys.stderr,
        )
        return 128 + exc.signum
    results["targets"] = report.targets(results["rows"])
    report.print_all(results)
    if plan.only:
        report.write_json(results, RESULTS / "partial.json")
        print(f"wrote {RESULTS / 'partial.json'}")
    else:
        stem = _stem(plan)
        report.write_json(results, RESULTS / f"{stem}.json")
        report.write_chart(results, RESULTS / f"{stem}.png")
        print(f"wrote {RESULTS / stem}.json, {stem}.png and {stem}.txt")
    shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
