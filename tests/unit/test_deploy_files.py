"""deploy/ offline: what can drift, kept in step (``make test-deploy`` runs the compose stack
for real; no Kubernetes cluster runs here, so the manifests are checked without one).

- the placement spec in the Kubernetes ConfigMap equals deploy/placement/mixed.json, which
  keeps 2 replicas of every partition;
- every ``$(VAR)`` a manifest expands is defined (ConfigMap shardrec-env or the container's env);
- (test_cli_deploy_files.py) every ``shardrec`` subcommand and flag they use exists in the CLI;
- the manifests, one by one and rendered by kustomize, validate against the Kubernetes schemas
  (``kubernetes-validate --strict``, offline);
- every pod template meets the restricted Pod Security Standard (kubernetes-validate does not
  check it) and has a read-only root filesystem;
- the frontends' disruption budget, autoscaler and preStop; the shard count in one place;
  addresses that do not assume IPv4; compose publishing on 127.0.0.1 only;
- secrets: every Secret a workload reads is documented in docs/deploy.md and made by
  deploy/k8s_secrets.py (the overlay it writes renders and validates, with the tls component and without);
  no secret value in a ConfigMap, an env literal or on a command line; secret files mounted
  read-only, without subPath (rotation), not world-readable; the TLS readiness probe passes
  against an mTLS server with the certificates made.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
MANIFESTS = [p for p in K8S if p.name != "kustomization.yaml"]
# The oldest Kubernetes the manifests use features of (the pod-index label), and the newest
# schemas kubernetes-validate carries.
K8S_VERSIONS = ("1.28.0", "latest")


def test_k8s_placement_configmap_equals_the_shipped_spec() -> None:
    text = (DEPLOY / "k8s" / "config.yaml").read_text()
    block = text.split("placement.json: |\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    assert json.loads(textwrap.dedent("\n".join(lines))) == json.loads((DEPLOY / "placement" / "mixed.json").read_text())


def test_every_expanded_variable_is_defined() -> None:
    config = (DEPLOY / "k8s" / "config.yaml").read_text()
    defined = set(re.findall(r"^  (SHARDREC_[A-Z_]+):", config, re.MULTILINE))
    assert {"SHARDREC_ZK", "SHARDREC_CLUSTER"} <= defined
    for path in K8S:
        text = path.read_text()
        local = set(re.findall(r"- name: ([A-Z_]+)[^\n]*\n\s+valueFrom:", text))
        used = set(re.findall(r"\$\(([A-Z_]+)\)", text)) | set(re.findall(r"\$\{([A-Z_]+)\}", text))
        optional = set(re.findall(r"\$\{([A-Z_]+):-", text))  # tested for before use (ADVERTISE_DOMAIN: tls/)
        missing = used - defined - local - optional - {"HOSTNAME"}
        assert not missing, f"{path.name} expands undefined {sorted(missing)}"


# ---- Kubernetes: schemas, the restricted profile, lifecycle ------------------------------------


def _docs(paths) -> list[dict]:
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


def _rendered() -> list[dict]:
    """``kubectl kustomize deploy/k8s`` (the manifests as applied)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (it renders the kustomization)")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(kind/name, pod spec) of every workload."""
    found = []
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            found.append((f"{d['kind']}/{d['metadata']['name']}", spec["template"]["spec"]))
    return found


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What in a pod spec breaks the restricted Pod Security Standard (which includes
    baseline), plus our own rule of a read-only root filesystem. Empty when none."""
    bad = []
    psc = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            bad.append(f"{field}: true")
    for v in pod.get("volumes", []):
        kind = next(k for k in v if k != "name")
        if kind not in RESTRICTED_VOLUMES:
            bad.append(f"volume {v['name']} is {kind}")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    containers = [c for key in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(key, [])]
    for c in containers:
        csc = c.get("securityContext", {})
        name = c["name"]
        if csc.get("privileged"):
            bad.append(f"{name}: privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            bad.append(f"{name}: runAsNonRoot is not true")
        if csc.get("runAsUser") == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile {seccomp!r}")
        caps = csc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{name}: hostPort")
        if csc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{name}: root filesystem is writable")
        elif "/tmp" not in {m["mountPath"] for m in c.get("volumeMounts", [])}:
            bad.append(f"{name}: read-only root without a writable /tmp")
    return bad


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    import kubernetes_validate

    for doc in _docs([path]):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version() if version == "latest" else version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_kustomization_validates(version: str) -> None:
    import kubernetes_validate

    docs = _rendered()
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Deployment", "Job", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version() if version == "latest" else version, strict=True)
    for name, pod in _pod_templates(docs):
        assert {c["image"] for c in pod["containers"]} == {"shardrec:dev"}, name


def test_every_pod_template_meets_the_restricted_profile() -> None:
    pods = _pod_templates(_docs(MANIFESTS))
    assert len(pods) == 4
    for name, pod in pods:
        assert restricted_violations(pod) == [], name


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda p: p.update(hostNetwork=True), "hostNetwork: true"),
        (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "volume h is hostPath"),
        (lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile None"),
        (lambda p: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot is not true"),
        (lambda p: p["containers"][0]["securityContext"].update(privileged=True), "privileged"),
        (lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
        (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=[]), "do not drop ALL"),
        (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "adds capabilities"),
        (lambda p: p["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False), "writable"),
        (lambda p: p["containers"][0]["ports"].append({"containerPort": 1, "hostPort": 1}), "hostPort"),
    ],
)
def test_the_restricted_profile_check_catches(break_it, expected: str) -> None:
    _, pod = next(t for t in _pod_templates(_docs([DEPLOY / "k8s" / "shard-statefulset.yaml"])))
    pod = copy.deepcopy(pod)
    break_it(pod)
    assert any(expected in v for v in restricted_violations(pod)), restricted_violations(pod)


def test_frontend_has_a_disruption_budget_an_autoscaler_and_a_prestop_drain() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs([DEPLOY / "k8s" / "frontend.yaml"])}
    deployment = docs["Deployment", "shardrec-frontend"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = docs["PodDisruptionBudget", "shardrec-frontend"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["maxUnavailable"] == 1
    hpa = docs["HorizontalPodAutoscaler", "shardrec-frontend"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "shardrec-frontend"}
    assert hpa["minReplicas"] >= 2, "one frontend must serve while another stops"
    assert "replicas" not in deployment["spec"], "the autoscaler sets the replicas"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace_s = float(re.search(r"--grace-s (\S+)", container["args"][0]).group(1))
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + grace_s


def test_shard_count_is_set_in_one_place() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    (count,) = [r["count"] for r in kustomization["replicas"] if r["name"] == "shardrec-shard"]
    statefulset = next(d for d in _docs([DEPLOY / "k8s" / "shard-statefulset.yaml"]) if d["kind"] == "StatefulSet")
    assert "replicas" not in statefulset["spec"]
    env = next(d for d in _docs([DEPLOY / "k8s" / "config.yaml"]) if d["metadata"]["name"] == "shardrec-env")["data"]
    assert not env["SHARDREC_SHARD_NODES"].isdigit(), "SHARDREC_SHARD_NODES is filled in by the kustomization"
    rendered = _rendered()
    replicas = next(d for d in rendered if d["kind"] == "StatefulSet")["spec"]["replicas"]
    nodes = next(d for d in rendered if d["metadata"]["name"] == "shardrec-env")["data"]["SHARDREC_SHARD_NODES"]
    assert replicas == count and nodes == str(count)


@pytest.mark.parametrize("path", [DEPLOY / "compose.yaml", *MANIFESTS], ids=lambda p: p.name)
def test_addresses_do_not_assume_ipv4(path: Path) -> None:
    text = path.read_text()
    assert "0.0.0.0" not in text, "listen on [::] (dual-stack)"
    for line in re.findall(r".*--advertise-host.*", text):
        assert re.search(r'--advertise-host "(\$\{advertise\}|\$\$ip)"', line), line
    if "--advertise-host" in text:
        assert re.search(r'\*:\*\) (advertise|ip)="\[', text), "IPv6 addresses are bracketed"


def test_the_deploy_placement_keeps_two_replicas_of_every_partition() -> None:
    from services.core.placement import load_placement_spec

    spec = load_placement_spec(DEPLOY / "placement" / "mixed.json")
    for entry in (spec.default, *spec.tables.values()):
        assert entry.resolve_replicas(3) >= 2, entry
    assert "--spec /app/deploy/placement/mixed.json" in (DEPLOY / "compose.yaml").read_text()


def test_compose_publishes_on_loopback_and_runs_restricted() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert "name" not in compose, "compose v1 (Debian's docker-compose) rejects a top-level name"
    services = compose["services"]
    assert {"zookeeper", "redis", "init", "shard-0", "shard-1", "shard-2", "frontend-0", "frontend-1"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        if service.get("image", "").startswith("shardrec:"):
            assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
            assert "no-new-privileges:true" in service["security_opt"] and "/tmp" in service["tmpfs"], name


@pytest.mark.parametrize("pod_ip, advertised, extra_env", [
    ("10.1.2.3", "10.1.2.3", {}),
    ("fd00::5", "[fd00::5]", {}),
    ("fd00::5", {"shardrec-shard": "fe-0.shardrec-shard.ns.svc.cluster.local"}, {"ADVERTISE_DOMAIN": "shardrec-shard.ns.svc.cluster.local"}),
])  # fmt: skip
def test_pod_scripts_advertise_the_pod_ip_bracketed_when_ipv6(tmp_path: Path, pod_ip: str, advertised, extra_env: dict) -> None:
    """Each workload's shell script, run by /bin/sh with a stand-in ``shardrec`` that prints
    its arguments: the pod IP is advertised, with brackets when it is IPv6; with TLS
    (ADVERTISE_DOMAIN, deploy/k8s/tls) a shard advertises its DNS name."""
    fake = tmp_path / "shardrec"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "POD_IP": pod_ip, "POD_INDEX": "2", "POD_NAME": "fe-0",
           "SHARDREC_REDIS": "redis://redis:6379/0", "SHARDREC_REDIS_PREFIX": "shardrec:", **extra_env}
    for name, pod in _pod_templates(_docs(MANIFESTS)):
        (container,) = pod["containers"]
        if "--advertise-host" not in container["args"][0]:
            continue
        argv = ["/bin/sh", *container["command"][1:], container["args"][0]]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        args = out.stdout.split()
        want = advertised if isinstance(advertised, str) else advertised.get(name.split("/")[1], f"[{pod_ip}]")
        assert args[args.index("--advertise-host") + 1] == want, name
        assert args[args.index("--host") + 1] == "[::]", name


# ---- Kubernetes: secrets ---------------------------------------------------------------------

DOCS_DEPLOY = DEPLOY.parent / "docs" / "deploy.md"


@pytest.fixture(scope="module")
def with_secrets(tmp_path_factory) -> list[dict]:
    """The overlay deploy/k8s_secrets.py --tls writes (deploy/k8s, its tls component, every
    Secret generated), rendered by kustomize."""
    return _secrets_overlay(tmp_path_factory.mktemp("k8s") / "overlay", "--tls")


def _secrets_overlay(out: Path, *flags: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (it renders the kustomization)")
    made = subprocess.run([sys.executable, str(DEPLOY / "k8s_secrets.py"), "--out", str(out), "--namespace", "recsys", *flags],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode == 0, made.stderr
    rendered = subprocess.run(["kubectl", "kustomize", str(out)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return [d for d in yaml.safe_load_all(rendered.stdout) if d]


def _containers(pod: dict) -> list[dict]:
    return [c for key in ("initContainers", "containers") for c in pod.get(key, [])]


def secret_refs(docs: list[dict]) -> dict[str, set[str]]:
    """Secret name -> the keys workloads read from it (volumes, projected volumes, env); a
    volume of a whole Secret names no key."""
    refs: dict[str, set[str]] = {}
    for _, pod in _pod_templates(docs):
        for v in pod.get("volumes", []):
            sources = [{"secret": {"name": v["secret"]["secretName"], **v["secret"]}}] if "secret" in v else []
            for src in sources + v.get("projected", {}).get("sources", []):
                if "secret" in src:
                    refs.setdefault(src["secret"]["name"], set()).update(i["key"] for i in src["secret"].get("items", []))
        for c in _containers(pod):
            for e in c.get("env", []):
                if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                    refs.setdefault(ref["name"], set()).add(ref["key"])
            for e in c.get("envFrom", []):
                if "secretRef" in e:
                    refs.setdefault(e["secretRef"]["name"], set())
    return refs


def documented_secrets() -> dict[str, set[str]]:
    """The table of docs/deploy.md ("Secrets"): | `name` | `key`, `key` | ..."""
    rows = re.findall(r"^\| `(shardrec-[a-z-]+)` \| ([^|]+) \|", DOCS_DEPLOY.read_text(), re.MULTILINE)
    return {name: set(re.findall(r"`([^`]+)`", keys)) for name, keys in rows}


def test_every_secret_read_is_documented_and_generated(with_secrets: list[dict]) -> None:
    documented = documented_secrets()
    generated = {d["metadata"]["name"]: d for d in with_secrets if d["kind"] == "Secret"}
    base = secret_refs(_docs(MANIFESTS))
    assert set(base) >= {"shardrec-tokens", "shardrec-cluster-token", "shardrec-zookeeper-auth", "shardrec-redis-auth"}
    refs = secret_refs(with_secrets)
    assert set(refs) == set(base) | {"shardrec-tls-shard", "shardrec-tls-frontend"}
    assert set(refs) == set(documented), "docs/deploy.md lists exactly the Secrets the manifests read"
    for name, keys in refs.items():
        assert name in generated, f"deploy/k8s_secrets.py makes no {name}"
        assert keys <= set(generated[name]["data"]) and keys <= documented[name], (name, keys)
        if not keys:  # a whole Secret: the TLS layout
            assert generated[name]["type"] == "kubernetes.io/tls" and documented[name] == {"tls.crt", "tls.key", "ca.crt"}, name


def _text_of(obj) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _text_of(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _text_of(v)]
    return [str(obj)]


def test_no_secret_in_a_configmap_an_env_literal_or_a_command_line(with_secrets: list[dict]) -> None:
    from services.core.config import FRONTEND_SETTINGS, SHARD_SETTINGS

    secret_vars = {s.env for table in (FRONTEND_SETTINGS, SHARD_SETTINGS) for s in table.settings if s.secret}
    assert secret_vars >= {"SHARDREC_ZK_PASSWORD", "SHARDREC_REDIS_PASSWORD"}
    values = [base64.b64decode(v).decode() for d in with_secrets if d["kind"] == "Secret" for v in d["data"].values()]
    lines = [line.strip() for v in values for line in v.splitlines() if len(line.strip()) >= 16]
    tokens = [line for line in lines if '"' not in line and " " not in line]  # tokens, passwords (not PEM or TOML lines)
    assert len(tokens) >= 2
    exposed = [d for d in with_secrets if d["kind"] == "ConfigMap"]
    exposed += [c for _, pod in _pod_templates(with_secrets) for c in _containers(pod)]
    for where in exposed:
        text = "\n".join(_text_of({k: v for k, v in where.items() if k != "volumeMounts"}))
        name = where.get("name") or where["metadata"]["name"]
        assert not any(t in text for t in tokens), f"a secret value in {name}"
        assert not re.search(r"rediss?(\+sentinel)?://[^/\s\"]*@", text), f"a Redis URL with a password in {name}"
        for line in text.splitlines():
            assert not any(v in line for v in secret_vars), f"{name} sets a secret setting in the clear: {line}"
        assert not re.search(r"password|passwd", " ".join(where.get("data", {})), re.IGNORECASE), name


SECRET_FLAGS = ("--tokens-file", "--cluster-token-file", "--zk-auth", "--redis-password-file", "--tls-dir")


def test_secret_files_are_mounted_read_only_and_rotatable(with_secrets: list[dict]) -> None:
    """Secret volumes: read-only mounts without subPath (Kubernetes then updates the files
    when the Secret changes, and the processes re-read them: docs/security.md "Rotation"),
    mode 0440 for the pod's group (fsGroup 10001); every secret file a command names lies
    under one of its container's secret mounts."""
    for name, pod in _pod_templates(with_secrets):
        secret_volumes = {v["name"]: v for v in pod.get("volumes", [])
                          if "secret" in v or any("secret" in s for s in v.get("projected", {}).get("sources", []))}  # fmt: skip
        for v in secret_volumes.values():
            mode = (v.get("secret") or v.get("projected"))["defaultMode"]
            assert mode & 0o007 == 0 and mode & 0o040, (name, v["name"], oct(mode))
        if secret_volumes:
            assert pod["securityContext"]["fsGroup"] == 10001, name
        for c in _containers(pod):
            mounts = [m for m in c.get("volumeMounts", []) if m["name"] in secret_volumes]
            for m in mounts:
                assert m.get("readOnly") is True and "subPath" not in m, (name, m)
            roots = [m["mountPath"] + "/" for m in mounts]
            text = " ".join(_text_of([c.get("args", []), c.get("command", []), c.get("readinessProbe", {}), c.get("env", [])]))
            text = re.sub(r"\\\s+", " ", text)
            used = re.findall(r"(%s) \"?([^\s\"]+)" % "|".join(SECRET_FLAGS), text)
            used += [(e["name"], e["value"]) for e in c.get("env", []) if e["name"].startswith("SHARDREC_TLS_")]
            for flag, path in used:
                path = path.replace('${zk_auth}', "/etc/shardrec/secrets/zookeeper.toml")
                assert any((path + "/").startswith(r) for r in roots), f"{name}: {flag} {path} is not under a secret mount {roots}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_with_secrets_and_tls_validates(with_secrets: list[dict], version: str) -> None:
    import kubernetes_validate

    for doc in with_secrets:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version() if version == "latest" else version, strict=True)
    pods = _pod_templates(with_secrets)
    assert len(pods) == 4
    for name, pod in pods:
        assert restricted_violations(pod) == [], name


