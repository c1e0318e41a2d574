"""Where a server's model files come from, and what it seeds of them.

- A model on this disk: the server loads from its folder. With `--publish NAME` it also publishes it (splits it
  into one file per block, announces NAME signed, and seeds it).
- A model only the swarm has (`python -m swarm.server NAME`): the server fetches its small files, the shared and
  the client-side tensors first (it seeds those too, so the model outlives its publisher), then the files of
  the blocks it chooses to serve, and more when it moves to other blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hivemind import DHT

from swarm.distribution.fetch import FetchedModel, Seeding, fetch_files
from swarm.distribution.publish import publish_model
from swarm.distribution.torrents import TorrentSession
from swarm.identity import Identity, default_identity_path
from swarm.server.config import ServerConfig
from swarm.spans import BlockSpan

logger = logging.getLogger(__name__)


@dataclass
class ServedFiles:
    path: Path  # the model folder the server loads from
    session: TorrentSession | None = None  # libtorrent, when the server fetches or publishes the model
    seeding: Seeding | None = None
    fetched: FetchedModel | None = None  # the model came from the swarm: block files are fetched as needed

    def fetch_blocks(self, span: BlockSpan):
        if self.fetched is not None:
            self.fetched.fetch_more(self.fetched.manifest.files_for_blocks(span))
            self.announce()

    def stored_block_bytes(self, block: int) -> int | None:
        """Bytes of the files holding `block` as published (for a block not fetched yet), or None."""
        if self.fetched is None:
            return None
        return sum(entry.size for entry in self.fetched.manifest.files.values() if block in entry.blocks)

    def announce(self):
        """Tells the swarm which files this server seeds (called every announce period)."""
        if self.seeding is not None:
            self.seeding.announce()

    def close(self):
        if self.session is not None:
            self.session.close()


def open_served_files(config: ServerConfig, dht: DHT, local_path: Path | None, host: str) -> ServedFiles:
    """The files of `config.model`: `local_path` (published too with `config.publish`), or fetched from the swarm.
    `host` is the address other peers reach this server at."""
    if local_path is not None and config.publish is None:
        return ServedFiles(local_path)
    session = TorrentSession(config.host, config.torrent_port, announce_host=host)
    try:
        if local_path is not None:
            identity = Identity.load_or_create(config.identity or default_identity_path())
            published = publish_model(dht, session, local_path, config.publish, identity, work_dir=config.cache_dir)
            print(f"published: {config.publish} {published.announcement.info_hash}", flush=True)
            seeding = Seeding(dht, session, published.torrent, published.announcement, config.record_ttl)
            files = ServedFiles(local_path, session, seeding)
        else:
            fetched = fetch_files(dht, session, config.model, served_everywhere, cache_dir=config.cache_dir)
            seeding = Seeding(dht, session, fetched.torrent, fetched.announcement, config.record_ttl)
            files = ServedFiles(fetched.path, session, seeding, fetched)
    except BaseException:
        session.close()
        raise
    files.announce()
    return files


def served_everywhere(manifest) -> list[str]:
    """What every server of a fetched model keeps: its small files, the shared and the client-side tensors."""
    return sorted(path for path, entry in manifest.files.items() if entry.role in ("small", "shared", "client"))
