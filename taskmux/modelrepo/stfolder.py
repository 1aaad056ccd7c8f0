"""A sentence-transformers folder on disk, read the way sentence-transformers reads it.

`taskmux model build --encoder PATH` checks everything here before any export, so a folder
it cannot serve faithfully is refused in a second with one line saying what to fix:

- `modules.json`: a Transformer module, a Pooling module, then optionally Normalize. Any
  other module (Dense, LayerNorm, ...) changes the output in a way the export does not
  reproduce. Module types are matched by class name, so the names of sentence-transformers
  2 to 6 (`sentence_transformers.models.Pooling`, `...modules.pooling.Pooling`) all read.
- The Transformer module's folder (its `path`, usually the folder itself): `config.json`
  with a `model_type` in MODEL_TYPES, the weights, `tokenizer.json` (the service tokenizes
  with the `tokenizers` library alone), and `sentence_bert_config.json`.
- The Pooling module's `config.json`: mean or CLS pooling, written either as the legacy
  `pooling_mode_*` booleans or as `pooling_mode`.

The maximum sequence length is sentence-transformers': `max_seq_length` of
sentence_bert_config.json, else the tokenizer's `model_max_length` capped at the model's
`max_position_embeddings`. With `do_lower_case`, sentence-transformers lower-cases before
tokenizing; the served tokenizer.json then gets a Lowercase normaliser (`served_tokenizer`).

A Normalize module or not changes nothing that is served: the worker L2-normalises every
sentence vector (workers/compute.py), and similarity and zero-shot are cosines, so the
served embedding is the folder's embedding scaled to unit length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, normalizers

from model.manifest import sha256_file

# Encoders whose export is BERT's: (input_ids, attention_mask, token_type_ids) in, the last
# hidden state out, `encoder.layer.N` modules (the int8 recipe names one). The parity check
# at build time is what vouches for each folder.
MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
POOLING_MODES = ("mean", "cls")
LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",  # nosec B105: a config key naming a pooling, no secret
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin")
MODULES = ("Transformer", "Pooling", "Normalize")
NO_POSITION_LIMIT = 1_000_000  # tokenizers without a limit say int(1e30)


class EncoderFolderError(ValueError):
    """A folder `model build --encoder` cannot build from; the message says what to fix."""


@dataclass(frozen=True)
class EncoderFolder:
    """What a build needs from a sentence-transformers folder, checked."""

    path: Path  # the folder given (resolved): what sentence-transformers loads
    model_dir: Path  # the Transformer module's folder: config.json, weights, tokenizer.json
    model_type: str
    dimension: int
    num_heads: int
    max_sequence_length: int
    pooling: str  # one of POOLING_MODES
    normalize: bool  # a Normalize module (informative: the service always normalises)
    lowercase: bool  # the served tokenizer must lower-case (do_lower_case, not in tokenizer)
    weights_sha256: str  # of the weight files, by name (`weights_digest`)

    @property
    def name(self) -> str:
        """The encoder's name in the manifest: the folder's name."""
        return self.path.name


def read_encoder_folder(path: Path) -> EncoderFolder:
    """Read and check the folder; raises EncoderFolderError naming what to fix."""
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise EncoderFolderError(f"{path}: no such folder (give a sentence-transformers folder)")
    modules = _modules(path)
    model_dir = path / modules["Transformer"]
    config = _json(model_dir / "config.json", "the Hugging Face model config")
    model_type = str(config.get("model_type", ""))
    if model_type not in MODEL_TYPES:
        raise EncoderFolderError(
            f"{model_dir / 'config.json'}: model_type {model_type or 'missing'!r} is not one "
            f"whose export taskmux knows ({', '.join(MODEL_TYPES)}); choose a BERT-family model"
        )
    dimension = _int_field(config, "hidden_size", model_dir)
    pooling = _pooling(path / modules["Pooling"], dimension)
    tokenizer = _tokenizer(model_dir)
    st_config = _json_or_empty(model_dir / "sentence_bert_config.json")
    return EncoderFolder(
        path=path,
        model_dir=model_dir,
        model_type=model_type,
        dimension=dimension,
        num_heads=_int_field(config, "num_attention_heads", model_dir),
        max_sequence_length=_max_length(model_dir, config, st_config),
        pooling=pooling,
        normalize="Normalize" in modules,
        lowercase=bool(st_config.get("do_lower_case")) and not _lowercases(tokenizer),
        weights_sha256=weights_digest(model_dir),
    )


def served_tokenizer(folder: EncoderFolder, dst: Path) -> None:
    """Write the tokenizer.json the service uses: the folder's, lower-casing when
    sentence-transformers would (`do_lower_case`)."""
    tokenizer = Tokenizer.from_file(str(folder.model_dir / "tokenizer.json"))
    if folder.lowercase:
        inner = [tokenizer.normalizer] if tokenizer.normalizer is not None else []
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *inner])
    tokenizer.save(str(dst))


def weights_digest(model_dir: Path) -> str:
    """SHA-256 over the weight files' names and SHA-256s (sharded weights included)."""
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in model_dir.glob(pattern)})
    if not files:
        raise EncoderFolderError(
            f"{model_dir}: no weights ({', '.join(WEIGHT_PATTERNS)}); save the model there"
        )
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name} {sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _modules(path: Path) -> dict[str, str]:
    """Module class name -> its folder, relative to `path`, in modules.json's order."""
    if not (path / "modules.json").is_file():
        raise EncoderFolderError(
            f"{path}: no modules.json, so not a sentence-transformers folder; save one with "
            "SentenceTransformer(MODEL).save(PATH)"
        )
    entries = _json(path / "modules.json", "the module list")
    kinds = [str(e.get("type", "")).rsplit(".", 1)[-1] for e in entries]
    allowed = [list(MODULES), list(MODULES[:2])]
    if kinds not in allowed:
        raise EncoderFolderError(
            f"{path / 'modules.json'}: modules {kinds}; taskmux exports Transformer, Pooling "
            "and an optional Normalize only (a Dense or other module would be lost)"
        )
    return {kind: str(e.get("path", "")) for kind, e in zip(kinds, entries, strict=True)}


def _pooling(folder: Path, dimension: int) -> str:
    config = _json(folder / "config.json", "the Pooling module's config")
    modes = config.get("pooling_mode")
    if modes is None:
        legacy = [mode for key, mode in LEGACY_POOLING.items() if config.get(key)]
        modes = legacy or ["mean"]  # sentence-transformers' default
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise EncoderFolderError(
            f"{folder / 'config.json'}: pooling {modes}; taskmux serves mean or cls pooling"
        )
    width = config.get("word_embedding_dimension", config.get("embedding_dimension", dimension))
    if int(width) != dimension:
        raise EncoderFolderError(
            f"{folder / 'config.json'}: pools {width} dimensions, the model has {dimension}"
        )
    return str(modes[0])


def _tokenizer(model_dir: Path) -> Tokenizer:
    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise EncoderFolderError(
            f"{model_dir}: no tokenizer.json (the service needs a fast tokenizer); make one "
            f'with: python -c "from transformers import AutoTokenizer; '
            f"AutoTokenizer.from_pretrained('{model_dir}').save_pretrained('{model_dir}')\""
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise EncoderFolderError(f"{file}: not a tokenizers file ({err})") from err


def _lowercases(tokenizer: Tokenizer) -> bool:
    normalizer = tokenizer.normalizer
    return normalizer is not None and normalizer.normalize_str("AZ") == "az"


def _max_length(model_dir: Path, config: dict[str, Any], st_config: dict[str, Any]) -> int:
    positions = int(config.get("max_position_embeddings", NO_POSITION_LIMIT))
    explicit = st_config.get("max_seq_length")
    if explicit is not None:
        if int(explicit) > positions:
            raise EncoderFolderError(
                f"{model_dir / 'sentence_bert_config.json'}: max_seq_length {explicit} "
                f"exceeds the model's {positions} positions; lower it"
            )
        return int(explicit)
    tokenizer_config = _json_or_empty(model_dir / "tokenizer_config.json")
    limit = int(tokenizer_config.get("model_max_length", NO_POSITION_LIMIT))
    length = min(limit, positions)
    if length >= NO_POSITION_LIMIT:
        raise EncoderFolderError(
            f"{model_dir}: no max_seq_length in sentence_bert_config.json and no limit in "
            "config.json or tokenizer_config.json; set max_seq_length"
        )
    return length


def _int_field(config: dict[str, Any], key: str, model_dir: Path) -> int:
    try:
        return int(config[key])
    except (KeyError, TypeError, ValueError) as err:
        raise EncoderFolderError(f"{model_dir / 'config.json'}: no integer {key}") from err


def _json(file: Path, what: str) -> Any:
    if not file.is_file():
        raise EncoderFolderError(f"{file}: missing ({what})")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise EncoderFolderError(f"{file}: not valid JSON ({err})") from err


def _json_or_empty(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    data = _json(file, "")
    return data if isinstance(data, dict) else {}
