"""The task commands of `taskmux` (embed, classify, extract-entities, similarity, zero-shot,
analyze, anonymize) against a real gateway and worker: texts from arguments, a file and stdin, JSONL in
input order with several requests in flight, the table format, and errors."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.cli import main as bench_cli
from taskmux.cli import main as cli_main
from taskmux.cliinput import Batch, InputError, batches, parse_line
from taskmux.clioutput import ProgressBar, shorten
from tests.harness import Cluster, wait_for_catalog

TEXTS = ["I loved this film", "Angela Merkel visited Paris.", "The striker scored twice."]
SENTIMENT = {"positive", "negative"}
Check = Callable[[dict[str, Any]], None]


def _embedding(record: dict[str, Any]) -> None:
    assert len(record["embedding"]) == 384


def _sentiment(record: dict[str, Any]) -> None:
    assert record["label"] in SENTIMENT and 0 < record["score"] <= 1
    assert record["top"][0]["label"] == record["label"]


def _entities(record: dict[str, Any]) -> None:
    for entity in record["entities"]:
        assert record["text"][entity["start"] : entity["end"]] == entity["text"]


def _similarity(record: dict[str, Any]) -> None:
    assert -1 <= record["score"] <= 1


def _zero_shot(record: dict[str, Any]) -> None:
    assert record["label"] in {"sports", "politics"}
    assert {t["label"] for t in record["top"]} == {"sports", "politics"}


def _analyze(record: dict[str, Any]) -> None:
    _sentiment(record["sentiment"] | {"text": record["text"]})
    _entities({"text": record["text"], "entities": record["entities"]})
    assert len(record["embed"]) == 384


COMMANDS: dict[str, tuple[list[str], Check]] = {
    "embed": (["embed"], _embedding),
    "classify": (["classify", "--head", "sentiment", "--top-k", "2"], _sentiment),
    "extract-entities": (["extract-entities"], _entities),
    "similarity": (["similarity", "--query", "a football match"], _similarity),
    "zero-shot": (["zero-shot", "--labels", "sports,politics"], _zero_shot),
    "analyze": (["analyze", "--heads", "sentiment,entities,embed"], _analyze),
}


@pytest.fixture(scope="module")
def target(cluster: Cluster, model_repo: Path) -> str:
    _, address = cluster.start_gateway()
    wait_for_catalog(address, model_repo)
    return address


def _run(capsys: pytest.CaptureFixture[str], target: str, argv: list[str]) -> tuple[int, str, str]:
    code = cli_main([*argv, "--target", target])
    out, err = capsys.readouterr()
    return code, out, err


def _jsonl(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def _assert_records(records: list[dict[str, Any]], texts: list[str], check: Check) -> None:
    assert [r["index"] for r in records] == list(range(len(texts)))
    assert [r["text"] for r in records] == texts
    for record in records:
        check(record)


# ---------------------------------------------------------------- each command, each source


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_with_arguments_prints_one_json_document(
    name: str, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, _ = COMMANDS[name]
    code, out, err = _run(capsys, target, [*argv, *TEXTS])
    assert (code, err) == (0, "")
    document = json.loads(out)
    if name == "embed":
        assert [len(e["values"]) for e in document["embeddings"]] == [384] * 3
    elif name == "similarity":
        assert len(document["scores"]) == 3
    elif name == "analyze":
        assert sorted(r.get("textIndex", 0) for r in document["results"]) == [
            0,
            0,
            0,
            1,
            1,
            1,
            2,
            2,
            2,
        ]
    else:
        assert len(document["results"]) == 3


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_reads_a_file_and_prints_jsonl(
    name: str, target: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv, check = COMMANDS[name]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    code, out, err = _run(capsys, target, [*argv, "--input", str(path)])
    assert (code, err) == (0, "")  # stderr is not a terminal here: no progress bar
    _assert_records(_jsonl(out), TEXTS, check)


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_reads_stdin(
    name: str, target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv, check = COMMANDS[name]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TEXTS)))
    code, out, err = _run(capsys, target, [*argv, "--input", "-"])
    assert (code, err) == (0, "")
    _assert_records(_jsonl(out), TEXTS, check)


# ---------------------------------------------------------------- order, formats


def test_order_is_kept_with_many_small_batches_in_flight(
    target: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Lengths differ a lot, so batches finish out of order on the worker.
    texts = [f"review {i}: " + ("great " * (1 + (i * 37) % 90)) + "film" for i in range(50)]
    path = tmp_path / "many.txt"
    path.write_text("\n".join(texts), encoding="utf-8")
    common = ["classify", "--head", "sentiment", "--input", str(path)]
    code, out, _ = _run(capsys, target, [*common, "--batch-size", "3", "--concurrency", "6"])
    assert code == 0
    records = _jsonl(out)
    _assert_records(records, texts, _sentiment)
    code, reference, _ = _run(capsys, target, [*common, "--batch-size", "50", "--concurrency", "1"])
    assert code == 0
    assert [r["label"] for r in records] == [r["label"] for r in _jsonl(reference)]


def test_jsonl_input_takes_the_text_field(
    target: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": 7, "text": TEXTS[0]}), TEXTS[1], "", json.dumps({"text": TEXTS[2]})]
    path.write_text("\n".join(lines), encoding="utf-8")
    code, out, _ = _run(capsys, target, ["classify", "--head", "sentiment", "--input", str(path)])
    assert code == 0
    _assert_records(_jsonl(out), TEXTS, _sentiment)  # the blank line is skipped


def test_jsonl_format_refuses_a_line_without_text(
    target: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    argv = ["embed", "--input", str(path), "--input-format", "jsonl"]
    code, _, err = _run(capsys, target, argv)
    assert code == 2
    assert err == 'error: line 2: a JSON object with a string "text" field is needed\n'


def test_table_format(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, target, ["extract-entities", "--format", "table", *TEXTS])
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["index", "entities", "text"]
    assert len(rows) == 3
    assert rows[1].startswith("1 ") and rows[1].endswith(TEXTS[1])
    assert "Paris/LOC" in rows[1]
    code, out, _ = _run(
        capsys, target, ["classify", "--head", "sentiment", "--format", "table", "great"]
    )
    header, row = out.splitlines()
    assert header.split() == ["index", "label", "score", "text"]
    assert row.split()[1] in SENTIMENT and row.endswith("great")


def test_analyze_table_has_a_column_per_head(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["analyze", "--heads", "sentiment,embed", "--format", "table", TEXTS[0]]
    code, out, _ = _run(capsys, target, argv)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["index", "sentiment", "embed", "text"]
    assert "384 dims" in row


def test_similarity_json_ranks_over_every_batch(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    candidates = ["pasta with tomatoes", "change my password", "reset the password", "weather"]
    argv = ["similarity", "--query", "reset my password", "--top-k", "2", "--batch-size", "1"]
    code, out, _ = _run(capsys, target, [*argv, *candidates])
    assert code == 0
    document = json.loads(out)
    ranked = sorted(range(4), key=lambda i: -document["scores"][i])[:2]
    assert [t["index"] for t in document["top"]] == ranked
    assert set(ranked) == {1, 2}


# ---------------------------------------------------------------- anonymize


def test_anonymize_prints_no_original_in_any_format(
    target: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    texts = [*TEXTS, "Then Angela Merkel left Paris."]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    argv = ["anonymize", "--style", "pseudonym", "--batch-size", "4"]
    code, out, err = _run(capsys, target, [*argv, "--input", str(path)])
    assert (code, err) == (0, "")
    records = _jsonl(out)
    assert [r["index"] for r in records] == list(range(4))
    assert [r["text"] for r in records[1:]] == [
        "PER_1 visited LOC_1.",
        "The striker scored twice.",
        "Then PER_1 left LOC_1.",
    ]
    assert "Merkel" not in out and "Paris" not in out
    for text, record in zip(texts, records, strict=True):
        for span in record["spans"]:
            assert text[span["start"] : span["end"]] not in record["text"]
    code, out, _ = _run(capsys, target, ["anonymize", "--labels", "LOC", *texts[1:2]])
    assert code == 0
    assert json.loads(out)["results"][0]["text"] == "Angela Merkel visited [LOC]."
    code, out, _ = _run(capsys, target, ["anonymize", "--format", "table", *texts[1:2]])
    header, row = out.splitlines()
    assert header.split() == ["index", "replaced", "text"]
    assert row.split() == ["0", "2", "[PER]", "visited", "[LOC]."]


def test_anonymize_refuses_an_unknown_label(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, target, ["anonymize", "--labels", "PER,DATE", "hello"])
    assert code == 1 and out == ""
    assert err.startswith("error: INVALID_ARGUMENT: labels[1] 'DATE'") and "MISC" in err


# ---------------------------------------------------------------- errors


def test_a_bad_head_is_one_line_and_exit_1(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    for source in (["hello"], ["--input", "-"]):
        sys.stdin = io.StringIO("hello\nworld\n")
        code, out, err = _run(capsys, target, ["classify", "--head", "nope", *source])
        assert code == 1 and out == ""
        assert err.startswith("error: NOT_FOUND: ") and "nope" in err and err.count("\n") == 1


def test_an_invalid_text_names_its_batch(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("fine\nfine\n" + "x" * 20_000 + "\n"))
    code, _, err = _run(capsys, target, ["embed", "--input", "-", "--batch-size", "2"])
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT: texts[0] ")
    assert err.endswith("(in input text 2)\n") and err.count("\n") == 1


def test_texts_and_input_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["embed", "--input", "-", "hello"]) == 2
    assert capsys.readouterr().err == "error: give texts as arguments or --input, not both\n"


def test_bench_cli_reports_the_cli_and_the_load_tester(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "cli.json"
    argv = ["--target", target, "--lines", "40", "--loadtest-s", "1", "--json", str(report)]
    assert bench_cli(argv) == 0
    figures = json.loads(report.read_text())
    assert figures["cli"]["texts"] == 40 and figures["cli"]["texts_per_s"] > 0
    assert figures["loadtest"]["texts_per_s"] > 0
    assert "taskmux classify --head sentiment --input" in capsys.readouterr().out


# ---------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("line", "input_format", "text"),
    [
        ("plain text\n", "auto", "plain text"),
        ('{"text": "from json", "id": 1}\n', "auto", "from json"),
        ('{"not": "text"}\n', "auto", '{"not": "text"}'),
        ("{not json\n", "auto", "{not json"),
        ('{"text": "kept as is"}\n', "text", '{"text": "kept as is"}'),
        ("   \n", "auto", None),
    ],
)
def test_parse_line(line: str, input_format: str, text: str | None) -> None:
    assert parse_line(line, 1, input_format) == text


def test_parse_line_jsonl_insists_on_json() -> None:
    with pytest.raises(InputError, match="line 4: not JSON"):
        parse_line("plain\n", 4, "jsonl")


def test_batches_number_texts_across_batches() -> None:
    assert list(batches(iter("abcde"), 2)) == [
        Batch(0, ("a", "b")),
        Batch(2, ("c", "d")),
        Batch(4, ("e",)),
    ]
    assert Batch(4, ("e",)).span == "text 4" and Batch(2, ("c", "d")).span == "texts 2-3"


def test_progress_bar_draws_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    bar = ProgressBar(quiet, 10, enabled=False)
    bar.advance(5)
    bar.close()
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    bar = ProgressBar(shown, 10, enabled=True)
    bar.advance(5)
    bar.close()
    assert "5/10 texts" in shown.getvalue() and shown.getvalue().endswith("\n")
    assert "[" + "#" * 12 + "." * 12 + "]" in bar.line(1.0)


def test_shorten_keeps_one_line() -> None:
    assert shorten("a\nb  c", 10) == "a b c"
    assert shorten("x" * 20, 5) == "xxxx…"


@pytest.fixture(autouse=True)
def _no_stdin_by_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    yield
