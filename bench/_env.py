"""Tools the harness needs, found or installed, and the machine's description."""

from __future__ import annotations

import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVERS = REPO / "bench" / "servers"

# import name -> PyPI name: the Python anchors (httptools is uvicorn's fast parser,
# as `uvicorn[standard]` would install it), uvloop for every asyncio worker, the plot
PY_PACKAGES = {"uvicorn": "uvicorn", "httptools": "httptools", "gunicorn": "gunicorn",
               "uvloop": "uvloop", "matplotlib": "matplotlib", "a2wsgi": "a2wsgi"}


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def anchors_dir(given: str | None) -> Path | None:
    """../shared/anchors beside the repo (or --anchors / $BENCH_ANCHORS)."""
    for cand in (given, os.environ.get("BENCH_ANCHORS"), REPO.parent / "shared" / "anchors"):
        if cand and (Path(cand) / "reuseport_asyncio.py").is_file():
            return Path(cand).resolve()
    return None


def ensure_wrk(install: bool) -> str | None:
    """Path of wrk; installs the Debian package `wrk` with apt-get if it is missing."""
    found = shutil.which("wrk")
    if found or not install:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        say("wrk not found and no apt-get here: install wrk (https://github.com/wg/wrk) "
            "and put it on PATH")
        return None
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        say("wrk not found: run `sudo apt-get install -y wrk` (not root, no sudo here)")
        return None
    say("wrk not found: installing the Debian package with apt-get (apt-get install -y wrk)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = [*sudo, apt, "install", "-y", "-q", "wrk"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:  # stale or missing package lists: update once, retry
        subprocess.run([*sudo, apt, "update", "-q"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        say(f"apt-get install wrk failed:\n{r.stderr[-2000:]}")
        return None
    return shutil.which("wrk")


def ensure_python_packages(install: bool) -> dict[str, str | None]:
    """Versions of the packages in PY_PACKAGES, pip-installing the missing ones
    into this interpreter's environment when `install`."""
    missing = [name for name in PY_PACKAGES if not _importable(name)]
    if missing and install:
        pkgs = [PY_PACKAGES[m] for m in missing]
        say(f"installing into this Python environment ({sys.executable}): "
            f"pip install {' '.join(pkgs)}")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pkgs],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            say(f"pip install failed:\n{r.stderr[-2000:]}")
        importlib.invalidate_caches()
    elif missing:
        say(f"missing Python packages (not installing, --no-install): {' '.join(missing)}")
    return {name: _version(name) for name in PY_PACKAGES}


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _version(name: str) -> str | None:
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "?"))


def public_api_status() -> tuple[bool, str]:
    """Whether fastcluster's public API (the bench server needs it) imports here."""
    code = ("import fastcluster as c\n"
            "need = ['is_primary', 'is_worker', 'setup_primary', 'fork', 'run', 'worker']\n"
            "miss = [n for n in need if not hasattr(c, n)]\n"
            "from fastcluster import aio\n"
            "if not hasattr(aio, 'create_server'): miss.append('aio.create_server')\n"
            "print(','.join(miss))\n")
    r = subprocess.run([sys.executable, "-c", code], env=py_env(), capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"fastcluster public API not importable ({last})"
    if r.stdout.strip():
        return False, f"fastcluster public API lacks {r.stdout.strip()}"
    return True, "fastcluster public API"


def py_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for server processes: the repo first on PYTHONPATH."""
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    env.pop("FASTCLUSTER_POLICY", None)
    if extra:
        env.update(extra)
    return env


def _first_line(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (r.stdout + r.stderr).strip().splitlines()
    return out[0].strip() if out else None


def machine(wrk: str | None, node: str | None, py: dict[str, str | None]) -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else "?"
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s*(\d+)", f.read())
            mem = f"{int(m.group(1)) / 1024 / 1024:.1f} GiB" if m else "?"
    except OSError:
        pass
    wrk_v = _first_line([wrk, "-v"]) if wrk else None
    if wrk_v:
        wrk_v = wrk_v.split(" Copyright")[0]
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": str(os.cpu_count()),
        "affinity": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "uvloop": py.get("uvloop") or "not installed (asyncio loop)",
        "uvicorn": py.get("uvicorn") or "-",
        "httptools": py.get("httptools") or "-",
        "gunicorn": py.get("gunicorn") or "-",
        "wrk": wrk_v or "-",
        "node": (_first_line([node, "--version"]) if node else None) or "-",
        "fastcluster commit": (commit or "?") + (" (with uncommitted changes)" if dirty else ""),
    }


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="?([^"\n]*)', f.read(), re.M)
            return m.group(1) if m else "?"
    except OSError:
        return "?"
