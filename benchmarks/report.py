"""What a run shows: the terminal table, targets, ``latest.json`` and the chart.

Targets are printed as target against measured, with a verdict; they never
change the exit status, since a slow figure is a finding, not a harness
failure.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# (label, measured row, ceiling row or None, field, "≥" or "<", target); the
# "ceiling" is whatever row the measured one is held against.
TARGETS = (
    ("http 1 worker / falcon ceiling", "http max w1", "ceiling http w1", "rate",
     ">=", 0.8),
    ("ws / websockets ceiling", "ws max", "ceiling ws", "rate", ">=", 0.6),
    ("redis backlog drain / bare nats-py publish", "redis backlog c1",
     "ceiling nats-py publish", "rate", ">=", 0.3),
    ("nats ingest / bare nats-py publish", "nats burst c1",
     "ceiling nats-py publish", "rate", ">=", 0.3),
    ("http p99 at half load (ms)", "http half w1", None, "p99", "<", 5.0),
    ("http bulk 100/request / http 1 message", "http bulk w1", "http max w1",
     "rate", ">=", 10.0),
)  # fmt: skip

# Ratios worth seeing that have no target.
RATIOS = (
    ("http 2 workers / falcon ceiling (2)", "http max w2", "ceiling http w2"),
    ("http 2 workers / 1 worker", "http max w2", "http max w1"),
    ("redis 2 consumers / 1", "redis backlog c2", "redis backlog c1"),
    ("nats 2 consumers / 1", "nats burst c2", "nats burst c1"),
)


def source_commit(root: Path) -> str:
    """The commit measured: git's HEAD, with "+dirty" for uncommitted edits.

    A copy of the tree without ``.git`` can say its commit in the
    environment variable BENCH_SOURCE_COMMIT.
    """
    if os.environ.get("BENCH_SOURCE_COMMIT"):
        return os.environ["BENCH_SOURCE_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {row["name"]: row for row in rows}


def _value(row: dict, field: str) -> float | None:
    if field == "rate":
        return row.get("rate")
    return (row.get("latency_ms") or {}).get(field)


def targets(rows: list[dict]) -> list[dict]:
    """Each target with its measured value and whether it was met."""
    named = _by_name(rows)
    out = []
    for label, measured, ceiling, field, op, target in TARGETS:
        if measured not in named or (ceiling and ceiling not in named):
            continue
        value = _value(named[measured], field)
        if ceiling:
            base = _value(named[ceiling], field)
            value = value / base if value is not None and base else None
        met = value is not None and (value >= target if op == ">=" else value < target)
        out.append({"target": label, "wanted": f"{op} {target:g}",
                    "measured": None if value is None else round(value, 3),
                    "met": met})  # fmt: skip
    for label, top, bottom in RATIOS:
        if top in named and bottom in named and named[bottom]["rate"]:
            value = named[top]["rate"] / named[bottom]["rate"]
            out.append({"target": label, "wanted": None,
                        "measured": round(value, 3), "met": None})  # fmt: skip
    return out


def _gateway_cpu(row: dict) -> str:
    """CPU share of the busiest non-broker process: 1.00 is one core full."""
    skip = {"nats-server", "valkey", "probe"}
    shares = [
        (usage["cpu_share"], name)
        for name, usage in row.get("processes", {}).items()
        if name not in skip
    ]
    if not shares:
        return "-"
    share, name = max(shares)
    return f"{share:.2f} {name}"


def _share(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'phase':<24} {'offered/s':>9} {'sent':>9} {'arrived':>9} {'err':>5} "
        f"{'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'rss MiB':>7} {'gen cpu':>7} {'other':>6}  busiest (cpu share)"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        latency = {} if row.get("latency_note") else (row.get("latency_ms") or {})
        rss = max(
            (u["peak_rss_mib"] for n, u in row.get("processes", {}).items()
             if n not in ("nats-server", "valkey", "probe")),
            default=0,
        )  # fmt: skip
        arrived = row.get("delivered")
        offered = row.get("offered_rate")
        print(
            f"{row['name']:<24} {offered or 0:>9,.0f} {row['sent']:>9,} "
            f"{'-' if arrived is None else f'{arrived:,}':>9} {row['errors']:>5} "
            f"{row['rate']:>9,.0f} {_ms(latency.get('p50')):>8} "
            f"{_ms(latency.get('p99')):>8} {_ms(latency.get('max')):>8} "
            f"{rss:>7.1f} {_share(row['generator']['cpu_share']):>7} "
            f"{row['other_cpu_s']:>6.1f}  {_gateway_cpu(row)}"
        )
    if any(row.get("latency_note") for row in rows):
        print("backlog and burst rows: latency includes time queued, so not shown.")
    print(
        "gen cpu: the load generator's CPU share (1.00 = one core); other: CPU\n"
        "seconds used meanwhile by processes outside the benchmark, the\n"
        "harness included; busy processes elsewhere make every figure lower."
    )


BROKERS = ("nats-server", "valkey", "probe")
SOAK_GROWTH = 0.10  # the most a gateway process's RSS may grow in the soak


def cpu_per_message(row: dict) -> dict[str, float] | None:
    """Microseconds of CPU per message: the gateway (or ceiling) processes
    together, each broker, the probe, the load generator, and their sum."""
    count = row.get("delivered") or row.get("answered") or 0
    if not count:
        return None
    processes = row.get("processes", {})
    spent = {
        "gateway": sum(u["cpu_s"] for n, u in processes.items() if n not in BROKERS),
        **{name: processes.get(name, {}).get("cpu_s", 0.0) for name in BROKERS},
        "generator": row.get("generator", {}).get("cpu_s") or 0.0,
    }
    spent["all"] = sum(spent.values())
    return {name: round(cpu * 1e6 / count, 1) for name, cpu in spent.items()}


def print_cpu_table(rows: list[dict]) -> None:
    names = ("gateway", *BROKERS, "generator", "all")
    print(
        f"\n{'cpu us per message':<24} "
        + " ".join(f"{n:>11}" for n in names)
        + f" {'cores busy':>11}"
    )
    for row in rows:
        cpu = cpu_per_message(row)
        if cpu:
            cores = cpu["all"] * row["rate"] / 1e6
            print(
                f"{row['name']:<24} "
                + " ".join(f"{cpu[n]:>11.1f}" for n in names)
                + f" {cores:>11.2f}"
            )
    print(
        "gateway: the gateway's processes (or the ceiling's server); cores\n"
        f"busy: all of it at the row's rate (this machine has {os.cpu_count()});"
        "\na backlog's fill ran before its drain and is not counted."
    )


def print_targets(items: list[dict]) -> None:
    print(f"\n{'target':<46} {'wanted':>8} {'measured':>9}  verdict")
    for item in items:
        verdict = {True: "met", False: "MISSED", None: ""}[item["met"]]
        measured = "-" if item["measured"] is None else f"{item['measured']:.3f}"
        print(f"{item['target']:<46} {item['wanted'] or '':>8} {measured:>9}  "
              f"{verdict}")  # fmt: skip


def print_soak(soak: dict | None) -> None:
    if not soak:
        return
    print(f"\nsoak, {soak['seconds']:.0f} s: delivered == sent: "
          f"{soak['delivered_equals_sent']}")  # fmt: skip
    for kind, item in soak["ingresses"].items():
        print(f"  {kind:<6} offered {item['offered_rate']:>6,.0f}/s  "
              f"sent {item['sent']:>9,}  arrived {item['delivered']:>9,}  "
              f"p99 {_ms(item['latency_ms'].get('p99'))} ms")  # fmt: skip
    half = _trend_at(soak.get("rss_trend_mib") or [], soak["seconds"] / 2)
    print("  rss MiB, start -> half-way -> end (growth; in the second half):")
    worst = None
    for name, start in soak["rss_start_mib"].items():
        end = soak["rss_end_mib"].get(name)
        middle = half.get(name)
        if end is None or middle is None or not start:
            print(f"    {name:<34} {start:>7.1f} -> -")
            continue
        growth, late = (end - start) / start, (end - middle) / middle
        print(f"    {name:<34} {start:>7.1f} -> {middle:>7.1f} -> {end:>7.1f}"
              f"  ({growth:+.1%}; {late:+.1%})")  # fmt: skip
        if name not in BROKERS and (worst is None or growth > worst[0]):
            worst = (growth, late, name)
    if worst:
        growth, late, name = worst
        verdict = "met" if growth <= SOAK_GROWTH else "MISSED"
        print(f"  gateway rss growth <= {SOAK_GROWTH:.0%}: {verdict} (largest "
              f"{growth:+.1%}, {name}; second half {late:+.1%})")  # fmt: skip


def _trend_at(trend: list[dict], at: float) -> dict:
    """The RSS sample nearest ``at`` seconds into the soak."""
    if not trend:
        return {}
    return min(trend, key=lambda sample: abs(sample["at_s"] - at))


def print_all(results: dict) -> None:
    print()
    print_table(results["rows"])
    print_cpu_table(results["rows"])
    print_targets(results["targets"])
    print_soak(results["soak"])
    print(
        f"\nruntime {results['runtime_s']:.0f} s ({results['mode']} run "
        f"of {results['commit']})"
    )


def write_json(results: dict, path: Path) -> None:
    # Written aside, then renamed: a reader never sees half a file.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def write_chart(results: dict, path: Path) -> None:
    """Throughput beside each ceiling, and latency percentiles per ingress."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = _by_name(results["rows"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    _throughput_axes(left, named)
    _latency_axes(right, named)
    fig.suptitle(
        f"Fanout load benchmark, {results['commit']} ({results['mode']} run, "
        f"{results['machine']['cpus']} CPUs, {results['started_at']})"
    )
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)


