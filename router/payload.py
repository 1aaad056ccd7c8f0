"""Payloads sealed at rest: AES-256-GCM with keys from `TASKMUX_PAYLOAD_KEY_FILE`.

Gateways and workers that load the same key file seal what a user sent or got back
(job texts and parameters, reply bodies, stored idempotency results) before it reaches
Redis, and so its append-only file, snapshots, replicas and dead letters. Only routing
fields stay in the clear (`router.messages`).

The key file (a mounted Secret) holds one key per line, `id:base64`, where the base64
decodes to 32 random bytes; `#` starts a comment. The first key seals, every key opens,
so a key is rotated without downtime: add the new key as a second line everywhere, then
move it to the first line everywhere, then drop the old line once nothing sealed with it
is left (README, Production checklist). `python -m router.payload NEW_ID` prints a
fresh line.

A sealed value is self-describing:

    0x01 | key id length (1 byte) | key id | nonce (12 bytes) | ciphertext + GCM tag (16)

The nonce is fresh and random for every value (2^-32 collision bound after about 2^32
values per key: rotate long before). The associated data binds the key id and the
value's context (what it is, its Redis key and its job id), each length-prefixed, so a
value copied into another stream, under another job id, or from a job into a reply does
not open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from taskmux.config import SettingsError

FORMAT: Final = 1
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
AAD_LABEL: Final = b"taskmux payload v1"
# Request hashes are keyed (HMAC) with a key derived from each payload key, so a hash in
# Redis does not let anyone confirm a guessed text.
DIGEST_LABEL: Final = b"taskmux request digest v1"
FIX = "deploy the same key file (TASKMUX_PAYLOAD_KEY_FILE) to every gateway and worker"


class PayloadError(ValueError):
    """A sealed value that cannot be opened here: unknown key id, tampered, or malformed."""

    def __init__(self, message: str, key_id: str = "") -> None:
        super().__init__(message)
        self.key_id = key_id


class PayloadCipher:
    """Seals with the first key of a key file and opens with any of its keys."""

    def __init__(self, keys: Mapping[str, bytes], *, source: str = "") -> None:
        if not keys:
            raise ValueError("a PayloadCipher needs at least one key")
        self.key_ids = tuple(keys)
        self.primary = self.key_ids[0]
        self.source = source
        self._aead = {kid: AESGCM(key) for kid, key in keys.items()}
        self._digest_keys = {
            kid: hmac.digest(key, DIGEST_LABEL, "sha256") for kid, key in keys.items()
        }

    def __repr__(self) -> str:  # never the keys themselves
        return f"PayloadCipher(ids={self.key_ids!r}, source={self.source!r})"

    def describe(self) -> str:
        """For the start-up log line: ids only."""
        return f"sealing with key id {self.primary!r}, opening {', '.join(self.key_ids)}"

    def seal(self, data: bytes, *context: str) -> bytes:
        """`data` encrypted and authenticated under the primary key, bound to `context`."""
        kid = self.primary.encode()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead[self.primary].encrypt(nonce, data, _aad(kid, context))
        return bytes((FORMAT, len(kid))) + kid + nonce + sealed

    def open(self, value: bytes, *context: str) -> bytes:
        """The data `seal` was given with the same context, or PayloadError."""
        kid, nonce, sealed = split(value)
        aead = self._aead.get(kid)
        if aead is None:
            raise PayloadError(
                f"payload key id {kid!r} is unknown here (this process has "
                f"{', '.join(self.key_ids)}): {FIX}",
                kid,
            )
        try:
            return aead.decrypt(nonce, sealed, _aad(kid.encode(), context))
        except InvalidTag:
            raise PayloadError(
                f"the payload sealed with key id {kid!r} failed authentication: it was "
                "changed, moved to another stream or job, or sealed with a different key "
                f"under the same id ({FIX})",
                kid,
            ) from None

    def digest(self, data: bytes) -> bytes:
        """HMAC-SHA256 of `data` under the primary key's digest key."""
        return hmac.digest(self._digest_keys[self.primary], data, "sha256")

    def digests(self, data: bytes) -> frozenset[bytes]:
        """`digest` under every key: a digest made before a rotation still matches."""
        return frozenset(hmac.digest(k, data, "sha256") for k in self._digest_keys.values())

    @classmethod
    def from_file(cls, path: str | Path) -> PayloadCipher:
        """The keys of a key file; SettingsError names the file, the line and the fix."""
        where = f"TASKMUX_PAYLOAD_KEY_FILE={path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise SettingsError(f"{where}: cannot read it ({reason})") from None
        return cls(parse_key_file(text, where), source=str(path))


