"""`python -m swarm.publish MODEL_DIR --name NAME --initial-peers MADDR ...`: publish a model to the swarm, and seed it.

The model is split into one safetensors file per block (with the client's tensors, the tensors every server
needs, and the small files beside them) in `--work-dir` (default ~/.cache/swarm/published/NAME), made into a v2
torrent, and announced in the DHT as NAME -> info-hash with its manifest, signed with the publisher's key
(`--identity`, default ~/.cache/swarm/identity.key, created on first use). It prints

    published: NAME <info-hash> (<files> files, <MiB> MiB)

and seeds until stopped (Ctrl-C or SIGTERM). Servers then start with `python -m swarm.server NAME --blocks A:B`
and fetch only their blocks' files, from every peer that seeds them.

From Python, `swarm.publish(model_dir, name, initial_peers=[...])` returns a `Publisher` that seeds in the
background until `.stop()` (or the end of a `with` block).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from swarm import make_module_callable
from swarm.dht import add_join_arguments
from swarm.distribution.fetch import Seeding
from swarm.distribution.publish import publish_model
from swarm.distribution.torrents import TorrentSession
from swarm.errors import ConfigurationError
from swarm.identity import Identity, default_identity_path
from swarm.logs import configure_logging
from swarm.network import start_dht
from swarm.records import reachable_host

logger = logging.getLogger(__name__)

ANNOUNCE_PERIOD = 30.0  # seconds between announcements that this peer seeds the model
SEEDER_TTL = 90.0  # seconds a seeder record lives unless announced again


class Publisher:
    """Publishes a model and seeds it from a background thread until `stop()`."""

    def __init__(
        self,
        model_dir: str | Path,
        name: str,
        initial_peers: list[str] | tuple[str, ...] = (),
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        torrent_port: int = 0,
        announce_host: str | None = None,
        work_dir: str | Path | None = None,
        identity: str | Path | None = None,
        upload_rate_limit: int = 0,
        announce_period: float = ANNOUNCE_PERIOD,
    ):
        self.dht = start_dht(initial_peers, host=host, port=port)
        self.session = None
        try:
            visible = [str(maddr) for maddr in self.dht.get_visible_maddrs()]
            self.session = TorrentSession(host, torrent_port, reachable_host(host, announce_host, visible), upload_rate_limit)
            key = Identity.load_or_create(Path(identity) if identity else default_identity_path())
            self.published = publish_model(self.dht, self.session, Path(model_dir), name, key, work_dir=work_dir)
            self.seeding = Seeding(self.dht, self.session, self.published.torrent, self.published.announcement, SEEDER_TTL)
            self.seeding.announce()
        except BaseException:
            self._close()
            raise
        self.visible_maddrs = visible
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._announce_until_stopped, args=(announce_period,), daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self.published.manifest.name

    @property
    def info_hash(self) -> str:
        return self.published.announcement.info_hash

    def _announce_until_stopped(self, period: float):
        while not self._stop.wait(period):
            try:
                self.seeding.announce()
            except Exception as error:
                logger.warning(f"Could not announce {self.name} in the DHT: {error}")

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self._close()

    def _close(self):
        if self.session is not None:
            self.session.close()
        self.dht.shutdown()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc_info):
        self.stop()


def publish(model_dir: str | Path, name: str, initial_peers: list[str] | tuple[str, ...] = (), **kwargs) -> Publisher:
    """Publishes the model at `model_dir` as `name` and seeds it in the background; see `Publisher`."""
    return Publisher(model_dir, name, initial_peers, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.publish", description="Publish a model to the swarm and seed it.")
    parser.add_argument("model_dir", type=Path, help="the model's folder (Hugging Face layout, or a diffusers pipeline)")
    parser.add_argument("--name", required=True, help="the name peers fetch it by")
    add_join_arguments(parser, required=True)
    parser.add_argument("--torrent-port", type=int, default=0, help="libtorrent port (default: any)")
    parser.add_argument("--announce-host", help="address other peers dial (default: --host or a visible one)")
    parser.add_argument("--work-dir", type=Path, help="where the split model is written (default ~/.cache/swarm/published/NAME)")
    parser.add_argument("--identity", type=Path, help="publisher key file (default ~/.cache/swarm/identity.key)")
    parser.add_argument("--upload-limit", type=int, default=0, help="upload rate limit in bytes per second (default: none)")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        publisher = Publisher(
            args.model_dir, args.name, args.initial_peers, host=args.host, port=args.port, torrent_port=args.torrent_port,
            announce_host=args.announce_host, work_dir=args.work_dir, identity=args.identity, upload_rate_limit=args.upload_limit,
        )  # fmt: skip
    except ConfigurationError as error:
        logger.error(f"error: {error}")
        return 2
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    if args.new_swarm:
        print("To join this swarm, use --initial-peers " + " ".join(publisher.visible_maddrs), flush=True)
    manifest = publisher.published.manifest
    print(
        f"published: {publisher.name} {publisher.info_hash} ({len(manifest.files)} files, {manifest.total_bytes / 2**20:.1f} MiB)",
        flush=True,
    )
    logger.info(f"Seeding {publisher.published.path} from {publisher.session.address}; Ctrl-C to stop")
    stop.wait()
    publisher.stop()
    return 0


make_module_callable(__name__, publish)

if __name__ == "__main__":
    sys.exit(main())
