import dataclasses
import time

import pytest
from hivemind.utils import get_dht_time

from swarm.identity import Identity
from swarm.network import start_dht
from swarm.records import ServerRecord, ServerState, announce, fetch_models, fetch_records

FIELDS = dict(state=ServerState.ONLINE, throughput=12.5, version="0.1.0", address="127.0.0.1:1234", dtype="float32")
IDENTITIES = {name: Identity.generate() for name in "abc"}


def make_record(name="a", start=0, end=2, **overrides):
    return ServerRecord.signed(IDENTITIES[name], start=start, end=end, **{**FIELDS, **overrides})


def names(records_by_block):
    by_id = {identity.key_id: name for name, identity in IDENTITIES.items()}
    return [sorted(by_id[record.peer_id] for record in block) for block in records_by_block]


def test_unknown_fields_are_ignored_and_malformed_records_dropped():
    value = {**make_record().to_dict(), "field_from_the_future": [1, 2]}
    assert ServerRecord.from_dict(value).verified()
    assert ServerRecord.from_dict({**value, "state": "dancing"}) is None
    assert ServerRecord.from_dict({**value, "start": 3, "end": 1}) is None
    assert ServerRecord.from_dict({**value, "throughput": "fast"}) is None
    assert ServerRecord.from_dict({key: v for key, v in value.items() if key != "address"}) is None
    assert ServerRecord.from_dict("not a dict") is None


def test_a_record_checks_only_as_its_owner_signed_it():
    record = make_record("a")
    assert record.peer_id == IDENTITIES["a"].key_id and record.verified()
    assert not dataclasses.replace(record, throughput=1e9).verified()  # changed after signing
    assert not dataclasses.replace(record, address="10.0.0.66:1").verified()
    forged = dataclasses.replace(make_record("b"), peer_id=record.peer_id)  # b's key, a's id
    assert not forged.verified()
    assert not dataclasses.replace(record, signature="00" * 64).verified()
    stale = dataclasses.replace(record, signed_at=time.time() - 3600)
    assert not dataclasses.replace(stale, signature=IDENTITIES["a"].sign(stale.payload())).verified()


@pytest.fixture
def two_dht_peers():
    first = start_dht(host="127.0.0.1")
    second = start_dht(first.get_visible_maddrs(), host="127.0.0.1")
    yield first, second
    second.shutdown()
    first.shutdown()


def test_announced_records_are_found_per_block_and_expire(two_dht_peers):
    writer, reader = two_dht_peers
    assert announce(writer, "model-x", make_record("a", 0, 2), num_blocks=4, ttl=60)
    assert announce(writer, "model-x", make_record("b", 1, 3, state=ServerState.JOINING), num_blocks=4, ttl=1.5)
    writer.store("model-x.block2", {"garbage": True}, get_dht_time() + 60, subkey="c")
    records = fetch_records(reader, "model-x", 4)
    assert names(records) == [["a"], ["a", "b"], ["b"], []]
    assert fetch_models(reader) == {"model-x": 4}
    time.sleep(2)
    records = fetch_records(reader, "model-x", 4)
    assert names(records) == [["a"], ["a"], [], []]


def test_dht_peers_refuse_forged_records_under_a_peer_id(two_dht_peers):
    """c stores, under a's peer id, a record with c's own key, and one of a's records it altered: no DHT peer keeps
    them, and a's real record stays."""
    writer, reader = two_dht_peers
    assert announce(writer, "model-y", make_record("a", 0, 2), num_blocks=2, ttl=60)
    victim = IDENTITIES["a"].key_id
    impostor = dataclasses.replace(make_record("c", 0, 2, throughput=1e9), peer_id=victim)
    altered = dataclasses.replace(make_record("a", 0, 2), address="10.0.0.66:1", throughput=1e9)
    for value in (impostor.to_dict(), altered.to_dict(), {"garbage": True}):
        assert not reader.store("model-y.block0", value, get_dht_time() + 120, subkey=victim)
    (records,) = fetch_records(writer, "model-y", 1)
    assert [(record.peer_id, record.address, record.throughput) for record in records] == [(victim, FIELDS["address"], 12.5)]
