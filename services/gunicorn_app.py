"""gunicorn, embedded: the HTTP ingress's process manager.

Running gunicorn from Python (rather than through a shell line) keeps one
process tree under supervisord and takes every option from the settings.
Timeouts nest: a worker's own shutdown (``FANOUT_SHUTDOWN_TIMEOUT``) is
shorter than gunicorn's graceful timeout, which is shorter than
supervisord's ``stopwaitsecs`` (30 s).
"""

import ctypes
import math
import os
import signal
import sys

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from common import logs
from common import settings as settings_module

PR_SET_PDEATHSIG = 1  # from linux/prctl.h


class FanoutWorker(UvicornWorker):
    """The uvicorn worker with uvloop, httptools, limits and a bounded stop.

    On TERM a worker stops accepting, lets in-flight requests finish for at
    most half of ``FANOUT_SHUTDOWN_TIMEOUT``, then spends at most the other
    half committing what it holds; gunicorn's graceful timeout is 2 s more.
    ``limit_concurrency`` answers 503 beyond that many open connections; the
    httptools protocol is ours, to time out slow request heads (see
    services.http_protocol).
    """

    def __init__(self, *args, **kwargs):
        from services.http_protocol import guarded_protocol

        settings = settings_module.load_or_exit()
        self.CONFIG_KWARGS = {
            "loop": "uvloop",
            "http": guarded_protocol(
                settings.http_header_timeout,
                settings.http_body_timeout,
                max(settings.max_message_bytes, settings.max_bulk_bytes),
            ),
            "limit_concurrency": settings.http_max_connections,
            "server_header": False,
            "timeout_graceful_shutdown": settings.shutdown_timeout / 2,  # seconds
        }
        super().__init__(*args, **kwargs)

    def init_process(self) -> None:
        _die_with_parent()
        super().init_process()


def _die_with_parent() -> None:
    """Ask Linux to send this worker TERM when the gunicorn master dies.

    A master killed with -9 would otherwise leave its workers serving on the
    port, outside any supervisor, and the master started in its place could
    never bind it.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() == 1:  # the master died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class FanoutArbiter(Arbiter):
    """gunicorn's master, stopping gracefully on INT as on TERM.

    gunicorn makes INT (Ctrl-C) a quick stop that kills the workers without
    letting them answer or commit what they hold; a gateway must not lose
    an answer to a key press. QUIT is still the quick stop.
    """

    def handle_int(self):
        self.handle_term()


class FanoutHttp(BaseApplication):
    """gunicorn with options from a dict and the app from ``load_app()``."""

    def __init__(self, options: dict, load_app=None):
        self.options = options
        self.load_app = load_app
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def run(self) -> None:
        try:
            FanoutArbiter(self).run()
        except RuntimeError as exc:  # gunicorn's own way to report a bad start
            print(f"\nError: {exc}\n", file=sys.stderr, flush=True)
            sys.exit(1)

    def load(self):
        if self.load_app is not None:
            return self.load_app()
        from services.http import app_factory

        return app_factory()


def gunicorn_options(settings) -> dict:
    host, port = settings.http_bind
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "bind": [bind],
        "workers": settings.http_workers,
        "worker_class": FanoutWorker,
        "graceful_timeout": math.ceil(settings.shutdown_timeout) + 2,  # seconds
        "timeout": 30,  # seconds without a worker heartbeat
        "keepalive": 5,  # seconds an idle keep-alive connection is held
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "proc_name": "fanout-http",
        "backlog": 2048,
        # gunicorn's control socket sits at one path per user; several
        # gateways on one host would fight over it, and nothing uses it.
        "control_socket_disable": True,
    }


def run_gunicorn() -> None:
    settings = settings_module.load_or_exit()
    logs.setup(settings.log_level)
    FanoutHttp(gunicorn_options(settings)).run()