def test_overlay_without_tls_validates_and_mounts_no_tls(tmp_path: Path) -> None:
    import kubernetes_validate

    docs = _secrets_overlay(tmp_path / "overlay")
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"} == {
        "shardrec-tokens", "shardrec-cluster-token", "shardrec-zookeeper-auth", "shardrec-redis-auth"}  # fmt: skip
    for name, pod in _pod_templates(docs):
        assert restricted_violations(pod) == [], name
        assert "shardrec-tls" not in json.dumps(pod), f"{name} mounts TLS without the tls component"


def test_tls_readiness_probe_passes_against_the_mtls_shard_port(with_secrets: list[dict], tmp_path: Path) -> None:
    """The shard's readiness probe of deploy/k8s/tls (deploy/grpc_health_check.py with the
    pod's certificate, checked against its advertised DNS name) against a gRPC server with the
    made shard certificate that requires client certificates: SERVING; without a certificate
    the handshake fails."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    secret = next(d for d in with_secrets if d["kind"] == "Secret" and d["metadata"]["name"] == "shardrec-tls-shard")
    files = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for key, data in files.items():
        (tls_dir / key).write_bytes(data)
    servicer = health.HealthServicer()
    servicer.set("shardrec.v1.EmbeddingShard", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([(files["tls.key"], files["tls.crt"])], root_certificates=files["ca.crt"], require_client_auth=True)
    port = server.add_secure_port("localhost:0", creds)
    server.start()
    try:
        statefulset = next(d for d in with_secrets if d["kind"] == "StatefulSet")
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        argv = container["readinessProbe"]["exec"]["command"]
        script = argv[-1].replace("/app/deploy/", f"{DEPLOY}/").replace("/etc/shardrec/tls", str(tls_dir))
        script = script.replace("localhost:50051", f"localhost:{port}").replace("exec python", f"exec {sys.executable}")
        env = {"PATH": "/usr/bin:/bin", "POD_NAME": "shardrec-shard-2", "ADVERTISE_DOMAIN": "shardrec-shard.recsys.svc.cluster.local"}
        probe = subprocess.run([*argv[:-1], script], env=env, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        plain = subprocess.run([sys.executable, str(DEPLOY / "grpc_health_check.py"), f"localhost:{port}"], capture_output=True, text=True, timeout=30)
        assert plain.returncode == 1, plain.stderr
    finally:
        server.stop(0)
