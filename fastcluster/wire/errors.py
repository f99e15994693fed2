"""fastcluster's own exceptions. OS failures stay OSError; bad arguments are
ValueError/TypeError naming the argument; this is the small rest."""

from __future__ import annotations


class ClusterError(Exception):
    """Base of fastcluster's own errors."""


class ProtocolError(ClusterError):
    """A peer broke the control-channel protocol.

    `fatal` is True when the byte stream cannot be resynchronised (a frame
    length over the limit): the channel must be closed. A frame that is well
    delimited but does not decode (bad UTF-8, bad JSON, not an object) is not
    fatal: the next frame still starts at a known offset.
    """

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal
