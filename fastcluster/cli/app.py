"""Finding the app of `fastcluster run module:app`, and checking it before any fork.

Theory of operation: a wrong `module:app` must give one clear error and exit
status 1, not a crash loop of workers that each fail to import it. So the
primary checks it first. With `preload` the primary imports the app itself
(the workers inherit it). Without, importing it in the primary would pin the
primary's copy of the code (a rolling restart would fork the old code) and
run the app's import-time side effects in the primary, so a short-lived
forked child imports it, reports the interface (or the error) through a
pipe and exits; the workers import the app themselves after the fork.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import traceback
from typing import Any

BOOT_ERROR = 3  # a worker's exit status when it cannot start serving (gunicorn's)


class AppError(Exception):
    """module:app cannot be served; the message says why."""


def import_app(ref: str, factory: bool = False) -> Any:
    """The object `ref` ('module:attr.attr') names; called if factory."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name
                                   or module_name.startswith(e.name + ".")):
            raise AppError(f"cannot import module {module_name!r} (from {ref!r}): "
                           f"no module named {e.name!r} on sys.path "
                           f"(check the name, --app-dir, or the virtual environment)"
                           ) from None
        raise AppError(f"importing module {module_name!r} (from {ref!r}) failed:\n"
                       + _user_traceback(e)) from None
    except Exception as e:
        raise AppError(f"importing module {module_name!r} (from {ref!r}) failed:\n"
                       + _user_traceback(e)) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppError(f"module {module_name!r} has no attribute {attr!r} "
                           f"(from {ref!r})") from None
    if factory:
        if not callable(obj):
            raise AppError(f"{ref!r} is not callable, so it cannot be a factory: "
                           f"{type(obj).__name__}")
        try:
            obj = obj()
        except Exception as e:
            raise AppError(f"the app factory {ref!r} raised:\n"
                           + _user_traceback(e)) from None
    if not callable(obj):
        raise AppError(f"{ref!r} is not an ASGI or WSGI app (not callable): "
                       f"{type(obj).__name__}")
    return obj


def _user_traceback(e: BaseException) -> str:
    """The traceback without the frames of the import machinery and of this file."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if f.filename != __file__ and not f.filename.startswith("<frozen")
              and os.sep + "importlib" + os.sep not in f.filename]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames),
             *traceback.format_exception_only(type(e), e)]
    return "".join(lines).rstrip()


def interface_of(app: Any, wanted: str = "auto") -> str:
    """'asgi' or 'wsgi': an async function/__call__ (or a class) is ASGI."""
    if wanted != "auto":
        return wanted
    if inspect.isclass(app):
        return "asgi"
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else type(app).__call__
    return "asgi" if inspect.iscoroutinefunction(call) else "wsgi"


def check_in_child(ref: str, factory: bool, wanted: str) -> str:
    """Imports the app in a forked child; returns its interface. Raises AppError."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 1
        try:
            os.close(r)
            try:
                result = {"interface": interface_of(import_app(ref, factory), wanted)}
            except AppError as e:
                result = {"error": str(e)}
            with os.fdopen(w, "w") as f:
                json.dump(result, f)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    try:
        result = json.loads(text)
    except ValueError:
        raise AppError(f"checking {ref!r}: the importing process ended without an answer "
                       f"(exit status {os.waitstatus_to_exitcode(status)})") from None
    if "error" in result:
        raise AppError(str(result["error"]))
    return str(result["interface"])


def add_app_dir(app_dir: str) -> None:
    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
