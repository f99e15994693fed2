"""Logging for `fastcluster run`: levels, files, text or JSON lines, or the
user's own configuration (--log-config), set up in the primary before any
fork (workers inherit the handlers; files are opened O_APPEND, so lines of
several processes do not overwrite each other).

--log-config is the standard library's: a .json or .yaml/.yml file goes to
logging.config.dictConfig, anything else (.ini, .conf) to fileConfig. It
sets the handlers and formats, so --log-format and the log files with it
are an error; --log-level still sets the root level, and --access-log still
wraps the app (its lines go to the "fastcluster.access" logger, which the
config may set up).
"""

from __future__ import annotations

import importlib
import json
import logging
import logging.config
import sys
from typing import Any

TRACE = 5  # uvicorn's TRACE_LOG_LEVEL
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(message)s"
JSON_FIELDS = "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"
ACCESS_LOGGER = "fastcluster.access"


class LoggingError(ValueError):
    """The logging setup cannot be done; the message names the flag and why."""


def _json_formatter(fields: str) -> logging.Formatter:
    for module in ("pythonjsonlogger.json", "pythonjsonlogger.jsonlogger"):  # 3.x+, 2.x
        try:
            formatter: Any = importlib.import_module(module).JsonFormatter
        except (ImportError, AttributeError):
            continue
        return formatter(fields)  # type: ignore[no-any-return]
    raise LoggingError("--log-format json needs python-json-logger; install it with: "
                       "pip install 'fastcluster-server[cli]'")


def _handler(path: str, std: Any, flag: str) -> logging.Handler:
    if path == "-":
        return logging.StreamHandler(std)
    try:
        return logging.FileHandler(path)
    except OSError as e:
        raise LoggingError(f"{flag} {path!r}: cannot open it: {e.strerror or e}") from None


def _apply_config_file(path: str) -> None:
    low = path.lower()
    try:
        if low.endswith((".json", ".yaml", ".yml")):
            with open(path) as f:
                if low.endswith(".json"):
                    config = json.load(f)
                else:
                    try:
                        yaml: Any = importlib.import_module("yaml")
                    except ImportError:
                        raise LoggingError(f"--log-config {path!r}: a YAML file needs "
                                           "PyYAML (pip install pyyaml)") from None
                    config = yaml.safe_load(f)
            if not isinstance(config, dict):
                raise LoggingError(f"--log-config {path!r}: not a dictConfig mapping")
            config.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(config)
        else:
            with open(path):  # fileConfig says little when the file is missing
                pass
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except LoggingError:
        raise
    except OSError as e:
        raise LoggingError(f"--log-config {path!r}: cannot read it: {e.strerror or e}") from None
    except Exception as e:  # json, yaml and logging.config errors alike
        raise LoggingError(f"--log-config {path!r}: not a valid logging configuration: "
                           f"{e}") from None


def access_on(settings: dict[str, Any]) -> bool:
    """--access-log, or else implied by --access-logfile or --access-log-format
    (a format given is never ignored; --no-access-log still turns it off)."""
    if "access_log" in settings["given"]:
        return bool(settings["access_log"])
    return bool(settings["access_logfile"]) or "access_log_format" in settings["given"]


def configure(settings: dict[str, Any]) -> None:
    """Sets logging up from the settings; raises LoggingError."""
    logging.addLevelName(TRACE, "TRACE")
    level_name = settings["log_level"]
    level = TRACE if level_name == "trace" else getattr(logging, level_name.upper())
    logged = access_on(settings)
    if settings["log_config"]:
        clash = [f"--{n.replace('_', '-')}" for n in ("log_format", "error_logfile",
                                                     "access_logfile")
                 if n in settings["given"]]
        if clash:
            raise LoggingError(f"--log-config sets the handlers and formats itself; "
                               f"{', '.join(clash)} would be ignored: put it in the config")
        _apply_config_file(settings["log_config"])
        if "log_level" in settings["given"]:  # as uvicorn: the level still applies
            logging.getLogger().setLevel(level)
        return
    if settings["log_format"] == "json":
        formatter = _json_formatter(JSON_FIELDS)
    else:
        formatter = logging.Formatter(LOG_FORMAT)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = _handler(settings["error_logfile"], sys.stderr, "--error-logfile")
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's own info lines (one per worker and lifespan step) say less than ours
    logging.getLogger("uvicorn.error").setLevel(level if level <= logging.DEBUG
                                                else logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # ours replaces it
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO if logged else logging.WARNING)
    if settings["access_logfile"]:
        access_handler = _handler(settings["access_logfile"], sys.stdout, "--access-logfile")
        # the line is the --access-log-format's alone (gunicorn's), or a JSON object
        access_handler.setFormatter(_json_formatter("%(message)s")
                                    if settings["log_format"] == "json"
                                    else logging.Formatter("%(message)s"))
        access.addHandler(access_handler)
        access.propagate = False
