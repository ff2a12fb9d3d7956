"""infra/: Kubernetes manifests, the compose stack and the training image's Dockerfile.

Core Kubernetes kinds are validated strictly (unknown fields are errors) against the OpenAPI
schemas that kubernetes-validate ships offline. KubeRay's kinds (RayCluster, RayJob, RayCronJob)
have no offline schema package: their fields are checked here against the KubeRay v1.7.0 CRDs
(ray-operator/config/crd/bases), and their pod templates are validated as core PodTemplates.
Cross-checks tie the files together: Secrets and their keys, image names and versions, Service
names in URLs, schedules.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "compose.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_SERVER_SH = INFRA / "docker" / "mlflow-server.sh"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
# Oldest Kubernetes the manifests target (CronJob.spec.timeZone is GA from 1.27) and the newest
# whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# Files kept out of kustomization.yaml on purpose (see its header).
NOT_IN_KUSTOMIZATION = {"secrets.example.yaml", "rayjob-train.yaml", "raycronjob-nightly.yaml"}
NIGHTLY_SCHEDULE = "0 2 * * *"

# Fields of the KubeRay v1.7.0 CRDs (ray.io/v1) that these manifests may use.
RAYCLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy",
    "networkPolicy", "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP = {
    "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
    "serviceType", "template",
}  # fmt: skip
WORKER_GROUP = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
    "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}  # fmt: skip
AUTOSCALER_OPTIONS = {
    "args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy",
    "resources", "securityContext", "upscalingMode", "version", "volumeMounts",
}  # fmt: skip
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy",
    "metadata", "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML",
    "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
    "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
RAYCRONJOB_SPEC = {"schedule", "timeZone", "suspend", "jobTemplate"}


# ---------------------------------------------------------------------------------------------
# Loading


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def manifests(include_example: bool = False) -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in k8s_files()
        if include_example or path != SECRETS_EXAMPLE
        for doc in load_docs(path)
    ]


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def one(kind: str) -> dict:
    (doc,) = of_kind(kind)
    return doc


def walk(node) -> Iterator[dict]:
    """Every mapping inside a YAML document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for the RayCluster and the clusters RayJob/RayCronJob create."""
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in of_kind("RayCluster")]
    specs += [("RayJob", d["spec"]["rayClusterSpec"]) for d in of_kind("RayJob")]
    specs += [
        ("RayCronJob", d["spec"]["jobTemplate"]["rayClusterSpec"]) for d in of_kind("RayCronJob")
    ]
    return specs


def ray_groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) for every pod any manifest creates."""
    found = []
    for _, doc in manifests():
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "StatefulSet", "Job"):
            found.append((f"{kind} {doc['metadata']['name']}", spec["template"]))
        elif kind == "CronJob":
            found.append(
                (f"CronJob {doc['metadata']['name']}", spec["jobTemplate"]["spec"]["template"])
            )
    for where, spec in ray_cluster_specs():
        found += [(f"{where} group {i}", g["template"]) for i, g in enumerate(ray_groups(spec))]
    found += [
        (f"{where} submitter", spec["submitterPodTemplate"])
        for where, spec in rayjob_specs()
        if "submitterPodTemplate" in spec  # test_every_submitter_sends_the_ray_token needs it
    ]
    return found


def rayjob_specs() -> list[tuple[str, dict]]:
    """(where, RayJob spec) for the RayJob and the RayCronJob's job template."""
    return [("RayJob", d["spec"]) for d in of_kind("RayJob")] + [
        ("RayCronJob", d["spec"]["jobTemplate"]) for d in of_kind("RayCronJob")
    ]


def ray_pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) for every Ray node: heads and workers of every cluster."""
    return [
        (f"{where} group {i}", g["template"])
        for where, spec in ray_cluster_specs()
        for i, g in enumerate(ray_groups(spec))
    ]


def containers() -> list[tuple[str, dict]]:
    return [
        (f"{where} container {c['name']}", c)
        for where, template in pod_templates()
        for c in template["spec"]["containers"]
    ]


def pins() -> dict[str, str]:
    """constraints.txt as {name: version}."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found[name.strip().lower()] = version.strip()
    return found


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def training_image() -> str:
    return f"pipeline-training:{pyproject()['project']['version']}"


