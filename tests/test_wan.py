"""Simulated WAN links: the delay proxy (`python -m swarm.delay_proxy`) delays each direction, per source address,
with jitter and a bandwidth cap, never reordering bytes; servers behind proxies announce the proxies' addresses
(`--announce-port`), and a client generating through them gets the local model's tokens."""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest
import torch

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.launch import LocalSwarm, start_delay_proxy
from tests.conftest import assert_same_generation, generate_both


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)


@pytest.fixture(scope="module")
def echo():
    """The far end the proxies relay to: a TCP echo server on 127.0.0.1."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxies():
    started = []

    def start(target: str, *args: str):
        started.append(start_delay_proxy(target, *args))
        return started[-1].address

    yield start
    for proxy in started:
        proxy.stop()


def round_trip(address: str, payload: bytes = b"ping", source: str | None = None) -> tuple[float, bytes]:
    """Seconds from sending `payload` through a fresh connection to having all of it back, and what came back."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0) if source else None) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.sendall(b"warm")  # the proxy connects to its target on the first connection
        assert connection.recv(4) == b"warm"
        started = time.perf_counter()
        sender = threading.Thread(target=connection.sendall, args=(payload,))
        sender.start()
        received = bytearray()
        while len(received) < len(payload):
            received += connection.recv(1 << 16)
        sender.join()
        return time.perf_counter() - started, bytes(received)


def test_the_proxy_delays_each_direction(echo, proxies):
    direct, _ = round_trip(echo)
    delayed, answer = round_trip(proxies(echo, "--up-delay-ms", "30", "--down-delay-ms", "20"))
    assert answer == b"ping" and direct < 0.02
    assert 0.050 <= delayed < 0.150, delayed


def test_connections_from_another_source_get_their_own_delay(echo, proxies):
    address = proxies(echo, "--delay-ms", "40", "--delay-from", "127.0.0.2=5")
    assert 0.080 <= round_trip(address)[0] < 0.200
    assert 0.010 <= round_trip(address, source="127.0.0.2")[0] < 0.060


def test_the_bandwidth_cap_and_jitter_keep_every_byte_in_order(echo, proxies):
    payload = os.urandom(1 << 20)
    seconds, answer = round_trip(proxies(echo, "--bandwidth-mbit", "16", "--jitter-ms", "5"), payload)
    assert answer == payload
    assert seconds >= 0.5, f"1 MiB went through a 16 Mbit/s link and back in {seconds:.2f} s"


def test_bad_settings_are_refused_by_name():
    result = subprocess.run([sys.executable, "-m", "swarm.delay_proxy", "--target", "127.0.0.1:1", "--delay-ms", "-1"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "must not be negative" in result.stderr
    result = subprocess.run([sys.executable, "-m", "swarm.delay_proxy", "--target", "nowhere"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "expected HOST:PORT" in result.stderr


def test_generation_through_servers_behind_proxies_equals_local(tiny_llama, local_tiny_llama, tmp_path):
    """Each server listens on its own port and announces its proxy's (10 ms each way for clients from 127.0.0.2)."""
    proxy_args = ("--delay-ms", "2", "--jitter-ms", "1", "--delay-from", "127.0.0.2=10")
    with LocalSwarm(tiny_llama, ["0:2", "2:5"], log_dir=tmp_path, proxy_args=proxy_args) as swarm:
        assert [server.address for server in swarm.servers] == [proxy.address for proxy in swarm.proxies]
        config = ClientConfig(initial_peers=swarm.initial_peers, source_host="127.0.0.2")
        model = AutoDistributedModel.from_pretrained(tiny_llama, client_config=config)
        try:
            input_ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(1))
            assert_same_generation(*generate_both(model, local_tiny_llama, input_ids))
            assert sorted(model.remote.latencies.values())[0] >= 0.020, model.remote.latencies
        finally:
            model.remote.shutdown()


@pytest.mark.parametrize("client_delay, relayed", [(0, True), (25, False)], ids=["servers-far-apart", "client-far-away"])
def test_the_client_relays_links_slower_than_the_way_through_itself(tiny_llama, local_tiny_llama, tmp_path, client_delay, relayed):
    """Servers 50 ms apart (round trip): with the client next to them, pushing costs more than relaying, and after
    the first step (which measures the links) the client relays them; with the client 50 ms away, it keeps pushing."""
    proxy_args = ("--delay-ms", "25", "--delay-from", f"127.0.0.2={client_delay}")
    with LocalSwarm(tiny_llama, ["0:2", "2:4", "4:5"], log_dir=tmp_path, proxy_args=proxy_args) as swarm:
        config = ClientConfig(initial_peers=swarm.initial_peers, source_host="127.0.0.2")
        model = AutoDistributedModel.from_pretrained(tiny_llama, client_config=config)
        try:
            assert_same_generation(*generate_both(model, local_tiny_llama, torch.tensor([[3, 4, 5, 6]]), max_new_tokens=6))
            links = set(model.remote.relayed_links)
        finally:
            model.remote.shutdown()
    assert len(links) == (2 if relayed else 0), links
