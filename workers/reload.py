"""Hot reload of heads: pick up heads added or updated in the model repository.

The worker swaps in a new `LoadedModel` object; batches already computing keep the one
they started with, so in-flight requests finish on their version. A head whose files
are corrupt or do not fit the encoder is refused with a logged reason, and its previous
version (if any) keeps serving.

Of the encoder, only heads' own branches (`taskmux head train --fine-tune`) come and go
while a worker runs: a new branch is opened in the variant the worker runs (its file
checked against the manifest first) and shares the trunk's session; a branch no head
reads any more is closed with the model object that held it. Any other change of the
encoder (a rebuilt repository) needs a rolling restart, and until then the worker serves
the encoder it has, and refuses heads that read a branch it lacks.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from model.encoder import Encoder
from model.heads import HEAD_TYPES, Head
from model.loaded import LoadedModel
from model.manifest import (
    MANIFEST_FILE,
    HeadSpec,
    Manifest,
    ModelRepoError,
    load_manifest,
    sha256_file,
)

log = logging.getLogger(__name__)


def manifest_stamp(repo: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of the manifest: changes whenever it is rewritten."""
    try:
        stat = (repo / MANIFEST_FILE).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def reload_heads(current: LoadedModel, repo: Path) -> LoadedModel:
    """A model serving the repository's current heads (refused ones keep their old version)."""
    try:
        manifest = load_manifest(repo, verify=False)
    except ModelRepoError as err:
        log.error("not reloading: %s", err)
        return current
    encoder = _reload_encoder(current, manifest, repo)
    heads: dict[str, Head] = {}
    checksums = dict(current.manifest.checksums)
    for spec in manifest.heads:
        old = current.heads.get(spec.name)
        if old is not None and _unchanged(old.spec, spec, current.manifest, manifest):
            heads[spec.name] = old
            continue
        try:
            if spec.features not in encoder.branch_names:
                raise ModelRepoError(f"this worker's encoder has no {spec.features} branch")
            heads[spec.name] = _load(repo, manifest, spec, current.manifest.encoder.dimension)
        except ModelRepoError as err:
            log.error("refusing head %s version %s: %s", spec.name, spec.version, err)
            if old is not None:
                heads[spec.name] = old
            continue
        if spec.weights_file:
            checksums[spec.weights_file] = manifest.checksums[spec.weights_file]
        log.info("loaded head %s version %s", spec.name, spec.version)
    for name in current.heads.keys() - heads.keys():
        log.info("head %s left the repository; no longer serving it", name)
    served = Manifest(
        encoder=encoder.spec, heads=tuple(h.spec for h in heads.values()), checksums=checksums
    )
    return dataclasses.replace(current, manifest=served, encoder=encoder, heads=heads)


def _reload_encoder(current: LoadedModel, manifest: Manifest, repo: Path) -> Encoder:
    """The encoder serving the repository's heads' branches, or the current one when the
    encoder changed otherwise or a new branch cannot be opened."""
    old, new = current.encoder.spec, manifest.encoder
    if new == old:
        return current.encoder
    if not new.same_graphs(old):
        log.error("the repository's encoder changed; restart workers to serve it (heads only)")
        return current.encoder
    added = sorted(set(new.user_branches()) - set(old.user_branches()))
    try:
        for name in added:
            part = new.branch_files(name).get(current.encoder.variant)
            if part is None or sha256_file(repo / part.file) != part.sha256:
                raise ModelRepoError(f"the {name} branch's file is missing or corrupt")
        encoder = current.encoder.with_branches(new)
    except Exception as err:  # ONNX Runtime's load errors share no public base class
        log.error("not serving the repository's new branches: %s", err)
        return current.encoder
    gone = sorted(set(old.user_branches()) - set(new.user_branches()))
    log.info("encoder branches: opened %s, closed %s", added or "none", gone or "none")
    return encoder


def _unchanged(old: HeadSpec, new: HeadSpec, before: Manifest, after: Manifest) -> bool:
    if old != new:
        return False
    return not new.weights_file or (
        before.checksums.get(new.weights_file) == after.checksums.get(new.weights_file)
    )


def _load(repo: Path, manifest: Manifest, spec: HeadSpec, dimension: int) -> Head:
    if spec.weights_file:
        expected = manifest.checksums.get(spec.weights_file)
        if expected is None:
            raise ModelRepoError(f"manifest has no checksum for {spec.weights_file}")
        path = repo / spec.weights_file
        if not path.is_file():
            raise ModelRepoError(f"{spec.weights_file} is missing")
        if sha256_file(path) != expected:
            raise ModelRepoError(f"checksum mismatch for {spec.weights_file}")
    head: Head = HEAD_TYPES[spec.kind](spec, repo, dimension)
    return head
