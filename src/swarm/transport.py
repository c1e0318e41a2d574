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
READ_AHEAD = 1 << 16  # bytes a connection reads at once when it can (see `FrameReader`)
PREFIX_SIZE = wire.FRAME_PREFIX.size
# How long a connection that waits for bytes keeps asking for them before it sleeps, when its last wait was this
# short: a process that sleeps wakes on cold caches, and on a virtual machine its idle core first wakes through the
# hypervisor (measured on a 2-vCPU VM: an echo took 300 to 370 us sleeping on both ends, 150 to 180 us spinning).
SPIN_SECONDS = 300e-6


@dataclass(frozen=True)
class TransportLimits:
    """What one end accepts from the other."""

    max_message_bytes: int = 1 << 30  # largest frame (header and body) accepted
    frame_timeout: float = 60.0  # seconds a frame may take to arrive, from its first byte to its last
    idle_timeout: float = 900.0  # seconds a server keeps a connection that sends nothing
    max_connections: int = 1024  # connections a server serves at once; more are answered "Busy" and closed


def wait_until_ready(sock: socket.socket, events: int, deadline: float, poller: select.poll | None = None):
    """Returns once `sock` is ready for `events` (`select.POLLIN`, `select.POLLOUT`), or raises `socket.timeout` at
    `deadline` (time.monotonic)."""
    if poller is None:
        poller = select.poll()
        poller.register(sock, events)
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not poller.poll(remaining * 1000):
        raise socket.timeout("the peer did not send or take the frame in time")


