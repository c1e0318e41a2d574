"""Server records in the hivemind DHT: who serves which blocks of which model, and how well.

For every block it hosts, a server stores a `ServerRecord` under the key `"{model}.block{i}"`,
subkey = its peer id. Records expire `ttl` seconds after they were stored unless re-announced.
Values are plain msgpack dicts (hivemind's serializer, never pickle). Readers keep only records
whose known fields are valid and ignore unknown fields, so newer servers don't break older clients.

A server's peer id is the id of its identity's key (`swarm.identity`), and it signs each record with that key:
readers keep only records whose signature checks against a key of that id, signed in the last
`MAX_RECORD_AGE` seconds (`fetch_records`), so nobody can announce blocks in another server's name, and DHT
peers refuse to store an unsigned or forged value under a peer id's subkey (`swarm.network`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarm.identity import Identity, key_id, signed_by
from swarm.quantization import QUANT_TYPES
from swarm.spans import BlockSpan
from swarm.wire import FLOAT_DTYPES

logger = logging.getLogger(__name__)

MAX_RECORD_AGE = 600.0  # seconds after its signature that a record is still believed (servers re-sign every 30 s)
CLOCK_SKEW = 300.0  # seconds a signer's clock may run ahead of a reader's
_REPORTED: set[str] = set()  # peer ids whose bad records were logged (once each)


class ServerState(str, enum.Enum):
    JOINING = "joining"  # loading its blocks, not serving yet
    ONLINE = "online"  # serving requests
    OFFLINE = "offline"  # leaving or gone


@dataclass(frozen=True)
class ServerRecord:
    peer_id: str  # the server's hivemind peer id (base58)
    start: int  # first hosted block
    end: int  # one past the last hosted block
    state: ServerState
    throughput: float  # tokens per second the server expects to process through its whole span
    version: str  # swarm version of the server
    address: str  # "host:port" of its tensor transport
    dtype: str  # dtype of its weights unless quantized, and of the hidden states it takes and returns unless
    # `travel_dtype` names another
    quant_type: str = "none"  # "int8" or "nf4" if its blocks' linear layers are quantized (`swarm.quantization`)
    travel_dtype: str | None = None  # what hidden states travel to and from it in, unless a client asks for another,
    # where wider than `dtype` (its model's own code widens them between blocks: `ModelFamily.residual_dtype`)
    public_key: str = ""  # hex of its identity's Ed25519 public key, whose `key_id` is `peer_id`
    signed_at: float = 0.0  # seconds since the epoch when it signed the record, by its clock
    signature: str = ""  # hex of its signature of `payload()`

    @property
    def span(self) -> BlockSpan:
        return BlockSpan(self.start, self.end)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}

    def payload(self) -> bytes:
        """What the signature covers: every field but the signature itself."""
        fields = {name: value for name, value in self.to_dict().items() if name != "signature"}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def signed(cls, identity: Identity, **fields) -> "ServerRecord":
        """A record of `fields`, in the name of `identity` (its peer id is the identity's key id)."""
        unsigned = cls(peer_id=identity.key_id, public_key=identity.public_key, signed_at=time.time(), **fields)
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.payload()))

    def verified(self, now: float | None = None) -> bool:
        """Whether the owner of `peer_id`'s key signed this record, recently."""
        now = time.time() if now is None else now
        return (
            len(self.public_key) == 64
            and key_id(self.public_key) == self.peer_id
            and now - MAX_RECORD_AGE <= self.signed_at <= now + CLOCK_SKEW
            and signed_by(self.public_key, self.signature, self.payload())
        )

    @classmethod
    def from_dict(cls, value: Any) -> "ServerRecord | None":
        """Parses a DHT value; returns None for anything malformed. Unknown fields are ignored."""
        if not isinstance(value, dict):
            return None
        try:
            known = {field.name: value[field.name] for field in fields(cls)}
            record = cls(**{**known, "state": ServerState(known["state"])})
        except (KeyError, ValueError, TypeError):
            return None
        valid = (
            isinstance(record.peer_id, str)
            and isinstance(record.start, int)
            and isinstance(record.end, int)
            and 0 <= record.start < record.end
            and isinstance(record.throughput, (int, float))
            and record.throughput >= 0
            and isinstance(record.version, str)
            and isinstance(record.address, str)
            and ":" in record.address
            and isinstance(record.dtype, str)
            and record.quant_type in QUANT_TYPES
            and record.travel_dtype in (None, *FLOAT_DTYPES)
            and isinstance(record.public_key, str)
            and isinstance(record.signed_at, (int, float))
            and isinstance(record.signature, str)
        )
        return record if valid else None


