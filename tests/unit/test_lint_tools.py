"""The security linters of `make lint`: the pip-audit wrapper and bandit's configuration."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.dependency_audit import ROOT, audit_latest, main, parse, waivers

VULN = {"id": "GHSA-aaaa-bbbb-cccc", "aliases": ["CVE-2026-0001"], "fix_versions": ["2.0"]}


def _audit(*deps: dict[str, object]) -> str:
    return json.dumps({"dependencies": list(deps), "fixes": []})


def test_a_known_vulnerability_is_a_finding() -> None:
    report = parse(_audit({"name": "lib", "version": "1.0", "vulns": [VULN]}), {})
    assert report.findings == ["lib 1.0: GHSA-aaaa-bbbb-cccc (fixed in 2.0)"]
    assert report.audited == 1


@pytest.mark.parametrize("waived_id", ["GHSA-aaaa-bbbb-cccc", "CVE-2026-0001"])
def test_a_waiver_matches_the_id_or_an_alias(waived_id: str) -> None:
    report = parse(_audit({"name": "lib", "version": "1.0", "vulns": [VULN]}), {waived_id: "x"})
    assert report.findings == []


def test_skipped_packages_are_not_audited_and_our_own_is_ignored() -> None:
    report = parse(
        _audit(
            {"name": "lib", "skip_reason": "Dependency not found on PyPI"},
            {"name": "taskmux", "skip_reason": "Dependency not found on PyPI"},
            {"name": "ok", "version": "1", "vulns": []},
        ),
        {},
    )
    assert (report.findings, report.unaudited, report.audited) == ([], ["lib"], 1)


def test_waivers_need_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text('[tool.taskmux.audit]\nwaivers = [{id = "GHSA-1", reason = "no path"}]\n')
    assert waivers(path) == {"GHSA-1": "no path"}
    path.write_text('[tool.taskmux.audit]\nwaivers = [{id = "GHSA-1"}]\n')
    with pytest.raises(SystemExit, match="needs a reason"):
        waivers(path)


def test_the_committed_waivers_parse() -> None:
    assert isinstance(waivers(ROOT / "pyproject.toml"), dict)


def test_the_latest_release_fallback() -> None:
    """PyPI's project page speaks for the latest release only: an older pin is not audited."""
    pages = {
        "fresh": {"info": {"version": "2.0"}, "vulnerabilities": []},
        "flawed": {
            "info": {"version": "1.0"},
            "vulnerabilities": [{"id": "PYSEC-1", "fixed_in": []}],
        },
        "fixed-long-ago": {
            "info": {"version": "9.0"},
            "vulnerabilities": [{**VULN, "withdrawn": "2026-01-01"}],
        },
        "stale": {"info": {"version": "3.0"}, "vulnerabilities": []},
    }
    dists = {"fresh": "2.0", "flawed": "1.0", "fixed-long-ago": "9.0", "stale": "2.9", "gone": "1"}
    report = audit_latest(dists, {}, fetch=pages.get)
    assert report.findings == ["flawed 1.0: PYSEC-1 (no fix yet)"]
    assert report.unaudited == ["gone 1 (not on PyPI)", "stale 2.9 (latest is 3.0)"]
    assert report.audited == 3


def test_the_audit_runs_and_says_what_it_proved(capsys: pytest.CaptureFixture[str]) -> None:
    """The real audit of this venv: a count of what it audited, and a verdict."""
    code = main([])
    out = capsys.readouterr().out
    assert re.search(r"\d+ packages audited, \d+ unwaived known vulnerabilities", out), out
    assert code == (1 if "VULNERABLE" in out else 0)


def test_bandit_finds_a_planted_issue_and_none_in_the_project(tmp_path: Path) -> None:
    bandit = [sys.executable, "-m", "bandit", "-q", "-c", str(ROOT / "pyproject.toml")]
    planted = tmp_path / "planted.py"
    planted.write_text("import subprocess\nsubprocess.call('ls ' + input(), shell=True)\n")
    found = subprocess.run([*bandit, str(planted)], capture_output=True, text=True)
    assert found.returncode == 1 and "B602" in found.stdout
    clean = subprocess.run([*bandit, "-r", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert clean.returncode == 0, clean.stdout[-3000:]
