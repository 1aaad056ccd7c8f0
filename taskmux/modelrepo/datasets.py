"""Read labelled training data, failing with a message that names the file, line and column.

Readers check everything before anything is embedded or written, so bad data costs nothing:

- `read_table`: CSV, TSV (with a header row) or JSONL with a text and a label column, for
  `taskmux head train --kind classification`.
- `read_conll`: tagged sentences, one `word###TAG` sentence a line (the shipped
  conll2003/train.txt) or the classic one token a line (`word [...] TAG`, blank lines
  between sentences), for `--kind token`.
- `read_clinc`, `read_agnews`: the shipped intent and topic data sets.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
CONLL_SEPARATOR = "###"
_TAG = re.compile(r"^(O|[BI]-\S+)$")


class TrainingDataError(ValueError):
    """The labelled data is missing or unusable; nothing was written."""


@dataclass(frozen=True)
class LabelledRows:
    """Texts with their string labels, in file order."""

    texts: list[str]
    labels: list[str]

    def label_set(self) -> tuple[str, ...]:
        """The distinct labels, sorted."""
        return tuple(sorted(set(self.labels)))


@dataclass(frozen=True)
class TaggedSentence:
    """One sentence of words with one BIO tag per word."""

    words: tuple[str, ...]
    tags: tuple[str, ...]

    @property
    def text(self) -> str:
        """The words joined by single spaces: the raw text a caller would send."""
        return " ".join(self.words)


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def read_text(path: Path) -> str:
    """A file's text as UTF-8 (a leading BOM is dropped); TrainingDataError if unreadable."""
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise TrainingDataError(
            f"{path}:{line}: not UTF-8 (byte {data[err.start]:#04x} at offset {err.start})"
        ) from err
    if not text.strip():
        raise TrainingDataError(f"{path}: empty file")
    return text


def read_table(
    path: Path, *, text_column: str = "text", label_column: str = "label"
) -> LabelledRows:
    """Rows of a CSV, TSV or JSONL file (chosen by extension); need 2+ distinct labels."""
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise TrainingDataError(
            f"{path}: unknown extension {path.suffix!r}; use one of {sorted(TABLE_FORMATS)}"
        )
    text = read_text(path)
    if kind == "jsonl":
        rows = _jsonl_rows(path, text, text_column, label_column)
    else:
        rows = _delimited_rows(path, text, kind, text_column, label_column)
    if not rows:
        raise TrainingDataError(f"{path}: no data rows")
    data = LabelledRows([t for t, _ in rows], [label for _, label in rows])
    labels = data.label_set()
    if len(labels) < 2:
        raise TrainingDataError(
            f"{path}: column {label_column!r} has one label only ({labels[0]!r}); need two"
        )
    return data


