import pytest

from swarm.client.routing import RoutingPreferences, missing_blocks, plan_route
from swarm.records import ServerRecord, ServerState
from swarm.spans import BlockSpan


def record(name, start, end, state=ServerState.ONLINE, throughput=10.0):
    return ServerRecord(name, start, end, state, throughput, "0.1.0", f"127.0.0.1:{start}{end}", "float32")


def by_block(records, num_blocks):
    return [[r for r in records if r.start <= block < r.end] for block in range(num_blocks)]


def route_of(records, span, num_blocks=8, **preferences):
    route = plan_route(by_block(records, num_blocks), span, RoutingPreferences(**preferences))
    return [(hop.server.peer_id, str(hop.span)) for hop in route]


def test_route_clips_to_the_span():
    records = [record("a", 0, 4, throughput=10 / 4), record("c", 2, 8, throughput=10 / 6)]
    assert route_of(records, BlockSpan(1, 3)) == [("a", "1:3")]


def test_route_prefers_fewer_hops_between_equal_servers():
    records = [record("whole", 0, 8, throughput=10 / 8), record("left", 0, 4, throughput=10 / 4), record("right", 4, 8, throughput=10 / 4)]
    assert route_of(records, BlockSpan(0, 8)) == [("whole", "0:8")]


def test_route_takes_faster_servers_for_the_blocks_they_cover():
    records = [record("slow", 0, 8, throughput=1), record("fast", 2, 6, throughput=100)]
    assert route_of(records, BlockSpan(0, 8)) == [("slow", "0:2"), ("fast", "2:6"), ("slow", "6:8")]


def test_route_avoids_high_latency_servers():
    records = [record("near", 0, 8), record("far", 0, 8, throughput=20)]
    assert route_of(records, BlockSpan(0, 8), latencies={"near": 0.001, "far": 0.5}) == [("near", "0:8")]
    assert route_of(records, BlockSpan(0, 8), latencies={"near": 0.001, "far": 0.001}) == [("far", "0:8")]


def test_excluded_and_offline_servers_are_skipped_and_pinned_ones_preferred():
    records = [record("a", 0, 8, throughput=50), record("b", 0, 8), record("gone", 0, 8, ServerState.OFFLINE, 99)]
    assert route_of(records, BlockSpan(0, 8), excluded={"a"}) == [("b", "0:8")]
    assert route_of(records, BlockSpan(0, 8), pinned={"b"}) == [("b", "0:8")]
    records.append(record("c", 4, 8))
    assert route_of(records, BlockSpan(0, 8), pinned={"c"}) == [("a", "0:4"), ("c", "4:8")]


def test_missing_blocks_are_named():
    records = [record("a", 0, 2), record("b", 3, 5), record("c", 2, 3, ServerState.JOINING)]
    assert missing_blocks(by_block(records, 6), BlockSpan(0, 6)) == [2, 5]
    assert missing_blocks(by_block(records, 6), BlockSpan(0, 6), RoutingPreferences(excluded={"a"})) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match=r"\[2, 5\]"):
        plan_route(by_block(records, 6), BlockSpan(0, 6))
