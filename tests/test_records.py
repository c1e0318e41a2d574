import time

import hivemind
import pytest
from hivemind.utils import get_dht_time

from swarm.records import ServerRecord, ServerState, announce, fetch_models, fetch_records


def make_record(peer_id="peer", start=0, end=2, **overrides):
    settings = dict(
        peer_id=peer_id,
        start=start,
        end=end,
        state=ServerState.ONLINE,
        throughput=12.5,
        version="0.1.0",
        address="127.0.0.1:1234",
        dtype="float32",
    )
    return ServerRecord(**{**settings, **overrides})


def test_unknown_fields_are_ignored_and_malformed_records_dropped():
    value = {**make_record().to_dict(), "field_from_the_future": [1, 2]}
    assert ServerRecord.from_dict(value) == make_record()
    assert ServerRecord.from_dict({**value, "state": "dancing"}) is None
    assert ServerRecord.from_dict({**value, "start": 3, "end": 1}) is None
    assert ServerRecord.from_dict({**value, "throughput": "fast"}) is None
    assert ServerRecord.from_dict({key: v for key, v in value.items() if key != "address"}) is None
    assert ServerRecord.from_dict("not a dict") is None


@pytest.fixture
def two_dht_peers():
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield first, second
    second.shutdown()
    first.shutdown()


def test_announced_records_are_found_per_block_and_expire(two_dht_peers):
    writer, reader = two_dht_peers
    assert announce(writer, "model-x", make_record("a", 0, 2), num_blocks=4, ttl=60)
    assert announce(writer, "model-x", make_record("b", 1, 3, state=ServerState.JOINING), num_blocks=4, ttl=1.5)
    writer.store("model-x.block2", {"garbage": True}, get_dht_time() + 60, subkey="c")
    records = fetch_records(reader, "model-x", 4)
    assert [sorted(r.peer_id for r in block) for block in records] == [["a"], ["a", "b"], ["b"], []]
    assert fetch_models(reader) == {"model-x": 4}
    time.sleep(2)
    records = fetch_records(reader, "model-x", 4)
    assert [sorted(r.peer_id for r in block) for block in records] == [["a"], ["a"], [], []]
