"""Abuse of a real server on 127.0.0.1: malformed frames, huge declared sizes, slow and idle connections, requests
past every limit. Each case gets a clear error (or a closed connection) and is followed by a normal request,
which must still succeed with the same output; nothing a server answers names a Python exception.

The server (tiny Llama, all 5 blocks) runs with small limits, so that every limit is reachable quickly.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm import AutoDistributedModel, wire
from swarm.errors import BadRequestError, ServerBusyError
from swarm.launch import LocalSwarm
from swarm.server.server import raise_open_files_limit
from swarm.transport import Connection, FrameReader, TransportLimits

LIMITS = {
    "--max-request-tokens": "64",
    "--max-batch-size": "4",
    "--max-sessions": "8",
    "--max-connections": "40",
    "--frame-timeout": "2",
    "--idle-timeout": "6",
    "--cache-memory": "200KiB",
    "--busy-wait": "0.5",
}
WIDTH = 60  # the tiny Llama's hidden size
PYTHON_ERROR = re.compile(r"Traceback|\b[A-Z][A-Za-z]*(Error|Exception)\b")


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    """(address, reference): the server's address and its output for `HIDDEN` through all its blocks."""
    args = tuple(item for pair in LIMITS.items() for item in pair)
    with LocalSwarm(tiny_llama, ["0:5"], server_args=args, log_dir=tmp_path_factory.mktemp("logs")) as swarm:
        address = swarm.servers[0].address
        SWARMS[address] = swarm
        yield address, forward(address)


SWARMS = {}  # the server's address -> its LocalSwarm


HIDDEN = torch.randn(2, 7, WIDTH, generator=torch.Generator().manual_seed(0))


def forward(address: str, hidden: torch.Tensor = HIDDEN) -> torch.Tensor:
    connection = Connection(address, timeout=30)
    try:
        return connection.request({"method": "forward", "start": 0, "end": 5}, {"hidden_states": hidden})[1]["hidden_states"]
    finally:
        connection.close()


def assert_still_serving(server):
    address, reference = server
    assert torch.equal(forward(address), reference)