def is_valid_cron(expr: str) -> bool:
    """Standard 5-field cron: numbers, ranges, lists, steps and * within each field's bounds."""
    bounds = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, bounds, strict=True):
        for part in field.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not m:
                return False
            values = [int(v) for v in (m[2], m[3]) if v is not None]
            if any(not low <= v <= high for v in values) or (m[4] is not None and int(m[4]) < 1):
                return False
            if len(values) == 2 and values[0] > values[1]:
                return False
    return True


# ---------------------------------------------------------------------------------------------
# Every file parses; core kinds match the Kubernetes schemas


@pytest.mark.parametrize(
    "path", sorted(INFRA.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(INFRA))
)
def test_every_yaml_file_parses(path):
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_cron_checker_can_fail():
    assert is_valid_cron("0 2 * * *") and is_valid_cron("*/15 0-6 1,15 * 1-5")
    for bad in (
        "0 2 * *",
        "60 2 * * *",
        "0 24 * * *",
        "0 2 * * mon-",
        "5-1 * * * *",
        "*/0 * * * *",
    ):
        assert not is_valid_cron(bad), bad


CORE_DOCS = [
    (path, doc)
    for path, doc in manifests(include_example=True)
    if not doc["apiVersion"].startswith("ray.io/")
]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    ("path", "doc"),
    CORE_DOCS,
    ids=[f"{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in CORE_DOCS],
)
def test_core_manifests_match_the_kubernetes_schema(path, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_rejects_a_misspelt_field():
    doc = one("CronJob")
    doc["spec"]["concurrencyPolicyy"] = doc["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError, match="concurrencyPolicyy"):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    ("where", "template"), pod_templates(), ids=[w for w, _ in pod_templates()]
)
def test_pod_templates_inside_kuberay_kinds_match_the_schema(where, template):
    """KubeRay embeds core PodTemplateSpecs: validate them as PodTemplates."""
    doc = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "t"},
        "template": template,
    }
    kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_but_the_documented_exceptions():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in k8s_files()}
    assert listed <= on_disk, f"missing files: {listed - on_disk}"
    assert listed | NOT_IN_KUSTOMIZATION == on_disk
    assert not listed & NOT_IN_KUSTOMIZATION
    for generator in kustomization.get("configMapGenerator", []):
        for entry in generator["files"]:
            assert (K8S / entry.split("=")[-1]).is_file(), entry
    generated = {g["name"] for g in kustomization["configMapGenerator"]}
    used = {
        v["configMap"]["name"]
        for _, doc in manifests()
        for v in walk(doc)
        if isinstance(v.get("configMap"), dict)
    }
    assert used <= generated


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_build_output_matches_the_schema():
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Deployment", "StatefulSet", "CronJob", "RayCluster"} <= kinds
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "ml-pipeline"
    }
    for doc in docs:
        if not doc["apiVersion"].startswith("ray.io/"):
            kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


# ---------------------------------------------------------------------------------------------
# KubeRay kinds: the fields each requires, and nothing KubeRay 1.7 does not know


@pytest.mark.parametrize(
    ("where", "spec"), ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()]
)
def test_ray_cluster_specs_have_what_kuberay_requires(where, spec):
    assert set(spec) <= RAYCLUSTER_SPEC, where
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    assert spec["rayVersion"] == pins()["ray"], "rayVersion must be the ray the image installs"
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "strings only"
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 10001} <= head_ports
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[a-z0-9-]+", n) for n in names)
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP
        assert isinstance(group["rayStartParams"], dict)
        counts = [group["minReplicas"], group["replicas"], group["maxReplicas"]]
        assert all(isinstance(n, int) for n in counts) and counts == sorted(counts), group
    for group in ray_groups(spec):
        pod = group["template"]["spec"]
        assert pod["containers"] and all(c.get("image") for c in pod["containers"])
        shm = [m for c in pod["containers"] for m in c.get("volumeMounts", [])]
        assert any(m["mountPath"] == "/dev/shm" for m in shm), "Ray's object store needs /dev/shm"


