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
    heads/<name>/<version>/...    each trained head's files; a head trained with
                                  `taskmux head train --fine-tune` also has its own branch
                                  there (branch[.<variant>].onnx), listed as an encoder part

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
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from taskmux_api.kinds import HEAD_KINDS, HeadKind

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: no encoder parts, every head reads the embedding branch
MANIFEST_FILE = "manifest.json"


class ModelRepoError(Exception):
    """The model repository is missing, malformed or corrupt."""


FP32 = "fp32"  # the variant that is `model_file` itself
VARIANT_NAMES = ("int8", "fp16")
EMBEDDING = "embedding"  # a head's features: the original encoder's output
MULTITASK = "multitask"  # a head's features: the fine-tuned multi-task branch
FEATURES = (EMBEDDING, MULTITASK)
TRUNK = "trunk"  # the part every branch reads
PART_NAMES = (TRUNK, EMBEDDING, MULTITASK)  # the parts a build makes
# A head's own branch (`taskmux head train --fine-tune`) is a part named after the head
# and its version, e.g. "reviews-v2"; the version suffix keeps it apart from the built parts.
BRANCH_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}-v[0-9]+")


@dataclass(frozen=True)
class PartFile:
    """One ONNX graph of a split encoder, with its SHA-256 (kept here, like a variant's)."""

    file: str
    sha256: str
    # Transformer layers in this graph (what a branch costs; the same in every variant);
    # 0 where it was not recorded (manifests written before it).
    layers: int = 0


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

    def branch_cost(self, branch: str) -> float:
        """The share of one full encoder pass that computing `branch` adds per text, shared
        by every head that reads it (the trunk's share is shared by all heads); 0 when the
        manifest does not record the layer counts."""
        if not self.parts:
            return 1.0 if branch == EMBEDDING else 0.0
        part = self.parts.get(branch)
        full = self.parts[TRUNK].layers + self.parts[EMBEDDING].layers
        if part is None or not part.layers or not self.parts[TRUNK].layers or not full:
            return 0.0
        return round(part.layers / full, 4)

    def user_branches(self) -> list[str]:
        """The parts that are heads' own branches (not made by the build)."""
        return sorted(name for name in self.parts if name not in PART_NAMES)

    def built(self) -> EncoderSpec:
        """This spec without heads' own branches."""
        keep = [*PART_NAMES]
        variants = {n: replace(v, parts=_only(v.parts, keep)) for n, v in self.variants.items()}
        return replace(self, parts=_only(self.parts, keep), variants=variants)

    def same_graphs(self, other: EncoderSpec) -> bool:
        """Whether `other` differs from this spec in heads' branches and recorded layer
        counts only: a worker running one serves the other by opening or closing branches."""
        return _graphs(self) == _graphs(other)

    def with_branches(self, branches: dict[str, dict[str, PartFile]]) -> EncoderSpec:
        """This spec with heads' own branches set to `branches` (name -> "fp32" and each
        variant -> its file), any others dropped."""
        built = self.built()
        parts = {**built.parts, **{n: files[FP32] for n, files in branches.items()}}
        variants = {
            v: replace(
                spec, parts={**spec.parts, **{n: f[v] for n, f in branches.items() if v in f}}
            )
            for v, spec in built.variants.items()
        }
        return replace(built, parts=parts, variants=variants)

    def with_layer_counts(self, layers: int) -> EncoderSpec:
        """This spec with the built parts' layer counts recorded where they are missing
        (manifests written before them), for an encoder of `layers` layers in all."""
        if not self.parts:
            return self
        counts = {n: layers - self.branch_layer for n in PART_NAMES} | {TRUNK: self.branch_layer}
        parts = {
            n: replace(p, layers=p.layers or counts[n]) if n in counts else p
            for n, p in self.parts.items()
        }
        return replace(self, parts=parts)

    def branch_files(self, name: str) -> dict[str, PartFile]:
        """A part's files: fp32 and each variant's."""
        files = {FP32: self.parts[name]}
        return files | {v: spec.parts[name] for v, spec in self.variants.items()}


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
    # What the head reads: the embedding branch (the original encoder's output), the
    # multi-task branch (`EncoderSpec.parts.multitask`) or a branch of its own (a part
    # named BRANCH_NAME, `taskmux head train --fine-tune`). Manifests before schema 2:
    # embedding.
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


def _graphs(spec: EncoderSpec) -> EncoderSpec:
    built = spec.built()
    variants = {n: replace(v, parts=_no_layers(v.parts)) for n, v in built.variants.items()}
    return replace(built, parts=_no_layers(built.parts), variants=variants)


def _no_layers(parts: dict[str, PartFile]) -> dict[str, PartFile]:
    return {n: replace(p, layers=0) for n, p in parts.items()}


def _only(parts: dict[str, PartFile], names: list[str]) -> dict[str, PartFile]:
    return {n: p for n, p in parts.items() if n in names}


def _parse_parts(data: dict[str, Any]) -> dict[str, PartFile]:
    parts = {
        str(k): PartFile(str(v["file"]), str(v["sha256"]), int(v.get("layers", 0)))
        for k, v in data.items()
    }
    if not parts:
        return parts
    built = sorted(n for n in parts if n in PART_NAMES)
    if built != sorted(PART_NAMES):
        raise ModelRepoError(f"encoder parts {built} are not {sorted(PART_NAMES)}")
    odd = [n for n in parts if n not in PART_NAMES and not BRANCH_NAME.fullmatch(n)]
    if odd:
        raise ModelRepoError(f"encoder parts {odd} are neither built parts nor heads' branches")
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
    if head.features not in FEATURES and not BRANCH_NAME.fullmatch(head.features):
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
