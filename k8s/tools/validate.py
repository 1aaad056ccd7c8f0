"""`make k8s-validate`: render every overlay and check it, and the Dockerfiles, offline.

Run with the interpreter of .venv-k8s (the tools live next to it):

    .venv-k8s/bin/python k8s/tools/validate.py all        # what make k8s-validate runs
    .venv-k8s/bin/python k8s/tools/validate.py render     # rendered overlays into build/k8s
    .venv-k8s/bin/python k8s/tools/validate.py CHECK FILE...   # one check on given files

Checks: schema (kubernetes-validate --strict, per Kubernetes version), keda (CRD schemas,
trigger sanity, one summed scaling figure), settings (manifests against the code's
settings, ports and probes), drain (grace periods against the drain timeouts), availability
(Valkey replicas, PDB, anti-affinity, priorities, memory), monitoring (metrics ingress and
PodMonitors, DNS and OTLP egress), hardening
(taskmux's pod and NetworkPolicy rules), checkov (with k8s/policy/waivers.yaml),
dockerfiles (paths, ports, entry points) and hadolint. Exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import availability
import consistency
import dockerfiles
import drain
import keda
import monitoring
import policy
from common import OVERLAYS, ROOT, Obj, Report, load_objects, ref

CHECKS = (
    "schema", "keda", "settings", "drain", "availability", "monitoring", "hardening", "checkov",
    "dockerfiles", "hadolint",
)  # fmt: skip
DEFAULT_VERSIONS = ["1.33.0", "1.37.0"]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
HADOLINT_CONFIG = ROOT / "docker" / "hadolint.yaml"


def render(out: Path) -> list[Path]:
    """kubectl kustomize each overlay into out/<overlay>.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for overlay in sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file()):
        result = subprocess.run(  # nosec B603
            [policy.tool("kubectl"), "kustomize", str(overlay)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise SystemExit(
                f"kubectl kustomize {overlay.relative_to(ROOT)} failed:\n{result.stderr}"
            )
        target = out / f"{overlay.name}.yaml"
        target.write_text(result.stdout, encoding="utf-8")
        files.append(target)
    return files


def schema(files: list[Path], versions: list[str]) -> Report:
    """kubernetes-validate --strict; custom resources are left to the keda check."""
    report = Report(f"kubernetes-validate --strict (Kubernetes {', '.join(versions)})")
    for version in versions:
        for path in files:
            result = subprocess.run(  # nosec B603
                [policy.tool("kubernetes-validate"), "--strict", "--quiet", "--no-warn",
                 "--kubernetes-version", version, str(path)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                lines = (result.stdout + result.stderr).strip().splitlines() or ["failed"]
                for line in lines:
                    report.add(f"{path.name} @ {version}", line.strip())
    return report


def hadolint(paths: list[Path]) -> Report:
    report = Report("hadolint")
    result = subprocess.run(  # nosec B603
        [policy.tool("hadolint"), "--no-color", "-c", str(HADOLINT_CONFIG), *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        for line in (result.stdout + result.stderr).strip().splitlines() or ["failed"]:
            report.add("hadolint", line.strip())
    return report


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _objects(files: list[Path]) -> list[tuple[Path, list[Obj]]]:
    return [(path, load_objects(path)) for path in files]


def _per_file(files: list[Path], check: Callable[[list[Obj]], Report]) -> Report:
    """Run a check on each file's objects on their own (each overlay is one deployment)."""
    merged: Report | None = None
    for path, objs in _objects(files):
        report = check(objs)
        merged = merged or Report(report.check)
        merged.problems += [f"{path.name}: {p}" for p in report.problems]
    return merged or Report("no files")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("check", choices=["all", "render", *CHECKS])
    parser.add_argument("files", nargs="*", type=Path, help="manifests or Dockerfiles to check")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "k8s")
    parser.add_argument("--kubernetes-version", action="append", dest="versions")
    parser.add_argument("--waivers", type=Path, default=policy.WAIVERS)
    parser.add_argument("--keda-schemas", type=Path, default=keda.DEFAULT_SCHEMAS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    versions = args.versions or DEFAULT_VERSIONS

    if args.check == "render":
        for path in render(args.out):
            print(f"rendered {path}")
        return 0
    manifests = args.files
    docker = args.files or DOCKERFILES
    if args.check == "all":
        manifests = render(args.out)
        docker = DOCKERFILES
        print(f"rendered {', '.join(_shown(p) for p in manifests)}")
    checks: dict[str, Callable[[], Report]] = {
        "schema": lambda: schema(manifests, versions),
        "keda": lambda: _per_file(manifests, lambda objs: keda.check(objs, args.keda_schemas)),
        "settings": lambda: _per_file(manifests, consistency.check),
        "drain": lambda: _per_file(manifests, drain.check),
        "availability": lambda: _per_file(manifests, availability.check),
        "monitoring": lambda: _per_file(manifests, monitoring.check),
        "hardening": lambda: _per_file(manifests, policy.hardening),
        "checkov": lambda: policy.checkov(manifests, args.waivers),
        "dockerfiles": lambda: dockerfiles.check(docker),
        "hadolint": lambda: hadolint(docker),
    }
    selected = list(checks) if args.check == "all" else [args.check]
    failed = 0
    for name in selected:
        started = time.monotonic()
        report = checks[name]()
        report.print()
        print(f"     ({time.monotonic() - started:.1f}s)")
        failed += bool(report.problems)
    if args.check == "all":
        kinds = sorted({ref(o).split("/")[0] for _, objs in _objects(manifests) for o in objs})
        print(f"{len(selected) - failed}/{len(selected)} checks passed over {', '.join(kinds)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
