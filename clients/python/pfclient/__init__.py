"""pfclient: report fuzzing results to the local pfcollector daemon.

The thin client fuzz harnesses embed. It needs only the standard library and msgpack, never
imports the daemon, and starts no thread. Typical use::

    from pfclient import Client

    with Client(job_id="job-42", fuzzer="afl++") as pf:
        pf.stats(executions=1_000_000, exec_per_second=4200.0)
        pf.crash("SIGSEGV", crashing_input, signal=11)  # returns once stored durably

See ``docs/protocol.md`` for the wire protocol it speaks.
"""

from ._client import REJECTED_KEEP, Client, status
from ._errors import DaemonUnavailable, EventRejected, FlushTimeout, PfClientError
from ._wire import PROTOCOL_VERSION, default_socket_path

__all__ = [
    "PROTOCOL_VERSION",
    "REJECTED_KEEP",
    "Client",
    "DaemonUnavailable",
    "EventRejected",
    "FlushTimeout",
    "PfClientError",
    "default_socket_path",
    "status",
]