def raw_connection(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def frame(header: bytes, body: bytes = b"") -> bytes:
    return wire.FRAME_PREFIX.pack(len(header), len(body)) + header + body


def reply_to(address: str, data: bytes, then_close: bool = False) -> tuple[dict | None, bool]:
    """Sends raw bytes (then ends the connection's way out if `then_close`); returns (the error the server answers
    with, or None if it answered none, whether it then closed the connection)."""
    with raw_connection(address) as sock:
        try:
            sock.sendall(data)
            if then_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server may answer and close before it has read everything
            pass
        try:
            fields, _ = FrameReader(sock).receive(TransportLimits(frame_timeout=10))
        except (ConnectionError, OSError):
            return None, True
        sock.settimeout(0.5)
        try:
            closed = sock.recv(1) == b""
        except socket.timeout:
            closed = False
        except OSError:
            closed = True
    return fields.get("error"), closed


def assert_clear_error(error: dict | None, kind: str, message: str):
    assert error is not None and error["kind"] == kind, error
    assert re.search(message, error["message"]), error
    assert not PYTHON_ERROR.search(error["message"]), error


MALFORMED = {
    "not JSON": (b"{not json", "ProtocolError", "not valid JSON"),
    "nested JSON": (b"[" * 100_000 + b"]" * 100_000, "ProtocolError", "nested too deeply|not valid JSON"),
    "5000-digit integer": (b'{"method": "open", "max_length": ' + b"9" * 5000 + b"}", "ProtocolError", "not valid JSON"),
    "not an object": (b"[1, 2]", "ProtocolError", "must be a JSON object"),
    "tensors not a list": (b'{"method": "forward", "tensors": 7}', "ProtocolError", "must be a list"),
    "boolean dimension": (json.dumps({"tensors": [{"name": "x", "dtype": "float32", "shape": [True, 4]}]}).encode(), "ProtocolError", "invalid shape"),
    "negative dimension": (json.dumps({"tensors": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]}).encode(), "ProtocolError", "invalid shape"),
    "nine dimensions": (json.dumps({"tensors": [{"name": "x", "dtype": "float32", "shape": [1] * 9}]}).encode(), "ProtocolError", "invalid shape"),
    "unknown dtype": (json.dumps({"tensors": [{"name": "x", "dtype": "float64", "shape": [1]}]}).encode(), "ProtocolError", "unsupported dtype"),
    "nameless tensor": (json.dumps({"tensors": [{"dtype": "float32", "shape": [1]}]}).encode(), "ProtocolError", "string 'name'"),
    "body shorter than its tensors": (json.dumps({"tensors": [{"name": "x", "dtype": "float32", "shape": [1000]}]}).encode(), "ProtocolError", "body ends"),
}  # fmt: skip
BAD_REQUESTS = {
    "unknown method": ({"method": "explode"}, {}, "unknown method"),
    "method not a string": ({"method": {"a": 1}}, {}, "unknown method"),
    "close with a dict id": ({"method": "close", "session_id": {}}, {}, "session_id must be a string"),
    "boolean span": ({"method": "forward", "start": True, "end": 5}, {"hidden_states": HIDDEN}, "not within this server's span"),
    "span outside": ({"method": "forward", "start": 0, "end": 6}, {"hidden_states": HIDDEN}, "not within this server's span"),
    "integer hidden states": ({"method": "forward", "start": 0, "end": 5}, {"hidden_states": torch.zeros(1, 2, WIDTH, dtype=torch.int64)}, "must be torch.float32"),
    "two float dtypes": ({"method": "forward", "start": 0, "end": 5}, {"hidden_states": torch.zeros(1, 2, WIDTH, dtype=torch.float16), "attention_mask": torch.ones(1, 2)}, "in one of float32, bfloat16, float16"),
    "wrong width": ({"method": "forward", "start": 0, "end": 5}, {"hidden_states": torch.zeros(1, 2, WIDTH + 1)}, "must have shape"),
    "no hidden states": ({"method": "forward", "start": 0, "end": 5}, {}, "no 'hidden_states'"),
    "empty hidden states": ({"method": "forward", "start": 0, "end": 5}, {"hidden_states": torch.zeros(1, 0, WIDTH)}, "must have shape"),
    "too many positions": ({"method": "forward", "start": 0, "end": 5}, {"hidden_states": torch.zeros(1, 65, WIDTH)}, "max_request_tokens"),
    "too many sequences": ({"method": "forward", "start": 0, "end": 5}, {"hidden_states": torch.zeros(5, 1, WIDTH)}, "max_batch_size"),
    "max_length of 10**9": ({"method": "open", "start": 0, "end": 5, "max_length": 10**9}, {}, "exceeds this server's limit"),
    "boolean max_length": ({"method": "open", "start": 0, "end": 5, "max_length": True}, {}, "positive int"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frames_get_a_clear_error_and_a_closed_connection(server, case):
    header, kind, message = MALFORMED[case]
    error, closed = reply_to(server[0], frame(header))
    assert_clear_error(error, kind, message)
    assert closed
    assert_still_serving(server)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_clear_error_and_the_connection_stays(server, case):
    fields, tensors, message = BAD_REQUESTS[case]
    connection = Connection(server[0], timeout=30)
    try:
        with pytest.raises(BadRequestError, match=message) as error:
            connection.request(fields, tensors)
        assert not PYTHON_ERROR.search(str(error.value).split(": ", 1)[1])
        assert torch.equal(connection.request({"method": "forward", "start": 0, "end": 5}, {"hidden_states": HIDDEN})[1]["hidden_states"], server[1])
    finally:
        connection.close()


def test_huge_declared_sizes_are_refused_before_any_byte_of_them(server):
    for header_length, body_length in [(2**31 - 1, 0), (10, 2**31 - 1), (10, 2**30)]:
        error, closed = reply_to(server[0], wire.FRAME_PREFIX.pack(header_length, body_length) + b"{}")
        assert error is not None and error["kind"] == "ProtocolError" and "exceeds the limit" in error["message"]
        assert closed
    assert_still_serving(server)


def test_truncated_frames_cost_nothing(server):
    for data in [b"\x01", wire.FRAME_PREFIX.pack(100, 0) + b'{"method"', frame(b'{"tensors": [{"name": "x", "dtype": "float32", "shape": [4]}]}')[:-2]]:
        with raw_connection(server[0]) as sock:
            sock.sendall(data)
    assert_still_serving(server)


def test_a_frame_dripping_in_is_cut_off_at_the_frame_timeout(server):
    data = frame(json.dumps({"method": "info"}).encode())
    with raw_connection(server[0]) as sock:
        started = time.monotonic()
        closed_after = None
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
                time.sleep(0.4)
                sock.setblocking(False)
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed_after = time.monotonic() - started
                break
            finally:
                sock.setblocking(True)
    assert closed_after is not None and closed_after < 2 + 2, closed_after  # --frame-timeout 2
    assert_still_serving(server)


def test_idle_connections_are_closed(server):
    with raw_connection(server[0]) as sock:
        sock.settimeout(15)
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert 5 < time.monotonic() - started < 12  # --idle-timeout 6
    assert_still_serving(server)


def test_connections_past_the_limit_are_told_busy_and_the_server_recovers(server):
    raise_open_files_limit()
    sockets = []
    try:
        for _ in range(1000):
            sockets.append(raw_connection(server[0]))
        refused = []
        for sock in sockets[40:]:  # --max-connections 40
            fields, _ = FrameReader(sock).receive(TransportLimits(frame_timeout=10))
            refused.append(fields["error"])
        assert all(error["kind"] == "Busy" and "at most 40 connections" in error["message"] for error in refused)
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the server's threads notice the closed connections
        try:
            assert_still_serving(server)
            break
        except ServerBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_sessions_past_the_limit_are_told_busy(server):
    connections = [Connection(server[0], timeout=30) for _ in range(9)]
    try:
        for connection in connections[:8]:  # --max-sessions 8
            connection.request({"method": "open", "start": 0, "end": 5, "max_length": 16})
        for _ in range(92):  # 100 sessions asked for in all
            with pytest.raises(ServerBusyError, match="limit of 8 open sessions"):
                connections[8].request({"method": "open", "start": 0, "end": 5, "max_length": 16})
    finally:
        for connection in connections:
            connection.close()  # closing a connection frees its sessions
    time.sleep(0.5)
    connection = Connection(server[0], timeout=30)
    try:
        connection.request({"method": "open", "start": 0, "end": 5, "max_length": 16})
    finally:
        connection.close()
    assert_still_serving(server)


def test_steps_past_the_cache_memory_wait_then_are_told_busy(server):
    """Each position of a session costs 5 layers x 2 x 2 heads x 10 x 4 bytes = 800 bytes per sequence here."""
    connection = Connection(server[0], timeout=30)
    try:
        session = connection.request({"method": "open", "start": 0, "end": 5, "max_length": 1000})[0]
        for _ in range(4):  # 4 x 64 positions x 800 bytes: 200 KiB, the whole budget
            connection.request({"method": "step", **session}, {"hidden_states": torch.zeros(1, 64, WIDTH)})
        started = time.monotonic()
        with pytest.raises(ServerBusyError, match="cache memory limit"):
            connection.request({"method": "step", **session}, {"hidden_states": torch.zeros(1, 1, WIDTH)})
        assert time.monotonic() - started >= 0.5  # --busy-wait 0.5
        connection.request({"method": "close", **session})
    finally:
        connection.close()
    assert_still_serving(server)


def test_a_request_whose_client_has_gone_is_dropped_not_computed(server):
    """Requests queue for the one compute thread: those whose client has closed its connection meanwhile are
    dropped (the server says so in its log)."""
    swarm = SWARMS[server[0]]
    request = frame(json.dumps({"method": "forward", "start": 0, "end": 5, "tensors": [{"name": "hidden_states", "dtype": "float32", "shape": [4, 16, WIDTH]}]}).encode(), bytes(4 * 16 * WIDTH * 4))
    busy = [raw_connection(server[0]) for _ in range(6)]
    for sock in busy:  # the compute thread has work queued; the clients leave without waiting for it
        sock.sendall(request)
        sock.close()
    deadline = time.monotonic() + 10
    while not any("its client has gone" in line for line in swarm.servers[0].lines):
        assert time.monotonic() < deadline, swarm.servers[0].output()
        time.sleep(0.1)
    assert_still_serving(server)


def test_steps_past_max_length_are_refused(server):
    connection = Connection(server[0], timeout=30)
    try:
        session = connection.request({"method": "open", "start": 0, "end": 5, "max_length": 4})[0]
        connection.request({"method": "step", **session}, {"hidden_states": torch.zeros(1, 3, WIDTH)})
        with pytest.raises(BadRequestError, match="past the session's max_length 4"):
            connection.request({"method": "step", **session}, {"hidden_states": torch.zeros(1, 2, WIDTH)})
    finally:
        connection.close()
    assert_still_serving(server)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), declared=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)))
