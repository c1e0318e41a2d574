"""The tensor transport: framed request/response messages over plain TCP (see `swarm.wire`).

The hivemind DHT finds peers; hidden states travel on these direct connections, which cost a
fraction of a millisecond per hop on a LAN. A server runs one thread per connection; a client
holds one `Connection` per server it talks to and sends one request at a time on it.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable

import torch

from swarm import wire
from swarm.errors import (
    BadRequestError,
    PeerError,
    PeerTimeoutError,
    ProtocolError,
    RemoteError,
    ServerUnavailableError,
)

logger = logging.getLogger(__name__)

Message = tuple[dict[str, Any], dict[str, torch.Tensor]]
Handler = Callable[[dict[str, Any], dict[str, torch.Tensor], "ConnectionContext"], Message | None]


PREALLOCATE_LIMIT = 64 << 20  # larger messages are received in chunks, so a peer that only claims a huge
# size costs this much memory at most until its bytes actually arrive


def receive_exactly(sock: socket.socket, size: int) -> bytearray:
    if size > PREALLOCATE_LIMIT:
        chunks = [receive_exactly(sock, min(PREALLOCATE_LIMIT, size - done)) for done in range(0, size, PREALLOCATE_LIMIT)]
        return bytearray().join(chunks)
    buffer = bytearray(size)
    view, received = memoryview(buffer), 0
    while received < size:
        count = sock.recv_into(view[received:], size - received)
        if count == 0:
            raise ConnectionError("connection closed by peer")
        received += count
    return buffer


def receive_message(sock: socket.socket) -> Message:
    header_length, body_length = wire.decode_prefix(bytes(receive_exactly(sock, wire.FRAME_PREFIX.size)))
    header = receive_exactly(sock, header_length)
    body = receive_exactly(sock, body_length)
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

    A handler raises `BadRequestError` for bad input: the client gets the message, the connection stays.
    A frame that breaks the wire format gets an error reply, then the connection is closed.
    """

    def __init__(self, host: str, port: int, handler: Handler):
        self.handler = handler
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.host, self.port = self._listener.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
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

    def _accept_forever(self):
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve_connection, args=(sock, address), daemon=True)
            thread.start()

    def _serve_connection(self, sock: socket.socket, address):
        context = ConnectionContext(peer=f"{address[0]}:{address[1]}", sock=sock)
        try:
            with sock:
                while not self._stopping.is_set():
                    if not self._serve_one(sock, context):
                        return
        finally:
            for close in context.on_close:
                close()

    def _serve_one(self, sock: socket.socket, context: ConnectionContext) -> bool:
        """Serves one request; returns False when the connection should close."""
        try:
            fields, tensors = receive_message(sock)
        except (ConnectionError, OSError):
            return False
        except ProtocolError as error:
            logger.warning(f"Malformed message from {context.peer}: {error}")
            _try_send(sock, {"error": {"kind": "ProtocolError", "message": str(error)}})
            return False
        try:
            reply = self.handler(fields, tensors, context)
        except (BadRequestError, ProtocolError) as error:
            logger.info(f"Rejected a request from {context.peer}: {error}")
            return _try_send(sock, {"error": {"kind": "BadRequest", "message": str(error)}})
        except RemoteError as error:
            return _try_send(sock, {"error": {"kind": error.kind, "message": str(error)}})
        except Exception as error:
            logger.exception(f"Failed to serve a request from {context.peer}")
            return _try_send(sock, {"error": {"kind": type(error).__name__, "message": str(error)}})
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


def _try_send(sock: socket.socket, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bool:
    try:
        send_message(sock, fields, tensors)
        return True
    except OSError:
        return False


class Connection:
    """A client's connection to one server; `request` sends one message and waits for the reply."""

    def __init__(self, address: str, timeout: float):
        self.address = address
        self.timeout = timeout
        host, _, port = address.rpartition(":")
        try:
            self._sock = socket.create_connection((host, int(port)), timeout=timeout)
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
        with self._lock:
            if self.closed:
                raise PeerError(f"connection to {self.address} is closed")
            self._sock.settimeout(timeout or self.timeout)
            try:
                send_message(self._sock, fields, tensors)
                reply_fields, reply_tensors = receive_message(self._sock)
            except socket.timeout:
                self.close()
                raise PeerTimeoutError(f"{self.address} did not answer within {timeout or self.timeout} s") from None
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
    kind = error.get("kind", "RemoteError") if isinstance(error, dict) else "RemoteError"
    message = f"{address}: {error.get('message', error) if isinstance(error, dict) else error}"
    if kind in ("BadRequest", "ProtocolError"):
        return BadRequestError(message)
    if kind == "Unavailable":
        return ServerUnavailableError(message)
    return RemoteError(message, kind)
