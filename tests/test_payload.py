"""The payload cipher (router/payload.py) and the sealed message schema (router/messages.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest

from router import keys
from router.messages import IdempotencyRecord, Job, MalformedMessage, Reply, UnreadablePayload
from router.payload import PayloadCipher, PayloadError, key_id_of, new_key_line, request_digest
from taskmux.config import SettingsError

CANARY = "canary Zürich 東京 🙂 7f3a"
OLD = {"old": os.urandom(32)}
NEW = {"new": os.urandom(32)}


def cipher(*keysets: dict[str, bytes]) -> PayloadCipher:
    merged: dict[str, bytes] = {}
    for keyset in keysets:
        merged.update(keyset)
    return PayloadCipher(merged)


def job(**changes: object) -> Job:
    fields: dict[str, object] = {
        "id": "a1",
        "reply_to": keys.reply_stream("gw"),
        "deadline_ms": 2**41,
        "kind": "zero_shot",
        "head": "zero-shot",
        "texts": (CANARY, "two"),
        "params": {"labels": [CANARY + " label", "other"], "template": "It is {}."},
    }
    fields.update(changes)
    return Job(**fields)  # type: ignore[arg-type]


def as_read(fields: dict[str, str | int | bytes]) -> dict[bytes, bytes]:
    """What XREADGROUP would hand back for these XADD fields."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


# --- the cipher ----------------------------------------------------------------------


def test_seal_then_open_with_the_same_context() -> None:
    c = cipher(NEW)
    sealed = c.seal(CANARY.encode(), "job", "stream", "id")
    assert CANARY.encode() not in sealed
    assert key_id_of(sealed) == "new"
    assert c.open(sealed, "job", "stream", "id") == CANARY.encode()


def test_every_seal_has_a_fresh_nonce() -> None:
    c = cipher(NEW)
    assert c.seal(b"same", "x") != c.seal(b"same", "x")


@pytest.mark.parametrize("position", [-1, -20, 10])
def test_a_changed_byte_fails_authentication(position: int) -> None:
    c = cipher(NEW)
    sealed = bytearray(c.seal(b"payload", "job", "s", "1"))
    sealed[position] ^= 0x01
    with pytest.raises(PayloadError, match="failed authentication"):
        c.open(bytes(sealed), "job", "s", "1")


@pytest.mark.parametrize(
    "context",
    [("job", "other-stream", "1"), ("job", "s", "2"), ("reply", "s", "1"), ("job", "s1", "")],
)
def test_another_context_does_not_open(context: tuple[str, ...]) -> None:
    c = cipher(NEW)
    sealed = c.seal(b"payload", "job", "s", "1")
    with pytest.raises(PayloadError, match="moved to another stream or job"):
        c.open(sealed, *context)


def test_unknown_key_id_names_the_id_and_the_fix() -> None:
    sealed = cipher(OLD).seal(b"payload", "x")
    with pytest.raises(PayloadError) as err:
        cipher(NEW).open(sealed, "x")
    assert err.value.key_id == "old"
    assert "'old' is unknown here (this process has new)" in str(err.value)
    assert "deploy the same key file" in str(err.value)


def test_same_id_different_key_fails_authentication() -> None:
    sealed = PayloadCipher({"k": os.urandom(32)}).seal(b"payload", "x")
    with pytest.raises(PayloadError, match="different key under the same id"):
        PayloadCipher({"k": os.urandom(32)}).open(sealed, "x")


@pytest.mark.parametrize("value", [b"", b"\x02abc", b"\x01\x03old" + b"\0" * 10])
def test_malformed_sealed_values(value: bytes) -> None:
    with pytest.raises(PayloadError):
        cipher(OLD).open(value, "x")


def test_rotation_keeps_old_values_readable_while_both_keys_are_loaded() -> None:
    before = cipher(OLD).seal(b"queued before", "x")
    during = cipher(NEW, OLD)  # the new key made primary, the old one still loaded
    assert during.open(before, "x") == b"queued before"
    assert key_id_of(during.seal(b"now", "x")) == "new"
    assert cipher(OLD, NEW).open(during.seal(b"now", "x"), "x") == b"now"


def test_repr_shows_ids_never_keys() -> None:
    c = cipher(NEW, OLD)
    text = repr(c) + c.describe()
    assert "new" in text and "old" in text
    for key in (*NEW.values(), *OLD.values()):
        assert base64.b64encode(key).decode() not in text
        assert repr(key) not in text


def test_request_digest_is_keyed_and_survives_a_rotation() -> None:
    data = b"EmbedRequest\0" + CANARY.encode()
    assert request_digest(None, data) == hashlib.sha256(data).digest()
    old, new = cipher(OLD), cipher(NEW, OLD)
    assert request_digest(old, data) != hashlib.sha256(data).digest()
    assert request_digest(new, data) != request_digest(old, data)
    assert request_digest(old, data) in new.digests(data)


# --- key files -----------------------------------------------------------------------


