"""The deploy kit: Kubernetes manifests, the image's config and Dockerfile, and the image's run.

- Every manifest under deploy/kubernetes/ (and the Deployment in docs/operations.md) is checked
  against the Kubernetes OpenAPI schema with `kubernetes-validate` in strict mode (unknown keys
  fail), at 1.29 (the first release with native sidecars on by default) and at the newest release
  the validator knows. The kit is plain manifests listed by a kustomization.yaml that does nothing
  else, so each file is exactly what `kubectl apply -k` sends: nothing to render.
- The ServiceMonitor is a Prometheus Operator custom resource: no schema of it ships with the
  validator or with any package the project can install (the one Python package that models it
  accepts unknown keys). Its metadata and label selector are validated against the core schema's
  ObjectMeta and LabelSelector, the rest against the few fields the kit uses.
- Cross-checks a schema cannot see: the ConfigMap's routing table passes `parse_config`; probes
  and Services reach the ports that table listens on; the user is numeric and not root; the grace
  period covers the drain; the state file is on a writable volume, apart from the config.
- Without a container engine, the image's run is reproduced without a container: Turnout as uid
  10001 with a root-owned config folder it cannot write and a state folder it owns, as the
  Dockerfile lays them out, then a runtime split through the admin API with the token.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import orjson
import pytest
import yaml

from proxy.control.admin import is_loopback
from proxy.control.supervisor import (
    EXIT_MARGIN,
    KILL_REAP_TIMEOUT,
    TASKS_STOP_TIMEOUT,
    TOKEN_ENV,
    startup_refusals,
)
from proxy.core.config import parse_config
from proxy.core.spec import ConfigSpec
from tests.support import wait_until
from tests.support.turnout import PROJECT_ROOT, TurnoutProcess, free_port, http_status, launch
from tests.support.upstreams import EchoUpstream

KUBE_DIR = PROJECT_ROOT / "deploy" / "kubernetes"
VARIANTS = ("edge", "sidecar")
KUBE_VERSIONS = ("1.29", kubernetes_validate.latest_version())
OPERATIONS_DOC = PROJECT_ROOT / "docs" / "operations.md"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"
CONTAINER_CONFIG = PROJECT_ROOT / "config" / "container.yaml"
# The longest the supervisor takes after SIGTERM beyond drain.delay + drain.shutdown: the margin
# it gives workers, the wait to reap killed ones, and the stop of its own tasks.
SUPERVISOR_OVERHEAD = EXIT_MARGIN + KILL_REAP_TIMEOUT + TASKS_STOP_TIMEOUT
TOKEN = "deploy-kit-test-token"
# The pattern the ServiceMonitor CRD gives its durations (Prometheus durations), not empty.
PROMETHEUS_DURATION = re.compile(
    r"0|(?=[0-9])([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?"
)


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path}: expected one object"
    return data


def manifests(variant: str) -> list[Path]:
    """The files the variant's kustomization.yaml lists, in order."""
    folder = KUBE_DIR / variant
    return [folder / name for name in load_yaml(folder / "kustomization.yaml")["resources"]]


def objects(variant: str) -> dict[str, dict[str, Any]]:
    """The variant's objects by kind (each kind appears once, Service aside)."""
    found: dict[str, dict[str, Any]] = {}
    for path in manifests(variant):
        data = load_yaml(path)
        key = data["kind"] if data["kind"] != "Service" else f"Service/{data['metadata']['name']}"
        assert key not in found, f"{path}: a second {key}"
        found[key] = data
    return found


def schema_errors(data: dict[str, Any]) -> list[str]:
    """One line per Kubernetes version whose strict schema rejects `data`."""
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(data, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"Kubernetes {version}: {str(exc).splitlines()[0]}")
    return errors