def _delimited_rows(
    path: Path, text: str, kind: str, text_column: str, label_column: str
) -> list[tuple[str, str]]:
    source = io.StringIO(text, newline="")
    if kind == "csv":
        reader = csv.reader(source)
    else:
        reader = csv.reader(source, delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = [name.strip() for name in next(reader)]
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise TrainingDataError(f"{path}:1: header {header} lacks column(s) {missing}")
        text_at, label_at = header.index(text_column), header.index(label_column)
        rows: list[tuple[str, str]] = []
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise TrainingDataError(
                    f"{path}:{line}: {len(row)} fields, the header has {len(header)}"
                )
            rows.append(
                _checked(path, line, row[text_at], row[label_at], text_column, label_column)
            )
    except csv.Error as err:
        raise TrainingDataError(f"{path}:{reader.line_num}: {err}") from err
    return rows


def _jsonl_rows(
    path: Path, text: str, text_column: str, label_column: str
) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record: Any = json.loads(raw)
        except ValueError as err:
            raise TrainingDataError(f"{path}:{line}: not JSON: {err}") from err
        if not isinstance(record, dict):
            raise TrainingDataError(f"{path}:{line}: expected a JSON object")
        missing = [c for c in (text_column, label_column) if c not in record]
        if missing:
            raise TrainingDataError(f"{path}:{line}: no key(s) {missing}")
        value, label = record[text_column], record[label_column]
        if not isinstance(value, str):
            raise TrainingDataError(f"{path}:{line}: column {text_column!r} is not a string")
        if not isinstance(label, str | int) or isinstance(label, bool):
            raise TrainingDataError(f"{path}:{line}: column {label_column!r} is not a string")
        rows.append(_checked(path, line, value, str(label), text_column, label_column))
    return rows


def _checked(
    path: Path, line: int, text: str, label: str, text_column: str, label_column: str
) -> tuple[str, str]:
    if not text.strip():
        raise TrainingDataError(f"{path}:{line}: column {text_column!r} is empty")
    label = label.strip()
    if not label:
        raise TrainingDataError(f"{path}:{line}: column {label_column!r} is empty")
    return text, label


def read_conll(path: Path) -> list[TaggedSentence]:
    """Tagged sentences in either CoNLL layout (see the module docstring)."""
    text = read_text(path)
    lines = text.splitlines()
    if any(CONLL_SEPARATOR in line for line in lines):
        sentences = [
            _hash_sentence(path, n, line) for n, line in enumerate(lines, 1) if line.strip()
        ]
    else:
        sentences = _columns_sentences(path, lines)
    if not sentences:
        raise TrainingDataError(f"{path}: no sentences")
    types = entity_types(sentences)
    if not types:
        raise TrainingDataError(f"{path}: every tag is O; need at least one entity type")
    return sentences


def _hash_sentence(path: Path, line: int, raw: str) -> TaggedSentence:
    words, tags = [], []
    for column, token in enumerate(raw.split(), start=1):
        word, sep, tag = token.rpartition(CONLL_SEPARATOR)
        if not sep or not word:
            raise TrainingDataError(
                f"{path}:{line}: token {column} ({token!r}) is not word{CONLL_SEPARATOR}TAG"
            )
        words.append(word)
        tags.append(_checked_tag(path, line, tag))
    return TaggedSentence(tuple(words), tuple(tags))


def _columns_sentences(path: Path, lines: Sequence[str]) -> list[TaggedSentence]:
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    for line, raw in enumerate([*lines, ""], start=1):
        fields = raw.split()
        if fields and fields[0] == "-DOCSTART-":
            continue
        if not fields:
            if words:
                sentences.append(TaggedSentence(tuple(words), tuple(tags)))
            words, tags = [], []
            continue
        if len(fields) < 2:
            raise TrainingDataError(f"{path}:{line}: expected `word TAG`, got {raw.strip()!r}")
        words.append(fields[0])
        tags.append(_checked_tag(path, line, fields[-1]))
    return sentences


def _checked_tag(path: Path, line: int, tag: str) -> str:
    if not _TAG.match(tag):
        raise TrainingDataError(f"{path}:{line}: tag {tag!r} is not O, B-TYPE or I-TYPE")
    return tag


def entity_types(sentences: Sequence[TaggedSentence]) -> list[str]:
    """The entity types that occur, sorted."""
    return sorted({tag[2:] for s in sentences for tag in s.tags if tag != "O"})


def bio_labels(types: Sequence[str]) -> tuple[str, ...]:
    """A token head's labels: O, then B- and I- of each type."""
    return ("O", *(f"{prefix}-{t}" for t in types for prefix in ("B", "I")))


def read_clinc(path: Path) -> dict[str, LabelledRows]:
    """The CLINC150 JSON: each key (train, val, oos_train, oos_val) as rows."""
    text = read_text(path)
    try:
        data = json.loads(text)
        parts = {
            key: LabelledRows([str(t) for t, _ in rows], [str(label) for _, label in rows])
            for key, rows in data.items()
        }
    except (ValueError, TypeError, AttributeError) as err:
        raise TrainingDataError(
            f"{path}: not a CLINC150 JSON object of [text, intent] lists"
        ) from err
    missing = {"train", "val", "oos_train", "oos_val"} - parts.keys()
    if missing:
        raise TrainingDataError(f"{path}: no key(s) {sorted(missing)}")
    return parts


def read_agnews(path: Path) -> LabelledRows:
    """AG News `text<TAB>label` without a header, texts exactly as in the file."""
    rows: list[tuple[str, str]] = []
    for line, raw in enumerate(read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        fields = raw.split("\t")
        if len(fields) != 2:
            raise TrainingDataError(f"{path}:{line}: {len(fields)} fields, expected text<TAB>label")
        rows.append(_checked(path, line, fields[0], fields[1], "text", "label"))
    if not rows:
        raise TrainingDataError(f"{path}: no data rows")
    return LabelledRows([t for t, _ in rows], [label for _, label in rows])
