"""The internal messages that travel through Redis Streams, version 1.

These are not the public API (that is `protos/taskmux/v1`): they can change with a new
`SCHEMA_VERSION`, and every reader checks the version first. Stream entries are flat
maps of byte strings; `encode` and `decode` are the only code that knows the fields.

Job (a request for one head, in a job stream):
    v            schema version, "1"
    id           request id, unique per client call (hex)
    reply_to     the reply stream of the gateway waiting for it
    deadline_ms  absolute deadline, Unix epoch milliseconds; workers drop late jobs
    kind         what to compute, a task kind (taskmux_api/kinds.py): embed, classify,
                 entities, similarity, zero_shot, analyze, anonymize
    head         the head name (also the job stream's name; ANALYZE_STREAM_HEAD for analyze)
    texts        JSON array of strings (similarity: the query, then the candidates);
                 absent when sealed
    top_k        labels (classify, analyze) or candidates (similarity) to rank, >= 0
    enqueued_ms  when the gateway queued it (for queue-wait figures)
    params       optional JSON object: zero_shot {"labels": [...], "template": "...{}..."},
                 analyze {"heads": [...]} and, with the anonymize option, "anonymize":
                 {"labels": {head: [...]}, "style": ...}, anonymize {"labels": [...],
                 "style": "placeholder" | "pseudonym"}; absent when sealed
    sealed       instead of texts and params when the gateway has a payload key
                 (`router.payload`): {"texts": [...], "params": {...}} as JSON, sealed
                 with the context ("job", the job stream, id)
    request_id   optional: the client's request id (API field `request_id`), for logs
                 and dead letters; absent or empty when the client sent none
    traceparent  optional: W3C trace context of the gateway's enqueue span, which the
                 worker's spans continue; absent when the gateway does not trace (the
                 worker then starts a trace of its own), ignored when not valid

Reply (a worker's answer, in a reply stream):
    v            schema version, "1"
    id           the job's request id
    code         gRPC status code number; 0 is OK
    message      what went wrong, for the caller (empty when OK)
    body         on OK: the serialized public response message (EmbedResponse, ...);
                 for analyze, AnalyzeResult messages each prefixed by its varint length
    sealed       instead of a non-empty body when the worker has a payload key: the
                 body sealed with the context ("reply", the reply stream, id)

Readers accept plaintext entries whatever their own setting (so encryption can be
turned on without draining the streams); writers with a key always seal. Everything
else (ids, kind, head, deadlines, top_k, codes, status messages, request_id,
traceparent) is routing data and stays in the clear.

IdempotencyRecord (the value of a `keys.idempotency_key`, a byte string):
    b"1P" + request hash (32 bytes) + owner token     a call is computing it
    b"1D" + request hash (32 bytes) + response body   its result (as a Reply body)
    b"1S" + request hash (32 bytes) + sealed body     the same, sealed with the context
                                                      ("idem", the record's Redis key)
    The request hash is the SHA-256 of the API request without its metadata fields, or
    with a payload key its HMAC (`router.payload.request_digest`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from taskmux_api.kinds import TaskKind

from model.anonymize import Style
from router import keys
from router.payload import PayloadCipher, PayloadError, key_id_of

SCHEMA_VERSION: Final = "1"
HASH_BYTES: Final = 32
IDEM_PENDING: Final = b"1P"
IDEM_DONE: Final = b"1D"
IDEM_SEALED: Final = b"1S"
# Analyze jobs name several heads; they share one stream, which every worker reads.
ANALYZE_STREAM_HEAD: Final = "_analyze"

Fields = dict[bytes, bytes]


class MalformedMessage(ValueError):
    """A stream entry that does not follow the schema above."""


class UnreadablePayload(MalformedMessage):
    """A sealed payload this process cannot open: no key, an unknown key id, or tampered."""

    def __init__(self, message: str, key_id: str = "") -> None:
        super().__init__(message)
        self.key_id = key_id


def open_payload(cipher: PayloadCipher | None, value: bytes, what: str, *context: str) -> bytes:
    """A sealed `what` opened, or UnreadablePayload that says what to fix."""
    if cipher is None:
        raise UnreadablePayload(
            f"{what} is encrypted (payload key id {key_id_of(value)!r}) but this process has "
            "no payload key: set TASKMUX_PAYLOAD_KEY_FILE to the key file the gateways and "
            "workers share",
            key_id_of(value),
        )
    try:
        return cipher.open(value, *context)
    except PayloadError as err:
        raise UnreadablePayload(f"{what}: {err}", err.key_id) from None


@dataclass(frozen=True)
class Job:
    """One client request for one head."""

    id: str
    reply_to: str
    deadline_ms: int
    kind: str  # a TaskKind; decode gives the member itself
    head: str
    texts: tuple[str, ...]
    top_k: int = 1
    enqueued_ms: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    traceparent: str = ""

    def encode(self, cipher: PayloadCipher | None = None) -> dict[str, str | int | bytes]:
        """Fields for XADD; texts and params sealed when `cipher` is given."""
        fields: dict[str, str | int | bytes] = {
            "v": SCHEMA_VERSION,
            "id": self.id,
            "reply_to": self.reply_to,
            "deadline_ms": self.deadline_ms,
            "kind": self.kind,
            "head": self.head,
            "top_k": self.top_k,
            "enqueued_ms": self.enqueued_ms,
        }
        if cipher is None:
            fields["texts"] = json.dumps(self.texts, ensure_ascii=False)
            fields["params"] = json.dumps(self.params, ensure_ascii=False)
        else:
            payload = json.dumps({"texts": self.texts, "params": self.params}, ensure_ascii=False)
            fields["sealed"] = cipher.seal(payload.encode(), *self._context())
        if self.request_id:
            fields["request_id"] = self.request_id
        if self.traceparent:
            fields["traceparent"] = self.traceparent
        return fields

    def _context(self) -> tuple[str, str, str]:
        return ("job", keys.task_stream(self.head), self.id)

    @classmethod
    def decode(cls, fields: Fields, cipher: PayloadCipher | None = None) -> Job:
        """Parse an entry read from a job stream, or raise MalformedMessage (its subclass
        UnreadablePayload for a sealed entry that `cipher` cannot open)."""
        _check_version(fields)
        if b"sealed" in fields:
            fields = _opened_job(fields, cipher)
        try:
            texts = json.loads(_text(fields, "texts"))
        except ValueError as err:
            raise MalformedMessage(f"field 'texts' is not JSON: {err}") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise MalformedMessage("field 'texts' must be a JSON array of strings")
        job = cls(
            id=_text(fields, "id"),
            reply_to=_text(fields, "reply_to"),
            deadline_ms=_int(fields, "deadline_ms"),
            kind=_kind(fields),
            head=_text(fields, "head"),
            texts=tuple(texts),
            top_k=_int(fields, "top_k"),
            enqueued_ms=_int(fields, "enqueued_ms"),
            params=_params(fields),
            request_id=_text(fields, "request_id") if b"request_id" in fields else "",
            traceparent=_text(fields, "traceparent") if b"traceparent" in fields else "",
        )
        if not job.texts or job.top_k < 0 or not job.id or not job.reply_to:
            raise MalformedMessage("job needs an id, a reply_to, texts and top_k >= 0")
        if not is_reply_stream(job.reply_to):
            raise MalformedMessage(f"reply_to {job.reply_to!r} is not a reply stream")
        _check_params(job)
        return job


def _opened_job(fields: Fields, cipher: PayloadCipher | None) -> Fields:
    """The fields with `sealed` opened into `texts` and `params`."""
    head, job_id = _text(fields, "head"), _text(fields, "id")
    context = ("job", keys.task_stream(head), job_id)
    data = open_payload(cipher, fields[b"sealed"], "the job's payload", *context)
    try:
        payload = json.loads(data)
        texts, params = payload["texts"], payload["params"]
    except (ValueError, TypeError, KeyError):
        raise MalformedMessage("sealed payload is not {texts, params} JSON") from None
    opened = dict(fields)
    opened[b"texts"] = json.dumps(texts, ensure_ascii=False).encode()
    opened[b"params"] = json.dumps(params, ensure_ascii=False).encode()
    return opened


@dataclass(frozen=True)
class Reply:
    """A worker's answer to one job; `sealed` holds the body as read, if it was sealed."""

    id: str
    code: int
    message: str = ""
    body: bytes = b""
    sealed: bytes = b""

    def encode(
        self, cipher: PayloadCipher | None = None, stream: str = ""
    ) -> dict[str, str | int | bytes]:
        """Fields for XADD to `stream`; a non-empty body sealed when `cipher` is given."""
        fields: dict[str, str | int | bytes] = {
            "v": SCHEMA_VERSION,
            "id": self.id,
            "code": self.code,
            "message": self.message,
        }
        if cipher is not None and self.body:
            fields["sealed"] = cipher.seal(self.body, "reply", stream, self.id)
        else:
            fields["body"] = self.body
        return fields

    @classmethod
    def decode(cls, fields: Fields) -> Reply:
        """Parse an entry read from a reply stream, or raise MalformedMessage; a sealed
        body stays sealed until `payload` opens it."""
        _check_version(fields)
        return cls(
            id=_text(fields, "id"),
            code=_int(fields, "code"),
            message=_text(fields, "message"),
            body=fields.get(b"body", b""),
            sealed=fields.get(b"sealed", b""),
        )

    def payload(self, cipher: PayloadCipher | None, stream: str) -> bytes:
        """The body, opened if sealed; UnreadablePayload if `cipher` cannot open it."""
        if not self.sealed:
            return self.body
        return open_payload(cipher, self.sealed, "the worker's reply", "reply", stream, self.id)


