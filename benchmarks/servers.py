"""Starting, watching and stopping what a benchmark run needs.

Every process the harness starts is registered with one :class:`Fleet`;
``Fleet.stop_all()`` ends them in reverse order (TERM, then KILL after a
timeout) and runs from a ``finally``, so an error or Ctrl-C leaves nothing
behind. Each child gets its own session: Ctrl-C in the terminal reaches only
the harness, which then stops the children in order.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import redis

from services.broker import nats_command, redis_command

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
STOP_TIMEOUT = 15.0  # seconds between TERM and KILL
SAMPLE_EVERY = 0.25  # seconds between RSS samples


class HarnessError(Exception):
    """The harness itself cannot go on: a server did not start, nothing arrived."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class Proc:
    """One child process with its log file."""

    def __init__(
        self, name: str, command: list[str], env: dict, log_path: Path, pipes: bool
    ):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else self._log,
            stderr=self._log,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.process = psutil.Process(self.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """TERM, wait up to ``timeout`` seconds, then KILL its whole session."""
        if self.popen.stdin is not None:
            self.popen.stdin.close()  # the probe ends when its input closes
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} ignored TERM for {timeout:.0f} s; killing")
        # gunicorn's workers and anything else left in the session go too.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


class Fleet:
    """Every process a run started, stopped in reverse order at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self._started = 0

    def start(
        self,
        name: str,
        command: list[str],
        env: dict | None = None,
        pipes: bool = False,
    ) -> Proc:
        # Numbered, so a process started again keeps its earlier log.
        self._started += 1
        log_path = self.log_dir / f"{self._started:03d}-{name}.log"
        proc = Proc(name, command, env or base_env(), log_path, pipes)
        self.procs.append(proc)
        return proc

    def stop(self, *procs: Proc) -> None:
        for proc in procs:
            proc.stop()
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.stop(self.procs[-1])


def base_env() -> dict[str, str]:
    """The harness's environment without any FANOUT_* setting of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(check, what: str, timeout: float, proc: Proc | None = None) -> None:
    """Poll ``check()`` until true; raise if ``timeout`` passes or ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise HarnessError(
                f"{proc.name} exited while waiting for {what}; see {proc.log_path}"
            )
        try:
            if check():
                return
        except (OSError, redis.RedisError):
            pass  # not up yet
        time.sleep(0.05)
    where = f"; see {proc.log_path}" if proc is not None else ""
    raise HarnessError(f"{what} not ready after {timeout:.0f} s{where}")


def port_open(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=0.5):
        return True


def log_count(proc: Proc, line: str) -> int:
    return proc.log_text().count(line)


def bench_redis_command(port: int, data_dir: Path) -> list[str]:
    """The embedded broker's valkey, keeping its data in memory only.

    The embedded broker appends every write to a file and rewrites that file
    in a forked child whenever it has doubled. Which phase such a rewrite
    lands in depends on how much the phases before it wrote, and on two
    cores the child takes CPU from the gateway: measured on the bulk row, 182k
    to 197k messages a second with rewrites against 201k to 214k without.
    The benchmark measures the gateway; what a deployment's Redis does with
    its disk is that Redis's cost, and the ceilings here do not pay it either.
    """
    return [*redis_command(port, data_dir), "--appendonly", "no"]


class Brokers:
    """A nats-server and a valkey on free loopback ports, for this run only."""

    def __init__(self, fleet: Fleet, data_dir: Path):
        self.nats_port = free_port()
        self.redis_port = free_port()
        self.nats_url = f"nats://{LOOPBACK}:{self.nats_port}"
        self.redis_url = f"redis://{LOOPBACK}:{self.redis_port}/0"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.nats = fleet.start("nats-server", nats_command(self.nats_port, data_dir))
        self.redis = fleet.start(
            "valkey", bench_redis_command(self.redis_port, data_dir)
        )
        self.client = redis.Redis.from_url(self.redis_url, socket_timeout=10)
        wait_until(lambda: port_open(self.nats_port), "nats-server", 10, self.nats)
        wait_until(self.client.ping, "valkey", 10, self.redis)

    def gateway_env(self, **settings: str) -> dict[str, str]:
        """Environment for a gateway process: our brokers plus ``settings``."""
        env = base_env()
        env.update(
            FANOUT_NATS_URL=self.nats_url,
            FANOUT_REDIS_URL=self.redis_url,
            FANOUT_LOG_LEVEL="info",
            FANOUT_REDIS_BLOCK_TIMEOUT="1",
        )
        env.update(settings)
        return env


class Monitor:
    """CPU seconds and peak RSS of a set of processes over one phase.

    A process's children (gunicorn's workers) are counted with it. RSS is
    sampled every :data:`SAMPLE_EVERY` seconds in a thread, so a peak
    shorter than that can be missed.
    """

    def __init__(self, procs: dict[str, Proc], trend_every: float | None = None):
        self.procs = procs
        self._cpu0 = {name: _tree_cpu(p.process) for name, p in procs.items()}
        self.peak_rss: dict[str, int] = dict.fromkeys(procs, 0)
        self.trend_every = trend_every  # seconds; None keeps no trend
        self.trend: list[dict] = []
        self._host0 = _host_busy()
        self._done = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        # Sampled at the start as well as every interval (and once more by
        # finish): a backlog can drain in a tenth of a second, shorter than
        # the interval, and its row would show no peak at all.
        next_trend = time.monotonic()
        self._note_rss()
        while not self._done.wait(SAMPLE_EVERY):
            self._note_rss()
            if self.trend_every and time.monotonic() >= next_trend:
                next_trend += self.trend_every
                sizes = {k: round(v / 2**20, 1) for k, v in self.rss_each().items()}
                at = round(time.monotonic() - self._t0, 1)
                self.trend.append({"at_s": at, **sizes})

    def _note_rss(self) -> None:
        for name, rss in self.rss().items():
            self.peak_rss[name] = max(self.peak_rss[name], rss)

    def rss_each(self) -> dict[str, int]:
        """Current RSS in bytes of every process, children included."""
        out = {}
        for name, proc in self.procs.items():
            for p in _tree(proc.process):
                label = name if p.pid == proc.pid else f"{name} worker {p.pid}"
                out[label] = _rss(p)
        return out

    def rss(self) -> dict[str, int]:
        """Current RSS in bytes: the largest process of each tree."""
        out = {}
        for name, proc in self.procs.items():
            sizes = [_rss(p) for p in _tree(proc.process)]
            out[name] = max(sizes, default=0)
        return out

    def finish(self, window: float | None = None) -> dict:
        """Stop sampling; CPU seconds, CPU share and peak RSS per process.

        The share is CPU seconds over ``window`` (the seconds the load
        lasted; default: since the monitor started), so 1.0 is one core
        kept busy for the whole load. ``host`` holds the CPU seconds used
        by every process on the machine, ours included.
        """
        self._done.set()
        self._thread.join()
        self._note_rss()
        window = window or (time.monotonic() - self._t0)
        out = {}
        for name, proc in self.procs.items():
            cpu = _tree_cpu(proc.process) - self._cpu0[name]
            out[name] = {
                "cpu_s": round(cpu, 3),
                "cpu_share": round(cpu / window, 3),
                "peak_rss_mib": round(self.peak_rss[name] / 2**20, 1),
            }
        self.host_cpu_s = round(_host_busy() - self._host0, 3)
        return out


def _host_busy() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def _tree_cpu(process: psutil.Process) -> float:
    total = 0.0
    for p in _tree(process):
        try:
            times = p.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def run_together(fleet: Fleet, jobs: list[tuple], timeout: float) -> list[dict]:
    """Run load generators ``(name, command, env)`` side by side to their end.

    Returns each one's output, exit status and CPU seconds. The CPU comes
    from ``wait4``'s resource usage, so it is exact although the process
    has exited. A generator still running after ``timeout`` is stopped and
    the run fails: every generator is meant to stop by itself.
    """
    procs = [fleet.start(name, command, env) for name, command, env in jobs]
    usage: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(usage) < len(procs):
        if time.monotonic() > deadline:
            late = [p for p in procs if p.pid not in usage]
            fleet.stop(*late)
            raise HarnessError(
                f"{late[0].name} ran past {timeout:.0f} s; see {late[0].log_path}"
            )
        for proc in procs:
            if proc.pid in usage:
                continue
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.popen.returncode = os.waitstatus_to_exitcode(status)
                usage[pid] = rusage.ru_utime + rusage.ru_stime
        time.sleep(0.02)
    fleet.stop(*procs)
    return [
        {
            "returncode": p.popen.returncode,
            "output": p.log_text(),
            "cpu_s": round(usage[p.pid], 3),
            "log": str(p.log_path),
        }
        for p in procs
    ]


def run_bounded(
    fleet: Fleet, name: str, command: list[str], timeout: float, env: dict | None = None
) -> dict:
    """One generator alone: :func:`run_together` with a single job."""
    return run_together(fleet, [(name, command, env)], timeout)[0]


class ProbeClient:
    """The probe process (``benchmarks.probe``) and its line protocol."""

    def __init__(self, fleet: Fleet, nats_url: str):
        command = [sys.executable, "-m", "benchmarks.probe", nats_url]
        self.proc = fleet.start("probe", command, pipes=True)
        if self._line() != "ready":
            raise HarnessError(f"probe did not start; see {self.proc.log_path}")

    def _line(self) -> str:
        line = self.proc.popen.stdout.readline().decode().strip()
        if not line and not self.proc.alive():
            raise HarnessError(f"probe exited; see {self.proc.log_path}")
        return line

    def _ask(self, request: str) -> str:
        self.proc.popen.stdin.write(f"{request}\n".encode())
        self.proc.popen.stdin.flush()
        return self._line()

    def count(self, topic: str) -> int:
        return int(self._ask(f"count {topic}"))

    def stats(self, topic: str) -> dict:
        """Count, first and last arrival, latency percentiles; then forgets it."""
        stats = json.loads(self._ask(f"stats {topic}"))
        self._ask(f"forget {topic}")
        return stats

    def settle(self, topic: str, expected: int, timeout: float, quiet: float) -> int:
        """Wait until ``expected`` arrived, or nothing more came for ``quiet`` s."""
        deadline = time.monotonic() + timeout
        count, changed = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_count = self.count(topic)
            if now_count >= expected:
                return now_count
            if now_count != count:
                count, changed = now_count, time.monotonic()
            elif time.monotonic() - changed > quiet:
                break
            time.sleep(0.05)
        return max(count, 0)
