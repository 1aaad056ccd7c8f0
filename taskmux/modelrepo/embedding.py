"""Frozen encoder outputs for training and evaluation, computed as the worker computes them.

An optional cache folder keeps them between runs: one file per (encoder files, kind, list
of texts), named by a SHA-256 of all three, so a changed encoder or data set never reads a
stale entry. Sentence vectors are stored as computed (float32); token states as float16,
which is plenty for fitting and a quarter of the disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding

from model.encoder import Encoder, Floats, l2_normalize
from model.manifest import EMBEDDING, Manifest, load_manifest

log = logging.getLogger(__name__)

MAX_BATCH_TOKENS = 8192


class Embedder:
    """The repository's encoder on CPU, with an optional on-disk cache."""

    def __init__(
        self, repo: Path, *, cache_dir: Path | None = None, branch: str = EMBEDDING
    ) -> None:
        self.repo = repo
        self.branch = branch  # which encoder output: the embedding or the multi-task branch
        self.manifest: Manifest = load_manifest(repo)
        self.encoder = Encoder(repo, self.manifest.encoder, providers=["CPUExecutionProvider"])
        self.cache_dir = cache_dir
        spec = self.manifest.encoder
        checksums = self.manifest.checksums
        files = [checksums.get(spec.model_file), checksums.get(spec.tokenizer_file)]
        if branch != EMBEDDING:
            files += [branch, *(part.sha256 for _, part in sorted(spec.parts.items()))]
        self._fingerprint = json.dumps(files)

    def sentence_vectors(self, texts: Sequence[str]) -> Floats:
        """L2-normalised pooled vectors, one row per text (what classification heads read)."""
        unique = sorted(set(texts))
        cached = self._load(unique, "pooled")
        if cached is None:
            log.info("embedding %d distinct texts", len(unique))
            pooled, _ = self.encoder.encode(
                unique, max_batch_tokens=MAX_BATCH_TOKENS, branch=self.branch
            )
            cached = l2_normalize(pooled)
            self._save(unique, "pooled", cached)
        row_of = {text: i for i, text in enumerate(unique)}
        vectors: Floats = cached[[row_of[t] for t in texts]].astype(np.float32)
        return vectors

    def token_states(
        self, texts: Sequence[str], *, cached: bool = True
    ) -> list[tuple[Floats, Encoding]]:
        """Raw per-token states (incl. [CLS] and [SEP]) and the encoding of each text.

        With `cached`, states go through the cache (float16); without, they are exactly
        what a worker computes (float32), for scoring on the serving path.
        """
        if not cached:
            return self.encoder.encode_tokens(
                list(texts), max_batch_tokens=MAX_BATCH_TOKENS, branch=self.branch
            )
        encodings = self.encoder.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        stacked = self._load(texts, "tokens")
        if stacked is None:
            log.info("encoding tokens of %d texts", len(texts))
            pairs = self.encoder.encode_tokens(
                list(texts), max_batch_tokens=MAX_BATCH_TOKENS, branch=self.branch
            )
            width = self.manifest.encoder.dimension
            full = np.concatenate([s for s, _ in pairs]) if pairs else np.empty((0, width))
            # Fit on float16-rounded states on a first run too, so reruns give the same head.
            stacked = full.astype(np.float16)
            self._save(texts, "tokens", stacked)
        bounds = np.cumsum([0, *(len(e.ids) for e in encodings)])
        if bounds[-1] != len(stacked):
            raise RuntimeError("cached token states do not match the tokenizer")
        return [
            (stacked[bounds[i] : bounds[i + 1]].astype(np.float32), encodings[i])
            for i in range(len(texts))
        ]

    def _path(self, texts: Sequence[str], kind: str) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(self._fingerprint.encode())
        digest.update(kind.encode())
        digest.update(json.dumps(list(texts), ensure_ascii=False).encode("utf-8"))
        return self.cache_dir / f"{kind}-{digest.hexdigest()[:40]}.npy"

    def _load(self, texts: Sequence[str], kind: str) -> npt.NDArray[Any] | None:
        path = self._path(texts, kind)
        if path is None or not path.is_file():
            return None
        log.info("reading cached %s of %d texts from %s", kind, len(texts), path)
        loaded: npt.NDArray[Any] = np.load(path)
        return loaded

    def _save(self, texts: Sequence[str], kind: str, array: npt.NDArray[Any]) -> None:
        path = self._path(texts, kind)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            np.save(f, array)
        tmp.replace(path)
