"""KEDA objects against KEDA's own CRD schemas, plus what the schemas cannot say.

kubernetes-validate only warns on custom resources, so each ScaledObject and
TriggerAuthentication is checked here against the openAPIV3Schema of its CRD
(../shared/schemas/keda, see its README). Like the API server's strict field
validation, an unknown field is an error: every object schema that lists properties
and does not preserve unknown fields is closed with additionalProperties: false.

Trigger metadata is a free string map in the CRD, so the redis-streams triggers are
checked here too: known keys only, the streams and group of router/keys.py, a lag and a
pending trigger for every job stream the workers read (each head's, and analyze's).

One worker serves every stream, so the workers scale on one figure, the sum of them all:
advanced.scalingModifiers with a formula that adds up exactly the ScaledObject's triggers
(each named, an identifier, and marked as an input with a count of "1"), a target per
worker, and metricType AverageValue.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from common import ROOT, Obj, Report, find, redis_keys, ref, stream_heads

DEFAULT_SCHEMAS = ROOT.parent / "shared" / "schemas" / "keda"
GROUP = "keda.sh"
# Metadata keys of KEDA's redis-streams scaler (keda.sh/docs/latest/scalers/redis-streams).
REDIS_STREAMS_KEYS = {
    "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv",
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex",
}  # fmt: skip
COUNT_KEYS = ("pendingEntriesCount", "streamLength", "lagCount", "activationLagCount")
# Under scalingModifiers the HPA gets one metric, the formula's value against its target. A
# trigger's count key still picks what the scaler reads (lag, pending), but is no target:
# "1" marks the trigger as an input of the formula, so nobody reads it as one.
TARGET_KEYS = ("pendingEntriesCount", "streamLength", "lagCount")
INPUT_MARK = "1"
# A trigger's name is a variable of the formula (expr-lang): "embed-lag" would subtract.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def load_schemas(folder: Path) -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> closed JSON schema, for every CRD version in `folder`."""
    schemas: dict[tuple[str, str], Obj] = {}
    for path in sorted(folder.glob("*.yaml")):
        with path.open(encoding="utf-8") as f:
            for crd in yaml.safe_load_all(f):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group = crd["spec"]["group"]
                kind = crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    schema = version.get("schema", {}).get("openAPIV3Schema")
                    if schema is not None:
                        schemas[(f"{group}/{version['name']}", kind)] = _closed(schema)
    return schemas


