"""What a setting of `fastcluster run` is (Option), and the parsers its text goes through.

Every parser takes the text a flag, an environment variable or the config
file carries and returns the value, or raises ValueError saying what is
allowed (resolve() adds the setting's name, source and the text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

ENV_PREFIX = "FASTCLUSTER_"


class OptionError(ValueError):
    """A bad setting: the message names it, its source, the value, what is allowed."""


@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # the config key; flag and env var derive from it
    parse: Callable[[str], Any]  # text -> value; raises ValueError(what is allowed)
    default: Any
    help: str
    metavar: str | None = None
    flag_only: bool = False  # no env var / config key (e.g. --config itself)
    aliases: tuple[str, ...] = ()  # more flags for it (uvicorn's and gunicorn's names)
    # given several times (the flag repeated, a TOML list, or the environment
    # variable's items joined by `sep`): the value is a list
    multiple: bool = False
    sep: str = ","
    # "asgi" or "wsgi": only an app of that interface can use it; given for
    # the other one, `run` fails saying why (never accepted and ignored)
    interface: str | None = None
    why: str = ""  # with interface: the reason the other interface cannot use it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise ValueError(f"an int from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"an int from {lo} to {hi}")
        return value

    return parse


def _seconds(text: str, zero_ok: bool) -> float:
    bound = ">= 0" if zero_ok else "> 0"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"a number of seconds {bound}") from None
    low_ok = value >= 0 if zero_ok else value > 0  # False for nan
    if not (low_ok and value < float("inf")):
        raise ValueError(f"a finite number of seconds {bound}")
    return value


def seconds(text: str) -> float:
    return _seconds(text, zero_ok=False)


def delay(text: str) -> float:
    return _seconds(text, zero_ok=True)


def choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return text

    return parse


def boolean(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false (1/0, yes/no, on/off)")


def text(value: str) -> str:
    return value


def octal(value: str) -> int:
    """A umask: '0o22', '022', '22' (octal) from 0 to 0o777."""
    digits = value.strip().lower().removeprefix("0o")
    if not digits or any(c not in "01234567" for c in digits) or int(digits, 8) > 0o777:
        raise ValueError("an octal mask from 0 to 777 (e.g. 007 or 0o22)")
    return int(digits, 8)


def header(value: str) -> tuple[str, str]:
    """'NAME:VALUE' (uvicorn's --header): a valid header name, a value without CR/LF."""
    name, sep, rest = value.partition(":")
    name, rest = name.strip(), rest.strip()
    token = "!#$%&'*+-.^_`|~"
    if not sep or not name or not all(c.isascii() and (c.isalnum() or c in token)
                                      for c in name) \
            or any(c in rest for c in "\r\n\0"):
        raise ValueError("'NAME:VALUE' with a header name (letters, digits, -) and a "
                         "value without CR/LF")
    return name, rest


def fd_number(value: str) -> int:
    try:
        fd = int(value, 10)
    except ValueError:
        raise ValueError("a file descriptor number >= 3 (an inherited listening "
                         "socket)") from None
    if fd < 3:
        raise ValueError("a file descriptor number >= 3 (0-2 are stdio)")
    return fd


def nonempty(what: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if not value:
            raise ValueError(f"a non-empty {what}")
        return value

    return parse


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(show(v) for v in value)
    return str(value)