def parse_key_file(text: str, where: str) -> dict[str, bytes]:
    """{key id: key} in file order; SettingsError (prefixed by `where`) if malformed."""
    keys: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kid, sep, encoded = (part.strip() for part in line.partition(":"))
        at = f"{where}, line {number}"
        if not sep or not KEY_ID.fullmatch(kid):
            raise SettingsError(
                f"{at}: expected `id:base64-key` with an id of 1-64 letters, digits, '.', "
                "'_' or '-' (make one with `python -m router.payload NEW_ID`)"
            )
        if kid in keys:
            raise SettingsError(f"{at}: key id {kid!r} appears twice; ids must be unique")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise SettingsError(f"{at}: the key of {kid!r} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise SettingsError(
                f"{at}: the key of {kid!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES} "
                "(base64 of 32 random bytes: `python -m router.payload NEW_ID`)"
            )
        keys[kid] = key
    if not keys:
        raise SettingsError(
            f"{where}: no key in the file; add a line `id:base64-key` "
            "(`python -m router.payload NEW_ID` prints one)"
        )
    return keys


def load_cipher(path: str) -> PayloadCipher | None:
    """The cipher of the key file at `path`; None when unset (payloads stay plaintext)."""
    return PayloadCipher.from_file(path) if path else None


def log_at_rest(log: logging.Logger, cipher: PayloadCipher | None) -> None:
    """The start-up line that says whether this process seals payloads."""
    if cipher is None:
        log.warning(
            "payloads are PLAINTEXT at rest in Redis (and in its AOF and RDB files): set "
            "TASKMUX_PAYLOAD_KEY_FILE on every gateway and worker to seal texts and results"
        )
    else:
        log.info("payloads sealed at rest (AES-256-GCM), %s", cipher.describe())


def split(value: bytes) -> tuple[str, bytes, bytes]:
    """(key id, nonce, ciphertext with tag) of a sealed value, or PayloadError."""
    if len(value) < 2 or value[0] != FORMAT:
        raise PayloadError(f"not a sealed payload (format byte {value[:1]!r}, want {FORMAT})")
    end = 2 + value[1]
    if len(value) < end + NONCE_BYTES + TAG_BYTES:
        raise PayloadError("sealed payload is truncated")
    try:
        kid = value[2:end].decode("ascii")
    except UnicodeDecodeError:
        raise PayloadError("sealed payload has a key id that is not ASCII") from None
    return kid, value[end : end + NONCE_BYTES], value[end + NONCE_BYTES :]


def key_id_of(value: bytes) -> str:
    """The key id a sealed value names ("" if it is not one)."""
    try:
        return split(value)[0]
    except PayloadError:
        return ""


def new_key_line(key_id: str) -> str:
    """A line for a key file: `key_id` and 32 fresh random bytes in base64."""
    if not KEY_ID.fullmatch(key_id):
        raise ValueError(f"key id {key_id!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return f"{key_id}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}"


def _aad(kid: bytes, context: tuple[str, ...]) -> bytes:
    parts = [AAD_LABEL, kid, *(c.encode() for c in context)]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def request_digest(cipher: PayloadCipher | None, data: bytes) -> bytes:
    """The hash that identifies a request in Redis: keyed when payloads are sealed."""
    return hashlib.sha256(data).digest() if cipher is None else cipher.digest(data)


if __name__ == "__main__":  # `python -m router.payload NEW_ID`: one key-file line
    if len(sys.argv) != 2:
        sys.exit("usage: python -m router.payload NEW_ID  (prints `NEW_ID:base64-key`)")
    print(new_key_line(sys.argv[1]))
