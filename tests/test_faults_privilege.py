"""Workers with fewer privileges than the primary (issue 17, items 3 and 4):
a worker running as `nobody` cannot make the root primary bind what it could
not bind itself, and it dies with its primary like any other worker.

Each scenario runs a small cluster as root with uid/gid 65534 workers; the
hostile worker writes raw frames on its control channel (`_role.runtime`),
as a worker that ignored the API could.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from _faults import HTTP_SERVER, children
from _helpers import env, free_port, running, script, wait_dead  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")

ORPHANS = HTTP_SERVER + """
def main():
    import signal, time
    # an app that handles SIGTERM itself (uvicorn does): only PR_SET_PDEATHSIG,
    # not the runtime's reaction to its channel closing, ends it at once
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cluster.worker.send(f"up {os.getpid()} {os.getuid()}")
    time.sleep(60)

if cluster.is_primary:
    cluster.setup_primary(target=main, uid=65534, gid=65534, respawn=False)
    cluster.on("message", lambda w, m: print(m, flush=True))
    for _ in range(3):
        cluster.fork()
    cluster.run()
"""


def test_uid_workers_die_with_a_sigkilled_primary(tmp_path: Path, env: dict[str, str]) -> None:
    with running(script(tmp_path, ORPHANS), env) as r:
        ups = r.wait_for("up ", count=3, timeout=15)
        pids = [int(line.split()[1]) for line in ups]
        assert all(line.split()[2] == "65534" for line in ups), ups
        assert sorted(children(r.pid)) == sorted(pids)
        r.signal(signal.SIGKILL)
        left = wait_dead(pids, timeout=1.0)
        for pid in left:  # do not leave them behind for the next test
            os.kill(pid, signal.SIGKILL)
        assert left == [], f"workers {left} outlived their SIGKILLed primary by 1 s"
