"""`fastcluster run` under faults (issue 17): respawn pacing from its three
sources, workers that leave unasked, boot failures, the status socket's
trust. Real `fastcluster run` processes (the pytest plugin's fixture), real
signals; every wait bounded.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from _faults import wait_until
from test_cli import cli, cli_env

from fastcluster.pytest_plugin import fastcluster_server  # noqa: F401


def _respawn_delays(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"respawning in ([0-9.]+) s", log)]


def test_respawn_pacing_from_flags_env_and_config(fastcluster_server: Any,
                                                   tmp_path: Path) -> None:
    config = tmp_path / "fc.toml"
    config.write_text("[fastcluster]\nrespawn_delay_max = 0.9\n")
    server = fastcluster_server("cli_apps:wsgi_app", workers=1,
                                env={"FASTCLUSTER_CONFIG": str(config),
                                     "FASTCLUSTER_RESPAWN_STABLE": "60"},
                                args=("--respawn-delay", "0.6"))
    for _ in range(2):  # two young deaths: 0.6 s, then 1.2 s capped at 0.9 s
        (pid,) = server.worker_pids()
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda pid=pid: server.worker_pids() not in ([], [pid]), 5.0)
    delays = _respawn_delays(server.log())
    assert len(delays) == 2, server.log()
    assert 0.45 <= delays[0] <= 0.75 and 0.7 <= delays[1] <= 1.1, delays  # +-20% jitter
    assert server.stop() == 0
    bad = cli("run", "cli_apps:wsgi_app", env=cli_env(FASTCLUSTER_RESPAWN_DELAY="soon"))
    assert bad.returncode == 1
    assert "setting 'respawn_delay' (from $FASTCLUSTER_RESPAWN_DELAY) must be a number " \
           "of seconds > 0, got 'soon'" in bad.stderr


_ = (pytest, time)
