"""The four shipped tasks as training data for the multi-task branch, on the heads' splits.

Each task reads its data set with the loader its frozen head uses (`SPLIT_SEED`), so the
held-out rows are the very rows the frozen figures are quoted on, and they are never read
here. Training rows come from the inner *fit* part of each head's split and validation rows
(threshold choice, progress figures) from its inner *validation* part; both are seeded
subsamples, so a run fits on this machine's CPU in well under an hour:

- sentiment: every whole SST-2 sentence of the inner fit part plus a sample of its phrases;
  validation on the inner held-out whole sentences.
- intent: CLINC150 `train` (in scope) and half of `oos_train`, out-of-scope rows repeated
  `OOS_REPEAT` times so that the `oos` class is not drowned; validation on the inner split
  (a tenth of `train`, the other half of `oos_train`).
- topic: a sample of the AG News inner fit rows, raw texts.
- entities: a sample of CoNLL-2003 training sentences (IO tags on word pieces, as the frozen
  entities head), validation on a seed+1 tenth of the training sentences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from taskmux_api.kinds import HeadKind
from tokenizers import Encoding, Tokenizer

from taskmux.modelrepo import entities_head, intent, sentiment, topic
from taskmux.modelrepo.datasets import TaggedSentence, entity_types, read_conll
from taskmux.modelrepo.entities_train import scheme_labels, split_sentences, token_targets
from taskmux.modelrepo.recipe import Examples

IGNORE = -100  # target of tokens without a label (torch's cross-entropy default)


@dataclass(frozen=True)
class Sizes:
    """How many rows each task trains and validates on (the CPU budget of a run)."""

    sst_phrases: int = 20000
    intent_per_label: int = 100  # CLINC150 has 100 training queries per intent
    topic_train: int = 9000
    entities_train: int = 12000
    validation: int = 800  # per task, sentences (intent: in scope; all its oos rows besides)
    sentence_tokens: int = 64
    token_tokens: int = 128
    oos_repeat: int = 10
    # Training texts of each other task taught to the intent head as `oos`: CLINC150 has
    # 100 out-of-scope queries, too few to teach a fine-tuned head what is not a query.
    oos_borrowed: int = 300
    max_train: int = 0  # a cap on every task's training rows (0: none)


TINY = Sizes(40, 2, 24, 24, 16, 32, 48, 2, max_train=32)  # the smoke test's: seconds


@dataclass(frozen=True)
class TaskRows:
    """Tokenized rows of one task: encodings and targets (a label id, or one per token)."""

    encodings: list[Encoding]
    targets: list[int] | list[list[int]]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.encodings)


@dataclass(frozen=True)
class Task:
    """One head of the branch: its labels, kind, training rows and validation rows."""

    name: str
    kind: HeadKind
    labels: tuple[str, ...]
    train: TaskRows
    val: TaskRows
    fallback_label: str = ""  # intent: answered below the threshold
    val_sentences: list[TaggedSentence] | None = None  # token tasks: scored as spans


def load_tokenizer(path: Path, max_tokens: int) -> Tokenizer:
    """The serving tokenizer, unpadded, truncating at `max_tokens`."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    return tokenizer


def _sample(rows: Sequence[int], count: int, rng: np.random.Generator) -> list[int]:
    if count >= len(rows):
        return list(rows)
    return sorted(int(i) for i in rng.choice(np.asarray(rows), size=count, replace=False))


def _capped(rows: list[int], sizes: Sizes, rng: np.random.Generator) -> list[int]:
    return _sample(rows, sizes.max_train, rng) if sizes.max_train else rows


def _sentence_rows(tokenizer: Tokenizer, examples: Examples[Any], rows: Sequence[int]) -> TaskRows:
    texts = [examples.texts[i] for i in rows]
    return TaskRows(tokenizer.encode_batch(texts), [int(examples.y[i]) for i in rows], texts)


def sentiment_task(data: Path, seed: int, sizes: Sizes, tokenizer: Tokenizer) -> Task:
    """SST-2: whole sentences and a sample of phrases of the inner fit rows."""
    examples = sentiment.SENTIMENT.load(data, seed)
    rng = np.random.default_rng(seed)
    whole = examples.preferred
    assert whole is not None
    sentences = [i for i in examples.inner_fit if whole[i]]
    phrases = [i for i in examples.inner_fit if not whole[i]]
    train = sorted(sentences + _sample(phrases, sizes.sst_phrases, rng))
    train = _capped(train, sizes, rng)
    val = _sample(examples.inner_val, sizes.validation, rng)
    return Task(
        "sentiment", HeadKind.CLASSIFICATION, examples.labels,
        _sentence_rows(tokenizer, examples, train), _sentence_rows(tokenizer, examples, val),
    )  # fmt: skip


