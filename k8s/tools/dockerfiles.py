"""Dockerfiles without a Docker engine: everything they name must exist in the repository.

For each docker/*.Dockerfile: base images pinned to an exact tag or a digest; every path
it copies exists and is not excluded by .dockerignore; `python -m X` names a module of
the repository; `taskmux A B` is a subcommand of the CLI; the exposed port is the one
the component's settings default to; TASKMUX_* variables are settings that component
reads; the final stage runs as a non-root user and installs no build tools.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT, Report, port_of, settings_names

DOCKERIGNORE = ROOT / ".dockerignore"
MODULE_COMPONENT = {"gateway": "gateway", "workers": "worker"}
PORT_SETTING = {"gateway": "TASKMUX_LISTEN_ADDR", "worker": "TASKMUX_HEALTH_ADDR"}
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|cmake|cargo|rustc)\b")
# An exact version (x.y.z, any suffix) or a digest; "3.11-slim" or "latest" float.
DIGEST_OR_TAG = re.compile(r"(@sha256:[0-9a-f]{64}$)|(:\d+\.\d+\.\d+[\w.-]*$)")


@dataclass
class Stage:
    base: str
    alias: str = ""
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile as (INSTRUCTION, arguments) pairs, continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = rest.split()
            parts = [p for p in parts if not p.startswith("--")]
            alias = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else ""
            stages.append(Stage(parts[0], alias))
        elif stages:
            stages[-1].instructions.append((word, rest.strip()))
    return stages


def check(paths: list[Path]) -> Report:
    report = Report("Dockerfiles name only what the repository has")
    ignore = _dockerignore()
    for path in paths:
        name = path.name
        stages = parse(path)
        if not stages:
            report.add(name, "no FROM")
            continue
        aliases = {s.alias for s in stages if s.alias}
        for stage in stages:
            if stage.base not in aliases and (
                stage.base.endswith(":latest") or not DIGEST_OR_TAG.search(stage.base)
            ):
                report.add(name, f"FROM {stage.base} is not pinned to an exact tag or a digest")
            for word, args in stage.instructions:
                if word in ("COPY", "ADD") and "--from=" not in args:
                    for source in _sources(args):
                        _check_source(name, source, ignore, report)
                if word == "RUN":
                    _check_commands(name, args, report)
        final = stages[-1]
        _check_final(name, final, report)
    return report


def _sources(args: str) -> list[str]:
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    if args.lstrip().startswith("["):
        words = json.loads(args)
    return words[:-1]


def _check_source(name: str, source: str, ignore: list[str], report: Report) -> None:
    if not (ROOT / source).exists():
        report.add(name, f"copies {source}, which is not in the repository")
    elif _ignored(source.rstrip("/"), ignore):
        report.add(name, f"copies {source}, which .dockerignore leaves out of the context")


def _dockerignore() -> list[str]:
    if not DOCKERIGNORE.is_file():
        return []
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            excluded = not negate
    return excluded


def _check_commands(name: str, command: str, report: Report) -> None:
    for match in re.finditer(r"\bpython\S* -m ([\w.]+)", command):
        _check_module(name, match.group(1), report)
    for match in re.finditer(r"(?:^|[\s/])taskmux ([a-z-]+)(?: ([a-z-]+))?", command):
        _check_cli(name, [g for g in match.groups() if g], report)


def _check_module(name: str, module: str, report: Report) -> None:
    if module in ("venv", "pip", "compileall"):
        return
    base = ROOT / module.replace(".", "/")
    if not ((base / "__main__.py").is_file() or base.with_suffix(".py").is_file()):
        report.add(name, f"runs python -m {module}, which is not a module of the repository")


def _check_cli(name: str, words: list[str], report: Report) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    if "taskmux" not in scripts.get("project", {}).get("scripts", {}):
        report.add(name, "runs taskmux, which pyproject.toml does not install")
    parsers: set[str] = set()
    for module in (ROOT / "taskmux").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("add_parser", "add")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                parsers.add(str(node.args[0].value))
    for word in words:
        if word not in parsers:
            report.add(name, f"runs `taskmux {' '.join(words)}`: the CLI has no {word!r} command")


def _check_final(name: str, final: Stage, report: Report) -> None:
    users = [args for word, args in final.instructions if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        report.add(name, "the final stage does not switch to a non-root USER")
    entry = [args for word, args in final.instructions if word in ("ENTRYPOINT", "CMD")]
    if not entry:
        report.add(name, "no ENTRYPOINT or CMD")
    component = ""
    for args in entry:
        argv = json.loads(args) if args.startswith("[") else shlex.split(args)
        if len(argv) >= 3 and argv[0].startswith("python") and argv[1] == "-m":
            _check_module(name, argv[2], report)
            component = MODULE_COMPONENT.get(argv[2], "")
    copied = [
        _sources(args)
        for word, args in final.instructions
        if word == "COPY" and "--from=" not in args
    ]
    flat = {s.rstrip("/") for group in copied for s in group}
    for word, args in final.instructions:
        if word == "RUN" and BUILD_TOOLS.search(args):
            report.add(name, f"the final stage installs build tools: {args}")
        if word == "EXPOSE" and component:
            default = settings_names(component).get(PORT_SETTING[component]) or ""
            for port in re.findall(r"\d+", args):
                if int(port) != port_of(default):
                    report.add(
                        name,
                        f"EXPOSE {port}, but {PORT_SETTING[component]} defaults to {default}",
                    )
        if word == "ENV" and component:
            known = settings_names(component)
            for var in re.findall(r"\b(TASKMUX_\w+)=", args):
                if var not in known:
                    report.add(name, f"ENV {var} is not a setting the {component} reads")
    if component:
        package = {v: k for k, v in MODULE_COMPONENT.items()}[component]
        if package not in flat:
            report.add(name, f"runs python -m {package} but does not copy {package}/")