@dataclass(frozen=True)
class IdempotencyRecord:
    """The state of one idempotency key: pending (owner set) or done (body set)."""

    request_hash: bytes
    owner: bytes = b""
    body: bytes | None = None
    sealed: bool = False  # body as read is sealed: `result` opens it

    def encode(self, cipher: PayloadCipher | None = None, key: str = "") -> bytes:
        """The value to store under `key`; a body sealed when `cipher` is given."""
        if len(self.request_hash) != HASH_BYTES:
            raise ValueError("request_hash must be a SHA-256 digest")
        if self.body is None:
            return IDEM_PENDING + self.request_hash + self.owner
        if cipher is None:
            return IDEM_DONE + self.request_hash + self.body
        return IDEM_SEALED + self.request_hash + cipher.seal(self.body, "idem", key)

    @classmethod
    def decode(cls, raw: bytes) -> IdempotencyRecord:
        """Parse a stored value, or raise MalformedMessage."""
        state, request_hash, rest = raw[:2], raw[2 : 2 + HASH_BYTES], raw[2 + HASH_BYTES :]
        if len(request_hash) != HASH_BYTES or state not in (IDEM_PENDING, IDEM_DONE, IDEM_SEALED):
            raise MalformedMessage(f"not an idempotency record: {raw[:8]!r}...")
        if state == IDEM_PENDING:
            return cls(request_hash, owner=rest)
        return cls(request_hash, body=rest, sealed=state == IDEM_SEALED)

    def result(self, cipher: PayloadCipher | None, key: str) -> bytes | None:
        """The stored response body (opened if sealed), None while pending;
        UnreadablePayload if `cipher` cannot open it."""
        if self.body is None or not self.sealed:
            return self.body
        return open_payload(cipher, self.body, "the stored result", "idem", key)