THROUGHPUT_GROUPS = (
    (
        "http",
        ("http max w1", "http max w2", "http bulk w1"),
        ("ceiling http w1", "ceiling http w2"),
    ),
    ("ws", ("ws max",), ("ceiling ws",)),
    ("redis", ("redis backlog c1", "redis backlog c2"), ("ceiling nats-py publish",)),
    ("nats", ("nats burst c1", "nats burst c2"), ("ceiling nats-py publish",)),
)


def _throughput_axes(ax, named: dict) -> None:
    labels, values, colors = [], [], []
    for _, measured, ceilings in THROUGHPUT_GROUPS:
        for name in measured + ceilings:
            if name in named:
                labels.append(name.replace("ceiling ", "ceil. "))
                values.append(named[name]["rate"])
                colors.append("tab:gray" if name in ceilings else "tab:blue")
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, rotation=40, ha="right")
    # Log scale: the bare publish loop is tens of times the HTTP ingress.
    ax.set_yscale("log")
    ax.set_ylabel("messages / s, log (gateway: arrived at the subscriber)")
    ax.set_title("throughput (blue) beside its ceiling (gray)")


def _latency_axes(ax, named: dict) -> None:
    names = [n for n in ("http max w1", "http half w1", "http bulk w1", "ws max",
                         "ws half", "redis half c1", "nats half c1")
             if n in named]  # fmt: skip
    width = 0.27
    for offset, key in enumerate(("p50", "p99", "max")):
        values = [(named[n]["latency_ms"] or {}).get(key) or 0 for n in names]
        xs = [i + (offset - 1) * width for i in range(len(names))]
        ax.bar(xs, values, width, label=key)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("end-to-end latency, ms (log)")
    ax.set_title("latency: sender to subscriber")
    ax.legend()
