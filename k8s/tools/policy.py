"""Policy: checkov over the rendered manifests, with reasoned waivers, and taskmux's own
hardening rules, which do not depend on checkov's defaults.

A checkov finding fails the run unless k8s/policy/waivers.yaml waives that check for that
object with a reason. A waiver without a reason, or one that no longer matches anything,
fails too, so the file only ever lists what is really waived.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from common import ROOT, Obj, Report, all_containers, component, pod_labels, pod_spec, ref

WAIVERS = ROOT / "k8s" / "policy" / "waivers.yaml"
MIN_REASON_CHARS = 20
# Ingress from outside the namespace: only gateways take it; Redis takes the KEDA operator.
OUTSIDE_INGRESS = {"gateway": None, "redis": {"kubernetes.io/metadata.name": "keda"}}
# Prometheus in this namespace may reach a pod's metrics port (its containerPort "metrics").
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
# Containers without a CPU limit by design: the single-threaded Valkey server (check
# availability requires it to have none).
NO_CPU_LIMIT = {("redis", "valkey")}


def tool(name: str) -> str:
    """A validator installed next to this interpreter (.venv-k8s/bin)."""
    return str(Path(sys.executable).parent / name)


def checkov(files: list[Path], waivers_file: Path = WAIVERS) -> Report:
    shown = waivers_file.relative_to(ROOT) if waivers_file.is_relative_to(ROOT) else waivers_file
    report = Report(f"checkov (waivers: {shown})")
    waivers = _load_waivers(waivers_file, report)
    argv = [tool("checkov"), "--framework", "kubernetes", "--skip-download", "--quiet",
            "--compact", "-o", "json"]  # fmt: skip
    for path in files:
        argv += ["-f", str(path)]
    # No network: do not fetch Prisma Cloud's guideline mappings.
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)  # nosec B603
    try:
        parsed = json.loads(result.stdout) if result.stdout.strip() else []
    except json.JSONDecodeError:
        report.add(
            "checkov", f"unreadable output (exit {result.returncode}): {result.stderr[-500:]}"
        )
        return report
    runs = parsed if isinstance(parsed, list) else [parsed]
    used: set[int] = set()
    for run in runs:
        results = run.get("results", {}) if isinstance(run, dict) else {}
        for finding in results.get("failed_checks", []):
            obj = _object_of(finding)
            matched = [i for i, w in enumerate(waivers) if _matches(w, finding["check_id"], obj)]
            used.update(matched)
            if not matched:
                report.add(
                    f"{Path(finding.get('file_path', '')).name} {obj}",
                    f"{finding['check_id']} {finding.get('check_name', '')}",
                )
        for error in results.get("parsing_errors", []) if isinstance(results, dict) else []:
            report.add("checkov", f"could not parse {error}")
    for i, waiver in enumerate(waivers):
        if i not in used:
            report.add(
                str(waivers_file.name), f"waiver {waiver.get('check')} matches nothing: remove it"
            )
    return report


def _object_of(finding: dict[str, Any]) -> str:
    """checkov's "Deployment.ns.name" resource id as Deployment/name."""
    parts = str(finding.get("resource", "")).split(".")
    return f"{parts[0]}/{parts[-1]}" if len(parts) >= 2 else str(finding.get("resource"))


def _matches(waiver: dict[str, Any], check_id: str, obj: str) -> bool:
    objects = waiver.get("objects") or []
    return bool(waiver.get("check") == check_id and ("*" in objects or obj in objects))


def _load_waivers(path: Path, report: Report) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    waivers: list[dict[str, Any]] = list(data.get("waivers") or [])
    for waiver in waivers:
        if len(str(waiver.get("reason") or "").strip()) < MIN_REASON_CHARS:
            report.add(path.name, f"waiver {waiver.get('check')} needs a reason")
        if not waiver.get("objects"):
            report.add(path.name, f"waiver {waiver.get('check')} names no objects")
    return waivers


