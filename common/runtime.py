"""Running a Fanout process: uvloop, signals and an ordered stop."""

import asyncio
import signal
from collections.abc import Awaitable, Callable

import uvloop

from common import logs
from common import settings as settings_module
from common.settings import Settings


def install_stop_signals(stopping: asyncio.Event) -> None:
    """TERM and INT only set ``stopping``; the main task does the stopping."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)


def process_main(build: Callable[[Settings, asyncio.Event], Awaitable[int]]) -> None:
    """The body of a process's ``main()``: settings, logging, then run.

    A bad setting exits with code 78 before anything starts; otherwise the
    exit status is what ``build(settings, stopping)`` returns.
    """
    settings = settings_module.load_or_exit()
    logs.setup(settings.log_level)
    raise SystemExit(run(lambda stopping: build(settings, stopping)))


def run(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``main(stopping)`` on uvloop and return its exit status."""

    async def wrapper() -> int:
        stopping = asyncio.Event()
        install_stop_signals(stopping)
        return await main(stopping)

    return uvloop.run(wrapper())
