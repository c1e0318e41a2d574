"""`python -m swarm.server MODEL [--blocks START:END] (--initial-peers MADDR ... | --new-swarm)`"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import torch

from swarm.dht import add_join_arguments
from swarm.errors import ConfigurationError
from swarm.logs import configure_logging
from swarm.quantization import QUANT_TYPES
from swarm.server.config import ServerConfig
from swarm.server.server import Server
from swarm.spans import BlockSpan

logger = logging.getLogger("swarm.server")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, got {text}")
    return value


def span_argument(text: str) -> BlockSpan:
    try:
        return BlockSpan.parse(text)
    except ConfigurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def memory_argument(text: str) -> int:
    number = text.strip().lower().rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text.strip().lower()[len(number) :]
    try:
        return int(float(number) * UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 4GiB, 512MB or 1000000, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="python -m swarm.server", description="Serve a span of a model's blocks.")
    parser.add_argument(
        "model",
        help="model directory in Hugging Face layout, a repo id in the local HF cache, or the NAME (or NAME@INFOHASH) "
        "of a model published in the swarm, of which only the files this server needs are fetched",
    )
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--blocks", type=span_argument, help="half-open span START:END to host")
    span.add_argument("--num-blocks", type=int, help="host this many consecutive blocks, those the swarm serves least")
    parser.add_argument(
        "--max-memory",
        type=memory_argument,
        help="without --blocks or --num-blocks, host as many blocks as fit in this much memory, e.g. 4GiB "
        "(default: the available memory, so a large enough peer hosts the whole model)",
    )
    parser.add_argument(
        "--rebalance-period", type=float, default=60.0, help="seconds between checks whether to move a chosen span"
    )
    parser.add_argument("--model-name", help="name to announce in the DHT (default: repo id or directory name)")
    add_join_arguments(parser)
    parser.add_argument("--transport-port", type=int, default=0, help="tensor transport port (default: any)")
    parser.add_argument("--announce-host", help="address that clients dial (default: --host or a visible one)")
    parser.add_argument("--announce-port", type=int, help="transport port that clients dial, e.g. a proxy's or one forwarded "
                        "to --transport-port (default: --transport-port)")  # fmt: skip
    parser.add_argument("--torch-dtype", "--dtype", dest="dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the weights (of those not quantized) and of the hidden states")  # fmt: skip
    parser.add_argument("--quant-type", choices=QUANT_TYPES, default="none",
                        help="hold the blocks' linear layers in 8 bits (int8) or 4 bits (nf4), with bitsandbytes")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-wait-ms", type=non_negative, default=ServerConfig.batch_wait_ms,
                        help="milliseconds a decode step may wait for other sessions' steps to run in one batch "
                        f"with them; 0: no batching (default: {ServerConfig.batch_wait_ms:g})")  # fmt: skip
    parser.add_argument("--session-timeout", type=float, default=300.0, help="seconds an idle session lives")
    parser.add_argument("--max-session-length", type=int, help="longest session (default: model's max positions)")
    parser.add_argument("--announce-period", type=float, default=30.0, help="seconds between DHT announcements")
    parser.add_argument("--record-ttl", type=float, default=90.0, help="seconds a DHT record lives")
    parser.add_argument(
        "--shutdown-grace", type=float, default=5.0, help="seconds active sessions may finish after SIGTERM"
    )
    parser.add_argument("--cache-dir", type=Path, help="where a fetched model goes (default ~/.cache/swarm/models/NAME-<hash>)")
    parser.add_argument("--publish", metavar="NAME", help="publish the local model under NAME and seed it")
    parser.add_argument("--torrent-port", type=int, default=0, help="libtorrent port for fetching and seeding (default: any)")
    parser.add_argument(
        "--identity",
        type=Path,
        help="the server's key file, created if absent: its peer id, and the key its records, its answers to clients "
        "and what it publishes are signed with (default: a new key each run; ~/.cache/swarm/identity.key to publish)",
    )
    parser.add_argument("--swarm-key", type=Path, metavar="FILE", help="key file of a private swarm (see python -m swarm.dht)")
    add_limit_arguments(parser)
    args = parser.parse_args(argv)
    return ServerConfig(
        model=args.model,
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        max_memory=args.max_memory,
        rebalance_period=args.rebalance_period,
        model_name=args.model_name,
        initial_peers=args.initial_peers,
        new_swarm=args.new_swarm,
        host=args.host,
        port=args.port,
        transport_port=args.transport_port,
        announce_host=args.announce_host,
        announce_port=args.announce_port,
        dtype=DTYPES[args.dtype],
        quant_type=args.quant_type,
        device=args.device,
        batch_wait_ms=args.batch_wait_ms,
        session_timeout=args.session_timeout,
        max_session_length=args.max_session_length,
        announce_period=args.announce_period,
        record_ttl=args.record_ttl,
        shutdown_grace=args.shutdown_grace,
        cache_dir=args.cache_dir,
        publish=args.publish,
        torrent_port=args.torrent_port,
        identity=args.identity,
        swarm_key=args.swarm_key,
        **{name: getattr(args, name) for name in LIMITS},
    )


# ServerConfig fields that bound what the server does for anyone -> (argparse type, help); defaults are the fields'
LIMITS = {
    "max_request_tokens": (int, "rows of hidden states (batch x positions) in one request; clients split longer prefills"),
    "max_batch_size": (int, "sequences (beams included) in one request"),
    "max_sessions": (int, "inference sessions open at once"),
    "cache_memory": (memory_argument, "memory all sessions' caches may hold, e.g. 2GiB (default: a quarter of the memory available at start)"),
    "busy_wait": (float, "seconds a step waits for cache memory before it is answered busy"),
    "max_connections": (int, "connections served at once; more are answered busy"),
    "frame_timeout": (float, "seconds a request may take to arrive, from its first byte to its last"),
    "idle_timeout": (float, "seconds a connection may stay silent before it is closed"),
    "max_message_size": (memory_argument, "largest request, e.g. 256MiB (default: what the largest legal request needs)"),
}  # fmt: skip


def add_limit_arguments(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("limits", "what the server does for anyone; a request past one gets an error naming it")
    for name, (kind, help_text) in LIMITS.items():
        default = getattr(ServerConfig, name)
        shown = "" if default is None else f" (default: {default})"
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=help_text + shown)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        config = parse_args(argv)
        server = Server(config)
    except ConfigurationError as error:
        logger.error(f"error: {error}")
        return 2
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: server.stop_requested.set())
    try:
        server.run()
    except ConfigurationError as error:
        logger.error(f"error: {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
