"""A private swarm on 127.0.0.1 (`--swarm-key FILE`) and a keyless intruder: the intruder can neither read nor
write the swarm's records nor call its servers, while a client holding the key generates like the local model.
Also: a server's identity is its key (`--identity PATH`, kept across runs), and an address that another peer
announced as its own cannot answer in that peer's name."""

from __future__ import annotations

import dataclasses
import re

import hivemind
import pytest
import torch
from hivemind.utils import get_dht_time

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.errors import AccessDeniedError, PeerError, SwarmUnavailableError
from swarm.identity import Identity
from swarm.launch import LocalSwarm, start_bootstrap
from swarm.network import load_swarm_key, start_dht
from swarm.records import ServerRecord, ServerState, announce, block_key, fetch_records
from swarm.transport import Connection
from tests.conftest import assert_same_generation, generate_both
from tests.test_push import push_counts


def peer_id_of(server) -> str:
    return re.search(r"ready: .* peer (\S+)", "\n".join(server.lines)).group(1)


@pytest.fixture(scope="module")
def private_swarm(tiny_llama, tmp_path_factory):
    """(swarm, key file): a bootstrap peer that creates the key, and two servers that hold it."""
    logs = tmp_path_factory.mktemp("logs")
    key_file = tmp_path_factory.mktemp("keys") / "swarm.key"
    bootstrap, initial_peers = start_bootstrap(extra_args=("--swarm-key", str(key_file)), log_path=logs / "bootstrap.log")
    try:
        with LocalSwarm(tiny_llama, ["0:2", "2:5"], server_args=("--swarm-key", str(key_file)), log_dir=logs, initial_peers=initial_peers) as swarm:
            yield swarm, key_file
    finally:
        bootstrap.stop()


def test_a_client_with_the_key_generates_like_the_local_model(private_swarm, tiny_llama, local_tiny_llama):
    swarm, key_file = private_swarm
    assert key_file.is_file() and len(load_swarm_key(key_file)) == 32
    model = AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers, swarm_key=key_file)
    try:
        prompt = torch.randint(3, 131, (2, 7), generator=torch.Generator().manual_seed(3))
        remote, expected = generate_both(model, local_tiny_llama, prompt, max_new_tokens=6)
        assert_same_generation(remote, expected)
        counts = push_counts(model.remote)
        assert counts[swarm.servers[0].address]["pushed"] >= 6, "the servers did not push to each other with the key"
    finally:
        model.remote.shutdown()


def keyless_peer(initial_peers: list[str]) -> hivemind.DHT:
    """An intruder's DHT peer: it does not stop at its unanswered bootstrap (as swarm's own peers do)."""
    return hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], ensure_bootstrap_success=False, start=True)


def test_a_keyless_client_cannot_read_the_records(private_swarm, tiny_llama):
    swarm, _ = private_swarm
    with pytest.raises(SwarmUnavailableError, match="private and this peer does not hold its key"):
        AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers, coverage_timeout=3)
    intruder = keyless_peer(swarm.initial_peers)
    try:
        assert fetch_records(intruder, "tiny-llama", 5) == [[] for _ in range(5)]
    finally:
        intruder.shutdown()


def test_a_keyless_peer_cannot_write_records(private_swarm, tiny_llama):
    swarm, key_file = private_swarm
    intruder_identity = Identity.generate()
    record = ServerRecord.signed(intruder_identity, start=0, end=5, state=ServerState.ONLINE, throughput=1e9,
                                 version="0", address="127.0.0.1:9", dtype="float32")  # fmt: skip
    intruder = keyless_peer(swarm.initial_peers)
    member = start_dht(swarm.initial_peers, client_mode=True, swarm_key=load_swarm_key(key_file))
    try:
        announce(intruder, "tiny-llama", record, num_blocks=5, ttl=60)  # only its own storage takes it
        intruder.store(block_key("tiny-llama", 0), record.to_dict(), get_dht_time() + 60, subkey=record.peer_id)
        seen = {found.peer_id for block in fetch_records(member, "tiny-llama", 5) for found in block}
        assert intruder_identity.key_id not in seen and len(seen) == 2
    finally:
        intruder.shutdown()
        member.shutdown()


def test_a_keyless_caller_is_refused_before_any_model_work(private_swarm):
    swarm, _ = private_swarm
    for server in swarm.servers:
        connection = Connection(server.address, timeout=10)
        try:
            for fields in ({"method": "info"}, {"method": "forward", "start": 0, "end": 2}, {"method": "open", "start": 0, "end": 2, "max_length": 4}):
                with pytest.raises(AccessDeniedError, match="private swarm"):
                    connection.request(fields, {"hidden_states": torch.zeros(1, 1, 60)} if fields["method"] == "forward" else {})
            with pytest.raises(AccessDeniedError, match="does not hold its key"):
                connection.request({"method": "hello", "nonce": "ab" * 32})
            with pytest.raises(AccessDeniedError):
                connection.request({"method": "info"})
        finally:
            connection.close()


def test_an_identity_file_keeps_the_peer_id_across_runs(tiny_llama, tmp_path):
    identity_file = tmp_path / "server.key"
    peer_ids = []
    for run in range(2):
        with LocalSwarm(tiny_llama, ["0:5"], server_args=("--identity", str(identity_file)), log_dir=tmp_path / str(run)) as swarm:
            peer_ids.append(peer_id_of(swarm.servers[0]))
    assert identity_file.is_file() and peer_ids[0] == peer_ids[1] == Identity.load_or_create(identity_file).key_id


def test_an_address_announced_by_another_peer_cannot_answer_in_its_name(tiny_llama, local_tiny_llama, tmp_path):
    """A peer signs a record of its own that points to an honest server's address (with an attractive throughput):
    the server there cannot prove it is that peer, so the client leaves the record out and uses the honest one."""
    with LocalSwarm(tiny_llama, ["0:5"], log_dir=tmp_path) as swarm:
        honest = ServerRecord.from_dict(fetch_records_of(swarm)[0][0].to_dict())
        squatter = Identity.generate()
        fields = {field.name: getattr(honest, field.name) for field in dataclasses.fields(honest)}
        fields = {name: value for name, value in fields.items() if name not in ("peer_id", "public_key", "signed_at", "signature")}
        record = ServerRecord.signed(squatter, **{**fields, "throughput": 1e9})
        dht = start_dht(swarm.initial_peers, host="127.0.0.1")
        try:
            assert announce(dht, "tiny-llama", record, num_blocks=5, ttl=60)
            config = ClientConfig(initial_peers=swarm.initial_peers, pinned_peers={squatter.key_id})
            model = AutoDistributedModel.from_pretrained(tiny_llama, client_config=config)
            try:
                prompt = torch.randint(3, 131, (1, 5), generator=torch.Generator().manual_seed(4))
                remote, expected = generate_both(model, local_tiny_llama, prompt, max_new_tokens=4)
                assert_same_generation(remote, expected)
                assert squatter.key_id in model.remote.banned_until
                with pytest.raises(PeerError, match="cannot prove it is peer"):
                    model.remote.open_connection(record)
            finally:
                model.remote.shutdown()
        finally:
            dht.shutdown()


def fetch_records_of(swarm):
    dht = start_dht(swarm.initial_peers, client_mode=True)
    try:
        return fetch_records(dht, "tiny-llama", 5)
    finally:
        dht.shutdown()
