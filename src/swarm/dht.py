"""`python -m swarm.dht`: a bootstrap peer that hosts no blocks and prints the multiaddrs to join with."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from swarm.logs import configure_logging
from swarm.network import load_swarm_key, start_dht

logger = logging.getLogger(__name__)


def add_join_arguments(parser: argparse.ArgumentParser, required: bool = False):
    """`--initial-peers` or `--new-swarm`, `--host` and `--port`: how a peer joins the swarm's DHT, or starts one."""
    peers = parser.add_mutually_exclusive_group(required=required)
    peers.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR", help="multiaddrs of DHT peers")
    peers.add_argument("--new-swarm", action="store_true", help="start a new swarm and print its multiaddrs")
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=0, help="DHT port (default: 0, any free port)")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m swarm.dht", description="Run a bootstrap DHT peer.")
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: 0, any free port)")
    parser.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="peers of an existing swarm")
    parser.add_argument(
        "--swarm-key",
        type=Path,
        metavar="FILE",
        help="make the swarm private: only peers holding this key file reach it (created if absent; give it to them)",
    )
    args = parser.parse_args(argv)
    configure_logging()
    swarm_key = load_swarm_key(args.swarm_key, create=True) if args.swarm_key else None
    dht = start_dht(args.initial_peers, host=args.host, port=args.port, swarm_key=swarm_key)
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    maddrs = " ".join(str(maddr) for maddr in dht.get_visible_maddrs())
    print(f"To join this swarm, use --initial-peers {maddrs}", flush=True)
    logger.info(f"ready: DHT bootstrap peer {dht.peer_id}")
    stop.wait()
    dht.shutdown()


if __name__ == "__main__":
    main()
