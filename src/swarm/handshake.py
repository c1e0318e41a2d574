"""The first request on a connection to a server: `hello`, in which the server proves who it is.

    client -> server   {"method": "hello", "nonce": N, ["swarm_proof": HMAC(swarm key, "client" N)]}
    server -> client   {"peer_id", "public_key", "signature": its signature of ("swarm-hello" N),
                        ["swarm_proof": HMAC(swarm key, "server" N)]}

N is 32 random bytes (hex) the client chose. The client checks that the key's id is the peer id it chose from the
DHT's signed records and that the signature is that key's, so an address that another peer announced as its own
cannot answer in its name. In a private swarm each side also proves it holds the swarm key, and the server answers
nothing else before (`AccessDeniedError`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from swarm.errors import AccessDeniedError, BadReplyError, BadRequestError
from swarm.identity import Identity, key_id, signed_by

NONCE_HEX_DIGITS = 64


def _swarm_proof(swarm_key: bytes, role: bytes, nonce: str) -> str:
    return hmac.new(swarm_key, b"swarm-handshake\x00" + role + nonce.encode(), hashlib.sha256).hexdigest()


def _payload(nonce: str) -> bytes:
    return b"swarm-hello\x00" + nonce.encode()


def hello_request(swarm_key: bytes | None) -> dict[str, Any]:
    nonce = secrets.token_hex(NONCE_HEX_DIGITS // 2)
    fields = {"method": "hello", "nonce": nonce}
    if swarm_key is not None:
        fields["swarm_proof"] = _swarm_proof(swarm_key, b"client", nonce)
    return fields


def answer_hello(fields: dict[str, Any], identity: Identity, swarm_key: bytes | None) -> dict[str, Any]:
    """The server's answer to a `hello`, or `BadRequestError` / `AccessDeniedError`."""
    nonce = fields.get("nonce")
    if not (isinstance(nonce, str) and len(nonce) == NONCE_HEX_DIGITS and all(c in "0123456789abcdef" for c in nonce)):
        raise BadRequestError(f"hello needs a nonce of {NONCE_HEX_DIGITS} lowercase hex digits")
    answer = {"peer_id": identity.key_id, "public_key": identity.public_key, "signature": identity.sign(_payload(nonce))}
    if swarm_key is not None:
        proof = fields.get("swarm_proof")
        if not (isinstance(proof, str) and hmac.compare_digest(proof, _swarm_proof(swarm_key, b"client", nonce))):
            raise AccessDeniedError("this server belongs to a private swarm, and the client does not hold its key")
        answer["swarm_proof"] = _swarm_proof(swarm_key, b"server", nonce)
    return answer


def check_answer(request: dict[str, Any], answer: dict[str, Any], peer_id: str, address: str, swarm_key: bytes | None):
    """Raises `BadReplyError` unless `answer` proves the server at `address` is `peer_id` (and holds `swarm_key`)."""
    public_key, signature = answer.get("public_key"), answer.get("signature")
    if not (isinstance(public_key, str) and isinstance(signature, str) and len(public_key) == 64):
        raise BadReplyError(f"{address} answered hello without a key and a signature")
    if key_id(public_key) != peer_id or not signed_by(public_key, signature, _payload(request["nonce"])):
        raise BadReplyError(f"{address} cannot prove it is peer {peer_id[:16]}, which announced that address")
    if swarm_key is not None:
        proof = answer.get("swarm_proof")
        if not (isinstance(proof, str) and hmac.compare_digest(proof, _swarm_proof(swarm_key, b"server", request["nonce"]))):
            raise BadReplyError(f"{address} does not hold the swarm key")
