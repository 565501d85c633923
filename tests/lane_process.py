"""A transport-side process for the engine lane tests: calls the engine through a
``LaneClient`` and prints each reply as one JSON line.

    python -m tests.lane_process SOCKET METHOD REQUEST_HEX [COUNT] [TIMEOUT_S]

``started`` is printed once the calls are sent, so a test can kill this process mid-call.
"""

from __future__ import annotations

import asyncio
import json
import sys

from sluice.workers.lane import LaneClient, Reply


def as_json(reply: Reply) -> str:
    return json.dumps(
        {
            "code": reply.code.name,
            "details": reply.details,
            "response": None if reply.response is None else reply.response.hex(),
            "trailing": [
                [key, value if isinstance(value, str) else value.hex()]
                for key, value in reply.trailing_metadata
            ],
        }
    )


async def main(socket: str, method: str, request: bytes, count: int, timeout_s: float) -> None:
    client = LaneClient(socket)
    metadata = (("x-request-id", "lane-process"),)
    calls = [
        asyncio.ensure_future(client.unary(method, request, metadata, timeout_s))
        for _ in range(count)
    ]
    await asyncio.sleep(0)  # the frames are written
    print("started", flush=True)
    for call in calls:
        print(as_json(await call), flush=True)
    await client.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            args[0],
            args[1],
            bytes.fromhex(args[2]),
            int(args[3]) if len(args) > 3 else 1,
            float(args[4]) if len(args) > 4 else 30.0,
        )
    )
