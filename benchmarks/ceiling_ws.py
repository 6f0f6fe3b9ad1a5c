"""The WebSocket ceiling: parse each frame with orjson and answer it.

No brokers: what is left is the websockets library and the event loop,
under the server options the WebSocket ingress uses. Run as
``python -m benchmarks.ceiling_ws PORT``.
"""

import asyncio
import sys

import orjson
import uvloop
from websockets.asyncio.server import ServerConnection, serve

ANSWER = '{"status": "accepted"}'


async def answer_each(ws: ServerConnection) -> None:
    async for frame in ws:
        orjson.loads(frame)
        await ws.send(ANSWER, text=True)


async def main(port: int) -> None:
    async with serve(
        answer_each,
        "127.0.0.1",
        port,
        max_size=1024 * 1024,
        compression=None,
        server_header=None,
    ):
        print(f"ceiling ws listening on 127.0.0.1:{port}", flush=True)
        await asyncio.Future()  # until the harness sends TERM


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
