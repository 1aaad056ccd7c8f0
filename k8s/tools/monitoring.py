"""Can Prometheus scrape every gateway and worker, and can every pod resolve names and
(when tracing is on) export spans?

Each gateway and worker with a metrics port (TASKMUX_METRICS_ADDR) needs a NetworkPolicy
ingress rule from the monitoring namespace to that port, and a PodMonitor
(monitoring.coreos.com/v1) that selects its pods and scrapes that port by name, at the
path of its prometheus.io/path annotation. kubernetes-validate skips custom resources
and no PodMonitor CRD is vendored, so its fields are checked against POD_MONITOR_FIELDS
here (the subset taskmux uses; an unknown one is an error, as the API server's strict
validation makes it). Every pod may send DNS (UDP and TCP 53); OTLP egress (4317/4318)
goes only to named namespaces, and a component that traces over OTLP has it.
"""

from __future__ import annotations

from typing import Any

from common import Obj, Report, port_of, ref, taskmux_containers
from consistency import container_env

MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
METRICS_SETTING = "TASKMUX_METRICS_ADDR"
POD_MONITOR = ("monitoring.coreos.com/v1", "PodMonitor")
POD_MONITOR_FIELDS = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
DNS_PORTS = {("UDP", 53), ("TCP", 53)}
OTLP_PORTS = {4317, 4318}


def check(objs: list[Obj]) -> Report:
    report = Report("metrics scraped from monitoring, DNS and OTLP egress")
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    monitors = [o for o in objs if (o.get("apiVersion"), o.get("kind")) == POD_MONITOR]
    for monitor in monitors:
        _check_fields(monitor, report)
    for workload, name, container in taskmux_containers(objs):
        where = f"{ref(workload)} container {name}"
        env = container_env(container, objs, report, where)
        labels = _labels(workload)
        selecting = [p for p in policies if _selects(p["spec"].get("podSelector") or {}, labels)]
        address = env.get(METRICS_SETTING)
        port = port_of(address) if isinstance(address, str) and address else None
        if port is not None:
            _check_scraped(workload, container, port, selecting, monitors, report, where)
        _check_otlp(env, selecting, report, where)
    _check_dns(objs, policies, report)
    return report


def _labels(workload: Obj) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels") or {})


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    """matchLabels only ({} selects every pod); matchExpressions are not used here."""
    wanted = selector.get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def _ports(rule: Obj) -> set[tuple[str, Any]]:
    return {(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports") or []}


def _check_scraped(
    workload: Obj,
    container: Obj,
    port: int,
    selecting: list[Obj],
    monitors: list[Obj],
    report: Report,
    where: str,
) -> None:
    named = {p.get("containerPort"): p.get("name") for p in container.get("ports") or []}
    if port not in named:
        report.add(where, f"{METRICS_SETTING} port {port} is not a containerPort")
    admitted = any(
        any((p.get("namespaceSelector") or {}).get("matchLabels") == MONITORING
            for p in rule.get("from") or [])
        and ("TCP", port) in _ports(rule)
        for policy in selecting
        for rule in policy["spec"].get("ingress") or []
    )  # fmt: skip
    if not admitted:
        report.add(
            where, f"no NetworkPolicy admits the monitoring namespace to metrics port {port}"
        )
    path = (workload["spec"]["template"]["metadata"].get("annotations") or {}).get(
        "prometheus.io/path", "/metrics"
    )
    labels = _labels(workload)
    scraping = [
        endpoint
        for monitor in monitors
        if _selects(monitor.get("spec", {}).get("selector") or {}, labels)
        and (monitor.get("spec", {}).get("selector") or {}).get("matchLabels")
        for endpoint in monitor["spec"].get("podMetricsEndpoints") or []
    ]
    if not any(
        e.get("port") == named.get(port) and e.get("path", "/metrics") == path for e in scraping
    ):
        report.add(
            where,
            f"no PodMonitor scrapes its port {named.get(port) or port} at {path} "
            "(podMetricsEndpoints port is the containerPort's name)",
        )


def _check_fields(monitor: Obj, report: Report) -> None:
    spec = monitor.get("spec") or {}
    for key in sorted(set(spec) - POD_MONITOR_FIELDS):
        report.add(ref(monitor), f"spec.{key} is not a PodMonitor field taskmux knows")
    for i, endpoint in enumerate(spec.get("podMetricsEndpoints") or []):
        for key in sorted(set(endpoint) - ENDPOINT_FIELDS):
            report.add(ref(monitor), f"podMetricsEndpoints[{i}].{key} is not a known field")
        if not isinstance(endpoint.get("port"), str):
            report.add(ref(monitor), f"podMetricsEndpoints[{i}].port must name a containerPort")


def _check_otlp(env: dict[str, Any], selecting: list[Obj], report: Report, where: str) -> None:
    allowed: set[Any] = set()
    for policy in selecting:
        for rule in policy["spec"].get("egress") or []:
            otlp = {port for _, port in _ports(rule)} & OTLP_PORTS
            peers = rule.get("to") or []
            if otlp and (not peers or any("namespaceSelector" not in p for p in peers)):
                report.add(
                    ref(policy), f"OTLP egress {sorted(otlp)} is open beyond named namespaces"
                )
            allowed |= otlp if peers else set()
    if str(env.get("TASKMUX_TRACE_EXPORTER", "none")).lower() == "otlp":
        endpoint = str(env.get("TASKMUX_TRACE_ENDPOINT", "http://localhost:4317"))
        port = port_of(endpoint.rstrip("/")) or 4317
        if port not in allowed:
            report.add(where, f"traces over OTLP to port {port}, which no egress rule allows")


def _check_dns(objs: list[Obj], policies: list[Obj], report: Report) -> None:
    for obj in objs:
        if obj.get("kind") not in {"Deployment", "StatefulSet"}:
            continue
        labels = _labels(obj)
        allowed: set[tuple[str, Any]] = set()
        for policy in policies:
            if _selects(policy["spec"].get("podSelector") or {}, labels):
                for rule in policy["spec"].get("egress") or []:
                    allowed |= _ports(rule)
        missing = DNS_PORTS - allowed
        if missing:
            shown = ", ".join(f"{proto} {port}" for proto, port in sorted(missing))
            report.add(ref(obj), f"no egress for DNS ({shown}): it cannot resolve names")