def reachable_host(host: str, announce_host: str | None, visible_maddrs: list[str]) -> str:
    """The address others should dial: `announce_host`, else `host` unless it is a wildcard, else the first
    visible IPv4 address of the DHT (not a loopback one if there is another)."""
    if announce_host:
        return announce_host
    if host not in ("0.0.0.0", "::"):
        return host
    hosts = [maddr.split("/")[2] for maddr in visible_maddrs if maddr.startswith("/ip4/")]
    public = [candidate for candidate in hosts if not candidate.startswith("127.")]
    return (public or hosts or ["127.0.0.1"])[0]


def block_key(model_name: str, block: int) -> str:
    return f"{model_name}.block{block}"


MODELS_KEY = "swarm.models"  # subkey: model name, value: {"num_blocks": N}


def announce(dht: DHT, model_name: str, record: ServerRecord, num_blocks: int, ttl: float) -> bool:
    """Stores `record` under every block of its span and lists the model (with its `num_blocks`) in the
    swarm's registry of models, which `swarm.status` reads. One batch of DHT requests: a store per key
    would wake every DHT peer once per block. Returns True if every block's record was stored (the registry
    entry is refused when another server of the model stored one that expires later, which is as good)."""
    block_keys = [block_key(model_name, block) for block in record.span]
    keys = block_keys + [MODELS_KEY]
    values = [record.to_dict()] * len(block_keys) + [{"num_blocks": num_blocks}]
    subkeys = [record.peer_id] * len(block_keys) + [model_name]
    store = functools.partial(_store_many, keys=keys, values=values, subkeys=subkeys, expiration=get_dht_time() + ttl)
    stored = dht.run_coroutine(store)
    return all(stored[key, record.peer_id] for key in block_keys)


async def _store_many(dht: DHT, node: DHTNode, keys: list, values: list, subkeys: list, expiration: float):
    return await node.store_many(keys, values, expiration, subkeys=subkeys)


async def _get_many(dht: DHT, node: DHTNode, keys: list) -> dict:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    return {key: found.get(key) for key in keys}


def list_model(dht: DHT, model_name: str, num_blocks: int, ttl: float) -> bool:
    """Lists a model in the registry without serving any block (a peer that only seeds its files)."""
    return dht.store(MODELS_KEY, {"num_blocks": num_blocks}, get_dht_time() + ttl, subkey=model_name)


def fetch_models(dht: DHT) -> dict[str, int]:
    """Models announced in the swarm, with their number of blocks."""
    found = dht.get(MODELS_KEY, latest=True)
    models = {}
    if found is not None and isinstance(found.value, dict):
        for name, entry in found.value.items():
            value = getattr(entry, "value", None)
            if isinstance(name, str) and isinstance(value, dict) and isinstance(value.get("num_blocks"), int):
                models[name] = value["num_blocks"]
    return models


def fetch_records(dht: DHT, model_name: str, num_blocks: int) -> list[list[ServerRecord]]:
    """Returns, for each block of the model, the valid records of the servers announcing it (one batch of
    DHT requests for all blocks)."""
    keys = [block_key(model_name, block) for block in range(num_blocks)]
    found_by_key = dht.run_coroutine(functools.partial(_get_many, keys=keys))
    records_by_block = []
    for block, key in enumerate(keys):
        found = found_by_key[key]
        records = []
        if found is not None and isinstance(found.value, dict):
            for entry in found.value.values():
                record = ServerRecord.from_dict(getattr(entry, "value", None))
                if record is not None and not record.verified():
                    _report_once(record.peer_id, f"Ignoring a record of {record.address} for peer {record.peer_id[:16]}: its signature or identity does not check")
                elif record is not None and block in record.span:
                    records.append(record)
        records_by_block.append(records)
    return records_by_block


def _report_once(peer_id: str, message: str):
    if peer_id not in _REPORTED:
        _REPORTED.add(peer_id)
        logger.warning(message)
