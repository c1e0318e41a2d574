import pytest

from swarm.client.routing import missing_blocks, plan_route
from swarm.records import ServerRecord, ServerState
from swarm.spans import BlockSpan


def record(name, start, end, state=ServerState.ONLINE, throughput=10.0):
    return ServerRecord(name, start, end, state, throughput, "0.1.0", f"127.0.0.1:{start}{end}", "float32")


def by_block(records, num_blocks):
    return [[r for r in records if r.start <= block < r.end] for block in range(num_blocks)]


def test_route_uses_fewest_hops_and_clips_to_the_span():
    records = [record("a", 0, 4), record("b", 0, 2), record("c", 2, 8), record("d", 4, 8)]
    route = plan_route(by_block(records, 8), BlockSpan(0, 8))
    assert [(hop.server.peer_id, hop.span) for hop in route] == [("a", BlockSpan(0, 4)), ("c", BlockSpan(4, 8))]
    route = plan_route(by_block(records, 8), BlockSpan(1, 3))
    assert [(hop.server.peer_id, hop.span) for hop in route] == [("a", BlockSpan(1, 3))]


def test_route_prefers_faster_server_on_a_tie_and_skips_offline_ones():
    records = [record("slow", 0, 3, throughput=1), record("fast", 0, 3, throughput=5), record("gone", 0, 3, ServerState.OFFLINE, 99)]
    assert plan_route(by_block(records, 3), BlockSpan(0, 3))[0].server.peer_id == "fast"


def test_missing_blocks_are_named():
    records = [record("a", 0, 2), record("b", 3, 5), record("c", 2, 3, ServerState.JOINING)]
    assert missing_blocks(by_block(records, 6), BlockSpan(0, 6)) == [2, 5]
    with pytest.raises(ValueError, match="block 2"):
        plan_route(by_block(records, 6), BlockSpan(0, 6))
