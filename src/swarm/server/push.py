"""Server-to-server push: a step's inputs go from one server of a client's route straight to the next.

The client sends a step to the first server of a run of hops and, to each of the others, a step that awaits its
inputs (`await_push`); each server, once it has computed, pushes its inputs and outputs joined (what the client
would have sent the next hop) to the next server and replies to the client with its outputs. The client so gets
every hop's outputs (for failover's replays) while the hidden states go down the route without coming back to it
between hops: a step costs one delay per link of the chain instead of a round trip per server. A round-trip model
(a UNet) pushes down the route, the last hop turns around, and the way back pushes its outputs alone from hop to
hop up to the first; a step's `position` is then the number of steps its session has run.

    step  session_id position [push_to] + tensors       from the client: run this step, then push it on
    step  session_id position await_push [push_to]      from the client: run the step the previous server pushes
    push  session_id position + tensors                 from the previous server (no reply)

`push_to` names the next hop: `{"address", "peer_id", "session_id", "position", "dtype", "timeout"}`. A server
dials it with `hello`, so the next server proves it is the peer the client named (and, in a private swarm, that it
holds the key). A pushing server replies to its client without waiting for the next server (a push has no reply),
saying whether it could send the push: `pushed`, with the link's round trip `push_round_trip` (an echo timed when
the link opened, so that the client can relay a link slower than the way through itself), else `push_error`. A
client whose hop could not push sends the next hop the step itself, which cancels the wait (the awaiting step
answers `push_missing`). A step whose
`position` is not the session's length (after its `crop`) is answered `stale`, so a step never runs twice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from swarm.errors import SwarmError
from swarm.handshake import check_answer, hello_request
from swarm.models.base import Tensors
from swarm.models.checks import require
from swarm.transport import Connection, TransportLimits
from swarm.wire import DTYPES, is_int

MAX_PUSH_TIMEOUT = 60.0  # seconds a server waits for the next one to take a push, at most
MAX_AWAIT_TIMEOUT = 600.0  # seconds a step may wait for its push, at most


@dataclass(frozen=True)
class PushTarget:
    address: str
    peer_id: str
    session_id: str
    position: int
    dtype: torch.dtype | None
    timeout: float

    @classmethod
    def parse(cls, value: Any) -> "PushTarget":
        require(isinstance(value, dict), f"push_to must be an object, got {type(value).__name__}")
        address, peer_id, session_id = value.get("address"), value.get("peer_id"), value.get("session_id")
        position, dtype, timeout = value.get("position"), value.get("dtype"), value.get("timeout", 5.0)
        host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        require(bool(host) and port.isdigit(), f"push_to.address must be HOST:PORT, got {address!r}")
        require(isinstance(peer_id, str) and 0 < len(peer_id) <= 128, "push_to.peer_id must be a peer id")
        require(isinstance(session_id, str) and 0 < len(session_id) <= 128, "push_to.session_id must be a session id")
        require(is_int(position) and position >= 0, f"push_to.position must be a non-negative int, got {position!r}")
        require(dtype is None or dtype in DTYPES, f"push_to.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        require(isinstance(timeout, (int, float)) and 0 < timeout <= MAX_PUSH_TIMEOUT,
                f"push_to.timeout must be in (0, {MAX_PUSH_TIMEOUT:g}] seconds, got {timeout!r}")  # fmt: skip
        return cls(address, peer_id, session_id, position, DTYPES.get(dtype), float(timeout))


class Mailbox:
    """Where a session's pushed inputs meet the step that awaits them. A step that comes first leaves a callback,
    which the push runs from its own thread: the step starts without waking the thread that awaits it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._item: tuple[int, Tensors] | None = None  # a push no step has taken yet
        self._waiting: tuple[int, Callable[[Tensors], None]] | None = None  # the step that awaits its push

    def put(self, position: int, tensors: Tensors):
        """Hands `tensors` to the step at `position` if it awaits them, else leaves them for it (in place of any push
        that still waits)."""
        with self._lock:
            waiting = self._waiting
            if waiting is not None and waiting[0] == position:
                self._waiting = None
            else:
                self._item, waiting = (position, tensors), None
        if waiting is not None:
            waiting[1](tensors)

    def expect(self, position: int, callback: Callable[[Tensors], None]) -> Tensors | None:
        """The pushed inputs of the step at `position` if they are here; else None, and `callback` is left for its
        push to run with them. A push for another position that waits here is dropped."""
        with self._lock:
            item, self._item = self._item, None
            if item is not None and item[0] == position:
                return item[1]
            self._waiting = (position, callback)
            return None

    def cancel(self, position: int) -> bool:
        """Withdraws the callback of the step at `position`; False if its push has already run it."""
        with self._lock:
            if self._waiting is not None and self._waiting[0] == position:
                self._waiting = None
                return True
            return False


