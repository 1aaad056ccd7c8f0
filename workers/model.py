"""A loaded model repository: the verified manifest, the encoder and its heads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from taskmux.modelrepo.manifest import Manifest, load_manifest
from workers.encoder import Encoder
from workers.heads import Head, load_heads
from workers.settings import WorkerSettings


@dataclass(frozen=True)
class LoadedModel:
    """Everything a worker computes with; immutable once loaded."""

    manifest: Manifest
    encoder: Encoder
    heads: dict[str, Head]

    @classmethod
    def load(cls, settings: WorkerSettings) -> LoadedModel:
        """Verify checksums, then load the encoder and every head; raises ModelRepoError."""
        repo = Path(settings.model_repo)
        manifest = load_manifest(repo, verify=True)
        encoder = Encoder(
            repo,
            manifest.encoder,
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
        )
        return cls(manifest=manifest, encoder=encoder, heads=load_heads(repo, manifest))