def test_the_long_lived_cluster_has_cpu_and_gpu_worker_groups():
    groups = {g["groupName"]: g for g in one("RayCluster")["spec"]["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= set(groups)
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["minReplicas"] == 0  # costs nothing until a job asks for GPUs
    # Decoding photographs for one modern GPU takes many cores and a large object store.
    assert int(gpu["limits"]["cpu"]) >= 16
    (shm,) = [v for v in groups["gpu"]["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["sizeLimit"] == "32Gi"
    assert "nvidia.com/gpu" not in str(groups["cpu"])


def _check_rayjob_spec(spec: dict) -> None:
    assert set(spec) <= RAYJOB_SPEC
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
    assert runtime_env["working_dir"] == "/home/ray/pipeline"  # the image's WORKDIR


def test_rayjob_trains_the_main_job_on_a_cluster_of_its_own():
    job = one("RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"].get("name") or job["metadata"].get("generateName")
    spec = job["spec"]
    _check_rayjob_spec(spec)
    words = shlex.split(spec["entrypoint"])
    assert words[:4] == ["pipeline", "train", "--config", "jobs/configs/digits.yaml"]
    assert (ROOT / words[3]).is_file()
    overrides = dict(w.split("=", 1) for w in words[4:] if w != "--set")
    # pods share nothing but S3: data and checkpoints must not be local paths
    assert overrides["data.uri"].startswith("s3://")
    assert overrides["run.storage_path"].startswith("s3://")


# Pods share no disk: the nightly jobs keep data and checkpoints on the object store, like the
# training RayJob.
S3_SETS = [
    "--set",
    "data.uri=s3://pipeline/datasets/digits",
    "--set",
    "run.storage_path=s3://pipeline/runs",
]


def test_raycronjob_runs_nightly_and_says_it_is_behind_the_feature_gate():
    path = K8S / "raycronjob-nightly.yaml"
    header = path.read_text().split("apiVersion:")[0]
    assert "feature gate" in header and "RayCronJob=true" in header and "alpha" in header.lower()
    cron = one("RayCronJob")
    assert cron["apiVersion"] == "ray.io/v1"
    assert set(cron["spec"]) <= RAYCRONJOB_SPEC
    assert cron["spec"]["schedule"] == NIGHTLY_SCHEDULE
    _check_rayjob_spec(cron["spec"]["jobTemplate"])
    entrypoint = shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])
    assert entrypoint == ["pipeline", "nightly", "--config", "jobs/configs/nightly.yaml", *S3_SETS]


def test_cronjob_fallback_submits_nightly_to_the_long_lived_cluster():
    cron = one("CronJob")
    spec = cron["spec"]
    assert spec["schedule"] == NIGHTLY_SCHEDULE
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["timeZone"] == one("RayCronJob")["spec"]["timeZone"]
    (container,) = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    head_svc = f"{one('RayCluster')['metadata']['name']}-head-svc"
    assert env["RAY_DASHBOARD_ADDRESS"] == f"http://{head_svc}:8265"
    script = " ".join(container["command"] + container["args"])
    words = shlex.split(script.split("-c", 1)[1])
    assert words[:4] == ["exec", "ray", "job", "submit"]
    assert words[words.index("--address") + 1] == "$RAY_DASHBOARD_ADDRESS"
    assert words[words.index("--") + 1 :] == [
        "pipeline",
        "nightly",
        "--config",
        "jobs/configs/nightly.yaml",
        *S3_SETS,
    ]


@pytest.mark.parametrize(
    "schedule",
    [d["spec"]["schedule"] for d in of_kind("CronJob") + of_kind("RayCronJob")],
)
def test_schedules_are_valid_cron(schedule):
    assert is_valid_cron(schedule)


# ---------------------------------------------------------------------------------------------
# Cross-checks: secrets, images, services, resources


def documented_secret_keys() -> dict[str, set[str]]:
    return {
        d["metadata"]["name"]: set(d["stringData"])
        for d in load_docs(SECRETS_EXAMPLE)
        if d["kind"] == "Secret"
    }


def test_every_secret_key_ref_is_documented_in_the_example_and_every_example_key_is_used():
    documented = documented_secret_keys()
    used = {
        (ref["name"], ref["key"])
        for _, doc in manifests()
        for node in walk(doc)
        if isinstance(ref := node.get("secretKeyRef"), dict)
    }
    assert used, "no secretKeyRef found"
    for name, key in used:
        assert key in documented.get(name, set()), f"{name}/{key} not in secrets.example.yaml"
    assert {(n, k) for n, keys in documented.items() for k in keys} == used
    assert all(
        v == "REPLACE_ME" for d in load_docs(SECRETS_EXAMPLE) for v in d["stringData"].values()
    )
    header = SECRETS_EXAMPLE.read_text().split("apiVersion:")[0]
    for name in documented:  # the kubectl commands in the header create each one
        assert f"create secret generic {name}" in header


SENSITIVE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
USERINFO = re.compile(r"://[^/@\s]*:([^/@\s]+)@")  # scheme://user:PASSWORD@host


def test_no_literal_credentials_in_kubernetes_env():
    for where, container in containers():
        for env in container.get("env", []):
            value = env.get("value")
            if SENSITIVE.search(env["name"]):
                assert "valueFrom" in env, f"{where}: {env['name']} must come from a Secret"
            if value and (m := USERINFO.search(value)):
                assert re.fullmatch(r"\$\([A-Z0-9_]+\)", m[1]), f"{where}: {env['name']} inlines it"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_no_literal_credentials_in_compose_or_its_env_example():
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SENSITIVE.search(key) or key.endswith("_USER") or key.endswith("USERNAME"):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), f"{name}: {key}={value}"
            if m := USERINFO.search(value):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+\}", m[1]), f"{name}: {key} inlines a password"
    example = dict(
        line.split("=", 1)
        for line in (INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text())) - {"RAY_WORKER_CPUS"}
    assert referenced <= set(example), referenced - set(example)
    secrets = [k for k in example if re.search("PASSWORD|SECRET", k)]
    assert secrets and not any(example[k] for k in secrets), "the example holds a secret"
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_our_image_is_the_same_everywhere_and_third_party_images_are_pinned():
    ours = training_image()
    images = {c["image"] for _, c in containers()}
    images |= {s["image"] for s in compose()["services"].values()}
    assert {i for i in images if i.startswith("pipeline-training")} == {ours}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "pipeline-training", "newTag": ours.split(":")[1]}]
    for image in images - {ours}:
        tag = image.rsplit(":", 1)[-1]
        assert ":" in image and tag != "latest" and re.search(r"\d", tag), f"unpinned {image}"
    k8s_third_party = {c["image"] for _, c in containers()} - {ours}
    compose_third_party = {s["image"] for s in compose()["services"].values()} - {ours}
    assert k8s_third_party == compose_third_party  # the laptop runs what the cluster runs


