"""`python -m swarm.fetch NAME --output DIR --initial-peers MADDR ...`: download a whole published model.

Looks NAME up in the DHT (`NAME@INFOHASH` pins one publication), checks the publisher's signature and the
manifest, downloads every file from all the peers that seed them (verified piece by piece), and moves the model
folder to DIR: a normal checkpoint that `AutoModelForCausalLM.from_pretrained(DIR)` (or the family's own class,
or a diffusers pipeline) loads, with weights identical to the published ones. Without `--output`, the model
stays in ~/.cache/swarm/models/NAME-<hash>. `--seed` keeps seeding it there until stopped.

From Python: `swarm.fetch(name, initial_peers=[...], output=DIR)` returns the folder.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from swarm import make_module_callable
from swarm.distribution.fetch import ANNOUNCEMENT_FILE, DEFAULT_TIMEOUT, Seeding, fetch_files
from swarm.distribution.torrents import TorrentSession
from swarm.errors import ConfigurationError, SwarmError
from swarm.logs import configure_logging
from swarm.network import start_dht

logger = logging.getLogger(__name__)

SEEDER_TTL = 90.0  # seconds a seeder record lives unless announced again
ANNOUNCE_PERIOD = 30.0


def fetch(
    name: str,
    initial_peers: list[str] | tuple[str, ...] = (),
    output: str | Path | None = None,
    *,
    host: str = "0.0.0.0",
    cache_dir: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Downloads every file of the model published as `name`; returns its folder (`output` if given, which must
    not exist yet: the download goes to a sibling folder and is moved there once complete and verified)."""
    output = Path(output) if output is not None else None
    if output is not None and output.exists():
        raise ConfigurationError(f"{output} exists already; fetch writes a new folder")
    staging = output.parent / f".{output.name}.swarm-fetch" if output is not None else cache_dir
    dht = start_dht(initial_peers, client_mode=True)
    session = TorrentSession(host)
    try:
        fetched = fetch_files(dht, session, name, lambda manifest: sorted(manifest.files), cache_dir=staging, timeout=timeout)
    finally:
        session.close()
        dht.shutdown()
    if output is None:
        return fetched.path
    (fetched.path / ANNOUNCEMENT_FILE).unlink()
    return fetched.path.rename(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.fetch", description="Download a model published in the swarm.")
    parser.add_argument("name", help="NAME, or NAME@INFOHASH to pin one publication")
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="multiaddrs of DHT peers")
    destination = parser.add_mutually_exclusive_group()
    destination.add_argument("--output", type=Path, help="the folder to write (must not exist)")
    destination.add_argument("--seed", action="store_true", help="keep the model in the cache and seed it until stopped")
    parser.add_argument("--cache-dir", type=Path, help="download folder (default ~/.cache/swarm/models/NAME-<hash>)")
    parser.add_argument("--host", default="0.0.0.0", help="interface for libtorrent and the DHT (default: 0.0.0.0)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds the download may take")
    parser.add_argument("--upload-limit", type=int, default=0, help="with --seed: bytes per second (default: no limit)")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        if args.seed:
            return seed_until_stopped(args)
        path = fetch(args.name, args.initial_peers, args.output, host=args.host, cache_dir=args.cache_dir, timeout=args.timeout)
    except SwarmError as error:
        logger.error(f"error: {error}")
        return 2
    print(f"fetched: {args.name} to {path}", flush=True)
    return 0


def seed_until_stopped(args) -> int:
    dht = start_dht(args.initial_peers, host=args.host)
    session = TorrentSession(args.host, upload_rate_limit=args.upload_limit)
    try:
        fetched = fetch_files(dht, session, args.name, lambda manifest: sorted(manifest.files), args.cache_dir, args.timeout)
        print(f"fetched: {args.name} to {fetched.path}; seeding it", flush=True)
        seeding = Seeding(dht, session, fetched.torrent, fetched.announcement, SEEDER_TTL)
        stop = threading.Event()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signal_number, lambda *_: stop.set())
        seeding.announce()
        while not stop.wait(ANNOUNCE_PERIOD):
            seeding.announce()
    finally:
        session.close()
        dht.shutdown()
    return 0


make_module_callable(__name__, fetch)

if __name__ == "__main__":
    sys.exit(main())
