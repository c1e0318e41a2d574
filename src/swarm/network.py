"""Joining the swarm's DHT: every peer of swarm starts its hivemind DHT through `start_dht`, which makes it check
what it stores and reads, and keeps a private swarm private.

Signed records: a subkey that is a peer id (32 hex digits, the id of an Ed25519 key; see `swarm.identity`) belongs
to the owner of that key. `SignedRecordValidator` makes every DHT peer of swarm refuse to store, and every reader
refuse to believe, a value under such a subkey unless that key signed it: a server's record (`ServerRecord`) or a
model's announcement (`swarm.distribution.records.Announcement`). So no peer can announce blocks in another's name,
nor hide another's records by overwriting them.

Private swarms: with a swarm key (`--swarm-key FILE`), every DHT request and response carries an HMAC of itself
under the key (`SwarmKeyAuthorizer`); a peer without the key can neither read nor write the swarm's records, and
its answers are ignored. The servers' own connections check the key too (`swarm.handshake`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from pathlib import Path

import hivemind
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.auth import AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

from swarm.distribution.records import Announcement
from swarm.errors import ConfigurationError, SwarmUnavailableError
from swarm.identity import key_id
from swarm.records import ServerRecord

logger = logging.getLogger(__name__)

PEER_ID = re.compile(r"[0-9a-f]{32}")
SWARM_KEY_BYTES = 32
MAX_CLOCK_DIFFERENCE = 60.0  # seconds between a DHT request's time and its receiver's clock


def start_dht(
    initial_peers: list[str] | tuple[str, ...] = (),
    host: str | None = None,
    port: int = 0,
    client_mode: bool = False,
    swarm_key: bytes | None = None,
) -> hivemind.DHT:
    """A started hivemind DHT peer (listening on `host`:`port` unless `client_mode`) that checks signed records, and
    that talks only to peers holding `swarm_key` when one is given."""
    options = dict(initial_peers=list(initial_peers), start=True, record_validators=[SignedRecordValidator()])
    if client_mode:
        options["client_mode"] = True
    else:
        options["host_maddrs"] = [f"/ip4/{host or '0.0.0.0'}/tcp/{port}"]
    if swarm_key is not None:
        options["authorizer"] = SwarmKeyAuthorizer(swarm_key)
    try:
        return hivemind.DHT(**options)
    except RuntimeError as error:
        if "bootstrap failed" not in str(error):
            raise
        raise SwarmUnavailableError(
            f"none of the initial peers {list(initial_peers)} answered: they are down or unreachable, or the swarm is "
            "private and this peer does not hold its key"
        ) from None


def load_swarm_key(path: str | Path, create: bool = False) -> bytes:
    """The swarm key in the file at `path` (64 hex digits); with `create`, a new random one is written there (readable
    by its owner only) when there is none."""
    path = Path(path).expanduser()
    if not path.is_file():
        if not create:
            raise ConfigurationError(f"no swarm key file at {path} (`python -m swarm.dht --swarm-key {path}` creates one)")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(SWARM_KEY_BYTES) + "\n")
        path.chmod(0o600)
        logger.info(f"Created a swarm key in {path}: give it to the peers of this swarm only")
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ConfigurationError(f"{path} does not hold a swarm key (at least 32 hex digits)")
    return key


def swarm_key_argument(value) -> bytes | None:
    """A swarm key given as bytes, or as the path of its file; None stays None."""
    if value is None or isinstance(value, bytes):
        return value
    return load_swarm_key(value)


class SignedRecordValidator(RecordValidatorBase):
    """Values under a peer id's subkey must be signed by that peer's key (see the module's docstring)."""

    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:
            return True  # not a subkey swarm writes
        if not (isinstance(subkey, str) and PEER_ID.fullmatch(subkey)):
            return True
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            return False
        if isinstance(value, dict) and "public_key" in value:
            server = ServerRecord.from_dict(value)
            return server is not None and server.peer_id == subkey and server.verified()
        if isinstance(value, dict) and "publisher" in value:
            announcement = Announcement.from_dict(value)
            return announcement is not None and key_id(announcement.publisher) == subkey and announcement.verified()
        return False

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SignedRecordValidator)


class SwarmKeyAuthorizer(AuthorizerBase):
    """Signs every DHT request and response with an HMAC under the swarm key, and accepts only those that carry one
    (fresh, and not seen before)."""

    def __init__(self, swarm_key: bytes):
        self._key = hashlib.sha256(b"swarm-dht\x00" + swarm_key).digest()
        self._recent_nonces = TimedStorage()

    def _mac(self, role: bytes, message) -> bytes:
        return hmac.new(self._key, role + message.SerializeToString(deterministic=True), hashlib.sha256).digest()

    async def sign_request(self, request, service_public_key) -> None:
        auth = request.auth
        auth.time, auth.nonce, auth.signature = get_dht_time(), secrets.token_bytes(16), b""
        auth.signature = self._mac(b"request", request)

    async def validate_request(self, request) -> bool:
        auth = request.auth
        signature, auth.signature = auth.signature, b""
        expected = self._mac(b"request", request)
        auth.signature = signature
        if not hmac.compare_digest(signature, expected):
            return False
        now = get_dht_time()
        with self._recent_nonces.freeze():
            if abs(auth.time - now) > MAX_CLOCK_DIFFERENCE or auth.nonce in self._recent_nonces:
                return False
        self._recent_nonces.store(auth.nonce, None, now + 3 * MAX_CLOCK_DIFFERENCE)
        return True

    async def sign_response(self, response, request) -> None:
        auth = response.auth
        auth.nonce, auth.signature = request.auth.nonce, b""
        auth.signature = self._mac(b"response", response)

    async def validate_response(self, response, request) -> bool:
        auth = response.auth
        signature, auth.signature = auth.signature, b""
        expected = self._mac(b"response", response)
        auth.signature = signature
        return hmac.compare_digest(signature, expected) and auth.nonce == request.auth.nonce
