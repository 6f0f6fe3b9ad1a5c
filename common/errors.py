"""The exceptions Fanout raises.

One root, two branches that tell a caller what to do next:

* :class:`RetryableError`: the message may be fine but a broker is away or
  slow; the sender should try again later (HTTP 503).
* :class:`RejectedError`: the message itself is refused; sending it again
  will not help (HTTP 400 and friends).

:class:`ConfigError` is separate: it stops a process at startup.
"""

import orjson


def error_body(text: str) -> bytes:
    """The JSON every refusal Fanout writes carries: status and reason."""
    return orjson.dumps({"status": "error", "error": text})


class FanoutError(Exception):
    """Root of every error Fanout raises on purpose."""


class RetryableError(FanoutError):
    """A broker is unreachable or too slow; the same message may succeed later."""

    retry_after = 1  # seconds, sent to HTTP clients as Retry-After


class BrokerUnavailable(RetryableError):
    """NATS or Redis could not confirm the message in time."""


class Overloaded(RetryableError):
    """The process already holds as many unconfirmed messages as it may."""


class ShuttingDown(RetryableError):
    """The process is stopping and takes no new messages."""


class RejectedError(FanoutError):
    """The message is refused for what it contains; the text says why."""

    http_status = 400


class MessageTooLarge(RejectedError):
    """The message is larger than the configured maximum."""

    http_status = 413


class BulkTooLarge(RejectedError):
    """A bulk request holds more envelopes, or more bytes, than allowed."""

    http_status = 413


class PublishDenied(RejectedError):
    """The NATS server does not let the gateway's user publish to the topic.

    The server drops such a message and says so; the gateway passes that on
    instead of confirming it.
    """

    http_status = 403

    def __init__(self, topic: str):
        super().__init__(
            f'"topic" {topic!r} was refused by the nats server: the gateway '
            "may not publish there"
        )
        self.topic = topic


class ConfigError(FanoutError):
    """A setting has a value the process cannot start with."""
