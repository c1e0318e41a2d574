"""The live map of the swarm behind the API (`GET /v1/swarm`): which servers host which blocks, each server's
state, throughput and round trip, how many servers cover each block, and the route the last answer took.

Servers are read from the DHT and asked for their `info` over the client's own connections (which pass a private
swarm's key); a server that does not answer is left off the map, so a server that died disappears from it at the
next look, before its record expires in the DHT.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from swarm.client.remote import RemoteBlocks
from swarm.errors import SwarmError, _ranges
from swarm.records import ServerRecord, ServerState


def swarm_map(remote: RemoteBlocks) -> dict:
    records = {record.peer_id: record for block in remote.fetch_records() for record in block}
    candidates = sorted(
        (record for record in records.values() if record.state != ServerState.OFFLINE),
        key=lambda record: (record.start, record.end, record.peer_id),
    )
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(candidates)))) as pool:
        answers = list(pool.map(lambda record: probe(remote, record), candidates))
    servers = [describe(record, *answer) for record, answer in zip(candidates, answers) if answer is not None]
    coverage = [sum(s["start"] <= block < s["end"] and s["state"] == ServerState.ONLINE.value for s in servers) for block in remote.span]
    return {
        "model": remote.model_name,
        "num_blocks": len(remote.span),
        "servers": servers,
        "coverage": coverage,
        "uncovered": [list(run) for run in _ranges([block for block, count in enumerate(coverage) if count == 0])],
        "route": [{"peer_id": hop.server.peer_id, "address": hop.server.address, "start": hop.span.start, "end": hop.span.end} for hop in remote.last_route],
        "time": time.time(),
    }


def probe(remote: RemoteBlocks, record: ServerRecord) -> tuple[float, dict] | None:
    """The round trip (ms) of an `info` request to the server and its answer, or None if it did not answer."""
    try:
        connection = remote.connection(record)
        started = time.perf_counter()
        info, _ = connection.request({"method": "info"}, timeout=remote.config.ping_timeout)
        return (time.perf_counter() - started) * 1000, info
    except (SwarmError, OSError):
        return None


def describe(record: ServerRecord, ping_ms: float, info: dict) -> dict:
    sessions = info.get("sessions")
    return {
        "peer_id": record.peer_id,
        "address": record.address,
        "start": record.start,
        "end": record.end,
        "state": record.state.value,
        "throughput": round(record.throughput, 1),
        "ping_ms": round(ping_ms, 2),
        "sessions": sessions if isinstance(sessions, int) and not isinstance(sessions, bool) else None,
        "version": record.version,
    }
