"""atheris harness for the sans-I/O decoder, :class:`pfcollector.protocol.ServerConnection`.

Input layout: byte 0 picks the connection's ``max_frame`` (low 2 bits) and the chunking seed
(high 6 bits); the rest is the byte stream a client sends, fed in chunks of 1..97 bytes (or
whole), with every complete message pulled after each chunk, then EOF.

Properties checked (any violation raises, which atheris reports as a crash):

1. Nothing escapes but the protocol's own errors: :class:`MessageError` (the connection goes
   on), :class:`FrameError` / :class:`SessionError` (fatal, and sticky: the next call raises
   the same error object and nothing more is buffered).
2. No unbounded buffering: once drained, ``pending_bytes <= max_frame + HEADER_SIZE``.
3. Messages are what the docs promise: Hello, EventMsg or Control, and an event survives
   ``encode`` -> parse unchanged (kind, id, job_id, fields).

Run ``fuzz/run.sh [seconds]`` (see ``fuzz/README.md``).
"""

from __future__ import annotations

import contextlib
import random
import sys

try:
    import atheris
except ImportError:  # tests/test_fuzz_regressions.py replays inputs through check() without it
    atheris = None

_instrument = atheris.instrument_imports() if atheris is not None else contextlib.nullcontext()
with _instrument:
    from pfcollector import protocol
    from pfcollector.protocol import (
        HEADER_SIZE,
        Control,
        EventMsg,
        FrameError,
        Hello,
        MessageError,
        ServerConnection,
        SessionError,
    )

MAX_FRAMES = (protocol.DEFAULT_MAX_FRAME, 64, 1024, 65536)


def _chunks(data: bytes, seed: int) -> list[bytes]:
    if seed == 0:
        return [data] if data else []
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 97)
        out.append(data[i : i + n])
        i += n
    return out


def _roundtrip(msg: EventMsg) -> None:
    """An accepted event, encoded again, must parse to the same event."""
    again = ServerConnection()
    again.receive_data(protocol.encode(protocol.Hello(1, "j", "f", 0)))
    assert isinstance(again.next_message(), Hello)
    # A field whose default is None (corpus ``contents``) has no wire form: the protocol takes
    # nil only for envelope keys, so it is left out, as a client leaves it out.
    fields = {k: v for k, v in msg.fields.items() if v is not None}
    again.receive_data(
        protocol.encode(EventMsg(msg.seq, msg.kind, fields, msg.id, None, msg.job_id))
    )
    back = again.next_message()
    assert isinstance(back, EventMsg), back
    assert (back.kind, back.id, back.job_id, back.seq) == (msg.kind, msg.id, msg.job_id, msg.seq)
    assert back.fields == msg.fields, (back.fields, msg.fields)
    assert msg.ts_ns is None or msg.ts_ns >= 0, msg.ts_ns


def check(data: bytes) -> None:
    if not data:
        return
    max_frame = MAX_FRAMES[data[0] & 3]
    conn = ServerConnection(max_frame=max_frame)
    fatal: Exception | None = None
    for chunk in [*_chunks(data[1:], data[0] >> 2), b""]:
        conn.receive_data(chunk)
        while fatal is None:
            try:
                msg = conn.next_message()
            except MessageError:
                continue
            except (FrameError, SessionError) as exc:
                fatal = exc
                break
            if msg is None:
                break
            assert isinstance(msg, Hello | EventMsg | Control), msg
            if isinstance(msg, EventMsg):
                _roundtrip(msg)
        if fatal is not None:
            assert conn.pending_bytes == 0, conn.pending_bytes
            again: Exception | None = None
            try:
                conn.next_message()
            except (FrameError, SessionError) as exc:
                again = exc
            if again is not fatal:
                raise AssertionError(f"a fatal error is not sticky: {again!r} after {fatal!r}")
        assert conn.pending_bytes <= max_frame + HEADER_SIZE, (conn.pending_bytes, max_frame)


def main() -> None:
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris (it needs clang)")
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
