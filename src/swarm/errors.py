"""Every error that `swarm` raises on purpose, grouped by what a caller does about it.

    SwarmError
    ├── ConfigurationError        fix the arguments: bad model path, span, ...
    │   └── UnsupportedModelError  swarm cannot cut this model's architecture (yet)
    ├── RemoteError               a server answered with an error of its own: retry elsewhere
    │   ├── BadRequestError       the request was malformed or out of bounds (server stays up): a bug, not retried
    │   ├── ServerUnavailableError  the server is leaving and takes no new sessions: retry elsewhere
    │   ├── ServerBusyError       the server is at one of its limits (connections, sessions, cache memory): retry elsewhere
    │   ├── SessionExpiredError   the server no longer holds the session (idle too long, restarted, moved): replay it
    │   ├── AccessDeniedError     the server belongs to a private swarm whose key the client lacks: not retried
    │   └── InternalServerError   the server failed while running the request: retried once elsewhere
    ├── ProtocolError             a message broke the wire format; the connection is dropped
    ├── PeerError                 a peer failed or vanished: retry elsewhere
    │   ├── PeerTimeoutError      a peer did not answer in time
    │   └── BadReplyError         a peer's reply is not what was asked for (keys, shapes, dtypes, length)
    │       └── WrongOutputError  a peer's output differs from two other servers' (`ClientConfig.verify`)
    └── SwarmUnavailableError     the swarm can't serve the model now
        ├── MissingBlocksError    no server covers these blocks
        └── VerificationError     servers disagree on an output and no third one can tell which is right

`PeerError` and `RemoteError` other than `BadRequestError` are failures of a peer, worth retrying on
another one (see `swarm.client.retry`); everything else is raised at once.

On the wire, a server's error reply is `{"error": {"kind": K, "message": M}}` with K one of the kinds below
(`RemoteError.kind`) and M a sentence for a person: never a Python exception's name or a traceback.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base class of every error that `swarm` raises on purpose."""


class ConfigurationError(SwarmError, ValueError):
    """The caller asked for something that cannot work: a path that is not a model, a bad span, ..."""


class UnsupportedModelError(ConfigurationError):
    """swarm does not know how to cut this model into blocks: an unknown architecture, or a feature of a known one
    that its servers cannot reproduce. Raised by `from_pretrained` and at server start, never a wrong answer."""

    def __init__(self, model_type: str | None, reason: str):
        super().__init__(f"model type {model_type!r}: {reason}")
        self.model_type = model_type


class RemoteError(SwarmError):
    """A server received the request and answered with an error."""

    def __init__(self, message: str, kind: str = "RemoteError"):
        super().__init__(message)
        self.kind = kind


class BadRequestError(RemoteError):
    """The server rejected a request as malformed or out of bounds; it keeps serving others."""

    def __init__(self, message: str):
        super().__init__(message, kind="BadRequest")


class ServerUnavailableError(RemoteError):
    """The server is shutting down or not ready; another server should take the request."""

    def __init__(self, message: str):
        super().__init__(message, kind="Unavailable")


class ServerBusyError(RemoteError):
    """The server is at one of its limits (open connections, sessions, cache memory); another server, or this
    one later, can take the request."""

    def __init__(self, message: str):
        super().__init__(message, kind="Busy")


class SessionExpiredError(RemoteError):
    """The server does not hold the session any more: it was idle too long, or the server restarted or moved to
    other blocks. The client opens a new one and replays what the lost one was sent."""

    def __init__(self, message: str):
        super().__init__(message, kind="SessionExpired")


class AccessDeniedError(RemoteError):
    """The server belongs to a private swarm, and the request did not come with a proof of its key."""

    def __init__(self, message: str):
        super().__init__(message, kind="AccessDenied")


class InternalServerError(RemoteError):
    """The server failed while running a well-formed request (the details are in its log)."""

    def __init__(self, message: str):
        super().__init__(message, kind="Internal")


# the kind on the wire -> the error a client raises for it (any other kind: `RemoteError`)
ERROR_KINDS = {
    kind_class("").kind: kind_class
    for kind_class in (
        BadRequestError,
        ServerUnavailableError,
        ServerBusyError,
        SessionExpiredError,
        AccessDeniedError,
        InternalServerError,
    )
}


class ProtocolError(SwarmError):
    """Bytes on the wire do not form a valid message."""


class PeerError(SwarmError):
    """A peer could not be reached, closed the connection or failed mid-request."""


class PeerTimeoutError(PeerError, TimeoutError):
    """A peer did not answer within the allotted time."""


class BadReplyError(PeerError):
    """A server's reply is not what was asked for: the client leaves that server out and goes elsewhere."""


class WrongOutputError(BadReplyError):
    """A server's output differs from what two other servers computed for the same request."""


class SwarmUnavailableError(SwarmError):
    """The swarm cannot serve the requested model right now."""


class VerificationError(SwarmUnavailableError):
    """Two servers disagree on the output of the same blocks, and no third one can tell which is right."""


class MissingBlocksError(SwarmUnavailableError):
    """No server in the swarm covers some blocks of the model."""

    def __init__(self, model_name: str, missing_blocks: list[int], waited: float, min_precision: str | None = None):
        self.model_name = model_name
        self.missing_blocks = missing_blocks
        spans = ", ".join(f"[{start}, {end})" for start, end in _ranges(missing_blocks))
        precision = f" in {min_precision} or more precise weights (min_precision)" if min_precision else ""
        super().__init__(
            f"No server in the swarm serves blocks {spans} of model {model_name!r}{precision} "
            f"(waited {waited:.1f} s). Start servers for these blocks or check --initial-peers."
        )


def _ranges(blocks: list[int]) -> list[tuple[int, int]]:
    """Groups sorted block indices into half-open runs: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: list[tuple[int, int]] = []
    for block in sorted(blocks):
        if runs and runs[-1][1] == block:
            runs[-1] = (runs[-1][0], block + 1)
        else:
            runs.append((block, block + 1))
    return runs
