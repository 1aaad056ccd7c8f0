"""Audit the installed dependencies for known vulnerabilities with pip-audit (`make lint`).

Any known vulnerability that is not waived in pyproject.toml
(`[tool.taskmux.audit] waivers`, each with a reason) fails the audit.

pip-audit needs a vulnerability service: PyPI's per-release JSON API or OSV. Where neither
answers (an air-gapped build host, or a registry mirror that serves only the package
index), pip-audit reports every package as "could not be audited" and proves nothing.
That is reported loudly as NOT AUDITED and fails only with `--strict`, so a build without
the service still passes while a build with it enforces the audit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN_PACKAGES = {"taskmux"}  # the project itself is not on PyPI


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
        for vuln in dep.get("vulns", []):
            ids = {vuln.get("id", ""), *vuln.get("aliases", [])}
            if ids & waived.keys():
                continue
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fix yet"
            findings.append(f"{name} {dep.get('version')}: {vuln.get('id')} (fixed in {fixed})")
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
    for finding in report.findings:
        print(f"VULNERABLE: {finding}")
    for vuln_id, reason in waived.items():
        print(f"waived: {vuln_id}: {reason}")
    if report.findings:
        return 1
    if report.unaudited and not report.audited:
        print(
            "NOT AUDITED: no vulnerability service answered (PyPI's per-release JSON API or "
            "OSV); pip-audit proved nothing here. Run `make audit` where one is reachable."
        )
        return 1 if args.strict else 0
    if report.unaudited:
        print(f"not audited ({len(report.unaudited)}): {', '.join(report.unaudited)}")
        if args.strict:
            return 1
    print(f"pip-audit: {report.audited} packages audited, no unwaived known vulnerabilities")
    return 0


if __name__ == "__main__":
    sys.exit(main())
