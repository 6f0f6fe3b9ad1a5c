"""What the Redis and NATS consumers share: sorting a batch into messages
to publish and dead letters to keep, and retrying a broker step."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common.audit import dead_entry
from common.brokers import NatsLink, Written, backoff_delays, log_denied
from common.errors import FanoutError, PublishDenied, RejectedError, RetryableError
from common.logs import RateLimited
from common.message import Message, Parser

T = TypeVar("T")


def sort_batch(
    parser: Parser,
    items: Iterable[tuple[str | None, bytes]],
    refusals: RateLimited,
    clock=time.time,
) -> tuple[list[Message], list[bytes]]:
    """Parse ``(id, raw)`` items into messages and dead-letter entries.

    The items were taken together: one ``received_at`` for the batch.
    """
    messages: list[Message] = []
    dead: list[bytes] = []
    now = clock()
    for message_id, raw in items:
        try:
            messages.append(parser.bare(raw, message_id, received_at=now))
        except RejectedError as exc:
            refusals.warning("dead-lettered %s item: %s", parser.ingress, exc)
            dead.append(dead_entry(raw, str(exc), parser.ingress, now))
        except Exception as exc:  # noqa: BLE001 - one bad item must not jam the queue
            # A bug, not the sender's fault: kept with the error so that it
            # can be replayed once fixed, and the items behind it go on.
            logging.getLogger(f"fanout.{parser.ingress}").exception(
                "could not process a %s item; dead-lettered", parser.ingress
            )
            reason = f"internal error: {exc.__class__.__name__}: {exc}"
            dead.append(dead_entry(raw, reason, parser.ingress, now))
    return messages, dead


def split_denied(
    messages: list[Message],
    denied: set[str],
    ingress: str,
    logger: logging.Logger,
    clock=time.time,
) -> tuple[list[Message], list[bytes]]:
    """The messages NATS took, and dead letters for those to refused topics.

    A dead letter keeps the message as it was published (for a bare item,
    the item itself).
    """
    if not denied:
        return messages, []
    for topic in denied:
        log_denied(logger, topic)
    kept = [m for m in messages if m.topic not in denied]
    dead = [
        dead_entry(m.payload, str(PublishDenied(m.topic)), ingress, clock())
        for m in messages
        if m.topic in denied
    ]
    return kept, dead


async def confirm(
    nats: NatsLink,
    written: Written | None,
    messages: list[Message],
    timeout: float,
    logger: logging.Logger,
    give_up: Callable[[], bool],
) -> set[str] | None:
    """Wait until NATS has ``messages``, written earlier as ``written``.

    A batch NATS did not confirm in time is waited for again while the
    connection it was written to is up: the server reads a connection in
    order, so it has the batch once it answers, and writing it again would
    deliver it twice. A batch whose connection dropped, or whose write
    failed, is published again, whole, until NATS confirms it (see
    :func:`retry`). The topics NATS refused, or None once ``give_up()``
    says so.
    """

    async def attempt() -> set[str]:
        nonlocal written
        if written is None or not nats.may_confirm(written):
            written = await nats.send(messages)
        return await nats.confirm(written, timeout)

    return await retry(
        attempt, f"publishing {len(messages)} messages to nats", logger, give_up
    )


async def retry(
    step: Callable[[], Awaitable[T]],
    what: str,
    logger: logging.Logger,
    give_up: Callable[[], bool],
) -> T | None:
    """Run ``step`` until it succeeds; None once ``give_up()`` says so.

    Retries broker errors with backoff, logging the first failure and the
    recovery, not every attempt.
    """
    delays = backoff_delays()
    failures = 0
    while True:
        try:
            result = await step()
        except (
            RetryableError,
            aioredis.ConnectionError,
            aioredis.TimeoutError,
            ResponseError,
            OSError,
        ) as exc:
            # Outages are retried, and so is a command Redis refuses: an
            # ACL that does not allow it, a key of the wrong type, a full
            # memory. The operator can fix those while nothing held is
            # dropped; a consumer that exited instead would be given up on
            # by its supervisor and leave its list unread.
            failures += 1
            if failures == 1:
                level = (
                    logging.ERROR if isinstance(exc, ResponseError) else logging.WARNING
                )
                logger.log(level, "%s failed (%s); retrying", what, _brief(exc))
            if give_up():
                return None
            await asyncio.sleep(next(delays))
            continue
        if failures:
            logger.info("%s succeeded after %d retries", what, failures)
        return result


def _brief(exc: BaseException) -> str:
    if isinstance(exc, FanoutError):
        return str(exc)
    return f"{exc.__class__.__name__}: {exc}"