def services() -> dict[str, set[int]]:
    return {
        d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]} for d in of_kind("Service")
    }


def test_urls_name_services_that_exist():
    known = services()
    for cluster in of_kind("RayCluster"):  # KubeRay creates <name>-head-svc
        known[f"{cluster['metadata']['name']}-head-svc"] = {6379, 8265, 10001}
    urls = [
        (where, m[1], int(m[2]))
        for where, c in containers()
        for e in c.get("env", [])
        for m in re.finditer(r"https?://([a-z0-9-]+):(\d+)", e.get("value", ""))
    ]
    assert urls
    for where, host, port in urls:
        if host in ("localhost",):
            continue
        assert port in known.get(host, set()), f"{where}: no Service {host}:{port}"


def test_ray_pods_reach_mlflow_and_minio_with_credentials_from_secrets():
    for where, spec in ray_cluster_specs():
        for group in ray_groups(spec):
            env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
            assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000", where
            assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000", where
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"):
                assert "secretKeyRef" in env[name]["valueFrom"], (where, name)


def test_every_container_sets_requests_and_limits():
    for where, container in containers():
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}: {part}"
        if container["name"] in ("ray-head", "ray-worker"):
            # Ray sizes itself from limits; requests == limits keeps the scheduler honest
            assert resources["requests"] == resources["limits"], where


