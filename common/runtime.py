"""Running a Fanout process: uvloop, signals and an ordered stop."""

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import uvloop

from common import logs
from common import settings as settings_module
from common.settings import Settings

# PERF: a batch keeps thousands of objects alive at once (messages, their
# futures, parsed envelopes); at CPython's default threshold of 700 that
# started a young-generation collection every few requests, and a bulk
# request ran several. Measured on HTTP: +4-9% one message a request,
# +14-19% bulk.
GC_THRESHOLD = 20_000


def tune_gc() -> None:
    """Collect cycles less often, and never scan what startup built.

    Startup's objects (modules, settings, compiled patterns) are moved out
    of the collector's generations, so its rare full passes stay short.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)


# Set by HUP: once stopped, the process starts again (see process_main).
_hung_up = False


def install_stop_signals(stopping: asyncio.Event) -> None:
    """TERM and INT only set ``stopping``; the main task does the stopping.

    HUP stops the same way and then starts the program again, as HUP
    reloads gunicorn's workers.
    """
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    def hang_up() -> None:
        global _hung_up
        _hung_up = True
        stopping.set()

    loop.add_signal_handler(signal.SIGHUP, hang_up)


def process_main(build: Callable[[Settings, asyncio.Event], Awaitable[int]]) -> None:
    """The body of a process's ``main()``: settings, logging, then run.

    A bad setting exits with code 78 before anything starts; otherwise the
    exit status is what ``build(settings, stopping)`` returns. Stopped by
    HUP, the program starts again in the same process.
    """
    settings = settings_module.load_or_exit()
    logs.setup(settings.log_level)
    status = run(lambda stopping: build(settings, stopping))
    if _hung_up and status == 0:
        # Same process id, so the supervisor keeps following it; settings
        # and the files they name are read afresh.
        logging.getLogger("fanout").info("stopped on HUP; starting again")
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, *sys.argv])
    raise SystemExit(status)


def run(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``main(stopping)`` on uvloop and return its exit status."""

    async def wrapper() -> int:
        tune_gc()
        stopping = asyncio.Event()
        install_stop_signals(stopping)
        return await main(stopping)

    return uvloop.run(wrapper())
