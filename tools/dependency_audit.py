"""Audit the installed dependencies for known vulnerabilities with pip-audit (`make lint`).

Any known vulnerability that is not waived in pyproject.toml
(`[tool.taskmux.audit] waivers`, each with a reason) fails the audit.

pip-audit needs a vulnerability service: PyPI's per-release JSON API or OSV. Where neither
answers (a registry mirror that serves only the package index and project pages, as on
our build machines), pip-audit reports every package as "could not be audited". Then the
audit falls back to PyPI's project pages, which list the known vulnerabilities of a
package's latest release: a pin that is the latest release is audited by them, and any
other pin is listed as not audited. Anything not audited fails only with `--strict`, so
a build without the service still passes while the packages it could check are enforced.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OWN_PACKAGES = {"taskmux"}  # the project itself is not on PyPI
PROJECT_PAGE = "https://pypi.org/pypi/{name}/json"
FETCH_TIMEOUT_S = 15


@dataclass(frozen=True)
class Report:
    """What pip-audit found, less the waived vulnerabilities."""

    findings: list[str]
    unaudited: list[str]
    audited: int


def waivers(pyproject: Path) -> dict[str, str]:
    """Waived vulnerability ids and their reasons."""
    config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    entries = config.get("tool", {}).get("taskmux", {}).get("audit", {}).get("waivers", [])
    waived = {}
    for entry in entries:
        if not entry.get("reason"):
            raise SystemExit(f"audit waiver {entry.get('id')!r} needs a reason")
        waived[entry["id"]] = entry["reason"]
    return waived


def parse(output: str, waived: dict[str, str]) -> Report:
    """The report from pip-audit's JSON output."""
    findings, unaudited, audited = [], [], 0
    for dep in json.loads(output).get("dependencies", []):
        name = dep.get("name", "?")
        if name in OWN_PACKAGES:
            continue
        if "skip_reason" in dep:
            unaudited.append(name)
            continue
        audited += 1
        findings += vulnerability_lines(name, dep.get("version", "?"), dep.get("vulns", []), waived)
    return Report(findings, unaudited, audited)


def vulnerability_lines(
    name: str, version: str, vulns: list[dict[str, Any]], waived: dict[str, str]
) -> list[str]:
    """One line per vulnerability that is neither waived nor withdrawn."""
    lines = []
    for vuln in vulns:
        if vuln.get("withdrawn"):
            continue
        ids = {vuln.get("id", ""), *vuln.get("aliases", [])}
        if ids & waived.keys():
            continue
        fixes = vuln.get("fix_versions") or vuln.get("fixed_in") or []
        fixed = f"fixed in {', '.join(fixes)}" if fixes else "no fix yet"
        lines.append(f"{name} {version}: {vuln.get('id')} ({fixed})")
    return lines


def installed() -> dict[str, str]:
    """Every distribution in this environment, by normalized name, with its version."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if name and name not in OWN_PACKAGES:
            found[name] = dist.version
    return found


def project_page(name: str) -> dict[str, Any] | None:
    """PyPI's JSON page of a project; None when it cannot be had."""
    url = PROJECT_PAGE.format(name=name)
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # nosec B310
            page: dict[str, Any] = json.load(response)
    except (urllib.error.URLError, TimeoutError, ValueError):
        return None
    return page


def audit_latest(
    dists: dict[str, str],
    waived: dict[str, str],
    fetch: Callable[[str], dict[str, Any] | None] = project_page,
) -> Report:
    """Audit each pin that is its project's latest release against PyPI's project page."""
    findings, unaudited, audited = [], [], 0
    with ThreadPoolExecutor(8) as pool:
        pages = dict(zip(dists, pool.map(fetch, dists), strict=True))
    for name, version in sorted(dists.items()):
        page = pages[name]
        latest = (page or {}).get("info", {}).get("version")
        if page is None or latest != version:
            why = "not on PyPI" if page is None else f"latest is {latest}"
            unaudited.append(f"{name} {version} ({why})")
            continue
        audited += 1
        findings += vulnerability_lines(name, version, page.get("vulnerabilities", []), waived)
    return Report(findings, unaudited, audited)


def run_pip_audit(waived: dict[str, str]) -> str:
    """pip-audit's JSON for this environment; "" when it could not run at all."""
    argv = [sys.executable, "-m", "pip_audit", "--format", "json", "--progress-spinner", "off"]
    for vuln_id in waived:
        argv += ["--ignore-vuln", vuln_id]
    # Fixed argv: this interpreter's pip-audit; no shell.
    done = subprocess.run(  # nosec B603
        argv, capture_output=True, text=True, timeout=600, check=False
    )
    if not done.stdout.strip():
        print(done.stderr.strip()[-2000:], file=sys.stderr)
    return done.stdout


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 1 on an unwaived finding, or (with --strict) on anything not audited."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="fail when packages go unaudited")
    args = parser.parse_args(argv)
    waived = waivers(ROOT / "pyproject.toml")
    output = run_pip_audit(waived)
    report = parse(output, waived) if output.strip() else Report([], ["(everything)"], 0)
    source = "pip-audit"
    if not report.audited:
        print(
            "pip-audit: no vulnerability service answered (PyPI's per-release JSON API or "
            "OSV); falling back to PyPI's project pages (latest releases only)"
        )
        report, source = audit_latest(installed(), waived), "PyPI project pages"
    for finding in report.findings:
        print(f"VULNERABLE: {finding}")
    for vuln_id, reason in waived.items():
        print(f"waived: {vuln_id}: {reason}")
    if report.unaudited:
        print(f"NOT AUDITED ({len(report.unaudited)}): {', '.join(report.unaudited)}")
    print(
        f"{source}: {report.audited} packages audited, {len(report.findings)} unwaived known "
        f"vulnerabilities, {len(report.unaudited)} not audited"
    )
    if report.findings:
        return 1
    return 1 if args.strict and report.unaudited else 0


if __name__ == "__main__":
    sys.exit(main())
