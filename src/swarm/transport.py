"""The tensor transport: framed request/response messages over plain TCP (see `swarm.wire`).

The hivemind DHT finds peers; hidden states travel on these direct connections, which cost a
fraction of a millisecond per hop on a LAN. A server runs one thread per connection; a client
holds one `Connection` per server it talks to and sends one request at a time on it.

Neither end trusts the other's bytes (`TransportLimits`): a frame is read against a deadline, memory grows only
as its bytes arrive (a peer that merely claims a huge size costs nothing), frames past a size limit are refused,
a server keeps a bounded number of connections and closes idle ones, and its accept loop outlives any error.
Error replies carry a documented kind and a sentence (`swarm.errors`), never a traceback.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from swarm import wire
from swarm.errors import (
    ERROR_KINDS,
    BadRequestError,
    InternalServerError,
    PeerError,
    PeerTimeoutError,
    ProtocolError,
    RemoteError,
    ServerBusyError,
)

logger = logging.getLogger(__name__)

Message = tuple[dict[str, Any], dict[str, torch.Tensor]]
Handler = Callable[[dict[str, Any], dict[str, torch.Tensor], "ConnectionContext"], Message | None]

CHUNK = 1 << 20  # a frame's bytes are received into buffers of at most this size, allocated as they arrive


@dataclass(frozen=True)
class TransportLimits:
    """What one end accepts from the other."""

    max_message_bytes: int = 1 << 30  # largest frame (header and body) accepted
    frame_timeout: float = 60.0  # seconds a frame may take to arrive, from its first byte to its last
    idle_timeout: float = 900.0  # seconds a server keeps a connection that sends nothing
    max_connections: int = 1024  # connections a server serves at once; more are answered "Busy" and closed


def receive_exactly(sock: socket.socket, size: int, deadline: float) -> bytearray:
    """`size` bytes from `sock` by `deadline` (time.monotonic), or `socket.timeout`; buffers of at most `CHUNK`
    bytes are allocated as the bytes arrive."""
    chunks, received = [], 0
    while received < size:
        chunk = bytearray(min(CHUNK, size - received))
        view, filled = memoryview(chunk), 0
        while filled < len(chunk):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the frame did not arrive in time")
            sock.settimeout(remaining)
            count = sock.recv_into(view[filled:], len(chunk) - filled)
            if count == 0:
                raise ConnectionError("connection closed by peer")
            filled += count
        chunks.append(chunk)
        received += len(chunk)
    return chunks[0] if len(chunks) == 1 else bytearray().join(chunks)


def receive_message(
    sock: socket.socket, limits: TransportLimits, first_byte_timeout: float | None = None, deadline: float | None = None
) -> Message:
    """One frame: its first byte within `first_byte_timeout` (default: the frame timeout), the whole of it within
    `limits.frame_timeout` of that, and all of it by `deadline` if given; `ProtocolError` for a frame past
    `limits.max_message_bytes` or malformed."""
    first_deadline = time.monotonic() + (first_byte_timeout or limits.frame_timeout)
    first = receive_exactly(sock, 1, min(first_deadline, deadline or first_deadline))
    deadline = min(time.monotonic() + limits.frame_timeout, deadline or float("inf"))
    prefix = bytes(first + receive_exactly(sock, wire.FRAME_PREFIX.size - 1, deadline))
    header_length, body_length = wire.decode_prefix(prefix)
    if header_length + body_length > limits.max_message_bytes:
        raise ProtocolError(f"a frame of {header_length + body_length} bytes exceeds the limit of {limits.max_message_bytes}")
    header = receive_exactly(sock, header_length, deadline)
    body = receive_exactly(sock, body_length, deadline)
    return wire.decode(bytes(header), body)


def send_message(sock: socket.socket, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None):
    rest = send_what_fits(sock, fields, tensors)
    if rest:
        sock.sendall(rest)


def send_what_fits(
    sock: socket.socket, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, flags: int = 0
) -> bytes:
    """Sends a message with one `sendmsg` (tensor bytes are not copied); returns the bytes it did not take."""
    buffers = wire.encode(fields, tensors)
    try:
        sent = sock.sendmsg(buffers, [], flags)
    except BlockingIOError:
        sent = 0
    if sent == sum(len(buffer) for buffer in buffers):
        return b""
    return b"".join(bytes(buffer) for buffer in buffers)[sent:]


class ConnectionContext:
    """What a handler knows about the connection a request came on; resources tied to it close with it."""

    def __init__(self, peer: str, sock: socket.socket | None = None):
        self.peer = peer
        self.sock = sock
        self.on_close: list[Callable[[], None]] = []
        self.unsent = b""  # what `reply` could not send at once, for the connection's own thread to send
        self.greeted = False  # whether the peer has said `hello` (see `swarm.handshake`)

    def peer_is_gone(self) -> bool:
        """Whether the peer has closed the connection (a request whose client has gone is not worth computing)."""
        if self.sock is None:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            return bool(readable) and self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (OSError, ValueError):
            return True

    def has_input(self) -> bool:
        """Whether the peer has sent more (or closed the connection) since the request being handled."""
        if self.sock is None:
            return False
        try:
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def reply(self, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None):
        """Sends the reply to the request being handled, from any thread, without ever waiting for the peer:
        what the socket does not take at once is left in `unsent`. A handler that replies this way returns
        None once this has returned. (The server's compute thread replies so; a client that stops reading
        must not hold it up.)"""
        if self.sock is None:
            return
        try:
            self.unsent = send_what_fits(self.sock, fields, tensors, socket.MSG_DONTWAIT)
        except OSError:
            pass  # the connection is gone: its thread finds out at its next read


class TensorServer:
    """Accepts connections on (host, port) and answers each request with `handler(fields, tensors, context)`
    (or lets the handler send its reply with `context.reply` and return None).

    A handler raises a `RemoteError` (`BadRequestError`, `ServerBusyError`, ...) to answer with its kind and
    message; the connection stays. Any other exception is logged here and answered as an internal error. A frame
    that breaks the wire format or `limits` gets an error reply, then the connection is closed.
    """

    def __init__(self, host: str, port: int, handler: Handler, limits: TransportLimits | None = None):
        self.handler = handler
        self.limits = limits or TransportLimits()
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.host, self.port = self._listener.getsockname()[:2]
        self._stopping = threading.Event()
        self._open_connections = 0
        self._count_lock = threading.Lock()
        self._accept_thread = threading.Thread(target=self._accept_forever, name="swarm-accept", daemon=True)

    def start(self) -> "TensorServer":
        self._accept_thread.start()
        return self

    def stop(self):
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    @property
    def open_connections(self) -> int:
        return self._open_connections

    def _accept_forever(self):
        """Accepts until stopped, whatever `accept` raises meanwhile (out of file descriptors, a reset, ...)."""
        logged: set[int] = set()
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except OSError as error:
                if self._stopping.is_set():
                    return
                if error.errno not in logged:
                    logged.add(error.errno)
                    logger.warning(f"accept() failed ({error}); the server keeps accepting")
                time.sleep(0.1 if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) else 0.01)
                continue
            try:
                self._start_connection(sock, address)
            except Exception as error:  # a thread that cannot start: refuse this connection, keep the others
                logger.warning(f"Could not serve a connection from {address}: {error}")
                sock.close()

    def _start_connection(self, sock: socket.socket, address):
        with self._count_lock:
            refused = self._open_connections >= self.limits.max_connections
            if not refused:
                self._open_connections += 1
        if refused:
            sock.setblocking(False)
            message = f"this server serves at most {self.limits.max_connections} connections at once"
            _try_send(sock, {"error": {"kind": ServerBusyError("").kind, "message": message}}, nonblocking=True)
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            threading.Thread(target=self._serve_connection, args=(sock, address), daemon=True).start()
        except BaseException:
            with self._count_lock:
                self._open_connections -= 1
            raise

    def _serve_connection(self, sock: socket.socket, address):
        context = ConnectionContext(peer=f"{address[0]}:{address[1]}", sock=sock)
        try:
            with sock:
                while not self._stopping.is_set():
                    if not self._serve_one(sock, context):
                        return
        finally:
            with self._count_lock:
                self._open_connections -= 1
            for close in context.on_close:
                close()

    def _serve_one(self, sock: socket.socket, context: ConnectionContext) -> bool:
        """Serves one request; returns False when the connection should close."""
        try:
            fields, tensors = receive_message(sock, self.limits, first_byte_timeout=self.limits.idle_timeout)
        except (ConnectionError, OSError):  # closed, reset, or too slow (socket.timeout is an OSError)
            return False
        except ProtocolError as error:
            logger.info(f"Malformed message from {context.peer}: {error}")
            _try_send(sock, {"error": {"kind": "ProtocolError", "message": str(error)}})
            return False
        try:
            reply = self.handler(fields, tensors, context)
        except ProtocolError as error:
            logger.info(f"Rejected a request from {context.peer}: {error}")
            return _try_send(sock, {"error": {"kind": "BadRequest", "message": str(error)}})
        except RemoteError as error:
            logger.info(f"Answered a request from {context.peer} with {error.kind}: {error}")
            return _try_send(sock, {"error": {"kind": error.kind, "message": str(error)}})
        except Exception:
            logger.exception(f"Failed to serve a request from {context.peer}")
            message = "the server failed while running this request"
            return _try_send(sock, {"error": {"kind": InternalServerError("").kind, "message": message}})
        if reply is not None:
            return _try_send(sock, *reply)
        unsent, context.unsent = context.unsent, b""
        if not unsent:
            return True
        try:
            sock.sendall(unsent)
            return True
        except OSError:
            return False


def _try_send(
    sock: socket.socket, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, nonblocking: bool = False
) -> bool:
    try:
        if nonblocking:
            send_what_fits(sock, fields, tensors, socket.MSG_DONTWAIT)
        else:
            sock.settimeout(TransportLimits.frame_timeout)
            send_message(sock, fields, tensors)
        return True
    except OSError:
        return False


class Connection:
    """A client's connection to one server; `request` sends one message and waits for the reply, which must
    arrive whole within the request's timeout and within `limits.max_message_bytes`."""

    def __init__(self, address: str, timeout: float, limits: TransportLimits | None = None, source_host: str | None = None):
        self.address = address
        self.timeout = timeout
        self.limits = limits or TransportLimits()
        host, _, port = address.rpartition(":")
        try:
            source = (source_host, 0) if source_host else None
            self._sock = socket.create_connection((host, int(port)), timeout=timeout, source_address=source)
        except socket.timeout:
            raise PeerTimeoutError(f"connecting to {address} timed out after {timeout} s") from None
        except (OSError, ValueError) as error:
            raise PeerError(f"cannot connect to {address}: {error}") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self.closed = False

    def request(
        self, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, timeout: float | None = None
    ) -> Message:
        timeout = timeout or self.timeout
        with self._lock:
            deadline = time.monotonic() + timeout
            self._send(fields, tensors, timeout)
            return self._receive(max(deadline - time.monotonic(), 1e-3))

    def peer_closed(self) -> bool:
        """Whether the server has closed its end (nothing it sends unasked is expected)."""
        with self._lock:
            try:
                readable = select.select([self._sock], [], [], 0)[0]
                return bool(readable) and self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except (OSError, ValueError):
                return True

    def send(self, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, timeout: float | None = None):
        """Sends a request whose reply `receive` reads later (replies come in the order of the requests)."""
        with self._lock:
            self._send(fields, tensors, timeout or self.timeout)

    def receive(self, timeout: float | None = None) -> Message:
        """The reply to the oldest request `send` sent whose reply has not been read."""
        with self._lock:
            return self._receive(timeout or self.timeout)

    def _send(self, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None, timeout: float):
        if self.closed:
            raise PeerError(f"connection to {self.address} is closed")
        try:
            self._sock.settimeout(timeout)
            send_message(self._sock, fields, tensors)
        except socket.timeout:
            self.close()
            raise PeerTimeoutError(f"{self.address} did not take a request within {timeout} s") from None
        except OSError as error:
            self.close()
            raise PeerError(f"lost connection to {self.address}: {error}") from None

    def _receive(self, timeout: float) -> Message:
        if self.closed:
            raise PeerError(f"connection to {self.address} is closed")
        try:
            self._sock.settimeout(timeout)
            reply_fields, reply_tensors = receive_message(self._sock, self.limits, timeout, time.monotonic() + timeout)
        except socket.timeout:
            self.close()
            raise PeerTimeoutError(f"{self.address} did not answer within {timeout} s") from None
        except (OSError, ProtocolError) as error:
            self.close()
            raise PeerError(f"lost connection to {self.address}: {error}") from None
        if "error" in reply_fields:
            raise _remote_error(self.address, reply_fields["error"])
        return reply_fields, reply_tensors

    def close(self):
        self.closed = True
        try:
            self._sock.close()
        except OSError:
            pass


def _remote_error(address: str, error: Any) -> RemoteError:
    kind = error.get("kind") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    message = f"{address}: {message if isinstance(message, str) else repr(error)}"[:2000]
    if kind == "ProtocolError":
        return BadRequestError(message)
    if kind in ERROR_KINDS:
        return ERROR_KINDS[kind](message)
    return RemoteError(message, kind if isinstance(kind, str) else "RemoteError")
