"""Do the rendered manifests fit the code? Settings, ports, probes, volumes, images, Redis.

Every TASKMUX_* variable a gateway or worker container gets must be one its code reads
(a typo such as TASKMUX_REDIS_URI would otherwise be silently ignored), the required ones
must be set, and the ports in the settings must be the ones the probes and Services use.
Each logs in to Redis as its own ACL user (router/acl.py) with a password from a mounted
Secret, never one written in a manifest; Valkey takes its users from an aclfile Secret.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from common import (
    Obj,
    Report,
    acl_user_names,
    all_containers,
    component,
    find,
    pod_labels,
    pod_spec,
    port_of,
    ref,
    settings_names,
    taskmux_containers,
)

REQUIRED = {
    "gateway": ("TASKMUX_REDIS_URL", "TASKMUX_LISTEN_ADDR"),
    "worker": ("TASKMUX_REDIS_URL", "TASKMUX_MODEL_REPO", "TASKMUX_HEALTH_ADDR"),
}
# The gRPC port each component's probes and Services use, from which setting.
PORT_SETTING = {"gateway": "TASKMUX_LISTEN_ADDR", "worker": "TASKMUX_HEALTH_ADDR"}
READINESS_SERVICE = ""  # taskmux/health.py: "" = ready, "liveness" = alive
LIVENESS_SERVICE = "liveness"
# A worker's startup probe: SERVING once its model is loaded, whatever Redis does.
STARTUP_SERVICE = "started"
LOGICAL_IMAGES = ("taskmux-gateway", "taskmux-worker", "taskmux-model")
GPU_RESOURCE = "nvidia.com/gpu"
# The router/acl.py user each component logs in as.
ACL_USER = {"gateway": "GATEWAY", "worker": "WORKER"}
REDIS_CLIS = ("valkey-cli", "redis-cli")


def check(objs: list[Obj]) -> Report:
    report = Report("settings and ports match the code")
    for workload, name, container in taskmux_containers(objs):
        where = f"{ref(workload)} container {name}"
        env = container_env(container, objs, report, where)
        _check_names(name, env, report, where)
        _check_ports_and_probes(workload, name, container, env, objs, report, where)
        _check_files(workload, container, env, report, where)
        _check_redis_login(name, env, report, where)
        if name == "worker":
            _check_worker(workload, container, env, report, where)
    _check_images(objs, report)
    _check_replicas(objs, report)
    _check_redis(objs, report)
    return report


def container_env(container: Obj, objs: list[Obj], report: Report, where: str) -> dict[str, Any]:
    """Variable name -> literal value (or a description of where it comes from)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            cm_name = source["configMapRef"]["name"]
            cm = find(objs, "ConfigMap", cm_name)
            if cm is None:
                report.add(where, f"envFrom ConfigMap {cm_name} is not in the manifests")
                continue
            for key, value in (cm.get("data") or {}).items():
                env[source.get("prefix", "") + key] = value
        else:
            report.add(where, f"envFrom {sorted(source)} hides which variables are set")
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = f"<{next(iter(var.get('valueFrom') or {'unset': 0}))}>"
    return env


def _check_names(name: str, env: dict[str, Any], report: Report, where: str) -> None:
    known = settings_names(name)
    for var in sorted(env):
        if var not in known:
            report.add(
                where,
                f"{var} is not a setting the {name} reads (known: {', '.join(sorted(known))})",
            )
    for var in REQUIRED[name]:
        if var not in env:
            report.add(where, f"required setting {var} is not set")


