"""Everything a server can be told, in one dataclass; the CLI maps its flags onto it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from swarm.spans import BlockSpan


@dataclass
class ServerConfig:
    model: str  # local model directory in Hugging Face layout, or a repo id in the local HF cache
    blocks: BlockSpan | None = None  # blocks to host, half-open; None: chosen by num_blocks or max_memory
    num_blocks: int | None = None  # host this many consecutive blocks, those the swarm serves least
    max_memory: int | None = None  # bytes of block weights to host when neither blocks nor num_blocks is given;
    # None: the available memory less 1 GiB (so a peer with enough memory hosts the whole model)
    rebalance_period: float = 60.0  # seconds between checks whether a self-chosen span should move; 0: never
    model_name: str | None = None  # name announced in the DHT; default: repo id or directory name
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any peer of the swarm's DHT
    new_swarm: bool = False  # start a new swarm instead of joining one
    host: str = "0.0.0.0"  # interface for the DHT and the tensor transport
    port: int = 0  # DHT (libp2p) port; 0 picks a free one
    transport_port: int = 0  # tensor transport port; 0 picks a free one
    announce_host: str | None = None  # address clients should dial; default: host, or a visible address
    announce_port: int | None = None  # transport port clients should dial (a proxy's, a forwarded one); default: its own
    dtype: torch.dtype = torch.float32  # weights and hidden states
    quant_type: str = "none"  # "int8" or "nf4": the blocks' linear layers quantized (see `swarm.quantization`)
    device: str = "cpu"
    batch_wait_ms: float = 5.0  # milliseconds a decode step may wait for the steps of other sessions that stepped
    # within the last second, to run in one forward with them (`swarm.server.batching`); 0: every step runs alone
    session_timeout: float = 300.0  # seconds an idle session keeps its cache
    max_session_length: int | None = None  # longest session allowed; default: the model's max positions
    announce_period: float = 30.0  # seconds between re-announcements in the DHT (each one wakes every DHT peer)
    record_ttl: float = 90.0  # seconds a record lives unless re-announced
    shutdown_grace: float = 5.0  # seconds active sessions may finish after SIGTERM before the server exits
    # model distribution (swarm.distribution): a model that is not on this disk is fetched from the swarm by name
    cache_dir: Path | None = None  # where a fetched model's files go (default ~/.cache/swarm/models/NAME-<hash>);
    # with `publish`, where the published split is written (default ~/.cache/swarm/published/NAME)
    publish: str | None = None  # publish the local model under this name and seed it
    torrent_port: int = 0  # libtorrent's port when fetching or publishing; 0 picks a free one
    identity: Path | None = None  # the server's key file, created if absent: its peer id, its records' and its
    # answers' signatures, and the publisher's key; None: a new key for each run (published as ~/.cache/swarm/identity.key)
    swarm_key: Path | None = None  # the key file of a private swarm: only peers holding it reach this server or its DHT
    # bounds on what the server does for anyone: a request past one is answered with an error naming it
    max_request_tokens: int = 16384  # rows of hidden states (batch x positions) in one request; clients split
    # a longer prefill into steps that fit
    max_batch_size: int = 64  # sequences (beams included) in one request
    max_sessions: int = 256  # inference sessions open at once
    cache_memory: int | None = None  # bytes that all sessions' caches may hold; None: a quarter of the memory
    # available at start. A step that finds them full waits up to `busy_wait` for sessions to end, then is
    # answered "busy" (the client goes to another server)
    busy_wait: float = 5.0
    max_connections: int = 1024  # connections served at once; more are answered "busy" and closed
    frame_timeout: float = 60.0  # seconds a request may take to arrive, from its first byte to its last
    idle_timeout: float = 900.0  # seconds a connection may stay silent before the server closes it
    max_message_size: int | None = None  # bytes of one request; None: what the largest legal request needs
