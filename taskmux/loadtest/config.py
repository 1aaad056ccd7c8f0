"""What a load test does: `LoadConfig`, and the `--mix` and `--lengths` specs that fill it.

Mix spec: comma-separated entries `TASK[:ARG][=WEIGHT]`. Each request picks one entry at
random with probability weight / sum of weights (weight defaults to 1).

    embed                      Embed
    classify:HEAD              Classify with HEAD (required), e.g. classify:sentiment
    entities[:HEAD]            ExtractEntities (HEAD defaults to "entities")
    similarity[:N]             Similarity: one query and N candidates (default 8)
    zero-shot[:L1+L2+...]      ZeroShotClassify with these labels (default 4 topics)
    analyze:H1+H2+...          Analyze (server stream) with these heads, e.g.
                               analyze:embed+sentiment+topic+intent

Length spec: comma-separated `WORDS[=WEIGHT]`; each text gets a length drawn by weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from taskmux_client.channel import TLSConfig, auth_metadata

Mode = Literal["closed", "open"]
Task = Literal["embed", "classify", "entities", "similarity", "zero-shot", "analyze"]

TASKS: tuple[Task, ...] = ("embed", "classify", "entities", "similarity", "zero-shot", "analyze")
DEFAULT_ENTITIES_HEAD = "entities"
DEFAULT_CANDIDATES = 8
DEFAULT_ZERO_SHOT_LABELS = ("sports", "politics", "technology", "health")
MAX_CANDIDATES = 4096  # far above any server limit; only guards against typos
DEFAULT_MIX = "embed"
DEFAULT_LENGTHS = "8,32,128"


class ConfigError(ValueError):
    """A load-test option or spec is invalid; the message says which and why."""


@dataclass(frozen=True)
class MixEntry:
    """One kind of request in the mix: a task, its arguments, and its relative weight."""

    task: Task
    args: tuple[str, ...] = ()  # head, candidate count, labels or heads, by task
    weight: float = 1.0

    @property
    def label(self) -> str:
        """The entry as written in a mix spec, without its weight (used in reports)."""
        return f"{self.task}:{'+'.join(self.args)}" if self.args else self.task

    @property
    def candidates(self) -> int:
        """For similarity: the number of candidates per request."""
        return int(self.args[0]) if self.args else DEFAULT_CANDIDATES


def parse_mix(spec: str) -> tuple[MixEntry, ...]:
    """Parse a mix spec such as `embed=2,classify:sentiment=1`; raise ConfigError."""
    entries: list[MixEntry] = []
    seen: set[str] = set()
    for i, raw in enumerate(spec.split(","), start=1):
        item = raw.strip()
        where = f"mix entry {i} {item!r}"
        if not item:
            raise ConfigError(f"mix entry {i} is empty (spec {spec!r})")
        body, weight = _split_weight(item, where)
        name, _, arg = body.partition(":")
        name = name.strip()
        entry = MixEntry(
            _task(name, where), _task_args(name, arg.strip(), ":" in body, where), weight
        )
        if entry.label in seen:
            raise ConfigError(f"{where}: {entry.label} is listed twice; merge their weights")
        seen.add(entry.label)
        entries.append(entry)
    return tuple(entries)


def parse_lengths(spec: str) -> tuple[tuple[int, float], ...]:
    """Parse a lengths spec such as `8,32=2,128` into (words, weight) pairs."""
    out: list[tuple[int, float]] = []
    for i, raw in enumerate(spec.split(","), start=1):
        item = raw.strip()
        where = f"length entry {i} {item!r}"
        body, weight = _split_weight(item, where)
        try:
            words = int(body)
        except ValueError:
            raise ConfigError(f"{where}: expected a number of words, e.g. 32 or 32=2") from None
        if words < 1:
            raise ConfigError(f"{where}: a text needs at least 1 word")
        out.append((words, weight))
    return tuple(out)


def _split_weight(item: str, where: str) -> tuple[str, float]:
    body, eq, weight_text = item.rpartition("=")
    if not eq:
        return item, 1.0
    try:
        weight = float(weight_text)
    except ValueError:
        raise ConfigError(f"{where}: weight {weight_text!r} is not a number") from None
    if not (weight > 0 and math.isfinite(weight)):
        raise ConfigError(f"{where}: weight must be a positive number, not {weight_text!r}")
    if not body.strip():
        raise ConfigError(f"{where}: nothing before '='")
    return body.strip(), weight


def _task(name: str, where: str) -> Task:
    for task in TASKS:
        if name == task:
            return task
    raise ConfigError(f"{where}: unknown task {name!r}; one of {', '.join(TASKS)}")


def _task_args(name: str, arg: str, has_colon: bool, where: str) -> tuple[str, ...]:
    if has_colon and not arg:
        raise ConfigError(f"{where}: nothing after ':'")
    if name == "embed":
        if arg:
            raise ConfigError(f"{where}: embed takes no argument")
        return ()
    if name == "classify":
        if not arg:
            raise ConfigError(f"{where}: classify needs a head, e.g. classify:sentiment")
        return (_single(arg, "head", where),)
    if name == "entities":
        return (_single(arg, "head", where),) if arg else ()
    if name == "similarity":
        if not arg:
            return ()
        if not (arg.isascii() and arg.isdigit()) or not 1 <= int(arg) <= MAX_CANDIDATES:
            raise ConfigError(
                f"{where}: similarity takes a number of candidates, e.g. similarity:8"
            )
        return (str(int(arg)),)
    if name == "zero-shot":
        if not arg:
            return ()
        labels = _plus_list(arg, "label", where)
        if len(labels) < 2:
            raise ConfigError(f"{where}: zero-shot needs at least 2 labels, e.g. zero-shot:a+b")
        return labels
    if not arg:
        raise ConfigError(f"{where}: analyze needs heads, e.g. analyze:embed+sentiment")
    return _plus_list(arg, "head", where)


def _single(arg: str, what: str, where: str) -> str:
    if "+" in arg:
        raise ConfigError(f"{where}: takes one {what}, not a '+' list")
    return arg


def _plus_list(arg: str, what: str, where: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in arg.split("+"))
    if any(not part for part in items):
        raise ConfigError(f"{where}: empty {what} in {arg!r}")
    if len(set(items)) != len(items):
        raise ConfigError(f"{where}: a {what} is repeated in {arg!r}")
    return items


@dataclass(frozen=True)
class LoadConfig:
    """Everything one load-test run needs; checked on construction (ConfigError)."""

    # gRPC target of the gateway(s): host:port, dns:///name:port, or ipv4:a:p,b:p.
    target: str = "127.0.0.1:50051"
    # "closed": `concurrency` callers back to back; "open": Poisson arrivals at `rate`.
    mode: Mode = "closed"
    # Closed loop: callers, each sending its next request when the previous one ends.
    concurrency: int = 8
    # Open loop: mean arrivals per second.
    rate: float = 0.0
    # Measured time after the warm-up; None means bounded by `requests` only.
    duration_s: float | None = 10.0
    # Time before measuring starts; calls started in it are left out of the figures.
    warmup_s: float = 1.0
    # Measured requests to send (after the warm-up); None means bounded by duration only.
    requests: int | None = None
    # Which requests to send and how often (see parse_mix).
    mix: tuple[MixEntry, ...] = field(default_factory=lambda: parse_mix(DEFAULT_MIX))
    # (words, weight) per text length (see parse_lengths).
    lengths: tuple[tuple[int, float], ...] = field(
        default_factory=lambda: parse_lengths(DEFAULT_LENGTHS)
    )
    # Texts in each request (Embed, Classify, ExtractEntities, ZeroShot, Analyze).
    texts_per_request: int = 1
    # gRPC channels, each its own HTTP/2 connection; callers spread round-robin.
    connections: int = 4
    # Per-call deadline; also bounds how long the end of a run waits for calls in flight.
    deadline_s: float = 10.0
    # Open loop: calls in flight past which a due arrival is dropped (counted, not sent).
    max_outstanding: int = 1024
    # Seeds texts, the task choices and the arrival times.
    seed: int = 0
    # Prebuilt requests per mix entry, reused in turn; raise it for less text reuse.
    distinct_requests: int = 256
    # A fresh idempotency key on every call, as taskmux_client sends by default (the
    # gateway then keeps each response in Redis for its idempotency TTL); turn it off to
    # measure calls without that record.
    idempotency_keys: bool = True
    # TLS to the gateway (a private CA, a client certificate for mutual TLS); None: plaintext.
    tls: TLSConfig | None = None
    # Sent as `authorization: Bearer` on every call when the gateway has a keys file;
    # left out of the repr and of the report.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.target.strip():
            raise ConfigError("target is empty")
        if self.mode not in ("closed", "open"):
            raise ConfigError(f"mode must be 'closed' or 'open', not {self.mode!r}")
        if self.mode == "closed" and self.concurrency < 1:
            raise ConfigError("closed loop needs concurrency >= 1")
        if self.mode == "open" and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ConfigError("open loop needs a rate > 0 (requests/s)")
        if self.duration_s is None and self.requests is None:
            raise ConfigError("set a duration, a number of requests, or both")
        if self.duration_s is not None and not (0 < self.duration_s < math.inf):
            raise ConfigError("duration must be > 0 seconds")
        if self.requests is not None and self.requests < 1:
            raise ConfigError("requests must be >= 1")
        if not (0 <= self.warmup_s < math.inf):
            raise ConfigError("warm-up must be >= 0 seconds")
        if not self.mix:
            raise ConfigError("the mix is empty")
        if not self.lengths or any(w < 1 or not weight > 0 for w, weight in self.lengths):
            raise ConfigError("lengths must be positive word counts with positive weights")
        for name, value in (
            ("texts per request", self.texts_per_request),
            ("connections", self.connections),
            ("max outstanding", self.max_outstanding),
            ("distinct requests", self.distinct_requests),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not (self.deadline_s > 0 and math.isfinite(self.deadline_s)):
            raise ConfigError("deadline must be > 0 seconds")
        try:
            auth_metadata(self.api_key)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def to_dict(self) -> dict[str, object]:
        """The config as JSON-ready values, with the mix and lengths written as specs."""
        return {
            "target": self.target,
            "mode": self.mode,
            "concurrency": self.concurrency if self.mode == "closed" else None,
            "rate": self.rate if self.mode == "open" else None,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "requests": self.requests,
            "mix": format_mix(self.mix),
            "lengths": format_lengths(self.lengths),
            "texts_per_request": self.texts_per_request,
            "connections": self.connections,
            "deadline_s": self.deadline_s,
            "max_outstanding": self.max_outstanding if self.mode == "open" else None,
            "seed": self.seed,
            "distinct_requests": self.distinct_requests,
            "idempotency_keys": self.idempotency_keys,
            "tls": self.tls is not None,
            "api_key_set": self.api_key is not None,
        }


def format_mix(mix: tuple[MixEntry, ...]) -> str:
    """The spec that parse_mix turns back into `mix`."""
    return ",".join(f"{e.label}={e.weight:g}" for e in mix)


def format_lengths(lengths: tuple[tuple[int, float], ...]) -> str:
    """The spec that parse_lengths turns back into `lengths`."""
    return ",".join(f"{words}={weight:g}" for words, weight in lengths)
