"""What every check shares: the repository's paths, YAML loading, and facts read from the
code itself (settings names, Redis key layout, shipped heads) without importing it.

The validators run in .venv-k8s, which has none of the project's dependencies, so the
code is read with `ast`, never imported.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "k8s" / "overlays"
SETTINGS_PREFIX = "TASKMUX_"
# Settings modules and the packages whose code a component runs.
COMPONENT_SETTINGS = {"gateway": "gateway/settings.py", "worker": "workers/settings.py"}
COMPONENT_PACKAGES = {"gateway": "gateway", "worker": "workers"}
# Settings both components embed (the Redis connection, router/connection.py).
# Settings both components read, through env_* calls or TASKMUX_* literals.
SHARED_SETTINGS = ("router/connection.py", "taskmux/tracing.py", "taskmux/logs.py")
ENV_READERS = {"env_str", "env_int", "env_float", "env_list", "env_secret"}

Obj = dict[str, Any]


@dataclass
class Report:
    """Problems found by one check; empty means it passed."""

    check: str
    problems: list[str] = field(default_factory=list)

    def add(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def print(self) -> None:
        if self.problems:
            print(f"FAIL {self.check}: {len(self.problems)} problem(s)")
            for problem in self.problems:
                print(f"  - {problem}")
        else:
            print(f"ok   {self.check}")


def load_objects(path: Path) -> list[Obj]:
    """Every non-empty YAML document of a file."""
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def ref(obj: Obj) -> str:
    """kind/name, as messages name an object."""
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def pod_spec(obj: Obj) -> Obj | None:
    """The pod spec of a workload (Deployment, StatefulSet, ...), else None."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        template_spec: Obj | None = spec.get("template", {}).get("spec")
        return template_spec
    return None


def pod_labels(obj: Obj) -> dict[str, str]:
    """Labels of the pods a workload makes."""
    if obj.get("kind") == "Pod":
        return dict(obj.get("metadata", {}).get("labels") or {})
    return dict(obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {})


def all_containers(spec: Obj) -> Iterator[Obj]:
    """Init containers, then containers."""
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def component(obj: Obj) -> str:
    """The app.kubernetes.io/component label of a workload's pods."""
    return pod_labels(obj).get("app.kubernetes.io/component", "")


def taskmux_containers(objs: list[Obj]) -> Iterator[tuple[Obj, str, Obj]]:
    """(workload, component, container) for each gateway and worker container."""
    for obj in objs:
        spec = pod_spec(obj)
        name = component(obj)
        if spec is None or name not in COMPONENT_SETTINGS:
            continue
        for container in spec.get("containers") or []:
            if container.get("name") == name:
                yield obj, name, container


def find(objs: list[Obj], kind: str, name: str) -> Obj | None:
    for obj in objs:
        if obj.get("kind") == kind and obj.get("metadata", {}).get("name") == name:
            return obj
    return None


def _parse(relpath: str) -> ast.Module:
    return ast.parse((ROOT / relpath).read_text(encoding="utf-8"), filename=relpath)


def settings_names(component_name: str) -> dict[str, str | None]:
    """TASKMUX_* variables a component reads, with the default value where it is literal.

    Names come from the env_* calls of its settings module and the shared ones (an
    env_secret NAME also reads NAME_FILE), plus any "TASKMUX_..." string literal in its
    package or a shared module (e.g. TASKMUX_LOG_LEVEL in taskmux/logs.py).
    """
    names: dict[str, str | None] = {}
    defaults = _dataclass_defaults(_parse(COMPONENT_SETTINGS[component_name]))
    for module in (COMPONENT_SETTINGS[component_name], *SHARED_SETTINGS):
        for node in ast.walk(_parse(module)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ENV_READERS
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                suffix = node.args[1].value
                names[SETTINGS_PREFIX + suffix] = defaults.get(suffix.lower())
                if node.func.id == "env_secret":
                    names[f"{SETTINGS_PREFIX}{suffix}_FILE"] = None
    package = sorted((ROOT / COMPONENT_PACKAGES[component_name]).glob("*.py"))
    for module in [*(str(m.relative_to(ROOT)) for m in package), *SHARED_SETTINGS]:
        for node in ast.walk(_parse(module)):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith(SETTINGS_PREFIX)
                and node.value != SETTINGS_PREFIX
                and node.value.replace("_", "").isalnum()
                and node.value.isupper()
            ):
                names.setdefault(node.value, None)
    return names


def _dataclass_defaults(tree: ast.Module) -> dict[str, str]:
    """Literal string/int defaults of the settings dataclass fields."""
    defaults: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, (str, int))
                ):
                    defaults[stmt.target.id] = str(stmt.value.value)
    return defaults


def redis_keys() -> tuple[str, str]:
    """(task stream prefix, worker consumer group) as router/keys.py defines them."""
    constants: dict[str, str] = {}
    tree = _parse("router/keys.py")
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            constants[node.targets[0].id] = node.value.value
    stream_prefix = ""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "task_stream":
            for sub in ast.walk(node):
                if isinstance(sub, ast.JoinedStr):
                    parts = []
                    for value in sub.values:
                        if isinstance(value, ast.Constant):
                            parts.append(str(value.value))
                        elif isinstance(value, ast.FormattedValue) and isinstance(
                            value.value, ast.Name
                        ):
                            parts.append(constants.get(value.value.id, "{" + value.value.id + "}"))
                    stream_prefix = "".join(parts)
    # "taskmux:v1:tasks:{head}" -> "taskmux:v1:tasks:"
    return stream_prefix.split("{")[0], constants["WORKER_GROUP"]


def shipped_heads() -> list[str]:
    """Heads every model repository has: the built-in ones (each HeadSpec(name=...) of
    taskmux/modelrepo/build.py: embed, similarity, zero-shot), plus each committed
    trained head."""
    heads = {"embed"}
    for node in ast.walk(_parse("taskmux/modelrepo/build.py")):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "HeadSpec":
            for keyword in node.keywords:
                if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                    heads.add(str(keyword.value.value))
    for head_json in (ROOT / "taskmux" / "modelrepo" / "trained").glob("*/head.json"):
        data = json.loads(head_json.read_text(encoding="utf-8"))
        heads.add(str(data.get("name") or head_json.parent.name))
    return sorted(heads)


def stream_heads() -> list[str]:
    """Every job stream's head name workers read: the shipped heads, plus shared streams
    such as analyze jobs' (router/messages.py constants named *_STREAM_HEAD)."""
    heads = set(shipped_heads())
    for node in _parse("router/messages.py").body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        value = getattr(node, "value", None)
        if (
            isinstance(target, ast.Name)
            and target.id.endswith("_STREAM_HEAD")
            and isinstance(value, ast.Constant)
            and isinstance(value.value, str)
        ):
            heads.add(value.value)
    return sorted(heads)


def port_of(address: str) -> int | None:
    """The port of "host:port" or "[v6]:port"."""
    _, _, port = address.rpartition(":")
    return int(port) if port.isdigit() else None


def acl_user_names() -> dict[str, str]:
    """Each AclUser of router/acl.py by its variable (GATEWAY, WORKER, ...) -> its name."""
    names: dict[str, str] = {}
    for node in _parse("router/acl.py").body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "AclUser"
        ):
            for keyword in node.value.keywords:
                if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                    names[node.targets[0].id] = str(keyword.value.value)
    return names
