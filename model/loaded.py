"""A loaded model repository: the verified manifest, the encoder and its heads."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from model.encoder import Encoder, Floats
from model.heads import Head, load_heads
from model.manifest import Manifest, load_manifest
from model.spin import SpinInRun


class LoadSettings(Protocol):
    """What loading needs to know; a worker's settings object is one."""

    @property
    def model_repo(self) -> Path: ...
    @property
    def providers(self) -> Sequence[str]: ...
    @property
    def intra_op_threads(self) -> int: ...
    @property
    def encoder_variant(self) -> str: ...
    @property
    def ort_spin(self) -> bool: ...
    @property
    def ort_spin_in_run(self) -> SpinInRun: ...
    @property
    def encoder_replicas(self) -> int: ...


class LabelCache:
    """Embeddings of zero-shot label sentences, most recently used kept (bounded)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._items: OrderedDict[str, Floats] = OrderedDict()
        self._capacity = capacity

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> Floats | None:
        """The cached vector, marking it recently used."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: Floats) -> None:
        """Cache a vector, evicting the least recently used past capacity."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)


@dataclass(frozen=True)
class LoadedModel:
    """Everything a worker computes with; immutable once loaded."""

    manifest: Manifest
    encoder: Encoder
    heads: dict[str, Head]
    label_cache: LabelCache = field(default_factory=LabelCache)

    @classmethod
    def load(cls, settings: LoadSettings) -> LoadedModel:
        """Verify checksums, then load the encoder and every head; raises ModelRepoError
        (VariantError when `settings.encoder_variant` cannot run here), or ProviderError
        when the ONNX Runtime providers the settings require do not run the session."""
        repo = Path(settings.model_repo)
        manifest = load_manifest(repo, verify=True)
        encoder = Encoder(
            repo,
            manifest.encoder,
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            variant=settings.encoder_variant,
            spin=settings.ort_spin,
            spin_in_run=settings.ort_spin_in_run,
            replicas=settings.encoder_replicas,
        )
        return cls(manifest=manifest, encoder=encoder, heads=load_heads(repo, manifest))
