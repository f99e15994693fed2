"""Listening addresses: what cluster.listen() accepts and how it travels.

Theory of operation: a worker names an address as `socket` does: a
(host, port) tuple (IPv4, IPv6 or a name), a 4-tuple for IPv6 scope, a str
path for a Unix socket ("\\0name" for the abstract namespace), or a bare
int port (all IPv4 interfaces). It travels to the primary as JSON (tuples
become lists) and is resolved there, where the bind happens.
"""

from __future__ import annotations

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


def resolve(wire: WireAddress) -> tuple[int, Any]:
    """(family, sockaddr) to bind, in the primary. Raises socket.gaierror."""
    if isinstance(wire, str):
        return socket.AF_UNIX, wire
    host, port = wire[0], wire[1]
    if host == "":
        return socket.AF_INET, ("0.0.0.0", port)
    if len(wire) == 4:
        return socket.AF_INET6, (host, port, wire[2], wire[3])
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               0, socket.AI_PASSIVE)
    family, _type, _proto, _canon, sockaddr = infos[0]
    return int(family), sockaddr


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
