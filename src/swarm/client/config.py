"""Everything a client can be told, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any peer of the swarm's DHT
    model_name: str | None = None  # name the servers announce; default: repo id or directory name
    coverage_timeout: float = 60.0  # seconds to wait for servers to cover every block before giving up
    connect_timeout: float = 10.0  # seconds to open a connection to a server
    request_timeout: float = 120.0  # seconds to wait for one server's answer to one request
    poll_period: float = 0.5  # seconds between DHT look-ups while waiting for coverage
