"""Server-to-server push (`swarm.server.push`): the servers of a route pass each step's hidden states on to the next
one themselves, and the client reads every hop's outputs. Against the local model: greedy, beams and sampling over
three servers; a server killed mid-generation; a server that its predecessor cannot reach (the client relays that
link, and only that one); bad push requests answered by name."""

from __future__ import annotations

import signal

import pytest
import torch

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.client.retry import RetryPolicy
from swarm.errors import BadRequestError, PeerError
from swarm.launch import LocalSwarm
from swarm.transport import Connection
from tests.conftest import assert_same_generation, generate_both
from tests.test_failover import ActAtToken

SPANS = ["0:2", "2:4", "4:5"]


def push_counts(remote) -> dict[str, dict[str, int]]:
    """Each live server's push counts (its `info`), by address."""
    records = {record.peer_id: record for block in remote.fetch_records() for record in block}
    counts = {}
    for record in records.values():
        try:
            info, _ = remote.connection(record).request({"method": "info"})
        except PeerError:
            continue  # a server that died
        counts[record.address] = {name[len("steps_") :]: value for name, value in info.items() if name.startswith("steps_")}
    return counts


def connect(model_dir, swarm, **config) -> AutoDistributedModel:
    retry = RetryPolicy(max_attempts=5, base_delay=0.05, total_timeout=20)
    return AutoDistributedModel.from_pretrained(model_dir, client_config=ClientConfig(initial_peers=swarm.initial_peers, retry=retry, **config))


@pytest.fixture(scope="module")
def swarm_3(tiny_llama, tmp_path_factory):
    with LocalSwarm(tiny_llama, SPANS, log_dir=tmp_path_factory.mktemp("logs")) as swarm:
        yield swarm


def test_push_gives_the_local_models_tokens_and_the_servers_push(swarm_3, tiny_llama, local_tiny_llama):
    model = connect(tiny_llama, swarm_3)
    try:
        before = push_counts(model.remote)
        prompt = torch.randint(3, 131, (2, 7), generator=torch.Generator().manual_seed(5))
        assert_same_generation(*generate_both(model, local_tiny_llama, prompt))
        beams = generate_both(model, local_tiny_llama, prompt, num_beams=3, do_sample=False, max_new_tokens=8)
        assert torch.equal(beams[0].sequences, beams[1].sequences)
        torch.manual_seed(11)
        sampled = model.generate(prompt, do_sample=True, top_k=20, max_new_tokens=8)
        torch.manual_seed(11)
        assert torch.equal(sampled, local_tiny_llama.generate(prompt, do_sample=True, top_k=20, max_new_tokens=8))
        after = push_counts(model.remote)
    finally:
        model.remote.shutdown()
    first, middle, last = (swarm_3.servers[index].address for index in range(3))
    steps = 12 + 8 + 8  # one push per step and hop, the prefill included
    assert after[first]["pushed"] - before[first]["pushed"] == steps and after[first]["received"] == before[first]["received"]
    assert after[middle]["received"] - before[middle]["received"] == steps and after[middle]["pushed"] - before[middle]["pushed"] == steps
    assert after[last]["received"] - before[last]["received"] == steps and after[last]["pushed"] == before[last]["pushed"]
    assert all(after[address]["push_failed"] == before[address]["push_failed"] for address in after)


def test_relay_mode_pushes_nothing(swarm_3, tiny_llama, local_tiny_llama):
    model = connect(tiny_llama, swarm_3, push=False)
    try:
        before = push_counts(model.remote)
        assert_same_generation(*generate_both(model, local_tiny_llama, torch.tensor([[5, 6, 7]])))
        assert push_counts(model.remote) == before
    finally:
        model.remote.shutdown()


def test_bad_push_requests_are_refused_by_name(swarm_3, tiny_llama):
    model = connect(tiny_llama, swarm_3)
    try:
        with model.inference_session(max_length=16) as session:
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
            hop = session._server_sessions[1]
            before = push_counts(model.remote)[hop.hop.server.address]["refused"]
            connection = Connection(hop.hop.server.address, 10)
            hidden = torch.zeros(1, 1, model.config.hidden_size)
            for session_id, position in ((hop.session_id, 1), ("nope", hop.length)):  # a stale push, an unknown session
                connection.send({"method": "push", "session_id": session_id, "position": position}, {"hidden_states": hidden})
            with pytest.raises(BadRequestError, match="push_to.address must be HOST:PORT"):
                connection.request({"method": "step", "session_id": hop.session_id, "push_to": {"address": "x"}}, {"hidden_states": hidden})
            with pytest.raises(BadRequestError, match="await_push is true, with a position and no tensors"):
                connection.request({"method": "step", "session_id": hop.session_id, "await_push": True}, {})
            connection.close()
            # no reply to either: the unknown session's push is dropped at once, the stale one is never run
            assert push_counts(model.remote)[hop.hop.server.address]["refused"] == before + 1
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)  # the session goes on
            assert hop.length == 9  # 3 + 2 tokens, then 3 + 2 more, the last one not yet run
    finally:
        model.remote.shutdown()


def test_a_server_killed_mid_generation_in_push_mode_keeps_the_output(tiny_llama, local_tiny_llama, tmp_path):
    with LocalSwarm(tiny_llama, ["0:2", "2:4", "2:4", "4:5"], log_dir=tmp_path) as swarm:
        model = connect(tiny_llama, swarm)
        input_ids = torch.tensor([[11, 12, 13, 14, 15]])
        expected = local_tiny_llama.generate(input_ids, max_new_tokens=16)
        try:
            with model.inference_session(max_length=32) as session:
                victim = next(server for server in swarm.servers if server.address == session.route[1].server.address)
                result = model.generate(input_ids, max_new_tokens=16, streamer=ActAtToken(6, lambda: victim.signal(signal.SIGKILL)))
                assert victim.process.wait(5) is not None and session.route[1].server.address != victim.address
            counts = push_counts(model.remote)
        finally:
            model.remote.shutdown()
    assert torch.equal(result, expected)
    assert counts[session.route[1].server.address]["received"] > 0, "the replacement did not run from pushes"


def test_a_server_its_predecessor_cannot_reach_is_relayed(tiny_llama, local_tiny_llama, tmp_path):
    """The middle server sits behind a proxy that refuses other servers (they dial from 127.0.0.1) but not the
    client (from 127.0.0.2): its predecessor reports the failed push, and the client relays that link only."""
    with LocalSwarm(tiny_llama, ["0:2"], log_dir=tmp_path) as swarm:
        blocked = LocalSwarm(tiny_llama, ["2:4"], log_dir=tmp_path / "blocked", initial_peers=swarm.initial_peers,
                             proxy_args=("--refuse-from", "127.0.0.1"))  # fmt: skip
        with blocked, LocalSwarm(tiny_llama, ["4:5"], log_dir=tmp_path / "last", initial_peers=swarm.initial_peers) as last:
            model = connect(tiny_llama, swarm, source_host="127.0.0.2")
            try:
                prompt = torch.randint(3, 131, (1, 6), generator=torch.Generator().manual_seed(2))
                assert_same_generation(*generate_both(model, local_tiny_llama, prompt))
                counts = push_counts(model.remote)
                relayed = set(model.remote.relayed_links)
            finally:
                model.remote.shutdown()
        first, middle, final = swarm.servers[0].address, blocked.servers[0].address, last.servers[0].address
        assert counts[first]["push_failed"] == 1 and counts[first]["pushed"] == 0, counts
        assert counts[middle]["pushed"] == 12 and counts[final]["received"] == 12, counts
        assert len(relayed) == 1