def pod_spec(variant: str) -> dict[str, Any]:
    spec = objects(variant)["Deployment"]["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def turnout_container(variant: str) -> dict[str, Any]:
    """The container running Turnout (a regular container, or a native sidecar)."""
    spec = pod_spec(variant)
    found: list[dict[str, Any]] = [
        container
        for container in spec.get("containers", []) + spec.get("initContainers", [])
        if container.get("args", [])[:1] == ["run"]
    ]
    assert len(found) == 1, "exactly one container runs `turnout run`"
    return found[0]


def turnout_config(variant: str) -> tuple[str, ConfigSpec]:
    """(the config path Turnout is started with, the ConfigMap's table parsed at that path)."""
    path = turnout_container(variant)["args"][1]
    configmap = objects(variant)["ConfigMap"]
    text = configmap["data"][posixpath.basename(path)]
    return path, parse_config(text, path)


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number, or a name among the container's ports)."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    assert isinstance(number, int)
    return number


def effective_security(variant: str, key: str) -> Any:
    """A securityContext setting of the Turnout container, or else of the pod."""
    container = turnout_container(variant).get("securityContext", {})
    return container.get(key, pod_spec(variant).get("securityContext", {}).get(key))


def pre_stop_seconds(container: dict[str, Any]) -> int:
    """The preStop sleep before the container gets SIGTERM (0 without one)."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep", f"preStop {command}: only a sleep can be accounted for"
    return int(command[1])


# --- every manifest against the Kubernetes schema ---------------------------------------------


def test_kustomizations_list_every_manifest_and_do_nothing_else() -> None:
    for variant in VARIANTS:
        folder = KUBE_DIR / variant
        kustomization = load_yaml(folder / "kustomization.yaml")
        # Only resources: then the files are exactly what `kubectl apply -k` applies.
        assert set(kustomization) == {"apiVersion", "kind", "resources"}
        listed = {path.name for path in manifests(variant)}
        present = {path.name for path in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == present, f"{folder}: listed {sorted(listed)}, present {sorted(present)}"


CORE_MANIFESTS = [
    path
    for variant in VARIANTS
    for path in manifests(variant)
    if load_yaml(path)["apiVersion"] != "monitoring.coreos.com/v1"
]


@pytest.mark.parametrize(
    "path", CORE_MANIFESTS, ids=[str(p.relative_to(KUBE_DIR)) for p in CORE_MANIFESTS]
)
def test_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    assert schema_errors(load_yaml(path)) == []


def test_the_validator_catches_what_it_is_here_for() -> None:
    """A Deployment without spec.selector (the docs' old example) and a misspelt key fail."""
    deployment = objects("edge")["Deployment"]
    without_selector = orjson.loads(orjson.dumps(deployment))
    del without_selector["spec"]["selector"]
    assert any("'selector' is a required property" in e for e in schema_errors(without_selector))
    misspelt = orjson.loads(orjson.dumps(deployment))
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    assert any("'readinessprobe' was unexpected" in e for e in schema_errors(misspelt))


def test_service_monitor_structure() -> None:
    edge = objects("edge")
    monitor = edge["ServiceMonitor"]
    assert monitor["kind"] == "ServiceMonitor"
    # Its ObjectMeta and LabelSelector are core types: validated inside core objects.
    as_configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": monitor["metadata"]}
    assert schema_errors(as_configmap) == []
    assert (
        schema_errors(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {"name": "selector-check"},
                "spec": {"selector": monitor["spec"]["selector"]},
            }
        )
        == []
    )
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    # It selects the admin Service, and scrapes /metrics on that Service's admin port.
    admin = edge["Service/turnout-admin"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= admin["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
    assert endpoint["path"] == "/metrics"
    assert endpoint["scheme"] == "http"
    assert PROMETHEUS_DURATION.fullmatch(endpoint["interval"])
    (service_port,) = [p for p in admin["spec"]["ports"] if p["name"] == endpoint["port"]]
    _, spec = turnout_config("edge")
    assert container_port(turnout_container("edge"), service_port["targetPort"]) == spec.admin[1]


# --- what the schema cannot see -------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_configmap_holds_a_valid_turnout_config(variant: str) -> None:
    path, spec = turnout_config(variant)
    container = turnout_container(variant)
    config_mount = posixpath.dirname(path)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == config_mount]
    # A folder, not subPath: the kubelet updates a mounted folder, never a subPath file.
    assert "subPath" not in mount
    (volume,) = [v for v in pod_spec(variant)["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == objects(variant)["ConfigMap"]["metadata"]["name"]
    assert spec.routes


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_and_services_reach_the_configured_ports(variant: str) -> None:
    _, spec = turnout_config(variant)
    container = turnout_container(variant)
    probes = {
        key: container[key]["httpGet"]
        for key in ("readinessProbe", "livenessProbe", "startupProbe")
        if key in container
    }
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    if "startupProbe" in probes:
        assert probes["startupProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert container_port(container, probe["port"]) == spec.admin[1]
    assert container_port(container, "http") == spec.listen[1]
    assert container_port(container, "admin") == spec.admin[1]
    # The kubelet probes the pod IP: admin must listen beyond loopback.
    assert spec.admin[0] == "0.0.0.0"
    for key, service in objects(variant).items():
        if not key.startswith("Service/"):
            continue
        for port in service["spec"]["ports"]:
            assert container_port(container, port["targetPort"]) in (spec.listen[1], spec.admin[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_match_the_pod_labels(variant: str) -> None:
    found = objects(variant)
    deployment = found["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for key, data in found.items():
        if key.startswith("Service/"):
            assert data["spec"]["selector"].items() <= labels.items(), key
        if key == "PodDisruptionBudget":
            assert data["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_as_a_numeric_non_root_user(variant: str) -> None:
    uid = effective_security(variant, "runAsUser")
    assert isinstance(uid, int)
    assert uid > 0
    assert uid == dockerfile_user()[0], "the same user as the image's USER"
    assert effective_security(variant, "runAsNonRoot") is True
    security = turnout_container(variant)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_file_is_on_a_writable_volume_apart_from_the_config(variant: str) -> None:
    path, spec = turnout_config(variant)
    assert spec.state_file is not None
    folder = posixpath.dirname(spec.state_file)
    assert folder != posixpath.dirname(path)
    container = turnout_container(variant)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    assert mount.get("readOnly", False) is False
    (volume,) = [v for v in pod_spec(variant)["volumes"] if v["name"] == mount["name"]]
    assert {"emptyDir", "persistentVolumeClaim", "ephemeral"} & set(volume)
    # The volume belongs to root unless the pod gives it Turnout's group.
    assert pod_spec(variant)["securityContext"]["fsGroup"] == dockerfile_user()[1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_grace_period_covers_the_drain(variant: str) -> None:
    _, spec = turnout_config(variant)
    pod = pod_spec(variant)
    turnout = turnout_container(variant)
    needed = pre_stop_seconds(turnout) + spec.drain.delay + spec.drain.shutdown
    if turnout in pod.get("initContainers", []):
        # A native sidecar gets SIGTERM only once every application container has exited.
        needed += max(pre_stop_seconds(c) for c in pod["containers"])
    assert pod["terminationGracePeriodSeconds"] >= needed + SUPERVISOR_OVERHEAD + 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_admin_token_comes_from_a_secret(variant: str) -> None:
    _, spec = turnout_config(variant)
    (env,) = [e for e in turnout_container(variant)["env"] if e["name"] == TOKEN_ENV]
    assert set(env["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    # Without the token this config is refused at start; with it, nothing else stands in the way.
    assert any(TOKEN_ENV in reason for reason in startup_refusals(spec, None))
    assert startup_refusals(spec, "a-token") == []


def test_edge_has_the_whole_kit() -> None:
    assert set(objects("edge")) == {
        "ConfigMap",
        "Deployment",
        "Service/turnout",
        "Service/turnout-admin",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }
    # The data-plane Service may become a LoadBalancer: it must not carry the admin port.
    _, spec = turnout_config("edge")
    container = turnout_container("edge")
    (port,) = objects("edge")["Service/turnout"]["spec"]["ports"]
    assert container_port(container, port["targetPort"]) == spec.listen[1]


def test_sidecar_is_native_and_forwards_to_the_application_on_localhost() -> None:
    pod = pod_spec("sidecar")
    turnout = turnout_container("sidecar")
    assert turnout in pod["initContainers"]
    assert turnout["restartPolicy"] == "Always"
    (app,) = pod["containers"]
    app_ports = {port["containerPort"] for port in app["ports"]}
    _, spec = turnout_config("sidecar")
    local = [
        endpoint
        for upstream in spec.upstreams
        for endpoint in upstream.endpoints
        if is_loopback(endpoint.host)
    ]
    assert local
    assert {endpoint.port for endpoint in local} <= app_ports


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_exactly_the_files() -> None:
    for variant in VARIANTS:
        result = subprocess.run(
            ["kubectl", "kustomize", str(KUBE_DIR / variant)],
            capture_output=True,
            check=True,
            timeout=60,
        )
        rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        files = [load_yaml(path) for path in manifests(variant)]

        def key(data: dict[str, Any]) -> str:
            return f"{data['kind']}/{data['metadata']['name']}"

        assert sorted(rendered, key=key) == sorted(files, key=key)


def doc_yaml_blocks(path: Path) -> list[dict[str, Any]]:
    """The ```yaml blocks of a Markdown file that hold one mapping."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)
    parsed = [yaml.safe_load(block) for block in blocks]
    return [block for block in parsed if isinstance(block, dict)]


def test_the_deployment_in_the_operations_doc_validates() -> None:
    deployments = [b for b in doc_yaml_blocks(OPERATIONS_DOC) if b.get("kind") == "Deployment"]
    assert deployments, "docs/operations.md shows a Deployment"
    for deployment in deployments:
        assert schema_errors(deployment) == []
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- the image ------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def instruction(name: str) -> str:
    (found,) = [rest for keyword, rest in dockerfile() if keyword == name]
    return found


def exec_form(text: str) -> list[str]:
    value = orjson.loads(text)
    assert isinstance(value, list)
    return [str(item) for item in value]


def dockerfile_user() -> tuple[int, int]:
    uid, _, gid = instruction("USER").partition(":")
    # Numeric, or Kubernetes' runAsNonRoot cannot verify it.
    assert uid.isdigit(), f"USER {uid} is not numeric"
    assert gid.isdigit(), f"USER group {gid} is not numeric"
    return int(uid), int(gid)


def image_config_path() -> str:
    """The config the image runs: the CMD's, copied from config/container.yaml."""
    assert exec_form(instruction("ENTRYPOINT")) == ["turnout"]
    command = exec_form(instruction("CMD"))
    assert command[0] == "run"
    copies = [rest.split() for keyword, rest in dockerfile() if keyword == "COPY"]
    assert ["config/container.yaml", command[1]] in copies
    return command[1]


def image_spec() -> ConfigSpec:
    return parse_config(CONTAINER_CONFIG.read_text(encoding="utf-8"), image_config_path())


def test_the_image_keeps_its_state_apart_from_its_config() -> None:
    spec = image_spec()
    assert spec.state_file is not None
    state_dir = posixpath.dirname(spec.state_file)
    assert state_dir != posixpath.dirname(image_config_path())
    assert exec_form(instruction("VOLUME")) == [state_dir]
    assert instruction("WORKDIR") == state_dir
    uid, gid = dockerfile_user()
    # Created owned by the image's user (in the same RUN as the user).
    runs = [rest for keyword, rest in dockerfile() if keyword == "RUN"]
    assert any(f"install -d -o {uid} -g {gid} -m 0750 {state_dir}" in run for run in runs)


def test_the_image_config_needs_the_token_and_names_no_private_address() -> None:
    spec = image_spec()
    assert {instruction("EXPOSE")} == {f"{spec.listen[1]} {spec.admin[1]}"}
    assert spec.admin[0] == "0.0.0.0"
    assert any(TOKEN_ENV in reason for reason in startup_refusals(spec, None))
    assert startup_refusals(spec, "a-token") == []
    for upstream in spec.upstreams:
        for endpoint in upstream.endpoints:
            try:
                address = ipaddress.ip_address(endpoint.host)
            except ValueError:
                continue  # a name: resolved where the image runs
            assert not address.is_private, f"{upstream.name}: {endpoint.host}"


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    steps = dockerfile()
    copies = [i for i, (keyword, rest) in enumerate(steps) if keyword == "COPY"]
    (install_deps,) = [i for i, (_, rest) in enumerate(steps) if "pip install -r" in rest]
    (copy_code,) = [i for i in copies if steps[i][1].split()[0] == "proxy"]
    assert install_deps < copy_code
    # Nothing but pyproject.toml is copied before the dependencies are installed.
    assert [steps[i][1].split()[:-1] for i in copies if i < install_deps] == [["pyproject.toml"]]
    # The code step installs Turnout alone: no download on a code change.
    (install_code,) = [rest for _, rest in steps if "pip install --no-deps" in rest]
    assert "--no-build-isolation" in install_code


def healthcheck_command() -> list[str]:
    options, _, command = instruction("HEALTHCHECK").partition(" CMD ")
    assert "--interval=" in options
    return exec_form(command)


def test_the_healthcheck_asks_readyz_on_the_images_config() -> None:
    # `turnout healthcheck` reads the admin port from the config the image runs.
    assert healthcheck_command() == ["turnout", "healthcheck", "--config", image_config_path()]


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        text = pattern.lstrip("!").strip("/")
        regex = re.escape(text).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_admits_what_the_dockerfile_copies_and_nothing_else() -> None:
    sources = [
        source
        for keyword, rest in dockerfile()
        if keyword == "COPY"
        for source in rest.split()[:-1]
    ]
    for source in sources:
        assert not dockerignore_excludes(source), source
    for path in ("proxy/__init__.py", "proxy/control/static/dashboard.html"):
        assert not dockerignore_excludes(path), path
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/unit/test_config.py",
        ".mypy_cache/3.11/x.json",
        "benchmarks/out/run.json",
        "proxy/__pycache__/config.cpython-311.pyc",
        "config/turnout.state.json",
        "config/demo.yaml",
    ):
        assert dockerignore_excludes(path), path


def test_the_package_carries_every_file_the_code_reads() -> None:
    """The image installs Turnout as a wheel: files under proxy/ that are not Python must be
    package data, or they exist in a checkout (and its editable install) but not in the image."""
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f).get("tool", {}).get("setuptools", {})
    # Each package's patterns are relative to its folder (proxy.control -> proxy/control/).
    patterns = [
        f"{package.replace('.', '/')}/{pattern}"
        for package, package_patterns in setuptools.get("package-data", {}).items()
        for pattern in package_patterns
    ]
    data = [
        path.relative_to(PROJECT_ROOT).as_posix()
        for path in (PROJECT_ROOT / "proxy").rglob("*")
        if path.is_file()
        and path.suffix not in (".py", ".pyc")
        and "__pycache__" not in path.parts
        # `./dev compile`'s output: a wheel builds its own.
        and not path.name.endswith(tuple(EXTENSION_SUFFIXES))
    ]
    missing = [name for name in data if not any(Path(name).match(p) for p in patterns)]
    assert missing == [], "add them to [tool.setuptools.package-data] in pyproject.toml"


# --- the image's run, without a container ---------------------------------------------------


def as_image_user() -> list[str]:
    uid, gid = dockerfile_user()
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


# Reading and traversing any folder, nothing more: write permissions stay those of the uid.
READ_SEARCH = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


@pytest.fixture
def image_user() -> list[str]:
    """The command prefix that runs a program as the image's user; skips unless we are root.

    Where the interpreter lives in a folder that user cannot enter (a Python under /root), the
    prefix also grants CAP_DAC_READ_SEARCH, which lets it read and traverse folders but never
    write: the writes this module checks are still judged by the uid alone.
    """
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run Turnout as the image's user")
    # Turnout starts its workers with sys.executable: the probe execs it from a child too.
    probe = (
        "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import proxy'], check=True)"
    )
    for prefix in (as_image_user(), [*as_image_user(), *READ_SEARCH]):
        result = subprocess.run(
            [*prefix, sys.executable, "-c", probe],
            cwd=PROJECT_ROOT,
            capture_output=True,
            timeout=60,
        )
        if result.returncode == 0:
            return prefix
    pytest.skip(f"the image's user cannot run {sys.executable}: {result.stderr[-300:]!r}")


@pytest.fixture
def image_root() -> Iterator[Path]:
    """An empty folder standing for the image's root file system."""
    with tempfile.TemporaryDirectory(prefix="turnout-image-") as folder:
        root = Path(folder)
        root.chmod(0o755)
        yield root


def run_healthcheck(image_user: list[str], config_path: Path) -> int:
    """The Dockerfile's HEALTHCHECK, as the image's user and without the token, on
    `config_path` (the image's config with this test's ports) in place of the image's path."""
    command = healthcheck_command()
    assert command[0] == "turnout"
    turnout = str(Path(sys.executable).with_name("turnout"))
    env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV}
    result = subprocess.run(
        [*image_user, turnout, *command[1:-1], str(config_path)],
        capture_output=True,
        timeout=30,
        env=env,
    )
    return result.returncode


def admin_call(proc: TurnoutProcess, method: str, path: str, body: bytes, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(
        f"{proc.admin_url}{path}", data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def served_by(proc: TurnoutProcess) -> str:
    with urllib.request.urlopen(f"{proc.url}/", timeout=10) as response:
        return str(response.headers["X-Upstream"])


def test_runs_as_the_image_does_and_writes_state_beside_a_read_only_config(
    image_user: list[str], image_root: Path, blue: EchoUpstream, green: EchoUpstream
) -> None:
    """Regression: in the old image the state file sat beside the config, in a folder the
    process could not write, and every runtime split answered 500."""
    uid, gid = dockerfile_user()
    spec = image_spec()
    assert spec.state_file is not None
    config_dir = image_root / posixpath.dirname(image_config_path()).lstrip("/")
    state_dir = image_root / posixpath.dirname(spec.state_file).lstrip("/")
    config_dir.mkdir(parents=True)
    state_dir.mkdir(parents=True)
    os.chown(state_dir, uid, gid)  # as the Dockerfile's `install -d -o ... -g ... -m 0750`
    state_dir.chmod(0o750)
    listen, admin = free_port(), free_port()
    # config/container.yaml with this test's ports, folders and upstreams; nothing else changed.
    config = yaml.safe_load(CONTAINER_CONFIG.read_text(encoding="utf-8"))
    config["listen"] = f"{spec.listen[0]}:{listen}"
    config["admin"] = f"{spec.admin[0]}:{admin}"
    config["state_file"] = str(state_dir / posixpath.basename(spec.state_file))
    config["upstreams"] = {
        "blue": {"endpoints": [blue.address]},
        "green": {"endpoints": [green.address]},
    }
    config_path = config_dir / posixpath.basename(image_config_path())
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    config_dir.chmod(0o555)  # root-owned and read-only, as in the image or a ConfigMap mount
    before = sorted(p.name for p in config_dir.iterdir())
    # The file says 0.0.0.0; this test reaches both ports on loopback only.
    where = {"listen": f"127.0.0.1:{listen}", "admin": f"127.0.0.1:{admin}"}
    prefix = (*image_user, "env", f"{TOKEN_ENV}={TOKEN}")
    proc = launch(where, config_path, prefix=prefix)
    try:
        for pid in proc.pids():
            status = Path(f"/proc/{pid}/status").read_text(encoding="latin-1")
            (uids,) = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
            assert uids == [str(uid)] * 4, f"pid {pid} runs as {uids}"
        assert served_by(proc) == "blue"
        split = b'{"green": 100}'
        assert admin_call(proc, "PUT", "/admin/routes/app/split", split, None) == 401
        assert admin_call(proc, "PUT", "/admin/routes/app/split", split, TOKEN) == 200
        state_file = Path(config["state_file"])
        assert orjson.loads(state_file.read_bytes())["splits"] == {"app": {"green": 100.0}}
        assert state_file.stat().st_uid == uid
        assert served_by(proc) == "green"
        # The harness writes turnout.stderr there before the start; Turnout itself writes nothing.
        assert sorted(p.name for p in config_dir.iterdir()) == sorted([*before, "turnout.stderr"])
        assert run_healthcheck(image_user, config_path) == 0
        assert proc.stop() == 0
        wait_until(lambda: http_status(f"{proc.admin_url}/readyz") is None, what="admin closed")
        assert run_healthcheck(image_user, config_path) != 0
    finally:
        proc.close()


def test_the_image_config_is_refused_without_the_token() -> None:
    env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", str(CONTAINER_CONFIG)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert TOKEN_ENV in result.stderr
    assert "Traceback" not in result.stderr
