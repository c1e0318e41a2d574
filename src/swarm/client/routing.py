"""Choosing which servers run which blocks: a route is a list of hops covering a span in order."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.records import ServerRecord, ServerState
from swarm.spans import BlockSpan


@dataclass(frozen=True)
class Hop:
    server: ServerRecord  # who runs these blocks
    span: BlockSpan  # the blocks it runs for this route (within the server's span)

    def __str__(self) -> str:
        return f"{self.span} via {self.server.address} ({self.server.peer_id[-8:]})"


def missing_blocks(records_by_block: list[list[ServerRecord]], span: BlockSpan) -> list[int]:
    """Blocks of `span` that no online server covers."""
    return [block for block in range(span.start, span.end) if not _online(records_by_block[block])]


def plan_route(records_by_block: list[list[ServerRecord]], span: BlockSpan) -> list[Hop]:
    """Covers `span` with as few hops as possible: at each block, the online server that reaches farthest
    (the faster one on a tie). Raises `ValueError` if some block has no online server."""
    hops, block = [], span.start
    while block < span.end:
        candidates = _online(records_by_block[block])
        if not candidates:
            raise ValueError(f"no online server covers block {block}")
        best = max(candidates, key=lambda record: (min(record.end, span.end), record.throughput))
        end = min(best.end, span.end)
        hops.append(Hop(best, BlockSpan(block, end)))
        block = end
    return hops


def _online(records: list[ServerRecord]) -> list[ServerRecord]:
    return [record for record in records if record.state == ServerState.ONLINE]
