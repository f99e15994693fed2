"""Listening addresses: what cluster.listen() accepts and how it travels.

Theory of operation: a worker names an address as `socket` does: a
(host, port) tuple (IPv4, IPv6 or a name), a 4-tuple for IPv6 scope, a str
path for a Unix socket ("\\0name" for the abstract namespace), or a bare
int port (all IPv4 interfaces). The worker resolves a host name
(numeric_wire), so it travels to the primary as JSON (tuples become lists)
with a numeric host; the primary resolves it with AI_NUMERICHOST only (no
DNS lookup in its loop) and binds it.
"""

from __future__ import annotations

import json
import socket
from typing import Any

Address = tuple[str, int] | tuple[str, int, int, int] | str
WireAddress = list[Any] | str


def to_wire(address: Any) -> WireAddress:
    """Checks an address given to listen() and returns its JSON form."""
    if isinstance(address, int) and not isinstance(address, bool):
        address = ("", address)
    if isinstance(address, (bytes, bytearray)):
        address = address.decode("utf-8", "surrogateescape")
    if isinstance(address, str):
        if not address:
            raise ValueError("address: a Unix socket path must not be empty")
        return address
    if isinstance(address, (tuple, list)) and len(address) in (2, 4):
        host, port = address[0], address[1]
        if not isinstance(host, str):
            raise TypeError(f"address: host must be a str, got {host!r}")
        if not isinstance(port, int) or isinstance(port, bool):
            raise TypeError(f"address: port must be an int from 0 to 65535, got {port!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"address: port must be an int from 0 to 65535, got {port!r}")
        rest = list(address[2:])
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in rest):
            raise TypeError(f"address: flowinfo and scope_id must be ints, got {address!r}")
        return [host, port, *rest]
    raise TypeError(
        "address must be (host, port), (host, port, flowinfo, scope_id), a Unix socket "
        f"path (str) or a port (int), got {address!r}"
    )


def from_wire(wire: Any) -> Address:
    """The Python form of a wire address (lists back to tuples)."""
    if isinstance(wire, str):
        return wire
    if isinstance(wire, list) and len(wire) == 2:
        return (str(wire[0]), int(wire[1]))
    if isinstance(wire, list) and len(wire) == 4:
        return (str(wire[0]), int(wire[1]), int(wire[2]), int(wire[3]))
    raise ValueError(f"not an address: {wire!r}")


def resolve(wire: WireAddress, numeric: bool = False) -> tuple[int, Any]:
    """(family, sockaddr) to bind. Raises socket.gaierror; with numeric (the
    primary serving a worker's request), ValueError for a host name."""
    if isinstance(wire, str):
        return socket.AF_UNIX, wire
    host, port = wire[0], wire[1]
    if host == "":
        return socket.AF_INET, ("0.0.0.0", port)
    if len(wire) == 4 and not numeric:
        return socket.AF_INET6, (host, port, wire[2], wire[3])
    flags = socket.AI_PASSIVE | (socket.AI_NUMERICHOST if numeric else 0)
    # an ASCII host goes as bytes: a str is IDNA-encoded first, and a worker
    # dropped to a user who cannot read the stdlib may be unable to import that codec
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    try:
        infos = socket.getaddrinfo(name, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as e:
        if numeric and e.errno == socket.EAI_NONAME:
            raise ValueError(f"address: host {host!r} is not a numeric address (the worker "
                             "resolves names before it asks the primary)") from None
        raise
    family, _type, _proto, _canon, sockaddr = infos[0]
    if len(wire) == 4 and family == socket.AF_INET6:
        return int(family), (sockaddr[0], port, wire[2], wire[3])
    return int(family), sockaddr


def numeric_wire(wire: WireAddress) -> WireAddress:
    """In the worker: the wire address with its host resolved to a number
    (the first address getaddrinfo gives, as the primary used to take).
    Raises socket.gaierror naming the address."""
    if isinstance(wire, str) or wire[0] == "":
        return wire
    try:
        family, sockaddr = resolve(wire)
    except socket.gaierror as e:
        host = f"[{wire[0]}]" if ":" in str(wire[0]) else str(wire[0])
        raise socket.gaierror(e.errno, f"{e.strerror}: {host}:{wire[1]}") from None
    return wire_of(family, sockaddr)


def family_of(address: Address) -> int:
    if isinstance(address, str):
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


def key_of(family: int, sockaddr: Any) -> tuple[Any, ...]:
    """The registry key of a bound address (flowinfo ignored)."""
    if family == socket.AF_UNIX:
        return (family, sockaddr)
    if family == socket.AF_INET6:
        return (family, sockaddr[0], sockaddr[1], sockaddr[3] if len(sockaddr) > 3 else 0)
    return (family, sockaddr[0], sockaddr[1])


def key_text(wire: Any) -> str:
    """A wire address as one comparable string (host, port; flowinfo and
    scope only when given)."""
    return json.dumps(wire, sort_keys=True)


def wire_of(family: int, sockaddr: Any) -> WireAddress:
    """The wire form of a real (getsockname) address."""
    if family == socket.AF_UNIX:
        if isinstance(sockaddr, bytes):
            return sockaddr.decode("utf-8", "surrogateescape")
        return str(sockaddr)
    return list(sockaddr)


def parse_address(text: str) -> tuple[str, int]:
    """"HOST:PORT", "[IPV6]:PORT" or ":PORT" (every IPv4 interface, as the
    CLI's --bind) -> (host, port); ValueError if malformed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(text)
    if not host:
        host = "0.0.0.0"
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(text)
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(text)  # a bare IPv6 address needs brackets
    port = int(port_text)
    if port > 65535 or any(c.isspace() for c in host):
        raise ValueError(text)
    return host, port


def allowed_keys(name: str, value: Any) -> tuple[Any, ...] | None:
    """The `allowed_addresses` setting: None, or addresses as listen() takes
    them; hosts numeric or resolved here (setup_primary, not the loop).
    Returns the registry keys of every address allowed."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"setting {name!r} must be a list of addresses ((host, port), a "
                        f"port, or a Unix socket path) or None, got {value!r}")
    keys: list[Any] = []
    for item in value:
        try:
            wire = to_wire(item)
        except (TypeError, ValueError) as e:
            raise type(e)(f"setting {name!r}: {e}") from None
        if isinstance(wire, str):
            keys.append(key_of(socket.AF_UNIX, wire))
            continue
        host = "0.0.0.0" if wire[0] == "" else wire[0]
        try:
            infos = socket.getaddrinfo(host, wire[1], socket.AF_UNSPEC, socket.SOCK_STREAM,
                                       0, socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise ValueError(f"setting {name!r}: cannot resolve {item!r}: "
                             f"{e.strerror}") from None
        for family, _t, _p, _c, sockaddr in infos:
            keys.append(key_of(int(family), sockaddr))
    return tuple(dict.fromkeys(keys))
