"""The command line of each gateway process: help, and nothing else.

Every setting comes from a ``FANOUT_*`` environment variable, so that
supervisord, systemd, the tests and the benchmark configure the processes
one way. A process started with an argument refuses it (exit status 2)
rather than starting on its defaults: ``fanout-http --help`` used to bind
port 8080 and dial NATS on 127.0.0.1:4222.
"""

import argparse
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

EPILOG = (
    "Takes no other arguments: every setting is a FANOUT_* environment "
    "variable (README.md, Settings), and a bad one stops the process with "
    "exit status 78."
)


def package_version() -> str:
    try:
        return version("fanout")
    except PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown"


def parse_command_line(
    program: str, summary: str, argv: Sequence[str] | None = None
) -> None:
    """Answer ``--help`` and ``--version``; exit 2 on any other argument."""
    parser = argparse.ArgumentParser(prog=program, description=summary, epilog=EPILOG)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {package_version()}"
    )
    parser.parse_args(argv)
