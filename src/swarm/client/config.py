"""Everything a client can be told, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.client.retry import RetryPolicy
from swarm.client.verify import VerifyConfig
from swarm.quantization import PRECISION_BITS
from swarm.wire import FLOAT_DTYPES


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any peer of the swarm's DHT
    model_name: str | None = None  # name the servers announce; default: repo id or directory name
    coverage_timeout: float = 60.0  # seconds to wait for servers to cover every block before giving up
    connect_timeout: float = 5.0  # seconds to open a connection to a server
    source_host: str | None = None  # local address connections to servers leave from (None: the system's choice)
    push: bool = True  # servers of a session's route pass each step's hidden states on to the next one themselves
    # (swarm.server.push); False: the client relays every hop (so it does anyway while spot checks are on)
    push_timeout: float = 2.0  # seconds a server waits for the next one to take a push before it tells the client
    relay_duration: float = 300.0  # seconds the client relays between two servers after one could not push to the other
    step_timeout: float = 30.0  # seconds a server may take per 256 tokens of a request before it counts as hung
    ping_timeout: float = 2.0  # seconds to wait for a ping while measuring latencies
    latency_smoothing: float = 0.3  # weight of a new ping in the moving average of a server's latency
    ban_duration: float = 60.0  # seconds a failed server is left out of routes
    busy_duration: float = 2.0  # seconds a server that answered "busy" (at one of its limits) is left out of routes
    max_reply_bytes: int = 1 << 30  # largest reply accepted from a server; a larger one is that server's fault
    records_max_age: float = 30.0  # seconds DHT records are reused before being fetched again
    poll_period: float = 0.5  # seconds between DHT look-ups while waiting for coverage
    pinned_peers: set[str] = field(default_factory=set)  # peer ids to use wherever they serve a block
    excluded_peers: set[str] = field(default_factory=set)  # peer ids never to use
    min_precision: str | None = None  # the least a server's weights may be held in: "float32", "bfloat16" or
    # "float16" (16 bits), "int8" or "nf4" (see `swarm.quantization`); None: any
    wire_dtype: str | None = None  # what hidden states travel in: "float32", "bfloat16" or "float16" (a server
    # computes in its own dtype and answers in this one); None: each server's own dtype
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # how failed requests are retried elsewhere
    verify: VerifyConfig | None = None  # spot checks of servers' outputs by other servers (None: none)
    swarm_key: bytes | None = None  # the key of a private swarm (`swarm.network.load_swarm_key(FILE)`)
    torrent_host: str = "0.0.0.0"  # interface libtorrent listens on while fetching a model published in the swarm
    fetch_timeout: float = 600.0  # seconds fetching a published model's client-side files may take

    def __post_init__(self):
        if self.min_precision is not None and self.min_precision not in PRECISION_BITS:
            raise ValueError(f"min_precision must be one of {', '.join(PRECISION_BITS)} or None, got {self.min_precision!r}")
        if self.wire_dtype is not None and self.wire_dtype not in FLOAT_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(FLOAT_DTYPES)} or None, got {self.wire_dtype!r}")