def hardening(objs: list[Obj]) -> Report:
    """taskmux's own rules for every pod and the NetworkPolicies around them."""
    report = Report("pod hardening and network policies")
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        where = ref(obj)
        pod_ctx = spec.get("securityContext") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                report.add(where, f"{flag} is on")
        if spec.get("automountServiceAccountToken") is not False:
            report.add(where, "automountServiceAccountToken is not false")
        for container in all_containers(spec):
            at = f"{where} container {container.get('name')}"
            ctx = container.get("securityContext") or {}
            if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
                report.add(at, "runAsNonRoot is not true")
            if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
                report.add(at, "runs as user 0")
            seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                report.add(at, "seccompProfile is not RuntimeDefault")
            if ctx.get("privileged"):
                report.add(at, "privileged")
            if ctx.get("allowPrivilegeEscalation") is not False:
                report.add(at, "allowPrivilegeEscalation is not false")
            if ctx.get("readOnlyRootFilesystem") is not True:
                report.add(at, "readOnlyRootFilesystem is not true")
            caps = ctx.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                report.add(at, "capabilities do not drop ALL")
            if caps.get("add"):
                report.add(at, f"adds capabilities {caps['add']}")
            resources = container.get("resources") or {}
            for section in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    exempt = (component(obj), container.get("name")) in NO_CPU_LIMIT
                    if section == "limits" and res == "cpu" and exempt:
                        continue
                    if res not in (resources.get(section) or {}):
                        report.add(at, f"no {res} {section}")
        if obj.get("kind") == "Deployment" and not spec.get("topologySpreadConstraints"):
            report.add(where, "no topologySpreadConstraints (replicas could share a node)")
    _network(objs, report)
    return report


def _network(objs: list[Obj], report: Report) -> None:
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    deny = [p for p in policies if _denies_all(p["spec"])]
    if not deny:
        report.add(
            "NetworkPolicy", "no default-deny policy (empty podSelector, Ingress and Egress)"
        )
    for obj in objs:
        if pod_spec(obj) is None:
            continue
        labels = pod_labels(obj)
        selecting = [p for p in policies if p["spec"].get("podSelector") and _selects(p, labels)]
        if not selecting:
            report.add(ref(obj), "no NetworkPolicy of its own (only the default deny)")
        allowed_outside = OUTSIDE_INGRESS.get(component(obj), False)
        metrics = _metrics_ports(pod_spec(obj) or {})
        for policy in selecting:
            for rule in policy["spec"].get("ingress") or []:
                peers = rule.get("from") or [{}]  # no "from" = anyone
                ports = {p.get("port") for p in rule.get("ports") or []}
                for peer in peers:
                    ns_labels = (peer.get("namespaceSelector") or {}).get("matchLabels")
                    if ns_labels == MONITORING and ports and ports <= metrics:
                        continue  # Prometheus, to the metrics port only
                    if (
                        "podSelector" in peer
                        and "namespaceSelector" not in peer
                        and "ipBlock" not in peer
                    ):
                        continue  # same namespace
                    ns = (peer.get("namespaceSelector") or {}).get("matchLabels")
                    if allowed_outside is None or (allowed_outside and ns == allowed_outside):
                        continue
                    target = component(obj) or ref(obj)
                    report.add(
                        ref(policy), f"lets traffic from outside the namespace into {target}"
                    )


def _metrics_ports(spec: Obj) -> set[Any]:
    """Numbers of the containerPorts named "metrics"."""
    return {
        p.get("containerPort")
        for c in spec.get("containers") or []
        for p in c.get("ports") or []
        if p.get("name") == "metrics"
    }


def _denies_all(spec: Obj) -> bool:
    """An empty podSelector with Ingress and Egress and no rule: nothing in or out."""
    types = set(spec.get("policyTypes") or [])
    rules = spec.get("ingress") or spec.get("egress")
    return not spec.get("podSelector") and not rules and {"Ingress", "Egress"} <= types


def _selects(policy: Obj, labels: dict[str, str]) -> bool:
    wanted = (policy["spec"].get("podSelector") or {}).get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())