def stream_entries(response: Any) -> list[tuple[bytes, list[tuple[bytes, Fields]]]]:
    """(stream, [(entry id, fields)]) from a RESP2 XREAD/XREADGROUP reply.

    Entries deleted while pending come back with no fields; they are skipped.
    """
    return [
        (stream, [(entry_id, fields) for entry_id, fields in entries if fields])
        for stream, entries in response or []
    ]


def reply_address(fields: Fields) -> tuple[str, str] | None:
    """(request id, reply stream) of an entry too broken to decode, if those survive."""
    try:
        address = _text(fields, "id"), _text(fields, "reply_to")
    except MalformedMessage:
        return None
    # Never write to a key that is not a reply stream, whatever a broken entry names.
    return address if is_reply_stream(address[1]) else None


def is_reply_stream(key: str) -> bool:
    """True for keys of the form `router.keys.reply_stream(...)`."""
    return key.startswith(keys.reply_stream("")) and len(key) > len(keys.reply_stream(""))


def pack_messages(messages: list[bytes]) -> bytes:
    """Concatenate serialized messages, each prefixed by its length as a varint."""
    out = bytearray()
    for message in messages:
        n = len(message)
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                break
        out += message
    return bytes(out)


def unpack_messages(data: bytes) -> list[bytes]:
    """The messages that `pack_messages` concatenated; MalformedMessage if cut short."""
    messages, pos = [], 0
    while pos < len(data):
        n = shift = 0
        while True:
            if pos >= len(data) or shift > 35:
                raise MalformedMessage("truncated length prefix")
            byte = data[pos]
            pos += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if pos + n > len(data):
            raise MalformedMessage("truncated message")
        messages.append(data[pos : pos + n])
        pos += n
    return messages