def _check_ports_and_probes(
    workload: Obj,
    name: str,
    container: Obj,
    env: dict[str, Any],
    objs: list[Obj],
    report: Report,
    where: str,
) -> None:
    address = env.get(PORT_SETTING[name])
    port = port_of(address) if isinstance(address, str) else None
    if port is None:
        report.add(where, f"{PORT_SETTING[name]}={address!r} has no literal port")
        return
    container_ports = {p.get("containerPort") for p in container.get("ports") or []}
    if port not in container_ports:
        report.add(where, f"{PORT_SETTING[name]} port {port} is not a containerPort")
    probe_port = _probe_port(name, env, port, container_ports, report, where)
    served = {port, *_http_port(env, container_ports, report, where)}
    wanted = {
        "readinessProbe": READINESS_SERVICE,
        "livenessProbe": LIVENESS_SERVICE,
    }
    if name == "worker":
        # Until the model is loaded ("started"). Never readiness: it needs Redis, and kubelet
        # would kill every starting worker while Redis is down.
        wanted["startupProbe"] = STARTUP_SERVICE
    for probe_name, service in wanted.items():
        probe = container.get(probe_name)
        if probe is None:
            report.add(where, f"no {probe_name}")
            continue
        grpc = probe.get("grpc")
        if grpc is None:
            report.add(where, f"{probe_name} is not a native gRPC probe")
            continue
        if grpc.get("port") != probe_port:
            report.add(where, f"{probe_name} port {grpc.get('port')} is not {probe_port}")
        if grpc.get("service", "") != service:
            why = ""
            if probe_name == "startupProbe" and grpc.get("service", "") == READINESS_SERVICE:
                why = " (readiness needs Redis: a Redis outage would kill starting workers)"
            report.add(
                where,
                f"{probe_name} asks for health service {grpc.get('service', '')!r}, "
                f"not {service!r}{why}",
            )
    labels = pod_labels(workload)
    named_ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    for svc in objs:
        if svc.get("kind") != "Service":
            continue
        selector = svc.get("spec", {}).get("selector") or {}
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            continue
        for svc_port in svc["spec"].get("ports") or []:
            target = svc_port.get("targetPort", svc_port.get("port"))
            target = named_ports.get(target, target)
            if target not in served:
                report.add(ref(svc), f"targetPort {target} is not the {name} port {port}")


def _http_port(
    env: dict[str, Any], container_ports: set[Any], report: Report, where: str
) -> set[int]:
    """The gateway's OpenAI-compatible HTTP port (TASKMUX_HTTP_ADDR), which a Service may
    target beside the gRPC port; none when it is unset."""
    address = env.get("TASKMUX_HTTP_ADDR")
    if not isinstance(address, str) or not address:
        return set()
    port = port_of(address)
    if port is None or port not in container_ports:
        report.add(where, f"TASKMUX_HTTP_ADDR port {port} is not a containerPort")
        return set()
    return {port}


def _probe_port(
    name: str,
    env: dict[str, Any],
    api_port: int,
    container_ports: set[Any],
    report: Report,
    where: str,
) -> int:
    """The port kubelet's gRPC probes must use: a gateway's plaintext health port when it
    has one (probes cannot speak TLS), else the API port."""
    if name != "gateway":
        return api_port
    address = env.get("TASKMUX_HEALTH_ADDR")
    if not isinstance(address, str) or not address:
        if env.get("TASKMUX_TLS_CERT_FILE"):
            report.add(
                where,
                "TLS is on but TASKMUX_HEALTH_ADDR is unset: kubelet's gRPC probes "
                "cannot speak TLS",
            )
        return api_port
    probe_port = port_of(address)
    if probe_port not in container_ports:
        report.add(where, f"TASKMUX_HEALTH_ADDR port {probe_port} is not a containerPort")
    return probe_port if probe_port is not None else api_port


def _mount(workload: Obj, container: Obj, path: str) -> tuple[Obj, Obj] | None:
    """(volumeMount, volume) of the deepest mount holding `path`, if any."""
    volumes = {v.get("name"): v for v in (pod_spec(workload) or {}).get("volumes") or []}
    best: tuple[Obj, Obj] | None = None
    for mount in container.get("volumeMounts") or []:
        root = str(mount.get("mountPath", "")).rstrip("/")
        if path.startswith(root + "/") and (
            best is None or len(root) > len(best[0]["mountPath"].rstrip("/"))
        ):
            best = (mount, volumes.get(mount.get("name"), {}))
    return best


def _check_files(
    workload: Obj, container: Obj, env: dict[str, Any], report: Report, where: str
) -> None:
    """A *_FILE setting names a file a mounted volume must provide: the root filesystem
    holds none of them, and a missing one stops the process at start."""
    for var, value in sorted(env.items()):
        if not var.endswith("_FILE") or not isinstance(value, str) or value.startswith("<"):
            continue
        found = _mount(workload, container, value)
        if found is None:
            report.add(where, f"{var}={value} is not in a mounted volume")
        elif var == "TASKMUX_REDIS_PASSWORD_FILE" and not (
            "secret" in found[1] and found[0].get("readOnly")
        ):
            report.add(where, f"{var}={value} is not on a read-only Secret volume")


