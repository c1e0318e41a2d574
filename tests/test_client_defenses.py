"""What a client does with servers that misbehave, on 127.0.0.1: replies that are not what was asked for (from a
lying server, `tests.lying_server`), internal errors, replies that drip in or declare huge sizes, and servers that
take fewer positions per request than a prompt holds. Generation stays identical to the local model.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.client.retry import RetryPolicy
from swarm.errors import BadRequestError, InternalServerError, PeerError, PeerTimeoutError
from swarm.launch import LocalSwarm
from swarm.transport import Connection, TransportLimits
from tests.conftest import assert_same_generation, generate_both
from tests.lying_server import start_liar

ROWS = 16  # --max-request-tokens of the honest server: a prompt of 2 x 20 tokens goes as three steps


@pytest.fixture(scope="module")
def honest_swarm(tiny_llama, tmp_path_factory):
    args = ("--max-request-tokens", str(ROWS))
    with LocalSwarm(tiny_llama, ["0:5"], server_args=args, log_dir=tmp_path_factory.mktemp("logs")) as swarm:
        yield swarm


def prompt() -> torch.Tensor:
    return torch.randint(3, 131, (2, 20), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("mode", ["shape", "extra", "dtype", "length"])
def test_a_server_whose_replies_are_not_what_was_asked_is_left_out(honest_swarm, tiny_llama, local_tiny_llama, mode, tmp_path):
    liar, liar_id = start_liar(mode, tiny_llama, honest_swarm.initial_peers, tmp_path / "liar.log")
    try:
        config = ClientConfig(initial_peers=honest_swarm.initial_peers, pinned_peers={liar_id})
        model = AutoDistributedModel.from_pretrained(tiny_llama, client_config=config)
        try:
            remote, expected = generate_both(model, local_tiny_llama, prompt(), max_new_tokens=6)
            assert_same_generation(remote, expected)
            assert liar_id in model.remote.banned_until
        finally:
            model.remote.shutdown()
    finally:
        liar.stop()


def test_an_internal_error_on_two_servers_is_raised_naming_both(tiny_llama, tmp_path):
    retry = RetryPolicy(max_attempts=10, total_timeout=60)
    with LocalSwarm(tiny_llama, [], log_dir=tmp_path) as swarm:
        liars = [start_liar("fail", tiny_llama, swarm.initial_peers, tmp_path / f"liar-{index}.log") for index in range(2)]
        try:
            model = AutoDistributedModel.from_pretrained(tiny_llama, client_config=ClientConfig(initial_peers=swarm.initial_peers, retry=retry))
            try:
                started = time.monotonic()
                with pytest.raises(InternalServerError, match="two servers failed on the same request") as error:
                    model.generate(prompt()[:, :4], max_new_tokens=2)
                assert time.monotonic() - started < 10
                assert all(process.address in str(error.value) for process, _ in liars)
                assert "RuntimeError" not in str(error.value) and "on purpose" not in str(error.value)
                assert len([peer for peer, _ in model.remote.banned_until.items()]) == 1  # the second is not banned
            finally:
                model.remote.shutdown()
        finally:
            for liar, _ in liars:
                liar.stop()


def test_a_prompt_longer_than_a_server_takes_goes_in_steps_that_fit(honest_swarm, tiny_llama, local_tiny_llama):
    model = AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=honest_swarm.initial_peers)
    try:
        remote, expected = generate_both(model, local_tiny_llama, prompt(), max_new_tokens=5)
        assert_same_generation(remote, expected)
        with pytest.raises(BadRequestError, match=f"at most {ROWS} in one request \\(max_request_tokens\\)"):
            model(prompt())  # a forward without a session cannot be split
    finally:
        model.remote.shutdown()


def misbehaving_peer(reply: bytes, pause: float) -> tuple[str, threading.Event]:
    """A TCP peer on 127.0.0.1 that answers the first request with `reply`, a byte every `pause` seconds."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve():
        with listener, listener.accept()[0] as sock:
            sock.recv(65536)
            for byte in reply:
                if done.wait(pause):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return
            done.wait(30)

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}", done


def test_a_reply_that_drips_in_times_out_at_the_request_deadline():
    address, done = misbehaving_peer(b"\x02\x00\x00\x00\x00\x00\x00\x00{}", pause=0.3)
    try:
        connection = Connection(address, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(PeerTimeoutError):
            connection.request({"method": "info"})
        assert time.monotonic() - started < 1.5  # the whole reply's deadline, not each byte's
    finally:
        done.set()


def test_a_reply_declaring_a_huge_size_is_refused_at_once():
    address, done = misbehaving_peer(b"\x02\x00\x00\x00\xff\xff\xff\x7f{}", pause=0)
    try:
        connection = Connection(address, timeout=5.0, limits=TransportLimits(max_message_bytes=1 << 20))
        started = time.monotonic()
        with pytest.raises(PeerError, match="exceeds the limit"):
            connection.request({"method": "info"})
        assert time.monotonic() - started < 1
    finally:
        done.set()


def test_a_session_that_expired_on_its_server_is_replayed(tiny_llama, local_tiny_llama, tmp_path):
    """The user pauses longer than the servers keep an idle session: the next turn replays the conversation on a
    new session (the servers are healthy: none is left out) and goes on exactly."""
    with LocalSwarm(tiny_llama, ["0:2", "2:5"], server_args=("--session-timeout", "1"), log_dir=tmp_path) as swarm:
        model = AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers)
        try:
            first, second = prompt()[:1, :6], prompt()[1:, :4]
            with model.inference_session(max_length=40):
                turn_one = model.generate(first, max_new_tokens=5, do_sample=False)
                time.sleep(3)  # the servers close the idle session
                turn_two = model.generate(second, max_new_tokens=5, do_sample=False)
            conversation = torch.cat([turn_one, second], dim=1)
            expected = local_tiny_llama.generate(conversation, max_new_tokens=5, do_sample=False)
            assert torch.equal(torch.cat([turn_one, turn_two], dim=1), expected)
            assert not model.remote.banned_until
        finally:
            model.remote.shutdown()
