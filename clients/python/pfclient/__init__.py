"""pfclient: report fuzzing results to the local pfcollector daemon.

The thin client fuzz harnesses embed. It needs only the standard library and msgpack, never
imports the daemon, and starts no thread. Typical use::

    from pfclient import Client

    with Client(job_id="job-42", fuzzer="afl++") as pf:
        pf.stats(executions=1_000_000, exec_per_second=4200.0)
        pf.crash("SIGSEGV", crashing_input, signal=11)  # returns once stored durably

See ``docs/protocol.md`` for the wire protocol it speaks.
"""

from ._client import DEFAULT_BUDGET, DEFAULT_QUEUE_BYTES, REJECTED_KEEP, Client, status
from ._errors import (
    DaemonUnavailable,
    EventRejected,
    FlushTimeout,
    OutboxUnavailable,
    PfClientError,
    UntrustedDaemon,
)
from ._outbox import default_outbox_dir, write_event
from ._wire import PROTOCOL_VERSION, default_socket_path

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_QUEUE_BYTES",
    "PROTOCOL_VERSION",
    "REJECTED_KEEP",
    "Client",
    "DaemonUnavailable",
    "EventRejected",
    "FlushTimeout",
    "OutboxUnavailable",
    "PfClientError",
    "UntrustedDaemon",
    "default_outbox_dir",
    "default_socket_path",
    "status",
    "write_event",
]
