"""A raw async test client: frames in and out over a real Unix socket, nothing hidden."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack
import trio

from pfcollector.events import Kind
from pfcollector.protocol import (
    Ack,
    ClientMessage,
    ErrorMsg,
    EventMsg,
    Hello,
    ServerMessage,
    encode,
    parse_server_message,
)


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, path: Path) -> RawClient:
        return cls(await trio.open_unix_socket(str(path)))

    async def send(self, msg: ClientMessage) -> None:
        await self.stream.send_all(encode(msg))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> ServerMessage | None:
        """The next message, or None at EOF."""
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    body = bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    return parse_server_message(msgpack.unpackb(body, raw=False))
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buf += data

    async def hello(self, job_id: str = "job-1", fuzzer: str = "afl") -> ServerMessage | None:
        await self.send(Hello(1, job_id, fuzzer, 4242))
        return await self.recv()

    async def aclose(self) -> None:
        await self.stream.aclose()


def event(seq: int, kind: Kind = Kind.COVERAGE, **fields: Any) -> EventMsg:
    defaults: dict[Kind, dict[str, Any]] = {
        Kind.COVERAGE: {"edges": seq, "new_edges": 1, "exec_count": 10},
        Kind.CRASH: {
            "type": "SEGV",
            "signal": 11,
            "exit_code": 0,
            "output": "",
            "stack_trace": "",
            "input": b"crash-%d" % seq,
        },
        Kind.STATS: {"executions": seq},
        Kind.CORPUS: {"files": [f"id:{seq}"], "total_size": seq},
    }
    return EventMsg(seq, kind, {**defaults[kind], **fields}, f"ev-{seq}-{kind.value}", None, None)


async def exchange(
    client: RawClient, events: list[EventMsg], limit: float = 20.0
) -> list[ErrorMsg]:
    """Send ``events``; wait for the cumulative ack of the last; return the errors seen."""
    for ev in events:
        await client.send(ev)
    errors: list[ErrorMsg] = []
    with trio.fail_after(limit):
        while True:
            msg = await client.recv()
            assert msg is not None, "the daemon closed the connection"
            if isinstance(msg, ErrorMsg):
                errors.append(msg)
            elif isinstance(msg, Ack) and msg.seq >= events[-1].seq:
                return errors
