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


BINDS = HTTP_SERVER + """
import errno, json, socket
from fastcluster import _role

def ask(address):
    try:
        reply, fds = _role.runtime.request({"t": "listen", "address": address, "backlog": 8})
    except OSError as e:
        return f"raised {type(e).__name__} {e}"
    for fd in fds:
        os.close(fd)
    if reply.get("t") == "listen_ok":
        return "ok"
    return f"refused {errno.errorcode.get(reply.get('errno'), reply.get('errno'))} " \\
           f"{reply.get('strerror')}"

def main():
    port, port2 = int(os.environ["PORT"]), int(os.environ["PORT2"])
    for label, address in [("priv", ["127.0.0.1", 79]), ("any", ["0.0.0.0", port2]),
                           ("name", ["localhost", port2]),
                           ("rootdir", os.environ["ROOTDIR"] + "/x.sock"),
                           ("opendir", os.environ["OPENDIR"] + "/y.sock")]:
        print("bind", label, ask(address), flush=True)
    serve_http(port)  # the allowed address still works

if cluster.is_primary:
    allowed = json.loads(os.environ["ALLOWED"])
    extra = {} if allowed is None else {"allowed_addresses": allowed}
    cluster.setup_primary(target=main, uid=65534, gid=65534, respawn=False, **extra)
    cluster.on("message", lambda w, m: print(m, flush=True))
    cluster.fork()
    cluster.run()
    print("primary done", flush=True)
"""


@pytest.mark.parametrize("allowed", ["set", "unset"])
def test_a_nobody_worker_cannot_make_the_primary_bind(tmp_path: Path, env: dict[str, str],
                                                      allowed: str) -> None:
    import json
    import shutil
    import tempfile

    from _faults import request

    port, port2 = free_port(), free_port()
    rootdir = tmp_path / "root-only"
    rootdir.mkdir(mode=0o700)
    opendir = tempfile.mkdtemp(prefix="fc-open-")  # reachable by nobody: /tmp, 0777
    os.chmod(opendir, 0o777)
    spec = None if allowed == "unset" else [["127.0.0.1", port], opendir + "/y.sock"]
    try:
        with running(script(tmp_path, BINDS), dict(
                env, PORT=str(port), PORT2=str(port2), ROOTDIR=str(rootdir),
                OPENDIR=opendir, ALLOWED=json.dumps(spec))) as r:
            r.wait_for("serving", timeout=15)
            binds = {ln.split()[1]: ln.split(None, 2)[2] for ln in r.wait_for("bind ", 5)}
            ok, _by = request(port)
            assert ok
            sock = Path(opendir) / "y.sock"
            st = sock.stat()
            owner = (st.st_uid, st.st_gid)
            r.signal(signal.SIGTERM)
            code, out = r.finish(timeout=15)
    finally:
        shutil.rmtree(opendir, ignore_errors=True)
    assert code == 0 and "primary done" in out, out
    assert binds["priv"].startswith("refused EACCES"), binds
    assert "127.0.0.1:79" in binds["priv"], binds
    assert binds["name"].startswith("refused EINVAL") and "numeric" in binds["name"], binds
    assert binds["rootdir"].startswith("refused EACCES"), binds
    assert not (rootdir / "x.sock").exists()
    assert binds["opendir"] == "ok", binds
    assert owner == (65534, 65534)  # made as if the worker made it
    if allowed == "set":  # only what the settings list
        assert binds["any"].startswith("refused EACCES"), binds
        assert "allowed_addresses" in binds["any"], binds
    else:  # what the worker could bind itself
        assert binds["any"] == "ok", binds
