"""`python -m swarm.status --initial-peers ...`: the models in a swarm and, block by block, who serves them.

    python -m swarm.status --initial-peers MADDR           # a table per model
    python -m swarm.status --initial-peers MADDR --json    # the same, for machines
    python -m swarm.status --initial-peers MADDR --plot coverage.png

From Python: `swarm_status(initial_peers)` returns a `SwarmStatus`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import hivemind

from swarm.distribution.manifest import ManifestError
from swarm.distribution.records import fetch_announcements, fetch_seeders
from swarm.errors import _ranges
from swarm.identity import key_id
from swarm.network import start_dht
from swarm.records import ServerState, fetch_models, fetch_records
from swarm.transport import Connection


@dataclass
class ServerStatus:
    peer_id: str
    address: str
    start: int  # first hosted block
    end: int  # one past the last hosted block
    state: str  # joining, online or offline
    throughput: float  # announced tokens/s
    version: str
    latency_ms: float | None  # round trip of a ping from here; None if it did not answer


@dataclass
class SeederStatus:
    peer_id: str
    address: str  # its libtorrent address
    blocks: list[list[int]]  # half-open [start, end) runs of the blocks whose files it seeds whole
    client_files: bool  # whether it seeds every file a client needs
    files: int  # files it seeds


@dataclass
class PublicationStatus:
    info_hash: str
    publisher: str  # the publisher's key id
    published_at: float
    total_bytes: int
    seeders: list[SeederStatus] = field(default_factory=list)


@dataclass
class ModelStatus:
    name: str
    num_blocks: int
    servers: list[ServerStatus] = field(default_factory=list)
    coverage: list[int] = field(default_factory=list)  # online servers per block
    uncovered: list[list[int]] = field(default_factory=list)  # half-open [start, end) runs nobody serves online
    publications: list[PublicationStatus] = field(default_factory=list)  # its files in the swarm, and their seeders


@dataclass
class SwarmStatus:
    models: list[ModelStatus]


def swarm_status(initial_peers: list[str], ping_timeout: float = 2.0, dht: hivemind.DHT | None = None) -> SwarmStatus:
    """Reads every model's records from the DHT and pings their servers."""
    own_dht = dht is None
    dht = dht or start_dht(initial_peers, client_mode=True)
    try:
        models = [model_status(dht, name, num_blocks, ping_timeout) for name, num_blocks in sorted(fetch_models(dht).items())]
    finally:
        if own_dht:
            dht.shutdown()
    return SwarmStatus(models)


def model_status(dht: hivemind.DHT, name: str, num_blocks: int, ping_timeout: float) -> ModelStatus:
    records_by_block = fetch_records(dht, name, num_blocks)
    records = {record.peer_id: record for block in records_by_block for record in block}
    servers = [
        ServerStatus(
            peer_id=record.peer_id,
            address=record.address,
            start=record.start,
            end=record.end,
            state=record.state.value,
            throughput=record.throughput,
            version=record.version,
            latency_ms=ping(record.address, ping_timeout) if record.state != ServerState.OFFLINE else None,
        )
        for record in sorted(records.values(), key=lambda record: (record.start, record.end, record.peer_id))
    ]
    online = [s for s in servers if s.state == ServerState.ONLINE.value and s.latency_ms is not None]
    coverage = [sum(s.start <= block < s.end for s in online) for block in range(num_blocks)]
    uncovered = [list(run) for run in _ranges([block for block, count in enumerate(coverage) if count == 0])]
    return ModelStatus(name, num_blocks, servers, coverage, uncovered, publication_status(dht, name))


