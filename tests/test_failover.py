"""Fault tolerance with real processes: a peer dying, hanging or leaving mid-generation never changes the answer."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.client.retry import RetryPolicy
from swarm.errors import SwarmUnavailableError
from swarm.launch import LocalSwarm


class ActAtToken:
    """A streamer that calls `action()` once `count` new tokens have been generated."""

    def __init__(self, count: int, action):
        self.count, self.action, self.seen, self.prompt_seen = count, action, 0, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.seen += 1
        if self.seen == self.count:
            self.action()

    def end(self):
        pass


def connect(model_dir, swarm, **config):
    client_config = ClientConfig(retry=RetryPolicy(max_attempts=5, base_delay=0.05, total_timeout=20), **config)
    return AutoDistributedModel.from_pretrained(model_dir, initial_peers=swarm.initial_peers, client_config=client_config)


def server_of(swarm, hop):
    return next(server for server in swarm.servers if server.address == hop.server.address)


@pytest.fixture
def replicated_swarm(tiny_llama, tmp_path):
    with LocalSwarm(tiny_llama, ["0:2", "2:5", "2:5"], log_dir=tmp_path) as swarm:
        yield swarm


@pytest.mark.parametrize("sampling", [False, True])
def test_sigkill_of_a_replica_mid_generation_keeps_the_output(replicated_swarm, tiny_llama, local_tiny_llama, sampling):
    model = connect(tiny_llama, replicated_swarm)
    input_ids = torch.tensor([[11, 12, 13, 14, 15]])
    settings = dict(max_new_tokens=16, do_sample=sampling, top_k=30)
    torch.manual_seed(7)
    expected = local_tiny_llama.generate(input_ids, **settings)
    try:
        with model.inference_session(max_length=32) as session:
            victim = server_of(replicated_swarm, session.route[1])
            torch.manual_seed(7)
            result = model.generate(input_ids, streamer=ActAtToken(8, lambda: victim.signal(signal.SIGKILL)), **settings)
            assert victim.process.wait(5) is not None
            assert session.route[1].server.address != victim.address
    finally:
        model.remote.shutdown()
    assert torch.equal(result, expected)


def test_hung_server_is_replaced_after_the_step_timeout(replicated_swarm, tiny_llama, local_tiny_llama):
    model = connect(tiny_llama, replicated_swarm, step_timeout=2.0)
    input_ids = torch.tensor([[21, 22, 23]])
    expected = local_tiny_llama.generate(input_ids, max_new_tokens=10)
    victim = None
    try:
        with model.inference_session(max_length=16) as session:
            victim = server_of(replicated_swarm, session.route[1])
            started = time.monotonic()
            result = model.generate(input_ids, max_new_tokens=10, streamer=ActAtToken(4, lambda: victim.signal(signal.SIGSTOP)))
            elapsed = time.monotonic() - started
    finally:
        if victim is not None:
            victim.signal(signal.SIGCONT)
        model.remote.shutdown()
    assert torch.equal(result, expected)
    assert 2.0 <= elapsed < 15


def test_losing_the_only_server_of_a_span_raises_a_clear_error_in_time(tiny_llama, tmp_path):
    with LocalSwarm(tiny_llama, ["0:2", "2:5"], log_dir=tmp_path) as swarm:
        model = connect(tiny_llama, swarm)
        model.remote.config.retry = RetryPolicy(max_attempts=4, base_delay=0.1, total_timeout=3)
        try:
            with model.inference_session(max_length=30):
                started = time.monotonic()
                with pytest.raises(SwarmUnavailableError, match=r"blocks 2:5") as error:
                    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, streamer=ActAtToken(3, lambda: swarm.servers[1].signal(signal.SIGKILL)))
                assert time.monotonic() - started < 10
                assert "2:5" in str(error.value)
        finally:
            model.remote.shutdown()


def test_sigterm_lets_active_sessions_finish(tiny_llama, local_tiny_llama, tmp_path):
    with LocalSwarm(tiny_llama, ["0:5", "0:5"], server_args=("--shutdown-grace", "20"), log_dir=tmp_path) as swarm:
        model = connect(tiny_llama, swarm)
        input_ids = torch.tensor([[31, 32, 33, 34]])
        try:
            with model.inference_session(max_length=30) as session:
                leaving = server_of(swarm, session.route[0])
                result = model.generate(input_ids, max_new_tokens=12, streamer=ActAtToken(3, lambda: leaving.signal(signal.SIGTERM)))
                assert session.route[0].server.address == leaving.address, "the session should finish where it started"
                assert leaving.process.poll() is None, "a leaving server waits for its active sessions"
                with model.inference_session(max_length=10) as next_session:
                    assert next_session.route[0].server.address != leaving.address
            assert leaving.process.wait(10) == 0
        finally:
            model.remote.shutdown()
    assert torch.equal(result, local_tiny_llama.generate(input_ids, max_new_tokens=12))


def test_server_joining_mid_session_is_used_by_the_next_session(tiny_llama, tmp_path):
    with LocalSwarm(tiny_llama, ["0:2", "2:5"], log_dir=tmp_path) as swarm:
        model = connect(tiny_llama, swarm, records_max_age=0.0)
        try:
            with model.inference_session(max_length=20) as session:
                model.generate(torch.tensor([[5, 6]]), max_new_tokens=3)
                newcomer = swarm.add_server("0:5")
                swarm.servers[1].signal(signal.SIGTERM)
                model.generate(None, max_new_tokens=3)
                assert newcomer.address not in [hop.server.address for hop in session.route]
            with model.inference_session(max_length=20) as session:
                assert session.route[-1].server.address == newcomer.address
        finally:
            model.remote.shutdown()
