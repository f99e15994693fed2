"""Two fastcluster hosts behind a real HAProxy: each host restarted in turn
(SIGTERM, drain, stop, start again) under a bounded client loop, with zero
failed requests.

Each host runs in a network namespace this test makes (`ip netns add`, one
veth pair, a /30 in 10.213.0.0/16 that no interface here uses); only
addresses inside those namespaces and their veth peers are touched. The
test itself stays on the host side and talks to HAProxy on 127.0.0.1;
HAProxy reaches the hosts over the veth pairs and checks their /readyz every
200 ms. On SIGTERM a host's /readyz fails at once and it keeps serving for
drain_delay (longer than HAProxy needs to mark it down), then shuts down
gracefully; so HAProxy never sends a request to a host that stopped
accepting. HAProxy's retries are off and no redispatch is set: a request
sent to a stopped host would be counted failed, not retried elsewhere.
HAProxy names the host that answered in a response header (X-Fleet-Host).

Hosts are either a script on the public API (http.server, one request per
connection) or `fastcluster run` serving an ASGI app with keep-alive to
HAProxy (the deploy/ recipe). A control case restarts the same hosts with
drain_delay 0 and must see failed requests: the zero above is the drain's.

Below those: deploy/'s files pass their tools (haproxy -c, systemd-analyze
verify, a YAML reader) and their delays add up; the systemd socket+service
pair is played by systemd-socket-activate (socket activation, READY=1,
drain, STOPPING=1).

Skipped, with the reason, when not root, when `ip netns` is not permitted,
or when HAProxy is missing and `apt-get install -y haproxy` cannot get it.
Everything the test starts is stopped and the namespaces deleted in
finally blocks, also when it fails.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import Running, env, free_port, script  # noqa: F401

DRAIN_DELAY = 1.5  # s; HAProxy marks a host down within fall x inter (2 x 200 ms) + a check
APP_PORT, HEALTH_PORT = 8000, 8081  # inside each host's namespace
CLIENTS = 2  # concurrent client loops
MAX_REQUESTS = 40_000  # per client loop
MAX_SECONDS = 45.0  # per client loop
MIN_SERVED = 20  # requests each host must serve in each phase it is up

HOST = """
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import fastcluster as cluster

NAME, IP, DRAIN = sys.argv[1], sys.argv[2], float(sys.argv[3])
APP, HEALTH = int(sys.argv[4]), int(sys.argv[5])

if cluster.is_primary:
    cluster.setup_primary(health=f"{IP}:{HEALTH}", drain_delay=DRAIN, graceful_timeout=5.0)
    listening = []
    def on_listening(w, address):
        listening.append(w.id)
        if len(listening) == 2:
            print("ready", NAME, os.getpid(), flush=True)
    cluster.on("listening", on_listening)
    for _ in range(2):
        cluster.fork()
    cluster.run()
    print("stopped", NAME, flush=True)
else:
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"{NAME} {os.getpid()}\\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    server = ThreadingHTTPServer((IP, APP), H, bind_and_activate=False)
    cluster.listen_server(server).serve_forever()
"""

HAPROXY_CFG = """
global
    maxconn 1024

defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    retries 0

listen fleet
    bind 127.0.0.1:{port}
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host health
    http-check expect status 200
    default-server inter 200ms fastinter 200ms downinter 200ms fall 2 rise 2
    http-response set-header X-Fleet-Host %[srv_name]
{servers}
"""


def sh(*args: str, check: bool = True, timeout: float = 60.0
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def need_haproxy() -> str:
    path = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy")
    if not path and shutil.which("apt-get"):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            inst = sh("apt-get", "install", "-y", "-q", "haproxy", check=False, timeout=300)
            if inst.returncode != 0:  # the package lists may be missing: update once
                sh("apt-get", "update", "-q", check=False, timeout=300)
                sh("apt-get", "install", "-y", "-q", "haproxy", check=False, timeout=300)
        path = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy")
                                           and "/usr/sbin/haproxy")
    if not path:
        pytest.skip("HAProxy is not installed and `apt-get install -y haproxy` failed")
    return path


def used_subnets() -> set[int]:
    """Third octets of 10.213.x.y addresses already on this host's interfaces."""
    out = sh("ip", "-4", "-o", "addr", "show", check=False).stdout
    used = set()
    for word in out.split():
        if word.startswith("10.213."):
            used.add(int(word.split(".")[2]))
    return used