def peek(sock: socket.socket) -> bytes | None:
    """The next byte the peer has sent, left unread; b"" if it has closed the connection (or it is broken), None
    if it has sent nothing more."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def receive_exactly(sock: socket.socket, size: int, deadline: float, head: bytes | bytearray = b"") -> bytearray:
    """`head` followed by `size` bytes from `sock`, by `deadline` (time.monotonic), or `socket.timeout`; buffers of
    at most `CHUNK` bytes are allocated as the bytes arrive."""
    chunks, received = [head] if head else [], 0
    while received < size:
        chunk = bytearray(min(CHUNK, size - received))
        view, filled = memoryview(chunk), 0
        while filled < len(chunk):
            try:
                count = sock.recv_into(view[filled:], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                wait_until_ready(sock, select.POLLIN, deadline)
                continue
            if count == 0:
                raise ConnectionError("connection closed by peer")
            filled += count
        chunks.append(chunk)
        received += len(chunk)
    return chunks[0] if len(chunks) == 1 and not head else bytearray().join(chunks)


class FrameReader:
    """Reads the frames that arrive on one socket. Each read takes whatever the socket holds, up to `READ_AHEAD`
    bytes, so a frame of a few KiB (a token's hidden states) usually arrives in one system call; bytes past a
    frame wait here for the next one. A frame that does not fit is received into buffers allocated as its bytes
    arrive (`receive_exactly`).

    Waiting spins, then sleeps: when the last wait for bytes ended within `spin` seconds (an RPC answered at once,
    a peer sending requests back to back), the reader asks the socket again and again for up to that long before it
    sleeps in `poll`; after a longer wait (a decode step through a chain, an idle client) it sleeps at once, so a
    connection that waits long costs no CPU."""

    def __init__(self, sock: socket.socket, spin: float | None = None):
        self.sock = sock
        self.spin = SPIN_SECONDS if spin is None else spin
        self._spin_next = True  # whether the last wait for bytes ended within `spin`
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._buffer = bytearray(READ_AHEAD)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # the bytes read but not yet taken: _buffer[_start:_end]

    @property
    def pending(self) -> int:
        """Bytes already read from the socket that belong to frames not yet returned."""
        return self._end - self._start

    def receive(
        self, limits: TransportLimits, first_byte_timeout: float | None = None, deadline: float | None = None
    ) -> Message:
        """One frame: its first byte within `first_byte_timeout` (default: the frame timeout), the whole of it
        within `limits.frame_timeout` of that, and all of it by `deadline` if given; `ProtocolError` for a frame
        past `limits.max_message_bytes` or malformed."""
        if self._start == self._end:
            first_deadline = time.monotonic() + (first_byte_timeout or limits.frame_timeout)
            self._fill(min(first_deadline, deadline or first_deadline))
        deadline = min(time.monotonic() + limits.frame_timeout, deadline or float("inf"))
        self._fill_to(PREFIX_SIZE, deadline)
        header_length, body_length = wire.decode_prefix(self._view[self._start : self._start + PREFIX_SIZE])
        size = header_length + body_length
        if size > limits.max_message_bytes:
            raise ProtocolError(f"a frame of {size} bytes exceeds the limit of {limits.max_message_bytes}")
        if PREFIX_SIZE + size > READ_AHEAD:
            self._start += PREFIX_SIZE
            header = self._take(header_length, deadline)
            return wire.decode(header, self._take(body_length, deadline))
        self._fill_to(PREFIX_SIZE + size, deadline)
        header_start = self._start + PREFIX_SIZE
        body_start = header_start + header_length
        self._start = body_start + body_length
        return wire.decode(self._view[header_start:body_start], bytearray(self._view[body_start : self._start]))

    def _fill(self, deadline: float):
        """Reads what the socket holds (at least a byte) into the free end of the buffer."""
        if self._start == self._end:
            self._start = self._end = 0
        free = self._view[self._end :]
        try:
            count = self.sock.recv_into(free, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            count = self._wait_and_receive(free, deadline)
        if count == 0:
            raise ConnectionError("connection closed by peer")
        self._end += count

    def _wait_and_receive(self, free: memoryview, deadline: float) -> int:
        """Receives into `free` once the socket holds something: first by asking again and again for up to `spin`
        seconds, if the last wait was that short, then by sleeping in `poll` until `deadline`."""
        started = time.perf_counter()
        spin_until = started + (self.spin if self._spin_next else 0.0)
        while True:
            try:
                count = self.sock.recv_into(free, 0, socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                if time.perf_counter() >= spin_until:
                    wait_until_ready(self.sock, select.POLLIN, deadline, self._poller)
        self._spin_next = time.perf_counter() - started <= self.spin
        return count

    def _fill_to(self, size: int, deadline: float):
        """Reads until `size` bytes (at most `READ_AHEAD`) are pending, first moving the pending bytes to the front
        of the buffer if they would not fit where they are."""
        if self._start + size > READ_AHEAD:
            pending = bytes(self._view[self._start : self._end])
            self._buffer[: len(pending)] = pending
            self._start, self._end = 0, len(pending)
        while self._end - self._start < size:
            self._fill(deadline)

    def _take(self, size: int, deadline: float) -> bytearray:
        """The next `size` bytes of the stream, in a buffer of their own."""
        taken = min(size, self.pending)
        head = bytearray(self._view[self._start : self._start + taken])
        self._start += taken
        if taken == size:
            return head
        return receive_exactly(self.sock, size - taken, deadline, head)


def send_message(
    sock: socket.socket, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, deadline: float | None = None
):
    """Sends a message whole by `deadline` (default: `TransportLimits.frame_timeout` from now), or raises
    `socket.timeout`."""
    rest = send_what_fits(sock, fields, tensors)
    if rest:
        send_rest(sock, rest, deadline or time.monotonic() + TransportLimits.frame_timeout)


def send_what_fits(sock: socket.socket, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """Sends what the socket takes at once of a message, with one `sendmsg` that never waits (tensor bytes are not
    copied); returns the bytes it did not take."""
    buffers = wire.encode(fields, tensors)
    try:
        sent = sock.sendmsg(buffers, [], socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    if sent == PREFIX_SIZE + len(buffers[1]) + wire.FRAME_PREFIX.unpack(buffers[0])[1]:
        return b""
    return b"".join(buffers)[sent:]


def send_rest(sock: socket.socket, data: bytes, deadline: float):
    """Sends `data` whole by `deadline`, or raises `socket.timeout`."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view, socket.MSG_DONTWAIT) :]
        except BlockingIOError:
            wait_until_ready(sock, select.POLLOUT, deadline)


class ConnectionContext:
    """What a handler knows about the connection a request came on; resources tied to it close with it."""

    def __init__(self, peer: str, sock: socket.socket | None = None):
        self.peer = peer
        self.sock = sock
        self.reader = FrameReader(sock) if sock is not None else None
        self.on_close: list[Callable[[], None]] = []
        self.unsent = b""  # what `reply` could not send at once, for the connection's own thread to send
        self.greeted = False  # whether the peer has said `hello` (see `swarm.handshake`)

    def peer_is_gone(self) -> bool:
        """Whether the peer has closed the connection (a request whose client has gone is not worth computing)."""
        if self.sock is None or self.reader.pending:
            return False
        return peek(self.sock) == b""

    def has_input(self) -> bool:
        """Whether the peer has sent more (or closed the connection) since the request being handled."""
        if self.sock is None:
            return False
        return bool(self.reader.pending) or peek(self.sock) is not None

    def reply(self, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None):
        """Sends the reply to the request being handled, from any thread, without ever waiting for the peer:
        what the socket does not take at once is left in `unsent`. A handler that replies this way returns
        None once this has returned. (The server's compute thread replies so; a client that stops reading
        must not hold it up.)"""
        if self.sock is None:
            return
        try:
            self.unsent = send_what_fits(self.sock, fields, tensors)
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
            _try_send(sock, {"error": {"kind": ServerBusyError("").kind, "message": message}}, wait=False)
            sock.close()
            return
        sock.settimeout(None)  # blocking mode, whose calls never poll first; each call here says whether to wait
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
            fields, tensors = context.reader.receive(self.limits, first_byte_timeout=self.limits.idle_timeout)
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
            send_rest(sock, unsent, time.monotonic() + self.limits.frame_timeout)
            return True
        except OSError:
            return False


def _try_send(
    sock: socket.socket, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, wait: bool = True
) -> bool:
    try:
        if wait:
            send_message(sock, fields, tensors)
        else:
            send_what_fits(sock, fields, tensors)
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
        self._sock.settimeout(None)  # blocking mode, whose calls never poll first; each call here says whether to wait
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = FrameReader(self._sock)
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
            return not self._reader.pending and peek(self._sock) == b""

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
            send_message(self._sock, fields, tensors, time.monotonic() + timeout)
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
            reply_fields, reply_tensors = self._reader.receive(self.limits, timeout, time.monotonic() + timeout)
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