def intent_task(
    data: Path, seed: int, sizes: Sizes, tokenizer: Tokenizer, borrowed: Sequence[str] = ()
) -> Task:
    """CLINC150 with `oos`: the inner fit rows, out-of-scope ones repeated, and `borrowed`
    texts (other tasks' training texts) as out of scope too."""
    examples = intent.INTENT.load(data, seed)
    rng = np.random.default_rng(seed)
    oos = examples.labels.index(intent.OOS)
    by_label: dict[int, list[int]] = {}
    for i in examples.inner_fit:
        by_label.setdefault(int(examples.y[i]), []).append(i)
    inscope = sorted(
        i
        for label, rows in by_label.items()
        if label != oos
        for i in _sample(rows, sizes.intent_per_label, rng)
    )
    out = [i for i in examples.inner_fit if examples.y[i] == oos]
    inscope = _capped(inscope, sizes, rng)
    train = inscope + out * sizes.oos_repeat
    detail = examples.detail
    val = _sample(detail.inscope_val, sizes.validation, rng) + list(detail.oos_val)
    rows = _sentence_rows(tokenizer, examples, train)
    if borrowed:
        extra = list(borrowed)
        rows = TaskRows(
            rows.encodings + tokenizer.encode_batch(extra),
            [*rows.targets, *([oos] * len(extra))],
            rows.texts + extra,
        )
    return Task(
        "intent", HeadKind.CLASSIFICATION, examples.labels,
        rows, _sentence_rows(tokenizer, examples, val), fallback_label=intent.OOS,
    )  # fmt: skip


def topic_task(data: Path, seed: int, sizes: Sizes, tokenizer: Tokenizer) -> Task:
    """AG News: a sample of the inner fit rows."""
    examples = topic.TOPIC.load(data, seed)
    rng = np.random.default_rng(seed)
    train = _capped(_sample(examples.inner_fit, sizes.topic_train, rng), sizes, rng)
    val = _sample(examples.inner_val, sizes.validation, rng)
    return Task(
        "topic", HeadKind.CLASSIFICATION, examples.labels,
        _sentence_rows(tokenizer, examples, train), _sentence_rows(tokenizer, examples, val),
    )  # fmt: skip


def token_rows(
    tokenizer: Tokenizer,
    sentences: Sequence[TaggedSentence],
    labels: Sequence[str],
    scheme: str = entities_head.SCHEME,
) -> TaskRows:
    """Tokenized sentences with one target per word piece (labels in `scheme`)."""
    index = {label: i for i, label in enumerate(labels)}
    texts = [s.text for s in sentences]
    encodings = tokenizer.encode_batch(texts)
    targets: list[list[int]] = []
    for sentence, encoding in zip(sentences, encodings, strict=True):
        row = [IGNORE] * len(encoding.ids)
        for k, label in token_targets(sentence, encoding, index, scheme):
            row[k] = label
        targets.append(row)
    return TaskRows(encodings, targets, texts)


def entities_task(data: Path, seed: int, sizes: Sizes, tokenizer: Tokenizer) -> Task:
    """CoNLL-2003: a sample of the training sentences, IO targets on word pieces."""
    sentences = read_conll(data / entities_head.DATA_FILE)
    labels = scheme_labels(entity_types(sentences), entities_head.SCHEME)
    split = split_sentences(sentences, seed=seed)
    inner = split_sentences(sentences, seed=seed + 1, among=split.train)
    rng = np.random.default_rng(seed)
    train = _capped(_sample(inner.train, sizes.entities_train, rng), sizes, rng)
    val = [sentences[i] for i in _sample(inner.heldout, sizes.validation, rng)]
    return Task(
        "entities", HeadKind.TOKEN_CLASSIFICATION, labels,
        token_rows(tokenizer, [sentences[i] for i in train], labels),
        token_rows(tokenizer, val, labels), val_sentences=val,
    )  # fmt: skip


def load_tasks(data: Path, seed: int, sizes: Sizes, tokenizer_file: Path) -> list[Task]:
    """The four tasks, tokenized (sentence tasks and token tasks at their own lengths)."""
    short = load_tokenizer(tokenizer_file, sizes.sentence_tokens)
    long = load_tokenizer(tokenizer_file, sizes.token_tokens)
    others = [
        sentiment_task(data, seed, sizes, short),
        topic_task(data, seed, sizes, short),
        entities_task(data, seed, sizes, long),
    ]
    rng = np.random.default_rng(seed + 2)
    borrowed = [
        task.train.texts[i]
        for task in others
        for i in _sample(range(len(task.train)), sizes.oos_borrowed, rng)
    ]
    intent_rows = intent_task(data, seed, sizes, short, borrowed if sizes.oos_borrowed else ())
    return [others[0], intent_rows, *others[1:]]
