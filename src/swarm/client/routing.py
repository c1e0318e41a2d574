"""Choosing which servers run which blocks: a route is a list of hops that covers a span in order.

`plan_route` picks the route with the least expected time per token. A hop on server S over k blocks
costs  latency(S) + k / (throughput(S) * len(S's span)) + HOP_OVERHEAD: the round trip measured by
pings, the compute time S announces, and a fixed cost per hop for (de)serialization. The search is a
shortest path over block boundaries (Dijkstra), so routes may mix long and short spans of any overlap.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from swarm.quantization import PRECISION_BITS, precision_of
from swarm.records import ServerRecord, ServerState
from swarm.spans import BlockSpan

HOP_OVERHEAD = 0.002  # seconds per hop beyond the network round trip: packing, unpacking, Python
DEFAULT_LATENCY = 0.005  # seconds assumed for a server that has not been pinged yet
MIN_THROUGHPUT = 1e-3  # tokens/s assumed for a server that announces 0 (not measured yet)


@dataclass(frozen=True)
class Hop:
    server: ServerRecord  # who runs these blocks
    span: BlockSpan  # the blocks it runs for this route (within the server's span)
    wire_dtype: str | None = None  # what floating-point tensors travel to it in; None: the server's (its record's
    # `travel_dtype`, else its dtype)

    @property
    def travel_dtype(self) -> str:
        """The dtype the hop's floating-point tensors travel in, both ways."""
        return self.wire_dtype or self.server.travel_dtype or self.server.dtype

    def __str__(self) -> str:
        return f"{self.span} via {self.server.address} ({self.server.peer_id[-8:]})"


@dataclass
class RoutingPreferences:
    latencies: dict[str, float] = field(default_factory=dict)  # peer id -> measured round trip, seconds
    excluded: set[str] = field(default_factory=set)  # peer ids never to use (banned or excluded by the user)
    pinned: set[str] = field(default_factory=set)  # peer ids to use wherever they cover a block
    min_bits: int = 0  # bits per weight a server must hold its blocks in at least (`ClientConfig.min_precision`)
    wire_dtype: str | None = None  # what hidden states travel in (`ClientConfig.wire_dtype`)


def usable_servers(records_by_block: list[list[ServerRecord]], preferences: RoutingPreferences) -> list[ServerRecord]:
    """Online servers that are not excluded and hold their weights precisely enough, each once."""
    servers = {}
    for records in records_by_block:
        for record in records:
            bits = PRECISION_BITS.get(precision_of(record.dtype, record.quant_type), 0)
            if record.state == ServerState.ONLINE and record.peer_id not in preferences.excluded and bits >= preferences.min_bits:
                servers[record.peer_id] = record
    return list(servers.values())


def missing_blocks(
    records_by_block: list[list[ServerRecord]], span: BlockSpan, preferences: RoutingPreferences | None = None
) -> list[int]:
    """Blocks of `span` that no usable server covers."""
    servers = usable_servers(records_by_block, preferences or RoutingPreferences())
    return [block for block in range(span.start, span.end) if not any(block in server.span for server in servers)]


def hop_cost(server: ServerRecord, num_blocks: int, preferences: RoutingPreferences) -> float:
    """Expected seconds per token for `num_blocks` blocks on `server`, network included."""
    compute = num_blocks / (max(server.throughput, MIN_THROUGHPUT) * len(server.span))
    return preferences.latencies.get(server.peer_id, DEFAULT_LATENCY) + compute + HOP_OVERHEAD


def plan_route(
    records_by_block: list[list[ServerRecord]], span: BlockSpan, preferences: RoutingPreferences | None = None
) -> list[Hop]:
    """The route over `span` with the least expected time per token; `ValueError` if a block is uncovered."""
    preferences = preferences or RoutingPreferences()
    servers = usable_servers(records_by_block, preferences)
    pinned_blocks = {block for server in servers if server.peer_id in preferences.pinned for block in server.span}
    best: dict[int, tuple[float, Hop | None]] = {span.start: (0.0, None)}
    queue, done = [(0.0, span.start)], set()
    while queue:
        cost, block = heapq.heappop(queue)
        if block in done:
            continue
        done.add(block)
        if block == span.end:
            break
        for server in servers:
            if block not in server.span or (block in pinned_blocks and server.peer_id not in preferences.pinned):
                continue
            for end in range(block + 1, min(server.end, span.end) + 1):
                if server.peer_id not in preferences.pinned and pinned_blocks & set(range(block, end)):
                    break
                total = cost + hop_cost(server, end - block, preferences)
                if end not in best or total < best[end][0]:
                    best[end] = (total, Hop(server, BlockSpan(block, end), preferences.wire_dtype))
                    heapq.heappush(queue, (total, end))
    if span.end not in best:
        missing = missing_blocks(records_by_block, span, preferences)
        raise ValueError(f"no usable server covers blocks {missing}")
    return _unwind(best, span)


def _unwind(best: dict[int, tuple[float, Hop | None]], span: BlockSpan) -> list[Hop]:
    hops, block = [], span.end
    while block != span.start:
        hop = best[block][1]
        hops.append(hop)
        block = hop.span.start
    return hops[::-1]