def test_random_bytes_never_break_the_server(server, data, declared):
    reply_to(server[0], struct.pack("<II", *declared) + data, then_close=True)
    reply_to(server[0], frame(data), then_close=True)


def test_eight_clients_generate_while_a_fuzzer_runs(server, tiny_llama, local_tiny_llama):
    """Eight clients (threads of one client model, a session each) generate while another thread sends malformed
    frames and bad requests as fast as it can: every output is the local model's."""
    prompts = [torch.randint(3, 131, (1, 4 + index), generator=torch.Generator().manual_seed(index)) for index in range(8)]
    expected = [local_tiny_llama.generate(prompt, max_new_tokens=12, do_sample=False) for prompt in prompts]
    model = AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=SWARMS[server[0]].initial_peers)
    stop, outputs, errors = threading.Event(), {}, []

    def fuzz():
        cases = [frame(header) for header, _, _ in MALFORMED.values()] + [wire.FRAME_PREFIX.pack(10, 2**30) + b"{}"]
        while not stop.is_set():
            for data in cases:
                reply_to(server[0], data, then_close=True)

    def generate(index: int):
        try:
            outputs[index] = model.generate(prompts[index], max_new_tokens=12, do_sample=False)
        except Exception as error:
            errors.append(error)

    fuzzer = threading.Thread(target=fuzz, daemon=True)
    fuzzer.start()
    clients = [threading.Thread(target=generate, args=(index,)) for index in range(8)]
    try:
        for client in clients:
            client.start()
        for client in clients:
            client.join(120)
    finally:
        stop.set()
        fuzzer.join(30)
        model.remote.shutdown()
    assert not errors, errors
    assert all(torch.equal(outputs[index], expected[index]) for index in range(8))


def test_after_the_fuzzing_the_server_still_serves(server):
    assert_still_serving(server)
