"""Publishing a model: split it into one file per block, make a v2 torrent of it, announce it signed, seed it."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hivemind import DHT

from swarm.distribution.manifest import ROOT, Manifest
from swarm.distribution.records import Announcement, announce_model
from swarm.distribution.split import split_model
from swarm.distribution.torrents import Torrent, TorrentSession, create_torrent
from swarm.errors import ConfigurationError
from swarm.identity import Identity, swarm_cache

logger = logging.getLogger(__name__)

TORRENT_FILE = "model.torrent"  # beside the published folder
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")  # "@" is for pinning an info-hash


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ConfigurationError(f"{name!r} cannot name a model: use letters, digits and . _ - / (200 at most)")
    return name


@dataclass
class Published:
    path: Path  # the published model folder, which the torrent seeds
    manifest: Manifest
    announcement: Announcement
    torrent: Torrent


def publish_model(
    dht: DHT, session: TorrentSession, model_dir: Path, name: str, identity: Identity, work_dir: Path | None = None
) -> Published:
    """Splits the model at `model_dir` into `work_dir / "model"` (default: ~/.cache/swarm/published/NAME), makes
    its torrent (`work_dir / "model.torrent"`), seeds it and announces NAME -> its info-hash and manifest in the
    DHT, signed by `identity`."""
    check_name(name)
    work_dir = Path(work_dir) if work_dir is not None else swarm_cache() / "published" / name.replace("/", "--")
    folder = work_dir / ROOT
    if folder.exists():
        shutil.rmtree(folder)  # published again: the split is rebuilt from the model as it is now
    manifest = split_model(Path(model_dir), folder, name)
    torrent_data, info_hash = create_torrent(folder)
    (work_dir / TORRENT_FILE).write_bytes(torrent_data)
    torrent = session.seed(work_dir, torrent_data)
    announcement = Announcement.create(manifest, info_hash, identity)
    if not announce_model(dht, announcement):
        logger.warning(f"Could not store the announcement of {name} in the DHT; it will be tried again")
    return Published(folder, manifest, announcement, torrent)
