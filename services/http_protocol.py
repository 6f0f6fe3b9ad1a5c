"""uvicorn's httptools protocol with the limits a public listener needs.

uvicorn times out an idle keep-alive connection, but not one that connects
and never finishes its request headers (a slowloris): this protocol gives
every request :attr:`GuardedHttpTools.header_timeout` seconds from the
connection (or from the request's first byte) to complete its headers, and
caps the bytes of the request line and headers at :data:`MAX_HEAD_BYTES`.
A body that has not fully arrived :attr:`GuardedHttpTools.body_timeout`
seconds after its headers is answered 408 too, and one whose Content-Length
is over :attr:`GuardedHttpTools.max_body` gets 413 without a byte of it read
(Falcon waits for a first body chunk before it calls the app).
"""

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from common.errors import error_body

MAX_HEAD_BYTES = 64 * 1024  # request line and headers together


class GuardedHttpTools(HttpToolsProtocol):
    header_timeout = 10.0  # seconds; set per process by guarded_protocol()
    body_timeout = 30.0  # seconds; likewise
    max_body = 16 * 1024 * 1024  # bytes, the largest body any request may have
    # Set in a request's ASGI scope when its body will never arrive whole
    # (timed out, or the client went away): the app, which may already hold
    # a complete-looking chunked body, must not accept it.
    INCOMPLETE = "fanout.body_incomplete"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._reading_body = False
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
        # PERF: timed only when a body is still to come; most requests
        # arrive whole in one read and need no timer at all.
        if self._reading_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(
                self.body_timeout, self._body_too_slow
            )

    def _mark_incomplete(self) -> None:
        if self._reading_body and self.cycle is not None:
            self.cycle.scope[self.INCOMPLETE] = True

    def _body_too_slow(self) -> None:
        self._body_timer = None
        self._mark_incomplete()
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()  # answered already; stop waiting for it
            return
        text = (
            f"the request body did not arrive within {self.body_timeout:g} s "
            "(FANOUT_HTTP_BODY_TIMEOUT)"
        )
        self._refuse(
            b"408 Request Timeout",
            error_body(text),
        )

    def _refuse(self, status: bytes, body: bytes = b"") -> None:
        if not self.transport.is_closing():
            kind = b"Content-Type: application/json\r\n" if body else b""
            self.transport.write(
                b"HTTP/1.1 %s\r\nConnection: close\r\n%sContent-Length: %d\r\n"
                b"\r\n%s" % (status, kind, len(body), body)
            )
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._reading_body = True
        super().on_headers_complete()
        length = next((v for n, v in self.headers if n == b"content-length"), b"")
        if length.isdigit() and int(length) > self.max_body:
            text = (
                f"request body is {int(length)} bytes; no request may be larger "
                f"than {self.max_body} bytes (FANOUT_MAX_MESSAGE_BYTES, "
                "FANOUT_MAX_BULK_BYTES)"
            )
            self._refuse(
                b"413 Content Too Large",
                error_body(text),
            )

    def on_message_complete(self) -> None:
        self._reading_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_incomplete()
        self._disarm_header_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().connection_lost(exc)


def guarded_protocol(
    header_timeout: float, body_timeout: float, max_body: int
) -> type[GuardedHttpTools]:
    """The protocol class with this process's timeouts and body limit."""
    return type(
        "GuardedHttpTools",
        (GuardedHttpTools,),
        {
            "header_timeout": header_timeout,
            "body_timeout": body_timeout,
            "max_body": max_body,
        },
    )