def test_key_file_first_key_seals_all_open(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-12\n{new_key_line('k2')}\n\n{new_key_line('k1')}  # old\n")
    c = PayloadCipher.from_file(path)
    assert c.key_ids == ("k2", "k1")
    assert key_id_of(c.seal(b"x")) == "k2"


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("", "no key in the file"),
        ("# only a comment\n", "no key in the file"),
        ("justbase64\n", "line 1: expected `id:base64-key`"),
        ("bad id!:" + base64.b64encode(b"k" * 32).decode(), "line 1: expected `id:base64-key`"),
        ("k1:not*base64\n", "line 1: the key of 'k1' is not valid base64"),
        ("k1:" + base64.b64encode(b"k" * 16).decode(), "is 16 bytes; AES-256 needs 32"),
        (f"{new_key_line('k1')}\n{new_key_line('k1')}\n", "line 2: key id 'k1' appears twice"),
    ],
)
def test_malformed_key_files_name_the_file_and_the_fix(
    tmp_path: Path, content: str, complaint: str
) -> None:
    path = tmp_path / "payload.keys"
    path.write_text(content)
    with pytest.raises(SettingsError) as err:
        PayloadCipher.from_file(path)
    assert f"TASKMUX_PAYLOAD_KEY_FILE={path}" in str(err.value)
    assert complaint in str(err.value)


def test_a_missing_key_file_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read it"):
        PayloadCipher.from_file(tmp_path / "absent")


# --- the sealed schema ---------------------------------------------------------------


def test_a_sealed_job_keeps_only_routing_fields_in_the_clear() -> None:
    original = job()
    fields = as_read(original.encode(cipher(NEW)))
    assert set(fields) == {
        b"v", b"id", b"reply_to", b"deadline_ms", b"kind", b"head", b"top_k",
        b"enqueued_ms", b"sealed",
    }  # fmt: skip
    assert all(b"canary" not in value for value in fields.values())
    assert Job.decode(fields, cipher(NEW)) == original
    assert Job.decode(as_read(original.encode()), cipher(NEW)) == original  # plaintext too


@pytest.mark.parametrize(
    ("field", "value"), [(b"head", b"intent"), (b"id", b"b2"), (b"head", b"_analyze")]
)
def test_a_sealed_job_moved_or_renamed_does_not_open(field: bytes, value: bytes) -> None:
    fields = as_read(job().encode(cipher(NEW)))
    fields[field] = value
    with pytest.raises(UnreadablePayload, match="failed authentication"):
        Job.decode(fields, cipher(NEW))


def test_a_sealed_job_without_a_key_says_what_to_set() -> None:
    fields = as_read(job().encode(cipher(NEW)))
    with pytest.raises(UnreadablePayload) as err:
        Job.decode(fields)
    assert err.value.key_id == "new"
    assert "no payload key: set TASKMUX_PAYLOAD_KEY_FILE" in str(err.value)


def test_a_sealed_job_with_a_bad_payload_is_malformed() -> None:
    c = cipher(NEW)
    fields = as_read(job().encode(c))
    fields[b"sealed"] = c.seal(
        json.dumps({"texts": 1}).encode(), "job", keys.task_stream("zero-shot"), "a1"
    )
    with pytest.raises(MalformedMessage, match="not \\{texts, params\\} JSON"):
        Job.decode(fields, c)


def test_a_sealed_reply_opens_only_on_its_stream() -> None:
    c = cipher(NEW)
    stream = keys.reply_stream("gw")
    reply = Reply(id="a1", code=0, body=CANARY.encode())
    fields = as_read(reply.encode(c, stream))
    assert b"body" not in fields and CANARY.encode() not in fields[b"sealed"]
    read = Reply.decode(fields)
    assert read.payload(c, stream) == CANARY.encode()
    with pytest.raises(UnreadablePayload, match="the worker's reply"):
        read.payload(c, keys.reply_stream("other"))
    with pytest.raises(UnreadablePayload, match="no payload key"):
        read.payload(None, stream)


def test_error_replies_and_plaintext_replies_stay_readable() -> None:
    c = cipher(NEW)
    error = Reply(id="a1", code=9, message="no key")
    assert Reply.decode(as_read(error.encode(c, "s"))).payload(None, "s") == b""
    plain = Reply(id="a1", code=0, body=b"body")
    assert Reply.decode(as_read(plain.encode())).payload(c, "s") == b"body"


def test_a_sealed_idempotency_result_is_bound_to_its_key() -> None:
    c = cipher(NEW)
    digest = request_digest(c, b"request")
    raw = IdempotencyRecord(digest, body=CANARY.encode()).encode(c, "idem:1")
    assert raw[:2] == b"1S" and CANARY.encode() not in raw
    record = IdempotencyRecord.decode(raw)
    assert record.request_hash == digest
    assert record.result(c, "idem:1") == CANARY.encode()
    with pytest.raises(UnreadablePayload, match="the stored result"):
        record.result(c, "idem:2")
    pending = IdempotencyRecord.decode(IdempotencyRecord(digest, owner=b"me").encode(c, "k"))
    assert pending.result(c, "k") is None