def _closed(schema: Any) -> Any:
    """An OpenAPI v3 (structural) schema as a JSON schema that rejects unknown fields."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    out.pop("format", None)
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def check(objs: list[Obj], schemas_dir: Path = DEFAULT_SCHEMAS) -> Report:
    report = Report(f"KEDA objects against their CRDs ({_show(schemas_dir)})")
    keda_objs = [o for o in objs if str(o.get("apiVersion", "")).startswith(GROUP + "/")]
    if not keda_objs:
        return report
    schemas = load_schemas(schemas_dir)
    if not schemas:
        report.add(str(schemas_dir), "no KEDA CRDs found")
        return report
    for obj in keda_objs:
        schema = schemas.get((obj["apiVersion"], obj.get("kind", "")))
        if schema is None:
            report.add(ref(obj), f"no CRD schema for {obj['apiVersion']} {obj.get('kind')}")
            continue
        validator = jsonschema.Draft202012Validator(copy.deepcopy(schema))
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in error.absolute_path) or "(root)"
            report.add(ref(obj), f"{path}: {error.message}")
        if obj.get("kind") == "ScaledObject":
            _check_scaled_object(obj, objs, report)
    return report


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT.parent))
    except ValueError:
        return str(path)


def _check_scaled_object(obj: Obj, objs: list[Obj], report: Report) -> None:
    spec = obj.get("spec") or {}
    where = ref(obj)
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if isinstance(low, int) and isinstance(high, int) and low > high:
        report.add(where, f"minReplicaCount {low} > maxReplicaCount {high}")
    stream_prefix, group = redis_keys()
    lag_heads: set[str] = set()
    pending_heads: set[str] = set()
    names: list[str] = []
    for i, trigger in enumerate(spec.get("triggers") or []):
        at = f"{where} trigger {trigger.get('name') or i}"
        name = str(trigger.get("name") or "")
        names.append(name)
        if not IDENTIFIER.fullmatch(name):
            report.add(
                at, f"name {name!r} is not an identifier the scalingModifiers formula can use"
            )
        auth = trigger.get("authenticationRef") or {}
        auth_obj = None
        if auth:
            auth_obj = find(objs, auth.get("kind", "TriggerAuthentication"), auth.get("name", ""))
            if auth_obj is None:
                report.add(at, f"authenticationRef {auth.get('name')} is not in the manifests")
        if trigger.get("type") != "redis-streams":
            continue
        meta = trigger.get("metadata") or {}
        for key in sorted(set(meta) - REDIS_STREAMS_KEYS):
            report.add(at, f"unknown redis-streams metadata key {key!r}")
        for key in COUNT_KEYS:
            if key in meta and not str(meta[key]).isdigit():
                report.add(at, f"{key}={meta[key]!r} is not a whole number")
        for key in TARGET_KEYS:
            if key in meta and str(meta[key]) != INPUT_MARK:
                report.add(
                    at,
                    f"{key}={meta[key]!r}: the formula's target scales, not this; set "
                    f"{INPUT_MARK!r} to mark the trigger as an input of the formula",
                )
        if "activationLagCount" in meta:
            report.add(
                at, "activationLagCount is ignored under scalingModifiers (activationTarget)"
            )
        params = {
            p.get("parameter")
            for p in (auth_obj or {}).get("spec", {}).get("secretTargetRef") or []
        }
        if not ({"address", "host", "addressFromEnv", "hostFromEnv"} & (set(meta) | params)):
            report.add(at, "no Redis address (metadata or TriggerAuthentication)")
        # Valkey's default user is off (k8s/base/valkey.conf): KEDA has a user of its own.
        if not ({"username", "usernameFromEnv"} & (set(meta) | params)):
            report.add(at, "no Redis username: KEDA would be the default user, which is off")
        stream = str(meta.get("stream", ""))
        if not stream.startswith(stream_prefix):
            report.add(at, f"stream {stream!r} is not a task stream ({stream_prefix}<head>)")
            continue
        if meta.get("consumerGroup") != group:
            report.add(at, f"consumerGroup {meta.get('consumerGroup')!r} is not {group!r}")
        head = stream.removeprefix(stream_prefix)
        if "lagCount" in meta:
            lag_heads.add(head)
            if "pendingEntriesCount" in meta:
                report.add(
                    at, "lagCount and pendingEntriesCount in one trigger: KEDA uses lag only"
                )
        elif "pendingEntriesCount" in meta:
            pending_heads.add(head)
        else:
            report.add(at, "neither lagCount nor pendingEntriesCount")
    for head in stream_heads():
        if head not in lag_heads:
            report.add(where, f"head {head!r} has no lagCount trigger (scaling from zero)")
        if head not in pending_heads:
            report.add(where, f"head {head!r} has no pendingEntriesCount trigger (work in flight)")
    _check_scaling_modifiers(spec, names, report, where)


def _check_scaling_modifiers(spec: Obj, names: list[str], report: Report, where: str) -> None:
    """One figure for the HPA: the sum of every trigger, against a per-worker target."""
    modifiers = (spec.get("advanced") or {}).get("scalingModifiers")
    if not modifiers:
        report.add(
            where,
            "no advanced.scalingModifiers: the HPA would follow the largest trigger, "
            "not the whole backlog one worker serves",
        )
        return
    formula = str(modifiers.get("formula") or "")
    terms = [term.strip() for term in formula.split("+")]
    if not all(IDENTIFIER.fullmatch(term) for term in terms):
        report.add(where, f"scalingModifiers.formula {formula!r} is not a sum of trigger names")
    else:
        for term, count in sorted(Counter(terms).items()):
            if count > 1:
                report.add(where, f"scalingModifiers.formula adds {term} {count} times")
        for term in sorted(set(terms) - set(names)):
            report.add(where, f"scalingModifiers.formula adds {term}, which is not a trigger")
        for name in sorted(set(names) - set(terms)):
            report.add(where, f"scalingModifiers.formula leaves out the trigger {name}")
    target = _number(modifiers.get("target"))
    if target is None or target <= 0:
        report.add(
            where,
            f"scalingModifiers.target {modifiers.get('target')!r} is not a number above 0 "
            "(jobs per worker)",
        )
    if modifiers.get("metricType") != "AverageValue":
        report.add(
            where,
            f"scalingModifiers.metricType is {modifiers.get('metricType')!r}, not "
            "'AverageValue': the target must be per worker (KEDA's fallback needs it too)",
        )
    activation = modifiers.get("activationTarget")
    low = _number(activation) if activation is not None else 0.0
    if low is None or low < 0:
        report.add(where, f"scalingModifiers.activationTarget {activation!r} is not a number >= 0")


def _number(value: object) -> float | None:
    try:
        return float(str(value))
    except ValueError:
        return None