class Namespace:
    """A network namespace with one veth pair: host side .1/30, namespace side .2/30."""

    def __init__(self, tag: str, octet: int) -> None:
        self.name = f"fcfleet-{tag}"
        self.veth_host, self.veth_ns = f"fcv{tag}h", f"fcv{tag}n"
        self.host_ip, self.ip = f"10.213.{octet}.1", f"10.213.{octet}.2"

    def create(self) -> None:
        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        sh("ip", "link", "set", self.veth_ns, "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth_host)
        sh("ip", "link", "set", self.veth_host, "up")
        for cmd in (("ip", "addr", "add", f"{self.ip}/30", "dev", self.veth_ns),
                    ("ip", "link", "set", self.veth_ns, "up"),
                    ("ip", "link", "set", "lo", "up")):
            sh("ip", "netns", "exec", self.name, *cmd)

    def delete(self) -> None:
        """Kills what is left in it (processes this test started), deletes it."""
        pids = sh("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", self.name, check=False)
        sh("ip", "link", "del", self.veth_host, check=False)  # gone with the netns, normally


@pytest.fixture
def namespaces() -> Iterator[list[Namespace]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for `ip netns add` (network namespaces)")
    if not shutil.which("ip"):
        pytest.skip("iproute2 (`ip`) is not installed")
    used = used_subnets()
    base = 1 + os.getpid() % 200
    octets = [o for o in range(base, base + 50) if o % 256 not in used and o < 255][:2]
    tag = str(os.getpid() % 100000)
    spaces = [Namespace(f"{tag}x{i}", octet) for i, octet in enumerate(octets, 1)]
    try:
        probe = sh("ip", "netns", "add", spaces[0].name, check=False)
        if probe.returncode != 0:
            pytest.skip(f"`ip netns add` is not permitted here: {probe.stderr.strip()}")
        sh("ip", "netns", "del", spaces[0].name, check=False)
        for ns in spaces:
            ns.create()
        yield spaces
    finally:
        for ns in spaces:
            ns.delete()


class Host:
    """One fastcluster primary (2 workers) inside a namespace: the HOST
    script above (kind "api"), or `fastcluster run` serving the ASGI test
    app with keep-alive, as in deploy/ (kind "cli")."""

    def __init__(self, path: Path, env: dict[str, str], ns: Namespace, name: str,
                 drain: float, kind: str) -> None:
        self.path, self.env, self.ns, self.name, self.drain = path, env, ns, name, drain
        self.kind = kind
        self.run: Running | None = None

    def start(self) -> None:
        netns = ("ip", "netns", "exec", self.ns.name, sys.executable)
        if self.kind == "api":
            argv = (*netns, str(self.path), self.name, self.ns.ip, str(self.drain),
                    str(APP_PORT), str(HEALTH_PORT))
            self.run = _RunningArgv(argv, self.env, self.path.parent)
            self.run.wait_for(f"ready {self.name}", timeout=15)
            return
        tests = Path(__file__).resolve().parent
        env = {k: v for k, v in self.env.items() if not k.startswith("FASTCLUSTER_")}
        env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests)])
        argv = (*netns, "-m", "fastcluster", "run", "cli_apps:asgi_app", "--workers", "2",
                "--bind", f"{self.ns.ip}:{APP_PORT}", "--health", f"{self.ns.ip}:{HEALTH_PORT}",
                "--drain-delay", str(self.drain), "--status-socket", "off")
        self.run = _RunningArgv(argv, env, tests)
        self.run.wait_containing(") listening on ", 2, timeout=15)

    def stop(self) -> tuple[int, list[str]]:
        assert self.run is not None
        self.run.signal(signal.SIGTERM)
        code, out = self.run.finish(timeout=15)
        self.run = None
        return code, out

    def kill(self) -> None:
        if self.run is not None:
            if self.run.proc.poll() is None:
                self.run.kill()
            self.run.close()
            self.run = None


