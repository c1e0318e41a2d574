"""`python -m swarm.delay_proxy`: a TCP relay that delays what passes through it, to simulate WAN links where
`tc netem` is not available (benchmarks and tests on one machine).

    python -m swarm.delay_proxy --listen 127.0.0.1:0 --target 127.0.0.1:PORT --delay-ms 50 [--jitter-ms 5]
        [--bandwidth-mbit 100] [--up-delay-ms MS] [--down-delay-ms MS] [--delay-from 127.0.0.2=10 ...]
        [--refuse-from 127.0.0.1 ...]

Every byte that enters the proxy leaves it `delay` later, in order, in both directions ("up": toward the target,
"down": back); `--jitter-ms` adds a random 0 to J ms per chunk (never reordering), and `--bandwidth-mbit` caps each
direction of each connection. `--delay-from HOST=MS` gives connections from that source address another one-way
delay (both directions): a server's proxy can so delay its clients (which dial from another loopback address,
`ClientConfig(source_host="127.0.0.2")`) and its fellow servers differently; `--refuse-from HOST` closes every
connection from that address at once (a server that other servers cannot reach, but its clients can). Put a proxy in front of a server and
let the server announce the proxy's address (`python -m swarm.server ... --announce-port PORT`): every connection
to it, from clients and from other servers, then goes through the proxy. Logs `ready: delay proxy at HOST:PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
from dataclasses import dataclass, field

from swarm.logs import configure_logging

logger = logging.getLogger(__name__)

CHUNK = 1 << 16  # bytes read at once
MAX_IN_FLIGHT = 256  # chunks a direction holds before it stops reading (backpressure)


@dataclass
class LinkSettings:
    """One direction of a link: a one-way delay, jitter on top of it, a bandwidth cap (0: none)."""

    delay: float = 0.0  # seconds
    jitter: float = 0.0  # seconds, at most, added per chunk
    bandwidth: float = 0.0  # bytes per second; 0: unlimited

    def __post_init__(self):
        if self.delay < 0 or self.jitter < 0 or self.bandwidth < 0:
            raise ValueError(f"delays, jitter and bandwidth must not be negative: {self}")


@dataclass
class ProxySettings:
    target: tuple[str, int]
    up: LinkSettings = field(default_factory=LinkSettings)
    down: LinkSettings = field(default_factory=LinkSettings)
    delay_from: dict[str, float] = field(default_factory=dict)  # source host -> one-way delay (s), both directions
    refuse_from: frozenset[str] = frozenset()  # source hosts whose connections are closed at once

    def links(self, source_host: str) -> tuple[LinkSettings, LinkSettings]:
        if source_host not in self.delay_from:
            return self.up, self.down
        delay = self.delay_from[source_host]
        return LinkSettings(delay, self.up.jitter, self.up.bandwidth), LinkSettings(delay, self.down.jitter, self.down.bandwidth)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: LinkSettings):
    """Copies `reader` to `writer`, each chunk delivered `link.delay` (plus jitter) after it arrived and no sooner
    than the bandwidth cap lets it; closes `writer`'s sending side at the end."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue(MAX_IN_FLIGHT)

    async def deliver():
        while (item := await chunks.get()) is not None:
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    delivery = asyncio.create_task(deliver())
    line_free = last_due = loop.time()
    try:
        while data := await reader.read(CHUNK):
            now = loop.time()
            if link.bandwidth:
                line_free = max(line_free, now) + len(data) / link.bandwidth
                now = line_free
            last_due = max(last_due, now + link.delay + random.uniform(0, link.jitter))
            await chunks.put((last_due, data))
    except (ConnectionError, OSError):
        pass
    await chunks.put(None)
    try:
        await delivery
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class DelayProxy:
    def __init__(self, settings: ProxySettings):
        self.settings = settings
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._relay, host, port)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter):
        source = client_writer.get_extra_info("peername")[0]
        if source in self.settings.refuse_from:
            client_writer.close()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.settings.target)
        except OSError as error:
            logger.warning(f"Cannot reach {self.settings.target[0]}:{self.settings.target[1]}: {error}")
            client_writer.close()
            return
        up, down = self.settings.links(source)
        try:
            await asyncio.gather(pump(client_reader, target_writer, up), pump(target_reader, client_writer, down))
        finally:
            for writer in (client_writer, target_writer):
                writer.close()


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def source_delay(text: str) -> tuple[str, float]:
    host, _, milliseconds = text.partition("=")
    try:
        return host, float(milliseconds) / 1000
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST=MILLISECONDS, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.delay_proxy", description="A TCP relay that delays what passes through it.")
    parser.add_argument("--listen", type=address, default=("127.0.0.1", 0), help="HOST:PORT to listen on (port 0: any)")
    parser.add_argument("--target", type=address, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in each direction")
    parser.add_argument("--up-delay-ms", type=float, help="one-way delay toward the target (default: --delay-ms)")
    parser.add_argument("--down-delay-ms", type=float, help="one-way delay back from the target (default: --delay-ms)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="up to this much more per chunk, at random")
    parser.add_argument("--bandwidth-mbit", type=float, default=0.0, help="cap per direction and connection (0: none)")
    parser.add_argument("--delay-from", type=source_delay, action="append", default=[], metavar="HOST=MS",
                        help="another one-way delay for connections from this source address")  # fmt: skip
    parser.add_argument("--refuse-from", action="append", default=[], metavar="HOST", help="close connections from this source address at once")
    args = parser.parse_args(argv)
    configure_logging()
    link = dict(jitter=args.jitter_ms / 1000, bandwidth=args.bandwidth_mbit * 1e6 / 8)
    up_ms = args.delay_ms if args.up_delay_ms is None else args.up_delay_ms
    down_ms = args.delay_ms if args.down_delay_ms is None else args.down_delay_ms
    try:
        up, down = LinkSettings(up_ms / 1000, **link), LinkSettings(down_ms / 1000, **link)
        settings = ProxySettings(args.target, up, down, dict(args.delay_from), frozenset(args.refuse_from))
    except ValueError as error:
        parser.error(str(error))

    async def run():
        proxy = DelayProxy(settings)
        port = await proxy.start(*args.listen)
        logger.info(f"ready: delay proxy at {args.listen[0]}:{port} -> {args.target[0]}:{args.target[1]} "
                    f"(up {up_ms:g} ms, down {down_ms:g} ms, jitter {args.jitter_ms:g} ms, bandwidth {args.bandwidth_mbit or 'unlimited'} Mbit/s)")  # fmt: skip
        async with proxy.server:
            await proxy.server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
