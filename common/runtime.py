"""Running a Fanout process: uvloop, signals and an ordered stop."""

import asyncio
import signal
from collections.abc import Awaitable, Callable

import uvloop


def install_stop_signals(stopping: asyncio.Event) -> None:
    """TERM and INT only set ``stopping``; the main task does the stopping."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)


def run(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``main(stopping)`` on uvloop and return its exit status."""

    async def wrapper() -> int:
        stopping = asyncio.Event()
        install_stop_signals(stopping)
        return await main(stopping)

    return uvloop.run(wrapper())
