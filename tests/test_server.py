"""The server: its CLI, and bad input that gets a clear error while the server keeps serving everyone else."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import hivemind
import pytest
import torch

from swarm import AutoDistributedModel, wire
from swarm.client.config import ClientConfig
from swarm.errors import BadRequestError, PeerError, SessionExpiredError
from swarm.launch import LocalSwarm, PeerProcess, run_peer
from swarm.records import ServerState, fetch_records
from swarm.transport import Connection


def run_server_cli(*args, timeout=60):
    """The exit code and output of `python -m swarm.server *args`, run to its end."""
    return run_peer(["-m", "swarm.server", *args], timeout, name="server")


def test_cli_new_swarm_prints_multiaddrs_and_serves(tiny_llama, local_tiny_llama):
    server = PeerProcess(
        ["-m", "swarm.server", str(tiny_llama), "--new-swarm", "--host", "127.0.0.1", "--blocks", "0:5"],
        name="server",
    )
    try:
        maddrs = server.wait_for(r"--initial-peers (/ip4/\S+)", timeout=60).group(1).split()
        ready = server.wait_for(r"ready: .*", timeout=120).group(0)
        assert "tiny-llama" in ready and "0:5" in ready
        model = AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=maddrs, coverage_timeout=30)
        input_ids = torch.tensor([[5, 6, 7, 8]])
        assert torch.equal(model.generate(input_ids, max_new_tokens=4), local_tiny_llama.generate(input_ids, max_new_tokens=4))
        model.remote.shutdown()
    finally:
        server.stop()


def test_sigterm_announces_offline_and_exits_quickly(tiny_llama):
    with LocalSwarm(tiny_llama, ["0:5"]) as swarm:
        server = swarm.servers[0]
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        server.process.wait(timeout=15)
        assert time.monotonic() - started < 5
        assert server.process.returncode == 0
        reader = hivemind.DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True)
        try:
            records = fetch_records(reader, "tiny-llama", 5)
        finally:
            reader.shutdown()
        assert all(len(block) == 1 and block[0].state == ServerState.OFFLINE for block in records), records


def test_path_that_is_not_a_model_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, output = run_server_cli(str(tmp_path), "--new-swarm", "--host", "127.0.0.1")
    assert code == 2
    assert "not a model" in output and str(tmp_path) in output
    code, output = run_server_cli(str(tmp_path / "missing"), "--new-swarm", "--host", "127.0.0.1")
    assert code == 2 and "neither a local model directory" in output


def test_span_outside_the_model_is_rejected(tiny_llama):
    code, output = run_server_cli(str(tiny_llama), "--blocks", "3:9", "--new-swarm", "--host", "127.0.0.1")
    assert code == 2
    assert "3:9" in output and "0:5" in output
    code, output = run_server_cli(str(tiny_llama), "--blocks", "4:2", "--new-swarm", "--host", "127.0.0.1")
    assert code == 2 and "START:END" in output


@pytest.fixture
def first_server(llama_swarm_3):
    connection = Connection(llama_swarm_3.servers[0].address, timeout=30)
    yield connection
    connection.close()


def open_session(connection, max_length=8):
    reply, _ = connection.request({"method": "open", "start": 0, "end": 1, "max_length": max_length})
    return reply["session_id"]


def step(connection, session_id, hidden):
    return connection.request({"method": "step", "session_id": session_id}, {"hidden_states": hidden})


def test_bad_steps_get_clear_errors(first_server):
    session_id = open_session(first_server)
    with pytest.raises(BadRequestError, match=r"hidden_states must have shape \(batch, tokens, 60\)"):
        step(first_server, session_id, torch.zeros(1, 2, 59))
    with pytest.raises(BadRequestError, match="must be torch.float32"):
        step(first_server, session_id, torch.zeros(1, 2, 60, dtype=torch.int64))
    reply, outputs = step(first_server, session_id, torch.zeros(1, 6, 60))
    assert reply["length"] == 6 and outputs["hidden_states"].shape == (1, 6, 60)
    with pytest.raises(BadRequestError, match="past the session's max_length 8"):
        step(first_server, session_id, torch.zeros(1, 3, 60))
    with pytest.raises(BadRequestError, match="batch of 1"):
        step(first_server, session_id, torch.zeros(2, 1, 60))
    with pytest.raises(BadRequestError, match="unexpected tensors"):
        first_server.request({"method": "step", "session_id": session_id}, {"hidden_states": torch.zeros(1, 1, 60), "x": torch.zeros(1)})
    reply, _ = step(first_server, session_id, torch.zeros(1, 2, 60))
    assert reply["length"] == 8


def test_unknown_and_closed_sessions(first_server):
    with pytest.raises(SessionExpiredError, match="holds no session"):
        step(first_server, "no-such-session", torch.zeros(1, 1, 60))
    session_id = open_session(first_server)
    assert first_server.request({"method": "close", "session_id": session_id})[0]["closed"]
    with pytest.raises(SessionExpiredError, match="holds no session"):
        step(first_server, session_id, torch.zeros(1, 1, 60))


def test_bad_requests(first_server):
    with pytest.raises(BadRequestError, match="unknown method"):
        first_server.request({"method": "explode"})
    with pytest.raises(BadRequestError, match=r"not within this server's span \[0, 1\)"):
        first_server.request({"method": "forward", "start": 0, "end": 3}, {"hidden_states": torch.zeros(1, 1, 60)})
    with pytest.raises(BadRequestError, match="max_length"):
        first_server.request({"method": "open", "start": 0, "end": 1, "max_length": 10**9})
    with pytest.raises(BadRequestError, match="no 'hidden_states'"):
        first_server.request({"method": "forward", "start": 0, "end": 1})


def test_malformed_messages_do_not_disturb_other_clients(llama_swarm_3, first_server, tiny_llama, local_tiny_llama):
    host, port = llama_swarm_3.servers[0].address.split(":")
    garbage = [b"\xff" * 64, b"\x05\x00\x00\x00\x00\x00\x00\x00{nope", _frame({"tensors": [{"name": "x", "dtype": "f", "shape": [1]}]})]
    for payload in garbage:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                reply = sock.recv(65536)
            except OSError:  # the server may answer and close before we finish sending
                reply = b""
        assert b"error" in reply or reply == b""
    reply, outputs = first_server.request({"method": "echo"}, {"x": torch.ones(3)})
    assert torch.equal(outputs["x"], torch.ones(3))
    model = AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=llama_swarm_3.initial_peers)
    input_ids = torch.tensor([[9, 10, 11]])
    assert torch.equal(model.generate(input_ids, max_new_tokens=3), local_tiny_llama.generate(input_ids, max_new_tokens=3))
    model.remote.shutdown()


def test_a_client_that_stops_reading_does_not_hold_up_the_others(llama_swarm_3, first_server):
    """The compute thread sends replies; a reply the client does not read must not block it."""
    host, port = llama_swarm_3.servers[0].address.split(":")
    hidden = torch.zeros(64, 256, 60)  # the largest request the default limits take: three replies of 3.9 MB are
    # more than the socket buffers hold
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = wire.encode({"method": "forward", "start": 0, "end": 1}, {"hidden_states": hidden})
        # sent from a thread: the server may stop reading this connection while its reply waits for room
        sender = threading.Thread(target=_send_ignoring_errors, args=(sock, b"".join(request) * 3))
        sender.start()
        session_id = open_session(first_server)
        started = time.monotonic()
        reply, outputs = step(first_server, session_id, torch.ones(1, 3, 60))
        assert reply["length"] == 3 and time.monotonic() - started < 10
        forward = {"method": "forward", "start": 0, "end": 1}
        _, outputs = first_server.request(forward, {"hidden_states": torch.ones(1, 2, 60)})
        assert outputs["hidden_states"].shape == (1, 2, 60)
        sender.join(timeout=15)


def _send_ignoring_errors(sock: socket.socket, data: bytes):
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_connection_to_a_dead_address_is_a_peer_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PeerError):
        Connection(f"127.0.0.1:{port}", timeout=5)


def _frame(header: dict) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(4, "little") + (4).to_bytes(4, "little") + encoded + b"\0" * 4


@pytest.fixture(scope="module")
def bfloat16_swarm(tiny_llama):
    args = ("--dtype", "bfloat16", "--session-timeout", "1")
    with LocalSwarm(tiny_llama, ["0:5"], server_args=args) as swarm:
        yield swarm


def test_idle_sessions_are_freed(bfloat16_swarm):
    connection = Connection(bfloat16_swarm.servers[0].address, timeout=30)
    try:
        reply, _ = connection.request({"method": "open", "start": 0, "end": 5, "max_length": 4})
        time.sleep(3)
        with pytest.raises(SessionExpiredError, match="holds no session"):
            step(connection, reply["session_id"], torch.zeros(1, 1, 60, dtype=torch.bfloat16))
    finally:
        connection.close()


def test_bfloat16_server_serves_a_float32_client(bfloat16_swarm, tiny_llama, local_tiny_llama):
    model = AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=bfloat16_swarm.initial_peers)
    try:
        input_ids = torch.tensor([[7, 8, 9, 10, 11]])
        with torch.no_grad():
            logits = model(input_ids).logits
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, local_tiny_llama(input_ids).logits, atol=0.1, rtol=0.05)
        assert model.generate(input_ids, max_new_tokens=4).shape == (1, 9)
    finally:
        model.remote.shutdown()


def test_hidden_states_travel_in_the_dtype_the_client_asks_for(bfloat16_swarm, tiny_llama):
    """A bfloat16 server computes in bfloat16 whatever its inputs come in, and answers in the dtype they came in."""
    connection = Connection(bfloat16_swarm.servers[0].address, timeout=30)
    forward = {"method": "forward", "start": 0, "end": 5}
    hidden = torch.randn(2, 3, 60).bfloat16()
    try:
        outputs = {dtype: connection.request(forward, {"hidden_states": hidden.to(dtype)})[1]["hidden_states"]
                   for dtype in (torch.bfloat16, torch.float32, torch.float16)}  # fmt: skip
        with pytest.raises(BadRequestError, match="in one of float32, bfloat16, float16"):
            connection.request(forward, {"hidden_states": hidden, "position_ids": torch.zeros(1, 3)})
    finally:
        connection.close()
    assert {dtype: output.dtype for dtype, output in outputs.items()} == {dtype: dtype for dtype in outputs}
    assert torch.equal(outputs[torch.float32], outputs[torch.bfloat16].float())
    assert torch.equal(outputs[torch.float16], outputs[torch.bfloat16].half())
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        ClientConfig(wire_dtype="int8")
    input_ids = torch.tensor([[7, 8, 9, 10, 11]])
    logits = {}
    for wire_dtype in (None, "float32"):
        config = ClientConfig(initial_peers=bfloat16_swarm.initial_peers, wire_dtype=wire_dtype)
        model = AutoDistributedModel.from_pretrained(tiny_llama, client_config=config)
        try:
            with torch.no_grad():
                logits[wire_dtype] = model(input_ids).logits
        finally:
            model.remote.shutdown()
    assert torch.equal(logits[None], logits["float32"])  # the server rounds to bfloat16 as the client would have


def test_half_precision_on_the_wire_to_float32_servers(llama_swarm_3, tiny_llama, local_tiny_llama):
    config = ClientConfig(initial_peers=llama_swarm_3.initial_peers, wire_dtype="float16")
    model = AutoDistributedModel.from_pretrained(tiny_llama, client_config=config)
    input_ids = torch.tensor([[7, 8, 9, 10, 11]])
    try:
        with torch.no_grad():
            logits, expected = model(input_ids).logits, local_tiny_llama(input_ids).logits
    finally:
        model.remote.shutdown()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-2, rtol=0)
    assert not torch.allclose(logits, expected, atol=1e-6, rtol=0), "the hidden states were not rounded on the way"
