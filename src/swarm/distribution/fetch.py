"""Fetching a published model's files from the peers that seed them, and seeding what a peer has.

    model = fetch_files(dht, session, "NAME", lambda manifest: manifest.files_for_blocks(BlockSpan(4, 8)))
    model.path     # ~/.cache/swarm/models/NAME-<hash>: a checkpoint folder holding the files fetched

`fetch_files` looks NAME up (`NAME@INFOHASH` pins one publication), checks the publisher's signature and the
manifest, joins the torrent through every peer that announces it seeds it, checks that the torrent's files are
exactly the manifest's, and downloads only the files asked for (more can be asked later, by a server that
moves to other blocks: `FetchedModel.fetch_more`). The session keeps seeding them; `Seeding.announce` says so
in the DHT and keeps the publisher's announcement alive.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from hivemind import DHT

from swarm.distribution.manifest import Manifest
from swarm.distribution.records import (
    Announcement,
    Seeder,
    announce_model,
    announce_seeder,
    choose_announcement,
    fetch_announcements,
    fetch_seeders,
)
from swarm.distribution.torrents import Torrent, TorrentSession
from swarm.records import list_model

logger = logging.getLogger(__name__)

ANNOUNCEMENT_FILE = ".swarm-announcement.json"  # in the model folder: what it was fetched as
DEFAULT_TIMEOUT = 600.0  # seconds a download may take before it fails
RESOLVE_WAIT = 15.0  # seconds a name may take to show up in the DHT (a peer that has just joined sees it late)
RESOLVE_PERIOD = 0.5  # seconds between look-ups while it has not


def models_cache() -> Path:
    return Path(os.environ.get("SWARM_CACHE_DIR") or Path.home() / ".cache" / "swarm").expanduser() / "models"


def default_cache_dir(name: str, info_hash: str) -> Path:
    """~/.cache/swarm/models/NAME-<first 16 digits of the info-hash> (NAME's slashes become "--")."""
    return models_cache() / f"{re.sub(r'[^A-Za-z0-9._-]', '-', name.replace('/', '--'))}-{info_hash[:16]}"


def split_pin(name: str) -> tuple[str, str | None]:
    """"NAME@INFOHASH" -> (NAME, INFOHASH); "NAME" -> (NAME, None)."""
    base, _, pinned = name.partition("@")
    return base, (pinned.lower() or None)


def resolve(dht: DHT, name: str, wait: float = RESOLVE_WAIT) -> Announcement:
    """The announcement a peer uses for `name` (see `swarm.distribution.records.choose_announcement`), looked up
    again for up to `wait` seconds while nobody announces it."""
    base, pinned = split_pin(name)
    deadline = time.monotonic() + wait
    announcements = fetch_announcements(dht, base)
    while not any(pinned in (None, item.info_hash) for item in announcements) and time.monotonic() < deadline:
        logger.debug(f"Nobody announces {name!r} yet; looking again in {RESOLVE_PERIOD} s")
        time.sleep(RESOLVE_PERIOD)
        announcements = fetch_announcements(dht, base)
    seeders = {item.info_hash: len(fetch_seeders(dht, item.info_hash)) for item in announcements}
    return choose_announcement(base, announcements, seeders, pinned)


def seeder_endpoints(dht: DHT, info_hash: str) -> list[tuple[str, int]]:
    return [seeder.endpoint for seeder in fetch_seeders(dht, info_hash)]


@dataclass
class FetchedModel:
    path: Path  # the model folder (a checkpoint folder with the files fetched so far)
    manifest: Manifest
    announcement: Announcement
    torrent: Torrent
    dht: DHT

    def fetch_more(self, paths: list[str], timeout: float = DEFAULT_TIMEOUT):
        """Downloads more of the model's files (a server that moves to other blocks)."""
        complete = set(self.torrent.complete_files())
        missing = [path for path in paths if path not in complete]
        if missing:
            self.torrent.want(missing)
            find = functools.partial(seeder_endpoints, self.dht, self.announcement.info_hash)
            self.torrent.wait_files(missing, timeout, find, f"Fetching {len(missing)} files of {self.manifest.name}")


def fetch_files(
    dht: DHT,
    session: TorrentSession,
    name: str,
    wanted: Callable[[Manifest], list[str]],
    cache_dir: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> FetchedModel:
    """Looks `name` up and downloads the files `wanted(manifest)` names into `cache_dir` (default
    ~/.cache/swarm/models/NAME-<hash>), which becomes a checkpoint folder of the model."""
    announcement = resolve(dht, name, wait=min(timeout, RESOLVE_WAIT))
    manifest = announcement.checked_manifest()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(manifest.name, announcement.info_hash)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torrent = session.download(announcement.info_hash, cache_dir)
    find = functools.partial(seeder_endpoints, dht, announcement.info_hash)
    torrent.add_peers(find())
    manifest.check_files(torrent.wait_metadata(timeout))
    torrent.place_files()
    (cache_dir / ANNOUNCEMENT_FILE).write_text(json.dumps(asdict(announcement), indent=1))
    paths = wanted(manifest)
    torrent.want(paths)
    logger.info(f"Fetching {len(paths)} of the {len(manifest.files)} files of {manifest.name} ({announcement.info_hash[:12]})")
    torrent.wait_files(paths, timeout, find, f"Fetching {manifest.name}")
    return FetchedModel(cache_dir, manifest, announcement, torrent, dht)


class Seeding:
    """Tells the swarm, each time `announce` is called, which of a torrent's files this peer seeds, and stores
    the model's signed announcement again, so that the name outlives its publisher."""

    def __init__(self, dht: DHT, session: TorrentSession, torrent: Torrent, announcement: Announcement, ttl: float):
        self.dht = dht
        self.session = session
        self.torrent = torrent
        self.announcement = announcement
        self.ttl = ttl

    def announce(self):
        seeder = Seeder(str(self.dht.peer_id), self.session.address, tuple(self.torrent.complete_files()))
        announce_seeder(self.dht, self.announcement.info_hash, seeder, self.ttl)
        announce_model(self.dht, self.announcement)
        list_model(self.dht, self.announcement.name, self.announcement.manifest["num_blocks"], self.ttl)