class _RunningArgv(Running):
    """Running with an arbitrary command line (here: `ip netns exec ... python ...`)."""

    def __init__(self, argv: tuple[str, ...], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._fd, selectors.EVENT_READ)
        self._buf = b""
        self._eof = False
        self.seen = []

    def wait_containing(self, text: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in ln for ln in self.seen) < count:
            left = deadline - time.monotonic()
            if left <= 0 or self.readline(left) is None:
                raise AssertionError(f"waited for {count} x {text!r}; output so far:\n"
                                     + "\n".join(self.seen))


class Clients:
    """CLIENTS loops of GET / through HAProxy, each bounded in count and time;
    every answer is recorded under the phase in force when it was asked."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.phase = "before"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.served: Counter[tuple[str, str]] = Counter()  # (phase, host) -> answers
        self.attempted: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.errors: list[str] = []
        self.last_seen: dict[str, float] = {}  # host -> time.monotonic() of its last answer
        self.threads = [threading.Thread(target=self._loop, daemon=True)
                        for _ in range(CLIENTS)]

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _one(self) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: fleet\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(ln.lower().split(": ", 1) for ln in lines[1:] if ": " in ln)
        host = fields.get("x-fleet-host", "")
        if lines[0].split(" ")[1:2] != ["200"] or not host or not body:
            raise ValueError(f"bad answer {data[:200]!r}")
        return host

    def _loop(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        for _ in range(MAX_REQUESTS):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            phase = self.phase
            try:
                host = self._one()
            except (OSError, ValueError) as e:
                with self.lock:
                    self.attempted[phase] += 1
                    self.failed[phase] += 1
                    self.errors.append(f"{phase}: {e!r}")
                continue
            with self.lock:
                self.attempted[phase] += 1
                self.served[phase, host] += 1
                self.last_seen[host] = time.monotonic()

    def wait_served(self, phase: str, hosts: list[str], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(self.served[phase, h] >= MIN_SERVED for h in hosts):
                    return
            time.sleep(0.02)
        raise AssertionError(f"phase {phase}: not every host of {hosts} served "
                             f"{MIN_SERVED}: {dict(self.served)}; errors {self.errors[:5]}")


def warm_up(port: int, names: list[str], log: Path, timeout: float = 15.0) -> None:
    """Waits until HAProxy listens and has marked every host up (each answered)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while set(names) - seen and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            seen.add(Clients(port)._one())
        time.sleep(0.02)
    assert not set(names) - seen, f"HAProxy never reached {set(names) - seen}; its log:\n" \
        + log.read_text()


class Result:
    def __init__(self, clients: Clients, detect: dict[str, float], elapsed: float) -> None:
        self.clients, self.detect, self.elapsed = clients, detect, elapsed
        phases = [p for p in clients.attempted if p.startswith(("restart", "back"))]
        self.attempted = sum(clients.attempted[p] for p in phases)  # during the restarts
        self.failed = sum(clients.failed[p] for p in phases)

    def report(self, drain: float, kind: str) -> None:
        c = self.clients
        print(f"\nfleet ({kind} hosts, drain_delay {drain} s): {self.attempted} requests "
              f"attempted through HAProxy during the two host restarts, {self.failed} failed; "
              f"{sum(c.attempted.values())} attempted in all over {self.elapsed:.1f} s, "
              f"{sum(c.failed.values())} failed")
        print("fleet: served per (phase, host):", dict(sorted(c.served.items())))
        print("fleet: last answer from a host after its SIGTERM (s):",
              {k: round(v, 3) for k, v in self.detect.items()})


