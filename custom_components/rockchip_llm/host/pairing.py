"""The pairing check over TLS: each side proves it holds the pairing key.

It runs right after the TLS handshake, before any request, in fixed-size binary
messages (nothing to parse from a stranger)::

    client -> host   MAGIC, client nonce (32 random bytes)
    host -> client   host nonce (32 random bytes)
    client -> host   client proof = HMAC-SHA256(key, CLIENT | identity | nonces)
    host -> client   host proof   = HMAC-SHA256(key, HOST | identity | nonces)

``identity`` is the SHA-256 of the host's certificate as each side sees it in TLS
(the host: its own; the client: the one it was shown), so a proof made for one
connection, or through a relay that shows another certificate, is worth nothing
elsewhere; both nonces make every proof new. The host answers only a correct client
proof, and closes the connection on anything else without saying why. Both sides
use this module.
"""

import asyncio
import hashlib
import hmac
import secrets
from typing import Final

MAGIC: Final = b"rockchip-llm pairing 1\n"
"""What a client sends first: this handshake, version 1."""
NONCE_BYTES: Final = 32
PROOF_BYTES: Final = hashlib.sha256().digest_size
_CLIENT: Final = b"rockchip-llm client proof\0"
_HOST: Final = b"rockchip-llm host proof\0"


class PairingFailed(Exception):
    """The other side did not prove that it holds the pairing key."""


def proof(
    label: bytes, key: bytes, identity: str, client_nonce: bytes, host_nonce: bytes
) -> bytes:
    """Return one side's proof for one connection."""
    message = label + identity.encode("ascii") + b"\0" + client_nonce + host_nonce
    return hmac.new(key, message, hashlib.sha256).digest()


def client_proof(
    key: bytes, identity: str, client_nonce: bytes, host_nonce: bytes
) -> bytes:
    """Return the client's proof."""
    return proof(_CLIENT, key, identity, client_nonce, host_nonce)


def host_proof(
    key: bytes, identity: str, client_nonce: bytes, host_nonce: bytes
) -> bytes:
    """Return the host's proof."""
    return proof(_HOST, key, identity, client_nonce, host_nonce)


async def async_prove_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: bytes,
    identity: str,
) -> None:
    """Pair as the client; raise PairingFailed unless the host proved the key too.

    A host that refuses the client's proof closes the connection: that is a
    PairingFailed as well.
    """
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    try:
        writer.write(MAGIC + client_nonce)
        await writer.drain()
        host_nonce = await reader.readexactly(NONCE_BYTES)
        writer.write(client_proof(key, identity, client_nonce, host_nonce))
        await writer.drain()
        answer = await reader.readexactly(PROOF_BYTES)
    except (asyncio.IncompleteReadError, ConnectionError) as err:
        raise PairingFailed("the host closed the connection") from err
    if not hmac.compare_digest(
        answer, host_proof(key, identity, client_nonce, host_nonce)
    ):
        raise PairingFailed("the host did not prove that it holds the pairing key")


async def async_check_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: bytes,
    identity: str,
) -> None:
    """Pair as the host; raise PairingFailed (for the log only) unless the client proved the key.

    The client learns nothing from a refusal: the caller closes the connection.
    """
    try:
        if await reader.readexactly(len(MAGIC)) != MAGIC:
            raise PairingFailed("it did not start the pairing handshake")
        client_nonce = await reader.readexactly(NONCE_BYTES)
        host_nonce = secrets.token_bytes(NONCE_BYTES)
        writer.write(host_nonce)
        await writer.drain()
        answer = await reader.readexactly(PROOF_BYTES)
    except asyncio.IncompleteReadError as err:
        raise PairingFailed("it closed the connection during the pairing") from err
    if not hmac.compare_digest(
        answer, client_proof(key, identity, client_nonce, host_nonce)
    ):
        raise PairingFailed(
            "its pairing proof is wrong (a wrong key, an old handshake replayed, or a "
            "relay that shows another certificate)"
        )
    writer.write(host_proof(key, identity, client_nonce, host_nonce))
    await writer.drain()
