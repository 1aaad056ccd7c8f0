"""What `taskmux model build` and friends print: a short summary, steps on stderr, --json."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from model.manifest import MANIFEST_FILE, load_manifest
from taskmux.cli import _parser
from taskmux.modelrepo.build import TRAINED_HEADS_DIR, trained_heads
from taskmux.modelrepo.summary import build_summary, heldout_figures, train_summary
from taskmux.progress import Steps
from tests.unit.conftest import taskmux_cli

MAX_SUMMARY_LINES = 30


def test_summary_names_every_head_and_variant_and_is_short(model_repo: Path) -> None:
    manifest = load_manifest(model_repo, verify=False)
    summary = build_summary(manifest, model_repo, 12.4)
    lines = summary.splitlines()
    assert len(lines) < MAX_SUMMARY_LINES, summary
    for head in manifest.heads:
        assert any(line.startswith(f"head {head.name} ") for line in lines), head.name
    for variant in ["fp32", *manifest.encoder.variants]:
        assert any(line.startswith(f"variant {variant} ") for line in lines), variant
    intent = manifest.head("intent")
    assert intent is not None and len(intent.labels) > 100
    assert f"{len(intent.labels)} labels" in summary
    assert not any(label in summary.split() for label in intent.labels if len(label) > 4)
    assert manifest.encoder.name in summary and str(manifest.encoder.dimension) in summary
    assert "built in 12 s" in lines[0] and f"{model_repo} (" in lines[0]
    assert " MB" in lines[0]


def test_summary_of_an_existing_repository_says_it_was_not_rebuilt(model_repo: Path) -> None:
    summary = build_summary(load_manifest(model_repo, verify=False), model_repo, None)
    assert "already built (--force rebuilds)" in summary.splitlines()[0]


def test_heldout_figures_leave_out_training_and_per_label_figures() -> None:
    metrics = {
        "heldout_f1": 0.801,
        "heldout_f1_LOC": 0.88,
        "heldout_recall": 0.8289,
        "heldout_entities": 2197.0,
        "train_sentences": 12620.0,
        "hidden": 512.0,
    }
    figures = heldout_figures(metrics, labels=("O", "LOC"))
    assert figures == "f1 80.1%, recall 82.9% (2197 entities)"
    assert heldout_figures({"l2": 0.03}) == ""


def test_train_summary_names_every_trained_head() -> None:
    heads = [spec for spec, _ in trained_heads()]
    summary = train_summary(heads, TRAINED_HEADS_DIR, 61.0)
    assert len(summary.splitlines()) == len(heads) + 1
    for head in heads:
        assert f"head {head.name} " in summary
    assert "in 61 s" in summary


def _two_steps(steps: Steps) -> None:
    """An export that succeeds, then a quantisation that fails."""
    steps.expect(2)
    with steps.step("export"):
        pass
    with pytest.raises(RuntimeError), steps.step("quantise"):
        raise RuntimeError("boom")


def test_piped_steps_are_one_plain_line_each() -> None:
    stream = io.StringIO()
    steps = Steps(stream, tty=False)
    _two_steps(steps)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 2
    assert lines[0].startswith("export ") and lines[0].endswith(" s")
    assert lines[1].startswith("quantise ") and "failed after" in lines[1]
    assert list(steps.durations) == ["export", "quantise"]


def test_terminal_steps_redraw_a_bar_then_leave_the_plain_line() -> None:
    stream = io.StringIO()
    _two_steps(Steps(stream, tty=True))
    text = stream.getvalue()
    assert "\r[............] 1/2 export" in text
    assert "\r[######......] 2/2 quantise" in text
    # What stays on screen: the last redraw of each line, i.e. each step's plain line.
    shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    assert [line.split()[0] for line in shown[:-1]] == ["export", "quantise"]
    assert "failed after" in shown[1] and shown[-1] == ""


def test_steps_without_a_stream_only_time() -> None:
    steps = Steps()
    with steps.step("export"):
        pass
    assert list(steps.durations) == ["export"]


@pytest.mark.parametrize(
    "argv",
    [
        ["model", "build", "--json", "--verbose"],
        ["model", "train-defaults", "--json", "--verbose"],
        ["model", "train-sentiment", "--json"],
        ["model", "eval", "--json", "--verbose"],
    ],
)
def test_output_flags(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert args.json is True and args.verbose is ("--verbose" in argv)
    assert _parser().parse_args(argv[:2]).json is False


def test_build_of_an_existing_repository_prints_the_summary_or_the_manifest(repo: Path) -> None:
    quiet = taskmux_cli("model", "build", "--out", str(repo))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.splitlines()[0].startswith(f"model repository  {repo} (")
    assert len(quiet.stdout.splitlines()) < MAX_SUMMARY_LINES
    full = taskmux_cli("model", "build", "--out", str(repo), "--json")
    assert full.returncode == 0, full.stderr
    manifest = load_manifest(repo)
    assert json.loads(full.stdout) == json.loads(manifest.to_json(with_checksums=False))


@pytest.mark.export
def test_build_prints_steps_and_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    run = taskmux_cli("model", "build", "--out", str(out), "--variants", "int8")
    assert run.returncode == 0, run.stderr
    assert (out / MANIFEST_FILE).is_file()
    # Piped: a plain line per step, and nothing else (no logs, bars or export warnings).
    steps = run.stderr.splitlines()
    assert "\r" not in run.stderr
    assert [line.split()[0] for line in steps] == ["export", "quantise", "split", "install"], (
        run.stderr
    )
    assert all(line.endswith(" s") for line in steps)
    summary = run.stdout.splitlines()
    assert len(summary) < MAX_SUMMARY_LINES
    assert "built in" in summary[0]
    assert [line.split()[1] for line in summary if line.startswith("variant")] == ["fp32", "int8"]
