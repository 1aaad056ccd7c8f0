"""The model repository manifest: what a repository holds, and proof that it is intact.

Layout of a repository folder (built by `taskmux model build`):

    manifest.json                 this manifest
    encoder/model.onnx            the shared encoder (outputs token_embeddings, pooled)
    encoder/model.<variant>.onnx  optional variants of it: int8 (CPU), fp16 (GPU)
    encoder/tokenizer.json        its tokenizer
    encoder/{trunk,embedding,multitask}[.<variant>].onnx
                                  the same encoder cut at a layer (schema 2, optional): a
                                  shared trunk, the original upper layers, and a fine-tuned
                                  copy of them that multi-task heads read
    heads/<name>/<version>/...    each trained head's files

Every file is listed under `checksums` with its SHA-256; a worker refuses a repository
whose files do not match. Encoder variants carry their SHA-256 in their own entry
(`encoder.variants.<name>.sha256`) rather than under `checksums`, so code that rewrites the
head list and its checksums (`head train`) keeps them without knowing about them. Manifests
written before variants existed have no `variants` and load as fp32 only. The same JSON,
minus checksums, is the catalog that workers publish to Redis for gateways.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskmux_api.kinds import HEAD_KINDS, HeadKind

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: no encoder parts, every head reads the embedding branch
MANIFEST_FILE = "manifest.json"


class ModelRepoError(Exception):
    """The model repository is missing, malformed or corrupt."""


VARIANT_NAMES = ("int8", "fp16")  # fp32 is `model_file` itself
EMBEDDING = "embedding"  # a head's features: the original encoder's output
MULTITASK = "multitask"  # a head's features: the fine-tuned multi-task branch
FEATURES = (EMBEDDING, MULTITASK)
PART_NAMES = ("trunk", EMBEDDING, MULTITASK)


@dataclass(frozen=True)
class PartFile:
    """One ONNX graph of a split encoder, with its SHA-256 (kept here, like a variant's)."""

    file: str
    sha256: str


@dataclass(frozen=True)
class VariantSpec:
    """Another file of the same encoder (same inputs and outputs), e.g. quantised to int8."""

    file: str
    sha256: str
    # How it was made from the fp32 file (quantiser or optimiser settings), for the record.
    recipe: str = ""
    # Agreement with fp32 and head figures, from `taskmux model eval --variant`; empty
    # until evaluated. Whether `auto` may pick it is decided from these.
    metrics: dict[str, float] = field(default_factory=dict)
    # The split encoder's graphs in this variant, by part name (PART_NAMES); empty when the
    # repository has no parts.
    parts: dict[str, PartFile] = field(default_factory=dict)


@dataclass(frozen=True)
class EncoderSpec:
    """The shared encoder."""

    name: str
    version: str
    dimension: int
    max_sequence_length: int
    model_file: str
    tokenizer_file: str
    source: str = ""
    variants: dict[str, VariantSpec] = field(default_factory=dict)
    # The encoder cut at `branch_layer` (schema 2): "trunk" (embeddings and the lower
    # layers: input_ids, attention_mask, token_type_ids -> hidden), "embedding" (the
    # original upper layers) and "multitask" (a fine-tuned copy), each branch taking
    # (hidden, attention_mask) to (token_embeddings, pooled). Empty: `model_file` only,
    # and every head reads it. `model_file` is kept either way (trunk + embedding in one).
    parts: dict[str, PartFile] = field(default_factory=dict)
    branch_layer: int = 0


@dataclass(frozen=True)
class HeadSpec:
    """One task head on top of the encoder."""

    name: str
    kind: HeadKind
    version: str
    labels: tuple[str, ...] = ()
    weights_file: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    description: str = ""
    # Classification only: below this top probability the answer is `fallback_label`
    # (e.g. intent's "oos", out of scope). 0 disables it.
    threshold: float = 0.0
    fallback_label: str = ""
    # What the head reads: the embedding branch (the original encoder's output) or the
    # multi-task branch (`EncoderSpec.parts.multitask`). Manifests before schema 2: embedding.
    features: str = EMBEDDING


@dataclass(frozen=True)
class Manifest:
    """A whole model repository's description."""

    encoder: EncoderSpec
    heads: tuple[HeadSpec, ...]
    checksums: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def head(self, name: str) -> HeadSpec | None:
        """The head called `name`, or None."""
        return next((h for h in self.heads if h.name == name), None)

    def to_dict(self, *, with_checksums: bool = True) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        if not with_checksums:
            data.pop("checksums")
        return data

    def to_json(self, *, with_checksums: bool = True) -> str:
        """The manifest as indented, key-sorted JSON."""
        return json.dumps(self.to_dict(with_checksums=with_checksums), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse a manifest dict, raising ModelRepoError on anything malformed."""
        try:
            if data["schema_version"] not in READABLE_SCHEMAS:
                raise ModelRepoError(
                    f"manifest schema_version {data['schema_version']} is not supported "
                    f"(this taskmux reads {READABLE_SCHEMAS}); rebuild with `taskmux model build`"
                )
            encoder = _parse_encoder(data["encoder"])
            heads = tuple(_parse_head(h) for h in data["heads"])
            checksums = {str(k): str(v) for k, v in data.get("checksums", {}).items()}
        except ModelRepoError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise ModelRepoError(f"malformed manifest: {err!r}") from err
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ModelRepoError(f"manifest lists a head twice: {sorted(names)}")
        for head in heads:
            if head.features != EMBEDDING and head.features not in encoder.parts:
                raise ModelRepoError(
                    f"head {head.name!r} reads the {head.features} branch, which the "
                    "encoder does not have"
                )
        return cls(encoder=encoder, heads=heads, checksums=checksums)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse manifest JSON."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ModelRepoError(f"manifest is not valid JSON: {err}") from err
        return cls.from_dict(data)


def _parse_parts(data: dict[str, Any]) -> dict[str, PartFile]:
    parts = {str(k): PartFile(str(v["file"]), str(v["sha256"])) for k, v in data.items()}
    if parts and sorted(parts) != sorted(PART_NAMES):
        raise ModelRepoError(f"encoder parts {sorted(parts)} are not {sorted(PART_NAMES)}")
    return parts


def _parse_encoder(data: dict[str, Any]) -> EncoderSpec:
    fields = dict(data)
    variants = {}
    for name, entry in fields.pop("variants", {}).items():
        if name not in VARIANT_NAMES:
            raise ModelRepoError(f"unknown encoder variant {name!r} (known: {VARIANT_NAMES})")
        variants[name] = VariantSpec(
            file=str(entry["file"]),
            sha256=str(entry["sha256"]),
            recipe=str(entry.get("recipe", "")),
            metrics={str(k): float(v) for k, v in entry.get("metrics", {}).items()},
            parts=_parse_parts(entry.get("parts", {})),
        )
    parts = _parse_parts(fields.pop("parts", {}))
    if parts and any(sorted(v.parts) != sorted(parts) for v in variants.values()):
        raise ModelRepoError("every encoder variant must have the same parts as fp32")
    return EncoderSpec(**fields, variants=variants, parts=parts)


def _parse_head(data: dict[str, Any]) -> HeadSpec:
    head = HeadSpec(
        name=str(data["name"]),
        kind=_head_kind(data),
        version=str(data["version"]),
        labels=tuple(str(label) for label in data.get("labels", ())),
        weights_file=str(data.get("weights_file", "")),
        metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
        description=str(data.get("description", "")),
        threshold=float(data.get("threshold", 0.0)),
        fallback_label=str(data.get("fallback_label", "")),
        features=str(data.get("features", EMBEDDING)),
    )
    if head.features not in FEATURES:
        raise ModelRepoError(f"head {head.name!r} reads unknown features {head.features!r}")
    if HEAD_KINDS[head.kind].trained and (len(head.labels) < 2 or not head.weights_file):
        raise ModelRepoError(f"{head.kind} head {head.name!r} needs 2+ labels and weights")
    if head.fallback_label and head.fallback_label not in head.labels:
        raise ModelRepoError(f"head {head.name!r}: fallback label is not one of its labels")
    return head


def _head_kind(data: dict[str, Any]) -> HeadKind:
    name, kind = str(data["name"]), str(data["kind"])
    try:
        return HeadKind(kind)
    except ValueError:
        raise ModelRepoError(f"head {name!r} has unknown kind {kind!r}") from None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(repo: Path, *, verify: bool = True) -> Manifest:
    """Read `repo/manifest.json`; with `verify`, check every file against its checksum."""
    path = repo / MANIFEST_FILE
    if not path.is_file():
        raise ModelRepoError(
            f"no model repository at {repo} ({MANIFEST_FILE} missing); build one with `make model`"
        )
    manifest = Manifest.from_json(path.read_bytes())
    if verify:
        verify_files(repo, manifest)
    return manifest


def verify_files(repo: Path, manifest: Manifest) -> None:
    """Raise ModelRepoError unless every referenced file exists and matches its checksum."""
    needed = {manifest.encoder.model_file, manifest.encoder.tokenizer_file}
    needed |= {h.weights_file for h in manifest.heads if h.weights_file}
    unlisted = needed - manifest.checksums.keys()
    if unlisted:
        raise ModelRepoError(f"manifest has no checksum for {sorted(unlisted)}")
    for rel, expected in sorted(manifest.checksums.items()):
        file = repo / rel
        if not file.is_file():
            raise ModelRepoError(f"model repository file {rel} is missing from {repo}")
        actual = sha256_file(file)
        if actual != expected:
            raise _mismatch(rel, expected, actual)
    files = [(f"encoder part {name}", part) for name, part in manifest.encoder.parts.items()]
    for name, variant in sorted(manifest.encoder.variants.items()):
        files.append((f"encoder variant {name}", PartFile(variant.file, variant.sha256)))
        files += [(f"encoder variant {name} part {p}", f) for p, f in variant.parts.items()]
    for what, part in files:
        file = repo / part.file
        if not file.is_file():
            raise ModelRepoError(f"{what} ({part.file}) is missing from {repo}")
        actual = sha256_file(file)
        if actual != part.sha256:
            raise _mismatch(part.file, part.sha256, actual)


def _mismatch(rel: str, expected: str, actual: str) -> ModelRepoError:
    return ModelRepoError(
        f"checksum mismatch for {rel}: manifest says {expected[:12]}…, file is "
        f"{actual[:12]}…; the repository is corrupt or was edited: rebuild it with `make model`"
    )


def write_manifest(repo: Path, manifest: Manifest) -> None:
    """Write the manifest atomically (a reader never sees half a file)."""
    tmp = repo / (MANIFEST_FILE + ".tmp")
    tmp.write_text(manifest.to_json() + "\n", encoding="utf-8")
    tmp.replace(repo / MANIFEST_FILE)
