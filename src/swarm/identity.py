"""A peer's identity: an Ed25519 key pair, kept in a file (`~/.cache/swarm/identity.key` by default).

A peer's id is `key_id(public key)`: the first 32 hex digits of the key's SHA-256. Whatever a peer signs (its
server records, a model it publishes, its answer to a connection's challenge) anyone can check against that id,
so no peer can speak for another.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm.errors import ConfigurationError

logger = logging.getLogger(__name__)


def swarm_cache() -> Path:
    """swarm's own cache folder: `$SWARM_CACHE_DIR`, by default `~/.cache/swarm`."""
    return Path(os.environ.get("SWARM_CACHE_DIR") or Path.home() / ".cache" / "swarm").expanduser()


def default_identity_path() -> Path:
    return swarm_cache() / "identity.key"


class Identity:
    """An Ed25519 key pair."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self.private_key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key = raw.hex()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @classmethod
    def generate(cls) -> "Identity":
        """A new key pair, kept in memory only."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> "Identity":
        """The key at `path`, created (readable by its owner only) when there is none."""
        if path.is_file():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except ValueError as error:
                raise ConfigurationError(f"{path} does not hold a private key: {error}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigurationError(f"{path} does not hold an Ed25519 private key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
            file.write(pem)
        logger.info(f"Created an identity in {path}")
        return cls(key)

    def sign(self, payload: bytes) -> str:
        return self.private_key.sign(payload).hex()


def key_id(public_key: str) -> str:
    return hashlib.sha256(bytes.fromhex(public_key)).hexdigest()[:32]


def signed_by(public_key: str, signature: str, payload: bytes) -> bool:
    """Whether `signature` (hex) is `public_key`'s (hex) signature of `payload`."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key)).verify(bytes.fromhex(signature), payload)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
