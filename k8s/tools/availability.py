"""Does Valkey survive a lost node, and do taskmux's pods keep their place when nodes are
short?

Valkey runs 3 or more replicas (a primary and replicas, with a Sentinel per pod) unless
its StatefulSet says why one is enough (annotation SINGLE_REASON); a PodDisruptionBudget
with maxUnavailable 1 selects it; its pods keep apart across nodes (pod anti-affinity on
kubernetes.io/hostname) and zones (a topology spread on topology.kubernetes.io/zone).
Valkey, gateway and worker pods name a PriorityClass of the manifests, Valkey's and the
gateways' above the workers'. Valkey's memory limit is at least twice maxmemory (an AOF
rewrite forks; copy-on-write can double the pages), and it has no CPU limit (a throttled
single-threaded server stalls every client).
"""

from __future__ import annotations

from typing import Any

from common import Obj, Report, component, find, pod_labels, pod_spec, ref
from consistency import _bytes, _valkey_config

SINGLE_REASON = "taskmux.io/single-valkey"
MIN_REASON_CHARS = 20
MIN_REPLICAS = 3
SENTINEL_PORT = 26379
HOSTNAME = "kubernetes.io/hostname"
ZONE = "topology.kubernetes.io/zone"
# PriorityClass order: each component above the ones after it.
PRIORITY_ABOVE_WORKERS = ("redis", "gateway")
PRIORITIZED = ("redis", "gateway", "worker")


def check(objs: list[Obj]) -> Report:
    report = Report("Valkey replicas, disruption budget, spreading, priorities, memory")
    for obj in objs:
        if obj.get("kind") == "StatefulSet" and component(obj) == "redis":
            _check_replicas(obj, report)
            _check_budget(obj, objs, report)
            _check_spread(obj, report)
            _check_resources(obj, objs, report)
    _check_priorities(objs, report)
    return report


def _check_replicas(obj: Obj, report: Report) -> None:
    replicas = obj.get("spec", {}).get("replicas", 1)
    reason = str((obj.get("metadata", {}).get("annotations") or {}).get(SINGLE_REASON) or "")
    sentinels = [
        c
        for c in (pod_spec(obj) or {}).get("containers") or []
        if any(p.get("containerPort") == SENTINEL_PORT for p in c.get("ports") or [])
    ]
    if replicas < MIN_REPLICAS and len(reason.strip()) < MIN_REASON_CHARS:
        report.add(
            ref(obj),
            f"replicas {replicas} < {MIN_REPLICAS} (a primary and two replicas) without an "
            f"annotation {SINGLE_REASON} that says why one is enough",
        )
    if replicas > 1 and not sentinels:
        report.add(ref(obj), f"{replicas} replicas but no Sentinel (containerPort {SENTINEL_PORT})")


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    wanted = selector.get("matchLabels") or {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def _check_budget(obj: Obj, objs: list[Obj], report: Report) -> None:
    labels = pod_labels(obj)
    budgets = [
        o
        for o in objs
        if o.get("kind") == "PodDisruptionBudget"
        and _selects(o.get("spec", {}).get("selector") or {}, labels)
    ]
    if not budgets:
        report.add(ref(obj), "no PodDisruptionBudget selects its pods")
    for budget in budgets:
        if budget["spec"].get("maxUnavailable") != 1:
            report.add(
                ref(budget),
                f"maxUnavailable is {budget['spec'].get('maxUnavailable')!r}, not 1 "
                "(one Valkey at a time)",
            )


def _check_spread(obj: Obj, report: Report) -> None:
    spec = pod_spec(obj) or {}
    labels = pod_labels(obj)
    anti = (spec.get("affinity") or {}).get("podAntiAffinity") or {}
    terms = [
        *(anti.get("requiredDuringSchedulingIgnoredDuringExecution") or []),
        *(
            t.get("podAffinityTerm") or {}
            for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution") or []
        ),
    ]
    if not any(
        t.get("topologyKey") == HOSTNAME and _selects(t.get("labelSelector") or {}, labels)
        for t in terms
    ):
        report.add(
            ref(obj),
            f"no pod anti-affinity on {HOSTNAME} for its own pods (copies could share a node)",
        )
    zone_terms = [t for t in terms if t.get("topologyKey") == ZONE]
    spreads = [
        c for c in spec.get("topologySpreadConstraints") or [] if c.get("topologyKey") == ZONE
    ]
    if not zone_terms and not spreads:
        report.add(ref(obj), f"no spread across zones ({ZONE})")


def _check_resources(obj: Obj, objs: list[Obj], report: Report) -> None:
    spec = pod_spec(obj) or {}
    container = (spec.get("containers") or [{}])[0]
    where = f"{ref(obj)} container {container.get('name')}"
    resources: dict[str, Any] = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if "cpu" in limits:
        report.add(
            where,
            f"CPU limit {limits['cpu']}: a throttled single-threaded server stalls every "
            "client (set a request only)",
        )
    for res in ("cpu", "memory"):
        if res not in requests:
            report.add(where, f"no {res} request")
    config = _valkey_config(spec, objs) or {}
    maxmemory, limit = _bytes(config.get("maxmemory")), _bytes(limits.get("memory"))
    if maxmemory is None or limit is None or limit < 2 * maxmemory:
        report.add(
            where,
            f"memory limit {limits.get('memory')} is not at least twice valkey.conf maxmemory "
            f"{config.get('maxmemory')} (an AOF rewrite forks: copy-on-write)",
        )


def _check_priorities(objs: list[Obj], report: Report) -> None:
    values: dict[str, int] = {}
    for obj in objs:
        spec = pod_spec(obj)
        name = component(obj)
        if spec is None or name not in PRIORITIZED:
            continue
        class_name = spec.get("priorityClassName")
        priority = find(objs, "PriorityClass", class_name) if class_name else None
        if priority is None:
            report.add(ref(obj), f"priorityClassName {class_name!r} is not a PriorityClass here")
        else:
            values[name] = int(priority.get("value", 0))
    worker = values.get("worker")
    for name in PRIORITY_ABOVE_WORKERS:
        if worker is not None and name in values and values[name] <= worker:
            report.add(
                f"PriorityClass of the {name}",
                f"value {values[name]} is not above the workers' {worker}",
            )