def _check_redis_login(name: str, env: dict[str, Any], report: Report, where: str) -> None:
    url = env.get("TASKMUX_REDIS_URL")
    if isinstance(url, str) and not url.startswith("<") and urlsplit(url).password:
        report.add(
            where,
            "TASKMUX_REDIS_URL holds a password: a ConfigMap is not a Secret "
            "(use TASKMUX_REDIS_PASSWORD_FILE)",
        )
    password = env.get("TASKMUX_REDIS_PASSWORD")
    if isinstance(password, str) and not password.startswith("<"):
        report.add(where, "TASKMUX_REDIS_PASSWORD is written in the manifest, not a Secret")
    wanted = acl_user_names().get(ACL_USER[name])
    user = env.get("TASKMUX_REDIS_USERNAME")
    if user != wanted:
        report.add(
            where,
            f"the {name} logs in to Redis as {user or 'default'}, not {wanted} "
            "(TASKMUX_REDIS_USERNAME, router/acl.py)",
        )
    elif not ({"TASKMUX_REDIS_PASSWORD", "TASKMUX_REDIS_PASSWORD_FILE"} & set(env)):
        report.add(where, f"the {name} logs in to Redis as {user} without a password")


def _cpu(value: Any) -> float | None:
    text = str(value)
    if text.endswith("m") and text[:-1].isdigit():
        return int(text[:-1]) / 1000
    try:
        return float(text)
    except ValueError:
        return None


def _check_worker(
    workload: Obj, container: Obj, env: dict[str, Any], report: Report, where: str
) -> None:
    spec = pod_spec(workload) or {}
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounts = {m.get("mountPath"): m for m in container.get("volumeMounts") or []}
    repo = env.get("TASKMUX_MODEL_REPO")
    mount = mounts.get(repo) if isinstance(repo, str) else None
    if mount is None:
        report.add(where, f"TASKMUX_MODEL_REPO={repo!r} is not a mounted volume")
    elif not mount.get("readOnly"):
        report.add(where, f"the model repository {repo} is not mounted read-only")
    # Reads a manifest's mount path; creates no file.
    tmp = mounts.get("/tmp")  # nosec B108
    if tmp is None or "emptyDir" not in volumes.get(tmp.get("name"), {}):
        report.add(where, "no writable emptyDir on /tmp (the root filesystem is read-only)")
    threads = env.get("TASKMUX_INTRA_OP_THREADS")
    limit = _cpu((container.get("resources") or {}).get("limits", {}).get("cpu"))
    if not (isinstance(threads, str) and threads.isdigit() and int(threads) > 0):
        report.add(where, "TASKMUX_INTRA_OP_THREADS must be set (0 means every core of the node)")
    elif limit is not None and int(threads) > limit:
        report.add(where, f"TASKMUX_INTRA_OP_THREADS={threads} exceeds the CPU limit {limit:g}")
    resources = container.get("resources") or {}
    wants_gpu = GPU_RESOURCE in (resources.get("limits") or {})
    image = str(container.get("image", ""))
    providers = str(env.get("TASKMUX_PROVIDERS", "auto"))
    if wants_gpu and "gpu" not in image.rsplit("/", 1)[-1]:
        report.add(where, f"asks for {GPU_RESOURCE} but runs the image {image}, not a GPU one")
    if wants_gpu and "CUDAExecutionProvider" not in providers and providers != "auto":
        report.add(where, f"asks for {GPU_RESOURCE} but TASKMUX_PROVIDERS={providers}")
    if not wants_gpu and "gpu" in image.rsplit("/", 1)[-1]:
        report.add(where, f"runs the GPU image {image} without asking for {GPU_RESOURCE}")


def _check_images(objs: list[Obj], report: Report) -> None:
    for obj in objs:
        spec = pod_spec(obj)
        for container in all_containers(spec or {}):
            image = str(container.get("image", ""))
            where = f"{ref(obj)} container {container.get('name')}"
            if image in LOGICAL_IMAGES:
                report.add(where, f"image {image} was not set by the overlay's `images:`")
            elif "@sha256:" not in image and not re.search(r":[\w][\w.-]*$", image.split("/")[-1]):
                report.add(where, f"image {image} has no tag or digest")
            elif image.endswith(":latest"):
                report.add(where, f"image {image} uses the tag latest")


