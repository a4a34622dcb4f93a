"""The watchers' loop: scan, sleep, and back off while the daemon is away.

Resource handling:
    SIGTERM and SIGINT set a flag; the loop finishes the scan it is in (whose events are then
    acknowledged, or not committed) and returns. The sink's connections are closed on return.

Error handling:
    :class:`pfclient.DaemonUnavailable` and :class:`pfclient.FlushTimeout` are one log line
    each and a wait that doubles from ``interval`` up to :data:`BACKOFF_CAP`; the state stays
    where the daemon last acknowledged, so nothing is lost or skipped.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from pfclient import DaemonUnavailable, EventRejected, FlushTimeout

from ._sink import Sink

__all__ = ["BACKOFF_CAP", "run_loop"]

log = logging.getLogger("pfcollector.watch")
BACKOFF_CAP = 30.0


def run_loop(scan: Callable[[], int], sink: Sink, interval: float, once: bool = False,
             stop: threading.Event | None = None) -> bool:  # fmt: skip
    """Call ``scan`` every ``interval`` seconds until stopped (or once, with ``once``).

    Returns:
        False if ``once`` was asked and the scan could not reach the daemon, else True.
    """
    stop = stop or _stop_on_signals()
    backoff = interval
    try:
        while not stop.is_set():
            try:
                sent = scan()
            except (DaemonUnavailable, FlushTimeout, EventRejected) as exc:
                # EventRejected reaches here only for "not now" refusals (spool full, disk
                # full): the sink poisons the rest. Either way the place is not advanced.
                if once:
                    log.error("%s", exc)
                    return False
                log.warning("daemon cannot take events, retrying in %.1fs: %s", backoff, exc)
                stop.wait(backoff)
                backoff = min(max(backoff, 0.1) * 2, BACKOFF_CAP)
                continue
            backoff = interval
            if sent:
                log.debug("sent %d event(s)", sent)
            if once:
                return True
            stop.wait(interval)
        return True
    finally:
        sink.close()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    return stop
