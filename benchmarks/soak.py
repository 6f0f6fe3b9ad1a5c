"""The soak: all four ingresses at once, at a moderate rate, for a long time.

What it looks for is drift, not speed: the RSS of every gateway process at
the start and at the end (and every :data:`TREND_EVERY` seconds between),
and whether every message sent arrived at the probe.
"""

from benchmarks import phases
from benchmarks.gateways import start_consumers, start_http, start_ws
from benchmarks.servers import Monitor, run_together

TREND_EVERY = 10.0  # seconds between RSS samples kept for the JSON


def soak_rates(bench: phases.Bench) -> dict[str, float]:
    """A share of each ingress's single-process maximum, within bounds."""
    tops = {
        "http": bench.row("http max w1")["rate"],
        "ws": bench.row("ws max")["rate"],
        "redis": bench.row("redis backlog c1")["rate"],
        "nats": bench.row("nats burst c1")["rate"],
    }
    return {
        kind: float(max(50, min(phases.SOAK_MOST, round(top * phases.SOAK_SHARE))))
        for kind, top in tops.items()
    }


def soak_jobs(bench, seconds: float, rates: dict, ports: dict) -> list[tuple]:
    env = phases.base_env()
    jobs = [
        phases.wrk_job(
            ports["http"], "bench.soak.http", seconds,
            int(rates["http"] * seconds), rates["http"],
        ),
        ("ws", phases.ws_command(
            ports["ws"], "bench.soak.ws", int(rates["ws"] * seconds),
            seconds, rates["ws"],
        ), env),
    ]  # fmt: skip
    for kind in ("redis", "nats"):
        url = getattr(bench.brokers, f"{kind}_url")
        command = phases.loads_command(
            kind, url, f"bench.soak.{kind}", int(rates[kind] * seconds),
            seconds, rates[kind],
        )  # fmt: skip
        jobs.append((kind, command, env))
    return jobs


def _mib(rss: dict[str, int]) -> dict[str, float]:
    return {name: round(size / 2**20, 1) for name, size in rss.items()}


def soak(bench: phases.Bench) -> None:
    seconds = bench.plan.soak_seconds
    fleet, brokers = bench.fleet, bench.brokers
    rates = soak_rates(bench)
    http_proc, http_port = start_http(fleet, brokers, 2)
    ws_proc, ws_port = start_ws(fleet, brokers)
    gateway = {"fanout-http": http_proc, "fanout-ws": ws_proc}
    gateway.update(start_consumers(fleet, brokers, "redis", 1))
    gateway.update(start_consumers(fleet, brokers, "nats", 1))

    monitor = Monitor({**gateway, **bench.infra}, trend_every=TREND_EVERY)
    rss_start = monitor.rss_each()
    jobs = soak_jobs(bench, seconds, rates, {"http": http_port, "ws": ws_port})
    runs = run_together(fleet, jobs, seconds + 60)
    results = [phases._result(run) for run in runs]
    ingresses = {}
    for (kind, _, _), result in zip(jobs, results, strict=True):
        kind = "http" if kind == "wrk" else kind
        ingresses[kind] = _soak_ingress(bench, kind, rates[kind], result)
    rss_end = monitor.rss_each()
    usage = monitor.finish()
    fleet.stop(*gateway.values())

    bench.soak = {
        "seconds": seconds,
        "ingresses": ingresses,
        "rss_start_mib": _mib(rss_start),
        "rss_end_mib": _mib(rss_end),
        "rss_trend_mib": monitor.trend,
        "processes": usage,
        "delivered_equals_sent": all(i["equal"] for i in ingresses.values()),
    }
    bench.brokers.client.unlink("MESSAGES:log")
    for kind, item in ingresses.items():
        print(
            f"  soak {kind:<6} offered {item['offered_rate']:>6,.0f}/s"
            f"  sent {item['sent']:,} arrived {item['delivered']:,}"
            f"  p99 {item['latency_ms']['p99'] or 0:.2f} ms"
        )


def _soak_ingress(bench: phases.Bench, kind: str, rate: float, result: dict):
    topic = f"bench.soak.{kind}"
    bench.probe.settle(topic, result["sent"], 60, phases.SETTLE_QUIET)
    stats = bench.probe.stats(topic)
    return {
        "offered_rate": rate,
        "sent": result["sent"],
        "answered": result.get("answered"),
        "delivered": stats["count"],
        "equal": stats["count"] == result["sent"],
        "errors": result.get("errors", 0),
        "latency_ms": stats["latency_ms"],
        "generator_cpu_s": result.get("generator_cpu_s"),
    }