def test_mlflow_server_runs_basic_auth_on_postgres_and_s3_with_health_probes():
    deployment = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow-server"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert env["MLFLOW_AUTH_DATABASE_URI"]["value"].endswith("/mlflow_auth")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    for name in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    names = [e["name"] for e in container["env"]]
    for name, e in env.items():  # $(VAR) only expands variables defined earlier in the list
        for ref in re.findall(r"\$\(([A-Z0-9_]+)\)", e.get("value", "")):
            assert names.index(ref) < names.index(name), f"{name} uses $({ref}) before it is set"
    assert "CREATE DATABASE mlflow_auth" in (K8S / "postgres-initdb.sh").read_text()


# ---------------------------------------------------------------------------------------------
# The MLflow start script (run with a stand-in `mlflow` that records what it was given)


@pytest.fixture
def fake_mlflow(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.txt"
    fake = bin_dir / "mlflow"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@postgres:5432/mlflow",
        "MLFLOW_AUTH_DATABASE_URI": "postgresql://u:p%40ss@postgres:5432/mlflow_auth",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://pipeline/mlartifacts",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "pw",
        "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow:5000,localhost:5000",
    }
    return env, record


def test_mlflow_server_script_writes_the_auth_config_and_starts_basic_auth(fake_mlflow, tmp_path):
    import configparser

    env, record = fake_mlflow
    subprocess.run(["bash", str(MLFLOW_SERVER_SH)], env=env, check=True, timeout=30)
    argv = record.read_text().splitlines()
    assert argv[:3] == ["server", "--app-name", "basic-auth"]
    assert argv[argv.index("--allowed-hosts") + 1] == "mlflow:5000,localhost:5000"
    assert "--serve-artifacts" in argv and "p@ss" not in " ".join(argv)
    ini = tmp_path / "basic_auth.ini"
    assert ini.stat().st_mode & 0o077 == 0, "the file holds a password: owner-only"
    config = configparser.ConfigParser()  # what MLflow uses to read it
    config.read(ini)
    assert config["mlflow"]["database_uri"] == env["MLFLOW_AUTH_DATABASE_URI"]
    assert config["mlflow"]["default_permission"] == "READ"


