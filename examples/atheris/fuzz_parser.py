"""An atheris (Python libFuzzer) harness that reports to pfcollector through pfclient.

The target is a toy parser with a bug; the harness reports ``started``, periodic stats and
coverage, and every crash with its input and Python traceback, then re-raises so atheris
(libFuzzer) still writes its ``crash-<sha1>`` artifact and stops as usual. Run the daemon
first (``pfcollector serve``), then::

    pip install atheris          # needs a clang with libFuzzer; see README.md
    python examples/atheris/fuzz_parser.py -atheris_runs=200000

``PFCOLLECTOR_JOB`` names the job (default ``job-atheris``); ``PFCOLLECTOR_SOCKET`` the
socket. If the daemon is not running the harness still fuzzes: reporting is best effort.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

import atheris

from pfclient import Client, PfClientError

JOB = os.environ.get("PFCOLLECTOR_JOB", "job-atheris")
STATS_EVERY = 2.0  # seconds between stats reports


@atheris.instrument_func  # coverage guidance for the code under test
def parse_record(data: bytes) -> dict[str, object]:
    """The code under test: ``key=value;`` records, with a planted bug on ``pfx=!``."""
    record: dict[str, object] = {}
    for part in data.split(b";"):
        key, sep, value = part.partition(b"=")
        if not sep:
            raise ValueError("no '='")
        if key == b"pfx" and value == b"!":
            raise RuntimeError(f"bug: key {key!r}")  # the planted crash
        record[key.decode("ascii")] = value
    return record


class Reporter:
    """Counts executions and reports to the daemon now and then; never breaks the fuzzer."""

    def __init__(self) -> None:
        self.client: Client | None = None
        try:
            self.client = Client(job_id=JOB, fuzzer="atheris", timeout=5.0)
            self.client.lifecycle("started", f"atheris harness pid {os.getpid()}")
        except PfClientError as exc:
            print(f"pfcollector: not reporting ({exc})", file=sys.stderr)
        self.executions = 0
        self.started = self.last = time.monotonic()

    def tick(self) -> None:
        self.executions += 1
        now = time.monotonic()
        if self.client is None or now - self.last < STATS_EVERY:
            return
        self.last = now
        try:
            self.client.stats(executions=self.executions,
                              exec_per_second=self.executions / (now - self.started))  # fmt: skip
        except PfClientError as exc:
            print(f"pfcollector: stats not sent ({exc})", file=sys.stderr)

    def crash(self, data: bytes, exc: BaseException) -> None:
        if self.client is None:
            return
        trace = "".join(traceback.format_exception(exc))
        try:  # waits until the daemon has the crash on disk
            self.client.crash(type(exc).__name__, data, signal=int(signal.SIGABRT),
                              output=str(exc), stack_trace=trace)  # fmt: skip
        except PfClientError as err:
            print(f"pfcollector: crash not reported ({err})", file=sys.stderr)
        finally:
            self.client.close()


reporter: Reporter | None = None


def test_one_input(data: bytes) -> None:
    assert reporter is not None
    reporter.tick()
    try:
        parse_record(data)
    except (ValueError, UnicodeDecodeError):
        pass  # expected rejections of bad input
    except Exception as exc:
        reporter.crash(data, exc)
        raise  # atheris prints it, writes crash-<sha1>, and exits


def main() -> None:
    global reporter
    reporter = Reporter()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
