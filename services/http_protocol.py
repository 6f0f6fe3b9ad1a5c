"""uvicorn's httptools protocol with the limits a public listener needs.

uvicorn times out an idle keep-alive connection, but not one that connects
and never finishes its request headers (a slowloris): this protocol gives
every request :attr:`GuardedHttpTools.header_timeout` seconds from the
connection (or from the request's first byte) to complete its headers, and
caps the bytes of the request line and headers at :data:`MAX_HEAD_BYTES`.
Body reads are timed by the app itself (``FANOUT_HTTP_BODY_TIMEOUT``).
"""

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # request line and headers together


class GuardedHttpTools(HttpToolsProtocol):
    header_timeout = 10.0  # seconds; set per process by guarded_protocol()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.header_timeout, self._headers_too_slow
            )

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._refuse(b"408 Request Timeout")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._head_bytes = 0
            self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        # While the header timer runs, the bytes arriving are a request's
        # head; past the cap the request is answered 431 and not parsed.
        if self._header_timer is not None:
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > MAX_HEAD_BYTES:
                self._disarm_header_timer()
                self._refuse(b"431 Request Header Fields Too Large")
                return
        super().data_received(data)

    def _refuse(self, status: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(
                b"HTTP/1.1 " + status + b"\r\nConnection: close\r\n"
                b"Content-Length: 0\r\n\r\n"
            )
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def guarded_protocol(header_timeout: float) -> type[GuardedHttpTools]:
    """The protocol class with this process's header timeout."""
    return type(
        "GuardedHttpTools", (GuardedHttpTools,), {"header_timeout": header_timeout}
    )
