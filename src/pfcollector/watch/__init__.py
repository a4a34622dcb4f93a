"""Sidecars that follow a fuzzer's files and report through :mod:`pfclient`.

``pfcollector watch afl OUTPUT_DIR`` (:class:`AflWatcher`) and ``pfcollector watch libfuzzer
ARTIFACT_DIR`` (:class:`LibFuzzerWatcher`). Each is a separate process using the blocking
client; its :class:`StateFile` remembers what the daemon acknowledged, so a restart resends
nothing, and crash events carry a :func:`stable_id` so even a resend is idempotent.
"""

from ._afl import (
    AflWatcher,
    coverage_fields,
    find_instances,
    parse_crash_name,
    parse_fuzzer_stats,
    signal_type,
    stats_fields,
)
from ._cli import watch_app
from ._libfuzzer import LibFuzzerWatcher, StatusLine, artifact_type, parse_status_line
from ._run import run_loop
from ._sink import Sink, stable_id, submit
from ._state import StateError, StateFile, default_state_path

__all__ = [
    "AflWatcher",
    "LibFuzzerWatcher",
    "Sink",
    "StateError",
    "StateFile",
    "StatusLine",
    "artifact_type",
    "coverage_fields",
    "default_state_path",
    "find_instances",
    "parse_crash_name",
    "parse_fuzzer_stats",
    "parse_status_line",
    "run_loop",
    "signal_type",
    "stable_id",
    "stats_fields",
    "submit",
    "watch_app",
]
