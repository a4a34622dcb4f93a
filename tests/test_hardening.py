"""The systemd unit is hardened: ``systemd-analyze security`` rates it below 2.0."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import require_tool

UNIT = Path(__file__).parent.parent / "contrib" / "systemd" / "pfcollector.service"
#: The exposure the unit must stay under (docs/security.md): "OK" in systemd's words.
MAX_EXPOSURE = 2.0


def test_service_unit_exposure_is_below_two() -> None:
    analyze = require_tool("systemd-analyze")
    run = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", run.stdout + run.stderr)
    assert found, f"no score in the output:\n{run.stdout}\n{run.stderr}"
    assert float(found.group(1)) < MAX_EXPOSURE, run.stdout


def test_service_unit_keeps_what_the_daemon_needs() -> None:
    """The hardening must not take away the network, the socket or private files."""
    text = UNIT.read_text()
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in text
    assert "UMask=0027" in text
    assert "PrivateUsers=yes" not in text  # would turn every peer uid into nobody
    assert "StateDirectoryMode=0750" in text
