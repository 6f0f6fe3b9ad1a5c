"""The gateway's own reading of NATS message frames, against a real server.

:class:`common.brokers.FrameReader` splits ``MSG`` and ``HMSG`` frames
itself and hands every other operation to nats-py. Whatever the chunking of
the socket, a subscriber must see every payload whole and in order, and a
plain nats-py subscription on the same connection must still get its
headers and reply subjects.
"""

import asyncio
import random

import nats
import pytest

from common.brokers import DirectClient

SIZES = [0, 1, 2, 130, 4096, 32_766, 32_767, 32_768, 32_769, 100_000, 300_000]


def payloads(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        size = rng.choice(SIZES) if n % 7 == 0 else rng.randrange(0, 600)
        # CR LF inside a payload must not be taken for the end of a frame.
        body = (b"%d:" % n) + bytes(rng.choice(b"ab\r\n ") for _ in range(size))
        out.append(body)
    return out


async def exchange(url: str, sent: list[bytes]) -> tuple[list, list, int]:
    direct: list[tuple[bytes, bytes]] = []
    plain: list = []
    reader = DirectClient()
    await reader.connect(url)
    await reader.subscribe_direct("frames.direct.>", direct.extend)

    async def on_plain(msg):
        plain.append(msg)

    await reader.subscribe("frames.plain", cb=on_plain)
    await reader.flush()

    writer = await nats.connect(url)
    for n, body in enumerate(sent):
        subject = f"frames.direct.{n % 3}"
        if n % 2:
            await writer.publish(subject, body, headers={"Nats-Msg-Id": f"id-{n}"})
        elif n % 5 == 0:
            await writer.publish(subject, body, reply="frames.reply")
        else:
            await writer.publish(subject, body)
        if n % 50 == 0:
            await writer.publish(
                "frames.plain",
                b"plain %d" % n,
                reply="frames.answer",
                headers={"Trace": f"t-{n}"},
            )
    await writer.flush()
    plain_count = (len(sent) + 49) // 50
    for _ in range(300):
        if len(direct) == len(sent) and len(plain) == plain_count:
            break
        await asyncio.sleep(0.05)
    # PINGs and PONGs between the frames still reach nats-py.
    await reader.flush(timeout=5)
    await writer.close()
    await reader.close()
    return direct, plain, plain_count


@pytest.mark.parametrize("seed", [1, 2])
def test_every_frame_arrives_whole_and_in_order(brokers, seed):
    """Small, large and split frames, with and without headers or replies."""
    sent = payloads(400, seed)
    direct, plain, plain_count = asyncio.run(exchange(brokers.nats_url, sent))

    assert [data for _, data in direct] == sent
    assert [subject for subject, _ in direct] == [
        b"frames.direct.%d" % (n % 3) for n in range(len(sent))
    ]
    assert len(plain) == plain_count
    for k, msg in enumerate(plain):
        assert msg.data == b"plain %d" % (k * 50)
        assert msg.reply == "frames.answer"
        assert msg.headers == {"Trace": f"t-{k * 50}"}
