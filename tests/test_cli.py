"""Each process's command line: help, and no start on an unknown argument."""

import os
import subprocess

import pytest

from tests.support import BIN, free_port

PROGRAMS = ["fanout-http", "fanout-ws", "fanout-redis", "fanout-nats"]


def _run(program: str, *args: str) -> subprocess.CompletedProcess:
    # Should a program start after all, it finds only free loopback ports,
    # no broker and no default port.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    env.update(
        FANOUT_NATS_URL=f"nats://127.0.0.1:{free_port()}",
        FANOUT_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        FANOUT_HTTP_BIND=f"127.0.0.1:{free_port()}",
        FANOUT_WS_BIND=f"127.0.0.1:{free_port()}",
    )
    try:
        return subprocess.run(
            [str(BIN / program), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{program} {' '.join(args)} started serving") from exc


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_is_printed_and_nothing_starts(program):
    """``--help`` prints the usage and the settings it reads, and exits 0."""
    done = _run(program, "--help")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {program} [-h] [--version]")
    assert "every setting is a FANOUT_* environment" in done.stdout
    assert "nats" not in done.stderr.lower()


@pytest.mark.parametrize("program", PROGRAMS)
def test_unknown_argument_is_refused(program):
    """An argument the program does not know stops it with exit status 2."""
    done = _run(program, "--bind", "0.0.0.0:80")

    assert done.returncode == 2
    assert f"{program}: error: unrecognized arguments: --bind 0.0.0.0:80" in (
        done.stderr
    )


def test_version_is_the_package_version():
    """``--version`` names the installed package's version."""
    done = _run("fanout-ws", "--version")

    assert done.returncode == 0
    assert done.stdout.strip() == "fanout-ws 0.1.0"


def test_fanout_version_is_the_package_version():
    """``fanout --version`` names the installed package's version."""
    done = _run("fanout", "--version")

    assert (done.returncode, done.stdout.strip()) == (0, "fanout 0.1.0")


def test_fanout_help_prints_its_usage():
    """``fanout --help`` prints the subcommands and exits 0."""
    done = _run("fanout", "--help")

    assert done.returncode == 0
    assert done.stdout.strip() == (
        "usage: fanout run | fanout start | fanout ctl SUPERVISORCTL-ARGS"
    )


@pytest.mark.parametrize(
    "command",
    [["fanout", "--bogus"], ["fanout", "run", "extra"], ["fanout-broker", "nats", "x"]],
)
def test_fanout_and_broker_refuse_unknown_arguments(command):
    """``fanout`` and ``fanout-broker`` refuse what they do not know with
    exit 2 and their usage, before anything starts."""
    done = _run(*command)

    assert done.returncode == 2
    assert done.stderr.startswith("usage: ")