def restart_each_host(tmp_path: Path, env: dict[str, str], namespaces: list[Namespace],
                      drain: float, kind: str) -> Result:
    """Two hosts behind HAProxy; under the client loops, each host in turn is
    SIGTERMed, waited for (exit 0), started again and seen serving again."""
    haproxy = need_haproxy()
    path = script(tmp_path, HOST, "host.py")
    hosts = [Host(path, env, ns, f"host{i}", drain, kind)
             for i, ns in enumerate(namespaces, 1)]
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, servers="\n".join(
        f"    server {h.name} {h.ns.ip}:{APP_PORT} check port {HEALTH_PORT}" for h in hosts)))
    check = sh(haproxy, "-c", "-f", str(cfg), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(tmp_path / "haproxy.log", "w")  # noqa: SIM115 (closed in finally)
    lb: subprocess.Popen[bytes] | None = None
    try:
        for h in hosts:
            h.start()
        lb = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=log,
                              stderr=subprocess.STDOUT)
        warm_up(port, [h.name for h in hosts], tmp_path / "haproxy.log")
        t_start = time.monotonic()
        detect: dict[str, float] = {}
        with Clients(port) as clients:
            clients.wait_served("before", [h.name for h in hosts])
            for h in hosts:
                clients.phase = f"restart {h.name}"
                t_term = time.monotonic()
                code, out = h.stop()
                assert code == 0, out
                last = f"stopped {h.name}" if kind == "api" else " stopped"
                assert any(ln.endswith(last) for ln in out), out  # the primary's last word
                with clients.lock:
                    detect[h.name] = clients.last_seen[h.name] - t_term
                h.start()
                clients.phase = f"back {h.name}"  # until HAProxy has it up again
                clients.wait_served(clients.phase, [h.name])
            clients.phase = "after"
            clients.wait_served("after", [h.name for h in hosts])
        return Result(clients, detect, time.monotonic() - t_start)
    finally:
        if lb is not None:
            lb.terminate()
            try:
                lb.wait(5)
            except subprocess.TimeoutExpired:
                lb.kill()
                lb.wait(5)
        for h in hosts:
            h.kill()
        log.close()


@pytest.mark.parametrize("kind", ["api", "cli"])
def test_rolling_host_restarts_behind_haproxy(tmp_path: Path, env: dict[str, str],
                                              namespaces: list[Namespace], kind: str) -> None:
    if kind == "cli":
        pytest.importorskip("uvicorn", reason="the CLI serves ASGI with uvicorn's protocols")
    r = restart_each_host(tmp_path, env, namespaces, DRAIN_DELAY, kind)
    r.report(DRAIN_DELAY, kind)
    c = r.clients
    assert sum(c.failed.values()) == 0, c.errors[:10]
    assert r.attempted >= 2 * MIN_SERVED
    for name in ("host1", "host2"):  # both served before and after both restarts
        assert c.served["before", name] >= MIN_SERVED
        assert c.served["after", name] >= MIN_SERVED
    # HAProxy stopped sending to each host before its drain ended (/readyz failed first)
    assert all(v < DRAIN_DELAY for v in r.detect.values()), r.detect


def test_control_without_drain_requests_fail(tmp_path: Path, env: dict[str, str],
                                             namespaces: list[Namespace]) -> None:
    """The same restarts with drain_delay 0: a host stops accepting before
    HAProxy's checks notice, and with retries off requests fail. Shows the
    test above can fail, and what the drain is worth."""
    r = restart_each_host(tmp_path, env, namespaces, 0.0, "api")
    r.report(0.0, "api")
    assert r.failed > 0
    for name in ("host1", "host2"):
        assert r.clients.served["after", name] >= MIN_SERVED


