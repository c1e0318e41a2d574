"""DHT records of model distribution: who published which model under a name, and who seeds its files.

    "swarm.published.{NAME}"   subkey: the publisher's key id   value: a signed `Announcement`
    "swarm.seeders.{HASH}"     subkey: the seeder's peer id     value: its libtorrent address and complete files

An announcement binds NAME to the info-hash of a v2 torrent and to the manifest of its files, signed with the
publisher's Ed25519 key (`Identity`, kept in `~/.cache/swarm/identity.key`). The signature covers the name,
the info-hash, the manifest and the publication time, not the DHT expiration: every seeder stores the
publisher's announcement again, verbatim, each time it announces itself, so a model stays findable after its
publisher leaves, and nobody but the publisher can change what it says. Readers keep only announcements whose
signature checks, whose key id matches their key, and whose name is the one asked for.

Two publishers may use one NAME: `choose_announcement` takes the info-hash that the most peers seed, then the
earliest publication, then the smallest info-hash; `NAME@INFOHASH` pins one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

from hivemind import DHT
from hivemind.utils import get_dht_time

from swarm.distribution.manifest import Manifest, ManifestError
from swarm.errors import ConfigurationError
from swarm.identity import Identity, key_id, signed_by

logger = logging.getLogger(__name__)

ANNOUNCEMENT_TTL = 3600.0  # seconds a model announcement lives unless a publisher or seeder stores it again
INFO_HASH_LENGTH = 64  # hex digits of a v2 (SHA-256) info-hash


def published_key(name: str) -> str:
    return f"swarm.published.{name}"


def seeders_key(info_hash: str) -> str:
    return f"swarm.seeders.{info_hash}"


@dataclass(frozen=True)
class Announcement:
    name: str
    info_hash: str  # hex of the v2 torrent's SHA-256 info-hash
    manifest: dict  # `Manifest.to_dict()`
    published_at: float  # seconds since the epoch, by the publisher's clock
    publisher: str  # hex of the publisher's Ed25519 public key
    signature: str  # hex of its signature of `payload()`

    def payload(self) -> bytes:
        fields = {"name": self.name, "info_hash": self.info_hash, "manifest": self.manifest, "published_at": self.published_at}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def create(cls, manifest: Manifest, info_hash: str, identity: Identity) -> "Announcement":
        unsigned = cls(manifest.name, info_hash, manifest.to_dict(), time.time(), identity.public_key, "")
        return cls(**{**asdict(unsigned), "signature": identity.sign(unsigned.payload())})

    def verified(self) -> bool:
        return signed_by(self.publisher, self.signature, self.payload())

    @classmethod
    def from_dict(cls, value) -> "Announcement | None":
        """An announcement from a DHT value, if it is well formed (its signature is checked by `verified`)."""
        if not isinstance(value, dict):
            return None
        try:
            announcement = cls(**{name: value[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None
        well_formed = (
            isinstance(announcement.name, str)
            and isinstance(announcement.info_hash, str)
            and len(announcement.info_hash) == INFO_HASH_LENGTH
            and all(digit in "0123456789abcdef" for digit in announcement.info_hash)
            and isinstance(announcement.manifest, dict)
            and isinstance(announcement.published_at, (int, float))
            and isinstance(announcement.publisher, str)
            and isinstance(announcement.signature, str)
        )
        return announcement if well_formed else None

    def checked_manifest(self) -> Manifest:
        manifest = Manifest.from_dict(self.manifest)
        if manifest.name != self.name:
            raise ManifestError(f"the manifest of {self.name!r} names {manifest.name!r}")
        return manifest


def announce_model(dht: DHT, announcement: Announcement, ttl: float = ANNOUNCEMENT_TTL) -> bool:
    return dht.store(
        published_key(announcement.name), asdict(announcement), get_dht_time() + ttl, subkey=key_id(announcement.publisher)
    )


def fetch_announcements(dht: DHT, name: str) -> list[Announcement]:
    """The announcements of `name` whose signatures check, one per publisher."""
    found = dht.get(published_key(name), latest=True)
    announcements = []
    if found is not None and isinstance(found.value, dict):
        for subkey, entry in found.value.items():
            announcement = Announcement.from_dict(getattr(entry, "value", None))
            if announcement is None or announcement.name != name or subkey != key_id(announcement.publisher):
                logger.debug(f"Ignoring a malformed announcement of {name!r} under {subkey!r}")
            elif not announcement.verified():
                logger.warning(f"Ignoring an announcement of {name!r} whose signature does not check")
            else:
                announcements.append(announcement)
    return announcements


@dataclass(frozen=True)
class Seeder:
    peer_id: str
    address: str  # "host:port" of its libtorrent session
    files: tuple[str, ...]  # the files it has complete

    @property
    def endpoint(self) -> tuple[str, int]:
        host, port = self.address.rsplit(":", 1)
        return host, int(port)


def announce_seeder(dht: DHT, info_hash: str, seeder: Seeder, ttl: float) -> bool:
    value = {"address": seeder.address, "files": list(seeder.files)}
    return dht.store(seeders_key(info_hash), value, get_dht_time() + ttl, subkey=seeder.peer_id)


def fetch_seeders(dht: DHT, info_hash: str) -> list[Seeder]:
    found = dht.get(seeders_key(info_hash), latest=True)
    seeders = []
    if found is not None and isinstance(found.value, dict):
        for peer_id, entry in found.value.items():
            value = getattr(entry, "value", None)
            if not (isinstance(peer_id, str) and isinstance(value, dict)):
                continue
            address, files = value.get("address"), value.get("files")
            if isinstance(address, str) and _is_endpoint(address) and isinstance(files, list) and all(isinstance(f, str) for f in files):
                seeders.append(Seeder(peer_id, address, tuple(files)))
    return seeders


def _is_endpoint(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def choose_announcement(name: str, announcements: list[Announcement], seeders: dict[str, int], pinned: str | None) -> Announcement:
    """The announcement a peer uses for `name`: the pinned info-hash, else the most seeded, then the earliest
    published, then the smallest info-hash (`seeders`: info-hash -> number of peers seeding it)."""
    candidates = [announcement for announcement in announcements if pinned is None or announcement.info_hash == pinned]
    if not candidates:
        pinned_text = f" with info-hash {pinned}" if pinned else ""
        raise ConfigurationError(f"nobody in the swarm announces a model named {name!r}{pinned_text}")
    return min(candidates, key=lambda item: (-seeders.get(item.info_hash, 0), item.published_at, item.info_hash))