def publication_status(dht: hivemind.DHT, name: str) -> list[PublicationStatus]:
    """Each publication of `name` whose signature checks, with the peers seeding its files."""
    publications = []
    for announcement in fetch_announcements(dht, name):
        try:
            manifest = announcement.checked_manifest()
        except ManifestError:
            continue
        seeders = []
        for seeder in sorted(fetch_seeders(dht, announcement.info_hash), key=lambda seeder: seeder.address):
            held = set(seeder.files)
            blocks = [block for block, whole in manifest.block_files(held.__contains__).items() if whole]
            client = set(manifest.client_files()) <= held
            seeders.append(SeederStatus(seeder.peer_id, seeder.address, [list(run) for run in _ranges(blocks)], client, len(held)))
        publications.append(
            PublicationStatus(announcement.info_hash, key_id(announcement.publisher), announcement.published_at, manifest.total_bytes, seeders)
        )
    return publications


def ping(address: str, timeout: float) -> float | None:
    try:
        connection = Connection(address, timeout)
        try:
            started = time.perf_counter()
            connection.request({"method": "info"}, timeout=timeout)
            return round((time.perf_counter() - started) * 1000, 2)
        finally:
            connection.close()
    except Exception:
        return None


def format_status(status: SwarmStatus) -> str:
    if not status.models:
        return "No models are announced in this swarm."
    lines = []
    for model in status.models:
        lines.append(f"Model {model.name}: {model.num_blocks} blocks, {len(model.servers)} server(s)")
        lines.append(f"  {'peer':<10} {'address':<22} {'blocks':<9} {'state':<8} {'tokens/s':>9} {'ping ms':>8}  version")
        for server in model.servers:
            latency = f"{server.latency_ms:.2f}" if server.latency_ms is not None else "-"
            lines.append(
                f"  {server.peer_id[-8:]:<10} {server.address:<22} {f'{server.start}:{server.end}':<9} "
                f"{server.state:<8} {server.throughput:>9.1f} {latency:>8}  {server.version}"
            )
        lines.append("  online servers per block: " + " ".join(str(count) for count in model.coverage))
        if model.uncovered:
            spans = ", ".join(f"{start}:{end}" for start, end in model.uncovered)
            lines.append(f"  UNCOVERED blocks: {spans}")
        else:
            lines.append("  every block is covered")
        for publication in model.publications:
            lines.append(
                f"  published as {publication.info_hash[:16]} by {publication.publisher[:8]} "
                f"({publication.total_bytes / 2**20:.1f} MiB), seeded by {len(publication.seeders)} peer(s):"
            )
            for seeder in publication.seeders:
                blocks = ", ".join(f"{start}:{end}" for start, end in seeder.blocks) or "-"
                client = "client files" if seeder.client_files else ""
                lines.append(f"    {seeder.peer_id[-8:]:<10} {seeder.address:<22} blocks {blocks:<12} {seeder.files:>4} files  {client}")
    return "\n".join(lines)


def plot_status(status: SwarmStatus, path: str):
    """Draws each model's coverage map: blocks across, servers down, uncovered blocks shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"online": "tab:green", "joining": "tab:orange", "offline": "tab:gray"}
    models = status.models or [ModelStatus("no models", 1)]
    figure, axes = plt.subplots(len(models), 1, figsize=(10, 1.5 + 0.4 * sum(len(m.servers) for m in models)), squeeze=False)
    for axis, model in zip(axes[:, 0], models):
        for row, server in enumerate(model.servers):
            axis.barh(row, server.end - server.start, left=server.start, color=colors.get(server.state, "tab:blue"))
        for start, end in model.uncovered:
            axis.axvspan(start, end, color="tab:red", alpha=0.25)
        axis.set_yticks(range(len(model.servers)), [f"{s.peer_id[-8:]} {s.address}" for s in model.servers])
        axis.set_xlim(0, model.num_blocks)
        axis.invert_yaxis()
        axis.set_xlabel("block")
        axis.set_title(f"{model.name}: green online, orange joining, gray offline, red uncovered")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.status", description="Show who serves what in a swarm.")
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the coverage map into this file")
    parser.add_argument("--ping-timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    status = swarm_status(args.initial_peers, args.ping_timeout)
    print(json.dumps(asdict(status), indent=1) if args.json else format_status(status))
    if args.plot:
        plot_status(status, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