class PushLinks:
    """This server's connections to the next servers of clients' routes, one per peer, each opened with `hello`."""

    def __init__(self, swarm_key: bytes | None, connect_timeout: float = 5.0):
        self.swarm_key = swarm_key
        self.connect_timeout = connect_timeout
        self._connections: dict[tuple[str, str], Connection] = {}
        self._round_trips: dict[tuple[str, str], float] = {}  # seconds of each link's hello round trip
        self._lock = threading.Lock()

    def link(self, target: PushTarget) -> tuple[Connection | None, str | None]:
        """The connection to the target, connecting first if there is none or the next server has closed it (it
        restarted, say), within the target's timeout; (None, why) if there can be none."""
        connection = self._kept(target)
        if connection is not None:
            return connection, None
        try:
            return self._connection(target, time.monotonic() + target.timeout), None
        except (SwarmError, OSError) as error:
            return None, f"unreachable: {error}"

    def send(self, target: PushTarget, connection: Connection, tensors: Tensors) -> str | None:
        """Sends `tensors` (floating-point ones in the target's dtype) on the target's `link`, within the target's
        timeout; None once they are sent, else why they could not be. A push has no reply: the next server runs it
        in the step that awaits it (or drops it, logging why), and the client reads that step's reply, so the
        pushing server answers its client without waiting for the next one. (It returns at once when the socket
        takes the frame, which a token's hidden states always fit.)"""
        sent = {
            name: tensor.to(target.dtype) if target.dtype is not None and tensor.is_floating_point() else tensor
            for name, tensor in tensors.items()
        }
        fields = {"method": "push", "session_id": target.session_id, "position": target.position}
        try:
            connection.send(fields, sent, timeout=target.timeout)
            return None
        except (SwarmError, OSError) as error:
            self._drop(target)
            return f"unreachable: {error}"

    def _kept(self, target: PushTarget) -> Connection | None:
        """The open connection to the target, if there is one whose peer has not closed it."""
        with self._lock:
            connection = self._connections.get((target.address, target.peer_id))
        if connection is None or connection.closed:
            return None
        if connection.peer_closed():
            self._drop(target)
            return None
        return connection

    def _connection(self, target: PushTarget, deadline: float) -> Connection:
        key = (target.address, target.peer_id)
        connection = Connection(target.address, min(self.connect_timeout, max(deadline - time.monotonic(), 1e-3)), TransportLimits())
        try:
            request = hello_request(self.swarm_key)
            answer, _ = connection.request(request, timeout=max(deadline - time.monotonic(), 1e-3))
            check_answer(request, answer, target.peer_id, target.address, self.swarm_key)
            started = time.perf_counter()  # the link's round trip: an echo, once the next server serves the link
            connection.request({"method": "echo"}, timeout=max(deadline - time.monotonic(), 1e-3))
            round_trip = time.perf_counter() - started
        except BaseException:
            connection.close()
            raise
        with self._lock:
            previous = self._connections.get(key)
            if previous is not None and not previous.closed:
                connection.close()
                return previous
            self._connections[key] = connection
            self._round_trips[key] = round_trip
        return connection

    def round_trip(self, target: PushTarget) -> float | None:
        """Seconds of the round trip to the target measured when its link opened (an echo), if it is open."""
        with self._lock:
            return self._round_trips.get((target.address, target.peer_id))

    def _drop(self, target: PushTarget):
        with self._lock:
            connection = self._connections.pop((target.address, target.peer_id), None)
        if connection is not None:
            connection.close()

    def close(self):
        with self._lock:
            connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            connection.close()
