"""Which blocks a server should host, from what the swarm already serves. Pure functions.

A block's capacity is the sum of the announced throughputs (tokens/s) of the online servers hosting
it; the swarm can go no faster than its weakest block (the bottleneck).

- `choose_span`: a joining server takes the N consecutive blocks with the least capacity: the window
  whose weakest block is weakest, then whose total capacity is least, then the first one.
- `should_move`: a server moves when hosting the span `choose_span` would give it raises the swarm's
  bottleneck by more than `min_gain` (a fraction) over staying where it is. A span that lost all its
  servers has a bottleneck of 0, so any server whose own blocks stay covered without it moves there.
"""

from __future__ import annotations

from swarm.records import ServerRecord, ServerState
from swarm.spans import BlockSpan


def block_capacities(
    records_by_block: list[list[ServerRecord]], exclude_peer: str | None = None
) -> list[float]:
    """Tokens/s each block can serve: the sum over the online servers hosting it (but `exclude_peer`)."""
    return [
        sum(
            record.throughput
            for record in records
            if record.state == ServerState.ONLINE and record.peer_id != exclude_peer
        )
        for records in records_by_block
    ]


def choose_span(capacities: list[float], num_blocks: int) -> BlockSpan:
    """The `num_blocks` consecutive blocks the swarm serves least."""
    num_blocks = min(num_blocks, len(capacities))
    starts = range(len(capacities) - num_blocks + 1)
    start = min(starts, key=lambda s: (min(capacities[s : s + num_blocks]), sum(capacities[s : s + num_blocks]), s))
    return BlockSpan(start, start + num_blocks)


def bottleneck(capacities: list[float], span: BlockSpan, throughput: float) -> float:
    """The swarm's weakest block if a server of `throughput` tokens/s hosts `span`."""
    return min(capacity + (throughput if block in span else 0.0) for block, capacity in enumerate(capacities))


def should_move(
    capacities_without_me: list[float], current: BlockSpan, throughput: float, min_gain: float = 0.2
) -> BlockSpan | None:
    """The span to move to, or None to stay (see the module docstring for the rule)."""
    candidate = choose_span(capacities_without_me, len(current))
    if candidate == current:
        return None
    before = bottleneck(capacities_without_me, current, throughput)
    after = bottleneck(capacities_without_me, candidate, throughput)
    return candidate if after > before * (1 + min_gain) else None


def blocks_that_fit(max_memory: int, block_bytes: int, num_blocks: int, reserved: int) -> int:
    """How many blocks of `block_bytes` fit in `max_memory` bytes once `reserved` bytes are set aside
    (the process itself, caches); at least 1, at most the whole model."""
    return max(1, min(num_blocks, (max_memory - reserved) // max(block_bytes, 1)))