# -- deploy/: the files are valid for their tools and their delays add up -------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def unit_values(path: Path) -> dict[str, list[str]]:
    """Key=Value lines of a systemd unit (keys may repeat), comments skipped."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for suffix in ("ms", "s", "m"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def test_deploy_haproxy_cfg_is_valid_and_detects_before_the_drain_ends() -> None:
    haproxy = need_haproxy()
    cfg = DEPLOY / "haproxy" / "haproxy.cfg"
    check = sh(haproxy, "-c", "-f", str(cfg), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    words = [w for ln in cfg.read_text().splitlines() for w in ln.split("#", 1)[0].split()]
    inter, fall = seconds(words[words.index("inter") + 1]), int(words[words.index("fall") + 1])
    timeout_check = seconds(words[words.index("check", words.index("timeout")) + 1])
    assert "/readyz" in words and words[words.index("port") + 1] == "8081"
    service = unit_values(DEPLOY / "systemd" / "myapp.service")
    env_vars = dict(v.split("=", 1) for v in service["Environment"])
    drain = float(env_vars["FASTCLUSTER_DRAIN_DELAY"])
    assert fall * inter + timeout_check < drain, (fall, inter, timeout_check, drain)


def test_deploy_systemd_units_verify_and_stop_in_time(tmp_path: Path) -> None:
    service = unit_values(DEPLOY / "systemd" / "myapp.service")
    socket_unit = unit_values(DEPLOY / "systemd" / "myapp.socket")
    assert service["Type"] == ["notify"] and service["KillMode"] == ["mixed"]
    env_vars = dict(v.split("=", 1) for v in service["Environment"])
    drain = float(env_vars["FASTCLUSTER_DRAIN_DELAY"])
    graceful = float(env_vars["FASTCLUSTER_GRACEFUL_TIMEOUT"])
    assert drain + graceful < seconds(service["TimeoutStopSec"][0])
    bind = service["ExecStart"][0].split("--bind ")[1].split()[0]
    assert socket_unit["ListenStream"] == [bind]  # the primary adopts it by address
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed: units not verified")
    for name in ("myapp.socket", "myapp.service"):  # ExecStart's venv does not exist here
        text = (DEPLOY / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/srv/myapp/venv/bin/fastcluster",
                                                  shutil.which("true") or "/bin/true"))
    out = sh("systemd-analyze", "verify", str(tmp_path / "myapp.socket"),
             str(tmp_path / "myapp.service"), check=False)
    problems = [ln for ln in (out.stdout + out.stderr).splitlines() if "myapp" in ln]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def test_deploy_kubernetes_probes_and_grace_period() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifest")
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "myapp.yaml").read_text()))
    deployment, service = docs
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env_vars = {e["name"]: e["value"] for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health_port = int(env_vars["FASTCLUSTER_HEALTH"].rsplit(":", 1)[1])
    bind_port = int(env_vars["FASTCLUSTER_BIND"].rsplit(":", 1)[1])
    assert ports == {"http": bind_port, "health": health_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["command"][:2] == ["fastcluster", "run"]  # exec form: SIGTERM to PID 1
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(env_vars["FASTCLUSTER_DRAIN_DELAY"])
    graceful = float(env_vars["FASTCLUSTER_GRACEFUL_TIMEOUT"])
    assert pre_stop + drain + graceful < pod["terminationGracePeriodSeconds"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_systemd_socket_activation_notify_and_drain(tmp_path: Path, env: dict[str, str]
                                                    ) -> None:
    """deploy/systemd's pair, played by systemd-socket-activate: it binds the
    port and starts `fastcluster run` on the first connection, which waits in
    the backlog and is served; READY=1 once the workers listen; SIGTERM:
    /readyz fails, STOPPING=1, exit 0."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate (package systemd) is not installed")
    tests = Path(__file__).resolve().parent
    run_env = {k: v for k, v in env.items() if not k.startswith("FASTCLUSTER_")}
    run_env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests)])
    run_env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    port, health = free_port(), free_port()
    argv = [activate, "-E", "PYTHONPATH", "-E", "NOTIFY_SOCKET", "-l", f"127.0.0.1:{port}",
            sys.executable, "-m", "fastcluster", "run", "cli_apps:wsgi_app", "--workers", "2",
            "--bind", f"127.0.0.1:{port}", "--health", f"127.0.0.1:{health}",
            "--drain-delay", "1", "--status-socket", "off"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, \
            open(tmp_path / "out", "w+") as out:
        notify.bind(run_env["NOTIFY_SOCKET"])
        notify.settimeout(15)
        proc = subprocess.Popen(argv, cwd=tests, env=run_env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while True:  # until systemd-socket-activate listens; then this starts the app
                try:
                    first = socket.create_connection(("127.0.0.1", port), timeout=15)
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                    time.sleep(0.02)
            with first:
                first.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := first.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0]
            assert answer.endswith(b" /first\n")  # waited in the backlog, then served
            ready = notify.recv(4096).decode()
            assert "READY=1" in ready and f"MAINPID={proc.pid}" in ready, ready
            status, _h, _b = http_get_status(health, "/readyz")
            assert status == 200
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 2
            while http_get_status(health, "/readyz")[0] == 200:  # the signal is on its way
                assert time.monotonic() < deadline, "/readyz still 200 after SIGTERM"
                time.sleep(0.01)
            status, _h, body = http_get_status(health, "/readyz")
            assert (status, body) == (503, b"not ready: draining\n")
            assert http_get_status(port, "/during-drain")[0] == 200  # still served
            said = [notify.recv(4096).decode()]
            assert proc.wait(15) == 0
            notify.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                while True:
                    said.append(notify.recv(4096).decode())
            assert "STOPPING=1" in said, said
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            out.seek(0)
            print(out.read())


def http_get_status(port: int, path: str) -> tuple[int, bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body