def test_mlflow_server_script_refuses_to_start_without_a_secret(fake_mlflow):
    env, record = fake_mlflow
    del env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    result = subprocess.run(
        ["bash", str(MLFLOW_SERVER_SH)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr
    assert not record.exists()


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_installs_the_package_with_constraints_not_a_hand_written_list():
    instructions = dockerfile_instructions()
    args = dict(v.split("=", 1) for k, v in instructions if k == "ARG" and "=" in v)
    assert args["RAY_VERSION"] == pins()["ray"]
    (base,) = [v for k, v in instructions if k == "FROM"]
    assert base == "rayproject/ray:${RAY_VERSION}-py311"  # Python 3.11, as requires-python
    makefile_torch = re.search(r"^TORCH := (.+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    assert args["TORCH"].strip('"') == makefile_torch.strip()
    for requirement in makefile_torch.split():
        name, version = requirement.split("==")
        assert pins()[name] == version

    installs = []
    for kind, value in instructions:
        if kind == "RUN":
            for command in re.split(r"&&|;", value):
                words = shlex.split(command.replace("${TORCH_INDEX_URL:+", "").replace("}", ""))
                if words[:2] == ["pip", "install"]:
                    installs.append(words[2:])
    assert len(installs) == 2, installs
    for words in installs:
        assert words[words.index("-c") + 1] == "constraints.txt"
    targets = [
        [w for i, w in enumerate(ws) if not w.startswith("-") and not ws[i - 1].startswith("-")]
        for ws in installs
    ]
    assert targets[0] == ["$TORCH"]
    (package,) = targets[1]
    extras = re.fullmatch(r"\.(?:\[([a-z,]+)\])?", package)
    assert extras, f"installs {package!r} instead of the project itself"
    known = set(pyproject()["project"]["optional-dependencies"])
    assert set((extras[1] or "").split(",")) - {""} <= known


def test_dockerfile_runs_as_non_root_and_copies_only_what_exists():
    instructions = dockerfile_instructions()
    users = [v for k, v in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(k == "WORKDIR" for k, _ in instructions)
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for kind, value in instructions:
        if kind == "COPY":
            sources = [w for w in value.split() if not w.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.split("/")[0] not in ignored and source not in ignored, source
    assert {".venv", "data", "runs", "mlflow.db", "mlartifacts"} <= ignored


# ---------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_services_have_healthchecks_conditions_and_loopback_ports():
    stack = compose()["services"]
    assert {"minio", "minio-setup", "postgres", "mlflow", "ray-head", "ray-worker"} <= set(stack)
    for name, service in stack.items():
        one_shot = service.get("restart") == "no"
        assert one_shot or service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is not bound to loopback"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in stack
            assert condition["condition"] in ("service_healthy", "service_completed_successfully")
        if service["image"] == training_image():
            assert service["build"]["dockerfile"] == "infra/docker/Dockerfile"
            assert (INFRA / service["build"]["context"] / "pyproject.toml").is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: {source}"
    assert stack["mlflow"]["command"] == ["mlflow-server"]
    assert stack["ray-worker"]["environment"] == stack["ray-head"]["environment"]


@pytest.mark.skipif(
    subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    if shutil.which("docker")
    else True,
    reason="docker compose not installed",
)
def test_docker_compose_accepts_the_file(tmp_path):
    example = (INFRA / ".env.example").read_text()
    env_file = tmp_path / ".env"
    env_file.write_text(re.sub(r"=$", "=x", example, flags=re.M))
    subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "--env-file", str(env_file), "config", "-q"],
        check=True,
        timeout=60,
    )


# ---------------------------------------------------------------------------------------------
# Security (issue 16): Ray token auth, NetworkPolicies, least-privilege credentials, no API tokens

RAY_AUTH = {"mode": "token", "secretName": "ray-auth"}
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}  # KubeRay 1.7's AuthOptions
# Credentials no Ray pod may hold: MLflow's admin, MinIO's root, PostgreSQL's roles.
ADMIN_SECRETS = {"mlflow-auth", "minio-root", "postgres-credentials", "mlflow-db-credentials"}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_names(node) -> set[str]:
    return {ref["name"] for n in walk(node) if isinstance(ref := n.get("secretKeyRef"), dict)}


def assert_sends_the_ray_token(where: str, container: dict) -> None:
    env = env_of(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    assert ref == {"name": "ray-auth", "key": "auth_token"}, f"{where}: RAY_AUTH_TOKEN"


@pytest.mark.parametrize(
    ("where", "spec"), ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()]
)
def test_every_ray_cluster_turns_token_auth_on_with_the_shared_secret(where, spec):
    assert spec.get("authOptions") == RAY_AUTH, where
    assert set(spec["authOptions"]) <= AUTH_OPTIONS
    assert "auth_token" in documented_secret_keys()["ray-auth"]  # the key authOptions reads


def test_every_submitter_sends_the_ray_token():
    (cron,) = [c for w, c in containers() if w.startswith("CronJob ")]
    assert_sends_the_ray_token("CronJob", cron)
    for where, spec in rayjob_specs():
        (container,) = spec["submitterPodTemplate"]["spec"]["containers"]
        assert_sends_the_ray_token(where, container)
        assert "command" not in container, f"{where}: KubeRay writes the `ray job submit` command"
        assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    stack = compose()["services"]
    for name in ("ray-head", "ray-worker"):
        env = stack[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH")
    health = " ".join(stack["ray-head"]["healthcheck"]["test"])
    assert "/api/gcs_healthz" in health, "with token auth only Ray's health endpoints are public"


@pytest.mark.parametrize(
    ("where", "template"), ray_pod_templates(), ids=[w for w, _ in ray_pod_templates()]
)
def test_ray_pods_hold_no_admin_credentials(where, template):
    (container,) = template["spec"]["containers"]
    assert not secret_names(container) & ADMIN_SECRETS, where
    env = env_of(container)
    for name, key in (
        ("MLFLOW_TRACKING_USERNAME", "username"),
        ("MLFLOW_TRACKING_PASSWORD", "password"),
    ):
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": "mlflow-pipeline-user",
            "key": key,
        }


def test_submitters_hold_nothing_but_the_ray_token():
    for where, container in containers():
        if where.startswith("CronJob ") or where.endswith(" submitter container ray-job-submitter"):
            assert secret_names(container) == {"ray-auth"}, where


def test_compose_ray_services_hold_no_admin_credentials():
    text = yaml.safe_dump(compose()["services"]["ray-head"]["environment"])
    for name in ("MLFLOW_AUTH_ADMIN", "MINIO_ROOT", "POSTGRES_", "MLFLOW_DB_"):
        assert name not in text, name
    assert "MLFLOW_PIPELINE_USERNAME" in text


def needs_the_kubernetes_api(where: str) -> bool:
    """Only the long-lived cluster's head: its in-tree autoscaler sidecar scales the pods."""
    autoscaled = {
        f"RayCluster {d['metadata']['name']} group 0"
        for d in of_kind("RayCluster")
        if d["spec"].get("enableInTreeAutoscaling")
    }
    return where in autoscaled


@pytest.mark.parametrize(
    ("where", "template"), pod_templates(), ids=[w for w, _ in pod_templates()]
)
def test_pods_get_a_service_account_token_only_when_they_use_the_api(where, template):
    assert template["spec"].get("automountServiceAccountToken") is needs_the_kubernetes_api(where)


def test_postgres_gives_mlflow_a_role_without_superuser():
    script = (K8S / "postgres-initdb.sh").read_text()
    sql = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    create_role = re.search(r"CREATE ROLE[^;]+;", sql, re.S)[0]
    for attribute in ("LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE", "NOBYPASSRLS"):
        assert attribute in create_role.rstrip(";").split(), attribute
    assert not re.search(r"(?<!NO)SUPERUSER", sql), "nothing may grant SUPERUSER"
    assert re.search(r"CREATE DATABASE mlflow OWNER", sql)
    assert re.search(r"CREATE DATABASE mlflow_auth OWNER", sql)
    mlflow = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    (container,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert "postgres-credentials" not in secret_names(container), (
        "MLflow must not use the superuser"
    )
    assert "mlflow-db-credentials" in secret_names(container)
    assert (
        "${MLFLOW_DB_USER}"
        in compose()["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    )


def test_postgres_init_script_reads_the_password_from_the_environment(tmp_path):
    """Run it as the postgres image does, with a stand-in psql that records argv and stdin."""
    record = tmp_path / "psql.txt"
    (tmp_path / "psql").write_text(f'#!/bin/sh\n{{ printf "%s\\n" "$@"; cat; }} > {record}\n')
    (tmp_path / "psql").chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "POSTGRES_USER": "postgres"}
    script = str(K8S / "postgres-initdb.sh")
    missing = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "MLFLOW_DB_USER" in missing.stderr
    env |= {"MLFLOW_DB_USER": "mlflow", "MLFLOW_DB_PASSWORD": "s3cret-pw"}
    subprocess.run(["sh", script], env=env, check=True, timeout=30)
    recorded = record.read_text()
    assert "s3cret-pw" not in recorded, "the password must not be on psql's command line or stdin"
    assert "\\getenv mlflow_password MLFLOW_DB_PASSWORD" in recorded
    assert "ON_ERROR_STOP=1" in recorded


def bucket_policy(script: str) -> dict:
    import json

    text = re.search(r"<<'POLICY'\n(.*?)\n\s*POLICY", script, re.S)[1]
    return json.loads(text)


def test_minio_user_for_ray_pods_is_scoped_to_the_pipeline_bucket():
    job = next(d for d in of_kind("Job") if d["metadata"]["name"] == "minio-setup")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    scripts = {
        "k8s": container["args"][0],
        "compose": compose()["services"]["minio-setup"]["command"][0],
    }
    for where, script in scripts.items():
        assert not re.search(r"policy attach local readwrite", script), where
        assert re.search(r"policy attach local pipeline-bucket --user", script), where
        resources = {r for st in bucket_policy(script)["Statement"] for r in st["Resource"]}
        assert resources == {"arn:aws:s3:::pipeline", "arn:aws:s3:::pipeline/*"}, where
        actions = {a for st in bucket_policy(script)["Statement"] for a in st["Action"]}
        assert not any(a == "s3:*" or a.startswith("admin:") for a in actions), where


def test_mlflow_setup_creates_the_pipeline_user_with_the_admin_credentials():
    job = next(d for d in of_kind("Job") if d["metadata"]["name"] == "mlflow-setup")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow-pipeline-user"]
    assert secret_names(container) == {"mlflow-auth", "mlflow-pipeline-user"}
    copies = [v for k, v in dockerfile_instructions() if k == "COPY"]
    assert any(v.endswith("/usr/local/bin/mlflow-pipeline-user") for v in copies)
    assert compose()["services"]["mlflow-setup"]["command"] == ["mlflow-pipeline-user"]


# NetworkPolicies: which of our pods may open a connection to which server port.


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector applied to a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_label_selector_matching_can_fail():
    labels = {"app.kubernetes.io/component": "ray-head"}
    expr = {"key": "app.kubernetes.io/component", "operator": "In", "values": ["ray-worker"]}
    assert not selects({"matchExpressions": [expr]}, labels)
    assert not selects({"matchLabels": {"app.kubernetes.io/name": "mlflow"}}, labels)
    assert selects({}, labels)


def allowed_sources(target_labels: dict[str, str], port: int) -> set[str]:
    """Our pod templates that may reach `port` on a pod with these labels ("*" for any pod of
    another namespace or any address), under a default-deny namespace."""
    policies = [
        d for d in of_kind("NetworkPolicy") if selects(d["spec"]["podSelector"], target_labels)
    ]
    sources: set[str] = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            assert peers, f"{policy['metadata']['name']}: an ingress rule without `from` admits all"
            for peer in peers:
                assert "ipBlock" not in peer, policy["metadata"]["name"]
                if "namespaceSelector" in peer:
                    sources.add("*")
                    continue
                sources |= {
                    where
                    for where, t in pod_templates()
                    if selects(peer["podSelector"], t["metadata"]["labels"])
                }
    return sources


def template_labels(kind: str, name: str) -> dict[str, str]:
    doc = next(d for d in of_kind(kind) if d["metadata"]["name"] == name)
    return doc["spec"]["template"]["metadata"]["labels"]


RAY_PODS = {w for w, _ in ray_pod_templates()}
SUBMITTERS = {w for w, _ in pod_templates() if w.startswith("CronJob ") or w.endswith(" submitter")}


def test_ingress_is_denied_by_default():
    (deny,) = [d for d in of_kind("NetworkPolicy") if d["spec"]["podSelector"] == {}]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")


def test_postgres_is_reachable_from_mlflow_only():
    assert allowed_sources(template_labels("StatefulSet", "postgres"), 5432) == {
        "Deployment mlflow"
    }


def test_mlflow_is_reachable_from_ray_pods_and_its_setup_job_only():
    assert allowed_sources(template_labels("Deployment", "mlflow"), 5000) == RAY_PODS | {
        "Job mlflow-setup"
    }


def test_minio_is_reachable_from_ray_pods_mlflow_and_its_setup_job_only():
    labels = template_labels("Deployment", "minio")
    expected = RAY_PODS | {"Deployment mlflow", "Job minio-setup"}
    assert allowed_sources(labels, 9000) == expected
    assert allowed_sources(labels, 9001) == set(), "the console: port-forward only"


@pytest.mark.parametrize(
    ("where", "template"), ray_pod_templates(), ids=[w for w, _ in ray_pod_templates()]
)
def test_ray_nodes_are_reachable_from_ray_pods_and_the_job_api_from_submitters(where, template):
    labels = template["metadata"]["labels"]
    is_head = where.endswith("group 0")
    assert labels.get("app.kubernetes.io/component") == ("ray-head" if is_head else "ray-worker")
    for port in (6379, 10001, 12345):  # GCS, Ray client, any raylet/worker port
        assert allowed_sources(labels, port) == RAY_PODS, (where, port)
    job_api = allowed_sources(labels, 8265)
    if is_head:  # submitters, and the KubeRay operator (another namespace) polls job status
        assert job_api == RAY_PODS | SUBMITTERS | {"*"}
        assert len(SUBMITTERS) == 3
    else:
        assert job_api == RAY_PODS
