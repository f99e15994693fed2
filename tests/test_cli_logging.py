"""`fastcluster run`'s logging flags through the real CLI: --log-config
(dictConfig JSON and YAML, fileConfig ini), --log-format json, the access
log's gunicorn atoms and files, --error-logfile, levels critical and trace.
"""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_cli import cli, get

from fastcluster.pytest_plugin import ClusterServer


def request(server: ClusterServer, path: str, headers: dict[str, str]) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", path, headers={"Connection": "close", **headers})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("app", ["cli_apps:asgi_app", "cli_apps:wsgi_app"])
def test_access_log_format_atoms_and_access_logfile(fastcluster_server: Any, tmp_path: Path,
                                                    app: str) -> None:
    access = tmp_path / "access.log"
    fmt = ('%(h)s|%(l)s|%(u)s|%(r)s|%(m)s|%(U)s|%(q)s|%(H)s|%(s)s|%(B)s|%(b)s|%(f)s|%(a)s|'
           '%(D)s|%(M)s|%(L)s|%(p)s|%({x-trace}i)s|%({content-type}o)s|%(t)s|%(zz)s')
    server = fastcluster_server(app, workers=1, args=("--access-logfile", str(access),
                                                      "--access-log-format", fmt))
    request(server, "/atoms?a=1", {"Referer": "http://r.example/", "User-Agent": "ua/1",
                                   "X-Trace": "t-42",
                                   "Authorization": "Basic dXNlcjE6cHc="})  # user1:pw
    assert server.stop() == 0
    line = access.read_text().strip()  # the format's alone: no time/level prefix
    fields = line.split("|")
    pid = fields[16].strip("<>")
    size = len(f"{app.split(':')[1][:4]} {pid} /atoms\n")  # the body the app sent
    assert fields[:9] == ["127.0.0.1", "-", "user1", "GET /atoms?a=1 HTTP/1.1", "GET", "/atoms",
                          "a=1", "HTTP/1.1", "200"], line
    assert fields[9] == fields[10] == str(size)
    assert fields[11:13] == ["http://r.example/", "ua/1"]
    assert int(fields[13]) >= int(fields[14]) * 1000 and float(fields[15]) >= 0
    assert re.fullmatch(r"<\d+>", fields[16])
    assert fields[17:19] == ["t-42", "text/plain"]
    assert re.fullmatch(r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]", fields[19])
    assert fields[20] == "-"  # an unknown atom, as gunicorn
    assert "GET /atoms" not in server.log()  # the access lines went to the file only


def test_bad_access_log_format_is_an_error() -> None:
    bad = cli("run", "cli_apps:asgi_app", "--access-log-format", "%(h)d %(")
    assert bad.returncode == 1
    assert "setting 'access_log_format' must be a %-format of gunicorn's atoms" in bad.stderr


def _dict_config(path: Path) -> dict[str, Any]:
    return {"version": 1,
            "formatters": {"mine": {"format": "CFG %(levelname)s %(message)s"}},
            "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path),
                                  "formatter": "mine"}},
            "root": {"level": "INFO", "handlers": ["file"]}}


@pytest.mark.parametrize("kind", ["json", "yaml", "ini"])
def test_log_config_dictconfig_and_fileconfig(fastcluster_server: Any, tmp_path: Path,
                                              kind: str) -> None:
    out = tmp_path / "out.log"
    config = tmp_path / f"logging.{kind}"
    if kind == "json":
        config.write_text(json.dumps(_dict_config(out)))
    elif kind == "yaml":
        yaml = pytest.importorskip("yaml", reason="PyYAML (the test extra) reads YAML")
        config.write_text(yaml.safe_dump(_dict_config(out)))
    else:
        config.write_text(
            "[loggers]\nkeys=root\n[handlers]\nkeys=file\n[formatters]\nkeys=mine\n"
            "[logger_root]\nlevel=INFO\nhandlers=file\n"
            f"[handler_file]\nclass=FileHandler\nformatter=mine\nargs=({str(out)!r},)\n"
            "[formatter_mine]\nformat=CFG %(levelname)s %(message)s\n")
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--log-config", str(config)))
    assert server.stop() == 0
    text = out.read_text()
    assert "CFG INFO fastcluster: primary pid" in text and "forked" in text
    assert "forked" not in server.log()  # the config's handler, not ours


def test_bad_log_config_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text('{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}')
    bad = cli("run", "cli_apps:asgi_app", "--log-config", str(config))
    assert bad.returncode == 1 and "not a valid logging configuration" in bad.stderr
    bad = cli("run", "cli_apps:asgi_app", "--log-config", str(tmp_path / "none.ini"))
    assert bad.returncode == 1 and "cannot read it" in bad.stderr
    bad = cli("run", "cli_apps:asgi_app", "--log-config", str(config), "--log-format", "json")
    assert bad.returncode == 1 and "--log-format would be ignored" in bad.stderr


def test_json_log_format_error_logfile_and_levels(fastcluster_server: Any, tmp_path: Path
                                                  ) -> None:
    errors = tmp_path / "errors.log"
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--log-format", "json", "--error-logfile", str(errors),
                                      "--access-log"))
    assert get(server, "/j")[0] == 200
    assert server.stop() == 0
    lines = [json.loads(line) for line in errors.read_text().splitlines()]
    assert any(d["message"].startswith("fastcluster: primary pid") and d["levelname"] == "INFO"
               for d in lines)
    assert any('"GET /j HTTP/1.1" 200' in d["message"] and d["name"] == "fastcluster.access"
               for d in lines)
    # critical: not even the lifecycle lines
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--log-level", "critical"))
    assert server.stop() == 0
    assert "forked" not in server.log()
    # trace: uvicorn's trace lines too
    server = fastcluster_server("cli_apps:asgi_app", workers=1, args=("--log-level", "trace"))
    assert get(server, "/t")[0] == 200
    assert server.stop() == 0
    assert "TRACE" in server.log() and "HTTP connection made" in server.log()
