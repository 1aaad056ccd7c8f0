"""Build a model repository from another encoder: `taskmux model build --encoder PATH`.

The steps are the packaged build's (export, variants) plus two of its own:

- a parity check: the fp32 export, run by the worker's own encoder code, against
  sentence-transformers loading the same folder, on English, Chinese, a truncated long
  text, and all of them padded into one batch; the build fails below MIN_COSINE;
- the shipped heads trained on this encoder from the labelled data, by the same recipes as
  `train-defaults` (`shipped.py`), unless the build is told not to (`data_dir=None`).

The committed heads and the multi-task branch were trained on all-MiniLM-L6-v2's weights;
they are never installed here, and the encoder stays one graph (no trunk or branches).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.encoder import Encoder, l2_normalize
from model.manifest import EncoderSpec, HeadSpec, Manifest
from taskmux.modelrepo.build import (
    BUILTIN_HEADS,
    DEFAULT_DATA_DIR,
    EMBED_HEAD,
    ENCODER_FILE,
    ENCODER_NAME,
    TOKENIZER_FILE,
    build_variant_steps,
    export_onnx,
    install_heads,
    new_staging,
    publish,
    quiet_export,
    trained_heads,
    write_staged_manifest,
)
from taskmux.modelrepo.quantize import Geometry
from taskmux.modelrepo.shipped import SHIPPED_HEADS, TRAINERS
from taskmux.modelrepo.stfolder import EncoderFolder, served_tokenizer
from taskmux.progress import Steps

log = logging.getLogger(__name__)

MIN_COSINE = 0.999
PARITY_TEXTS = (
    "A gripping, beautifully acted film.",
    "ok",
    "你好，世界。",  # noqa: RUF001 (Chinese punctuation, on purpose)
    "我们今天用中文写一个比较长的句子，看看模型是否一致。",  # noqa: RUF001
    "Mixed 中文 and English in one text.",
    "Привет, как дела?",
    "",
)
LONG_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "中", "文")


class ParityError(RuntimeError):
    """The export does not give what sentence-transformers gives for the same folder."""


@dataclass(frozen=True)
class Parity:
    """The worst cosine between the export and sentence-transformers, and its text."""

    cosine: float
    text: str
    texts: int


def build_own_repository(
    out: Path,
    folder: EncoderFolder,
    *,
    variants: Sequence[str],
    data_dir: Path | None,
    calibration_dir: Path = DEFAULT_DATA_DIR,
    cache_dir: Path | None = None,
    steps: Steps | None = None,
) -> tuple[Manifest, Parity]:
    """Write a repository for `folder`'s encoder to `out` (replacing it), with the shipped
    heads trained on it from `data_dir` (None: embed, similarity and zero-shot only); int8
    is calibrated on the training texts under `calibration_dir`.

    Raises ParityError, with nothing written, when the export and sentence-transformers
    disagree."""
    steps = steps or Steps()
    steps.expect(2 + len(variants) + (len(SHIPPED_HEADS) + 1 if data_dir else 0))
    staging = new_staging(out)
    try:
        with steps.step(f"export {folder.name} to ONNX"), quiet_export():
            export_onnx(folder.model_dir, staging / ENCODER_FILE, pooling=folder.pooling)
        served_tokenizer(folder, staging / TOKENIZER_FILE)
        encoder = encoder_spec(folder)
        with steps.step("check parity with sentence-transformers"), quiet_export():
            parity = check_parity(staging, encoder, folder)
        steps.write(
            f"parity: worst cosine {parity.cosine:.6f} over {parity.texts} texts "
            f"(at least {MIN_COSINE})\n"
        )
        geometry = Geometry(num_heads=folder.num_heads, hidden_size=folder.dimension)
        built = build_variant_steps(
            staging, variants, steps, data_dir=calibration_dir, geometry=geometry,
            max_tokens=encoder.max_sequence_length,
        )  # fmt: skip
        encoder = replace(encoder, variants=built)
        heads = builtin_heads(folder)
        if data_dir is not None:
            trained = train_heads(staging, encoder, heads, data_dir, cache_dir, steps)
            heads += install_heads(staging, trained, encoder.dimension, steps)
            shutil.rmtree(staging / TRAINING_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish(staging, out, encoder, heads), parity


def encoder_spec(folder: EncoderFolder) -> EncoderSpec:
    """The manifest's encoder: named after the folder, versioned by its weights."""
    return EncoderSpec(
        name=folder.name,
        version=f"sha256-{folder.weights_sha256[:12]}-onnx-fp32",
        dimension=folder.dimension,
        max_sequence_length=folder.max_sequence_length,
        model_file=ENCODER_FILE,
        tokenizer_file=TOKENIZER_FILE,
        source=(
            f"sentence-transformers folder {folder.path} ({folder.model_type}, "
            f"{folder.pooling} pooling, weights sha256:{folder.weights_sha256})"
        ),
    )