def _params(fields: Fields) -> dict[str, Any]:
    raw = fields.get(b"params")
    if raw is None:
        return {}
    try:
        params = json.loads(raw)
    except ValueError:
        raise MalformedMessage("field 'params' is not JSON") from None
    if not isinstance(params, dict):
        raise MalformedMessage("field 'params' must be a JSON object")
    return params


def _kind(fields: Fields) -> TaskKind:
    kind = _text(fields, "kind")
    try:
        return TaskKind(kind)
    except ValueError:
        raise MalformedMessage(f"unknown job kind {kind!r}") from None


def _check_params(job: Job) -> None:
    """The parameters each kind needs (see the Job fields above), so that a job that
    decodes can be computed."""
    if job.kind == TaskKind.ZERO_SHOT:
        if not _strings(job.params.get("labels")):
            raise MalformedMessage("a zero_shot job needs params.labels, a list of strings")
        if not isinstance(job.params.get("template", ""), str):
            raise MalformedMessage("params.template of a zero_shot job must be a string")
    elif job.kind == TaskKind.ANALYZE:
        if not _strings(job.params.get("heads")):
            raise MalformedMessage("an analyze job needs params.heads, a list of strings")
        if "anonymize" in job.params:
            _check_analyze_anonymize(job.params["anonymize"])
    elif job.kind == TaskKind.ANONYMIZE:
        if not _strings(job.params.get("labels")):
            raise MalformedMessage("an anonymize job needs params.labels, a list of strings")
        _check_style(job.params)
    elif job.kind == TaskKind.SIMILARITY and len(job.texts) < 2:
        raise MalformedMessage("a similarity job needs a query and at least one candidate")


def _check_analyze_anonymize(options: Any) -> None:
    labels = options.get("labels") if isinstance(options, dict) else None
    if not isinstance(labels, dict) or not all(map(_strings, labels.values())):
        raise MalformedMessage("params.anonymize.labels must map heads to lists of strings")
    _check_style(options)


def _check_style(params: dict[str, Any]) -> None:
    if params.get("style") not in tuple(Style):
        raise MalformedMessage(f"params.style must be one of {', '.join(Style)}")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _check_version(fields: Fields) -> None:
    version = fields.get(b"v")
    if version != SCHEMA_VERSION.encode():
        raise MalformedMessage(
            f"unsupported schema version {version!r}; this build reads {SCHEMA_VERSION!r}"
        )


def _text(fields: Fields, name: str) -> str:
    raw = fields.get(name.encode())
    if raw is None:
        raise MalformedMessage(f"missing field {name!r}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage(f"field {name!r} is not UTF-8") from None


def _int(fields: Fields, name: str) -> int:
    try:
        return int(_text(fields, name))
    except ValueError:
        raise MalformedMessage(f"field {name!r} is not an integer") from None
