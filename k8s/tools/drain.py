"""Does every taskmux pod get to finish its drain before kubelet kills it?

On SIGTERM a gateway reports NOT_SERVING and lets in-flight calls finish; a worker stops
pulling and finishes and acknowledges what it pulled. Each gives up after
TASKMUX_DRAIN_TIMEOUT_S. kubelet runs the preStop hook first, then sends SIGTERM, and
sends SIGKILL terminationGracePeriodSeconds after the pod began terminating (the preStop
time included). So each Deployment's grace period must exceed its preStop sleep plus the
drain timeout its container actually gets (from its env or ConfigMap, or else the
default of the settings dataclass, read from workers/settings.py or gateway/settings.py)
plus MARGIN_S for what follows the drain.
"""

from __future__ import annotations

from typing import Any

from common import Obj, Report, pod_spec, ref, settings_names, taskmux_containers
from consistency import container_env

DRAIN_SETTING = "TASKMUX_DRAIN_TIMEOUT_S"
# After the drain gives up: stopping the health server (1 s), closing Redis, and a
# worker's encoder thread finishing the batch it is computing.
MARGIN_S = 5
KUBERNETES_DEFAULT_GRACE_S = 30


def check(objs: list[Obj]) -> Report:
    report = Report("grace periods outlast preStop + drain timeout + margin")
    for workload, name, container in taskmux_containers(objs):
        where = f"{ref(workload)} container {name}"
        env = container_env(container, objs, report, where)
        drain = _drain_timeout(name, env, report, where)
        sleep_s = _pre_stop_sleep(container, report, where)
        if drain is None or sleep_s is None:
            continue
        grace = (pod_spec(workload) or {}).get(
            "terminationGracePeriodSeconds", KUBERNETES_DEFAULT_GRACE_S
        )
        needed = sleep_s + drain + MARGIN_S
        if not isinstance(grace, int) or grace < needed:
            report.add(
                where,
                f"terminationGracePeriodSeconds {grace} is less than preStop sleep {sleep_s}s "
                f"+ {DRAIN_SETTING} {drain}s + {MARGIN_S}s margin = {needed}s",
            )
    return report


def _drain_timeout(name: str, env: dict[str, Any], report: Report, where: str) -> int | None:
    """The drain timeout the container gets: its own setting, else the code's default."""
    value = env.get(DRAIN_SETTING)
    if value is None:
        value = settings_names(name).get(DRAIN_SETTING)
        if value is None:
            report.add(where, f"the {name}'s settings have no literal default for {DRAIN_SETTING}")
            return None
    if not str(value).isdigit():
        report.add(where, f"{DRAIN_SETTING}={value!r} is not a whole number of seconds")
        return None
    return int(value)


def _pre_stop_sleep(container: Obj, report: Report, where: str) -> int | None:
    """Seconds the preStop hook takes: 0 without one, its sleep; None if unknowable."""
    pre_stop = (container.get("lifecycle") or {}).get("preStop")
    if not pre_stop:
        return 0
    seconds = (pre_stop.get("sleep") or {}).get("seconds")
    if not isinstance(seconds, int) or set(pre_stop) != {"sleep"}:
        report.add(where, "preStop is not a plain sleep: its length is unknown to this check")
        return None
    return seconds