def builtin_heads(folder: EncoderFolder) -> list[HeadSpec]:
    """Embed, similarity and zero-shot; the embed head says how this encoder pools."""
    if folder.pooling == "mean":
        return list(BUILTIN_HEADS)
    embed = replace(
        EMBED_HEAD, description="Sentence embeddings: the [CLS] token's state, L2-normalised."
    )
    return [embed if h.name == EMBED_HEAD.name else h for h in BUILTIN_HEADS]


def long_text(tokens: int) -> str:
    """A text of more than `tokens` words (each at least one word piece): truncated."""
    return " ".join(LONG_WORDS[i % len(LONG_WORDS)] for i in range(tokens + 16))


def check_parity(staging: Path, spec: EncoderSpec, folder: EncoderFolder) -> Parity:
    """Compare the staged fp32 export with sentence-transformers on PARITY_TEXTS and a
    truncated long text, all padded into one batch; raises ParityError below MIN_COSINE."""
    from sentence_transformers import SentenceTransformer

    texts = [*PARITY_TEXTS, long_text(spec.max_sequence_length)]
    encoder = Encoder(staging, spec, providers=["CPUExecutionProvider"])
    pooled, _ = encoder.encode(texts, min_padding_efficiency=0.0)
    ours = l2_normalize(pooled)
    # A local folder, never a download.
    reference = SentenceTransformer(str(folder.path), device="cpu", local_files_only=True)
    theirs = np.asarray(
        reference.encode(texts, normalize_embeddings=True, show_progress_bar=False),
        dtype=np.float32,
    )
    cosines = np.sum(ours * theirs, axis=1)
    worst = int(np.argmin(cosines))
    parity = Parity(float(cosines[worst]), texts[worst], len(texts))
    log.info("parity with sentence-transformers: cosines %s", np.round(cosines, 6).tolist())
    if parity.cosine < MIN_COSINE:
        raise ParityError(
            f"the ONNX export of {folder.path} differs from sentence-transformers: cosine "
            f"{parity.cosine:.6f} (at least {MIN_COSINE} needed) for {parity.text[:40]!r}; "
            "the folder's model runs code the export does not reproduce, nothing was written"
        )
    return parity


TRAINING_DIR = "training"  # under the staging folder; removed once the heads are installed


def train_heads(
    staging: Path,
    encoder: EncoderSpec,
    heads: Sequence[HeadSpec],
    data_dir: Path,
    cache_dir: Path | None,
    steps: Steps,
) -> list[tuple[HeadSpec, Path]]:
    """Train the shipped heads on the staged encoder; (spec, weights) of each."""
    # The recipes read the encoder through a repository, so the staged one gets a manifest.
    write_staged_manifest(staging, encoder, heads)
    out = staging / TRAINING_DIR
    for name in SHIPPED_HEADS:
        with steps.step(f"train the {name} head on {encoder.name}"):
            TRAINERS[name](staging, data_dir, out_dir=out / name, cache_dir=cache_dir)
    return [(renamed(spec, encoder.name), w) for spec, w in trained_heads(out)]


def renamed(spec: HeadSpec, encoder_name: str) -> HeadSpec:
    """The recipes' descriptions name the packaged encoder; this head's names its own."""
    return replace(spec, description=spec.description.replace(ENCODER_NAME, encoder_name))