def _check_replicas(objs: list[Obj], report: Report) -> None:
    """A workload an autoscaler owns must not set replicas: every apply would reset it."""
    for obj in objs:
        target = None
        if obj.get("kind") == "HorizontalPodAutoscaler" or obj.get("kind") == "ScaledObject":
            target = obj.get("spec", {}).get("scaleTargetRef", {})
        if not target:
            continue
        workload = find(objs, target.get("kind", "Deployment"), target.get("name", ""))
        if workload is None:
            report.add(ref(obj), f"scales {target.get('name')}, which is not in the manifests")
        elif "replicas" in workload.get("spec", {}):
            report.add(ref(workload), f"sets replicas although {ref(obj)} owns the count")


def _check_redis(objs: list[Obj], report: Report) -> None:
    for obj in objs:
        if component(obj) != "redis" or obj.get("kind") != "StatefulSet":
            continue
        spec = pod_spec(obj) or {}
        container = (spec.get("containers") or [{}])[0]
        config = _valkey_config(spec, objs)
        where = ref(obj)
        if config is None:
            report.add(where, "no valkey.conf ConfigMap mounted")
            continue
        if config.get("appendonly") != "yes":
            report.add(
                where, "valkey.conf: appendonly is not yes (the queue must survive restarts)"
            )
        if config.get("maxmemory-policy") != "noeviction":
            report.add(
                where, "valkey.conf: maxmemory-policy is not noeviction (jobs could be evicted)"
            )
        memory_limit = (container.get("resources") or {}).get("limits", {}).get("memory")
        limit = _bytes(memory_limit)
        maxmemory = _bytes(config.get("maxmemory"))
        if limit is None or maxmemory is None or maxmemory > 0.8 * limit:
            report.add(
                where,
                f"valkey.conf maxmemory {config.get('maxmemory')} must be set and at most 80% "
                f"of the memory limit {memory_limit}",
            )
        data_dir = config.get("dir")
        claims = {
            t.get("metadata", {}).get("name") for t in obj["spec"].get("volumeClaimTemplates") or []
        }
        mounted = {m.get("mountPath"): m.get("name") for m in container.get("volumeMounts") or []}
        if mounted.get(data_dir) not in claims:
            report.add(where, f"valkey.conf dir {data_dir} is not on a PersistentVolumeClaim")
        _check_redis_users(obj, container, config, report, where)


def _check_redis_users(
    obj: Obj, container: Obj, config: dict[str, str], report: Report, where: str
) -> None:
    """Users come from an aclfile Secret (router/acl.py, the default user off), so a shared
    password must not switch the default user back on, and valkey-cli must log in."""
    aclfile = config.get("aclfile")
    if not aclfile:
        report.add(where, "valkey.conf has no aclfile: every client would be the default user")
    else:
        found = _mount(obj, container, aclfile)
        if found is None or "secret" not in found[1] or not found[0].get("readOnly"):
            report.add(where, f"valkey.conf aclfile {aclfile} is not on a read-only Secret volume")
    command = [*(container.get("command") or []), *(container.get("args") or [])]
    if "requirepass" in config or any("requirepass" in str(arg) for arg in command):
        report.add(
            where, "requirepass sets a password for the default user, which the aclfile turns off"
        )
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        argv = " ".join((container.get(probe_name) or {}).get("exec", {}).get("command") or [])
        if aclfile and any(cli in argv for cli in REDIS_CLIS) and "--user" not in argv:
            report.add(
                where,
                f"{probe_name} runs a Redis CLI without --user: as the default user (off) "
                "it only gets NOAUTH",
            )


def _valkey_config(spec: Obj, objs: list[Obj]) -> dict[str, str] | None:
    for volume in spec.get("volumes") or []:
        cm_name = (volume.get("configMap") or {}).get("name")
        cm = find(objs, "ConfigMap", cm_name) if cm_name else None
        text = (cm or {}).get("data", {}).get("valkey.conf")
        if text is not None:
            config: dict[str, str] = {}
            for line in text.splitlines():
                parts = line.split(None, 1)
                if parts and not parts[0].startswith("#"):
                    config[parts[0].lower()] = parts[1].strip() if len(parts) > 1 else ""
            return config
    return None


_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3,
    "ki": 1024, "mi": 1024**2, "gi": 1024**3,
}  # fmt: skip


def _bytes(value: Any) -> float | None:
    """Kubernetes ("1Gi") or Valkey ("768mb") memory quantities in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value or "").strip())
    if not match or match.group(2).lower() not in _UNITS:
        return None
    return float(match.group(1)) * _UNITS[match.group(2).lower()]
