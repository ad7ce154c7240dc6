"""What CI checks on deploy/, crds/ and examples/ without a cluster.

Every manifest validates against the Kubernetes 1.34 schemas (strict: unknown fields fail);
every kustomization renders with the real kubectl; the rendered operator is least-privilege and
meets the "restricted" Pod Security profile; images and ports agree across the files.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from cotrain_operator.api.models import GROUP, PLURAL
from cotrain_operator.api.validation import parse_job
from cotrain_operator.reconcile.access import render_trainer_access_yaml
from cotrain_operator.reconcile.children import job_labels
from tests.deploy.conftest import DEPLOY, KUSTOMIZATIONS, ROOT, find, load_documents

KUBERNETES_VERSION = "1.34"
Render = Callable[[str | Path], list[dict[str, Any]]]
# Kinds of other projects' CRDs, which kubernetes_validate has no schema for; each has a test of
# its own below.
FOREIGN_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("config.kueue.x-k8s.io/v1beta2", "Configuration"),  # a fragment of Kueue's own config
}
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest in the repository: deploy/ and crds/, not kustomizations, not
    the Helm chart's templates and values (test_helm_chart.py validates what it renders)."""
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted((ROOT / "crds").glob("*.yaml"))
    helm = DEPLOY / "helm"
    return [f for f in files if f.name != "kustomization.yaml" and not f.is_relative_to(helm)]


def validate(document: dict[str, Any]) -> None:
    kind = (document["apiVersion"], document["kind"])
    if kind in FOREIGN_KINDS:
        return
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def operator_deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return find(documents, "Deployment", "cotrain-operator")


def operator_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    containers = operator_deployment(documents)["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]  # type: ignore[no-any-return]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


# --------------------------------------------------------------------------------------------
# schemas


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    documents = load_documents(path.read_text())
    assert documents, f"{path} holds no object"
    for document in documents:
        validate(document)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_renders_with_kubectl_and_validates(
    kustomize: Render, kustomization: str
) -> None:
    documents = kustomize(kustomization)
    assert documents
    for document in documents:
        validate(document)


def test_the_strict_validation_catches_a_misspelt_field() -> None:
    """Guards the test above: a typo in a manifest fails rather than being ignored."""
    deployment = operator_deployment(load_documents((DEPLOY / "base/deployment.yaml").read_text()))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicey"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_a_valid_cotrainjob(path: Path) -> None:
    # kubernetes_validate knows no CRDs: the examples go through the same checks as
    # `cotrain validate` (the CRD's CEL rules, written once in api/rules.py).
    for document in load_documents(path.read_text()):
        job = parse_job(document)
        assert job.metadata.name


def test_overlays_install_what_the_base_does(kustomize: Render, overlay: str) -> None:
    def kinds(documents: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((d["kind"], d["metadata"]["name"]) for d in documents)

    assert kinds(kustomize(overlay)) == kinds(kustomize("deploy/base"))
    assert kinds(kustomize("deploy/base")) == [
        ("ClusterRole", "cotrain-operator"),
        ("ClusterRole", "cotrain-trainer"),
        ("ClusterRoleBinding", "cotrain-operator"),
        ("CustomResourceDefinition", f"{PLURAL}.{GROUP}"),
        ("Deployment", "cotrain-operator"),
        ("Namespace", "cotrain-system"),
        ("Service", "cotrain-operator-metrics"),
        ("ServiceAccount", "cotrain-operator"),
        ("ValidatingAdmissionPolicy", "cotrain-trainer-reports-own-job"),
        ("ValidatingAdmissionPolicyBinding", "cotrain-trainer-reports-own-job"),
    ]


def test_the_trainer_policy_file_is_generated_from_the_code() -> None:
    committed = (DEPLOY / "base" / "trainer.yaml").read_text()
    assert committed == render_trainer_access_yaml(), (
        "deploy/base/trainer.yaml is stale: "
        "python -m cotrain_operator.reconcile.access > deploy/base/trainer.yaml"
    )


def test_the_trainer_cluster_role_only_reports_status(kustomize: Render) -> None:
    role = find(kustomize("deploy/base"), "ClusterRole", "cotrain-trainer")
    assert role["rules"] == [
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]}
    ]


# --------------------------------------------------------------------------------------------
# least privilege


def test_the_cluster_role_has_no_wildcards_no_secrets_and_no_escalation(
    kustomize: Render, overlay: str
) -> None:
    role = find(kustomize(overlay), "ClusterRole", "cotrain-operator")
    assert "aggregationRule" not in role
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule, rule
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard {field} in {rule}"
            assert not any("*" in value for value in rule[field]), rule
        resources = {r.split("/")[0] for r in rule["resources"]}
        assert "secrets" not in resources, rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
        # Nodes are only read (GPU inventory); the operator never changes them.
        if "nodes" in resources:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule


def test_the_operator_runs_as_the_service_account_the_role_is_bound_to(
    kustomize: Render, overlay: str
) -> None:
    documents = kustomize(overlay)
    binding = find(documents, "ClusterRoleBinding", "cotrain-operator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "cotrain-operator",
    }
    deployment = operator_deployment(documents)
    account = find(documents, "ServiceAccount")
    pod_spec = deployment["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": pod_spec["serviceAccountName"],
            "namespace": deployment["metadata"]["namespace"],
        }
    ]
    assert account["metadata"]["name"] == pod_spec["serviceAccountName"]


# --------------------------------------------------------------------------------------------
# the operator's pod


@pytest.mark.parametrize(
    "kustomization", ["deploy/base", "deploy/overlays/dev", "deploy/overlays/production"]
)
def test_the_operator_pod_meets_the_restricted_profile(
    kustomize: Render, kustomization: str
) -> None:
    pod_spec = operator_deployment(kustomize(kustomization))["spec"]["template"]["spec"]
    for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod_spec.get(forbidden), forbidden
    assert all("hostPath" not in v for v in pod_spec.get("volumes", []))
    pod_security = pod_spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod_spec["containers"] + pod_spec.get("initContainers", []):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not security.get("privileged")
        assert container["resources"]["requests"].keys() >= {"cpu", "memory"}
        assert container["resources"]["limits"].keys() >= {"cpu", "memory"}


def test_the_namespace_enforces_the_restricted_profile(kustomize: Render, overlay: str) -> None:
    labels = find(kustomize(overlay), "Namespace", "cotrain-system")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def liveness_default() -> str:
    """The --liveness default of `python -m cotrain_operator`, read from its source."""
    source = (ROOT / "operator/cotrain_operator/__main__.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "add_argument"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "--liveness"
        ):
            for keyword in node.keywords:
                if keyword.arg == "default" and isinstance(keyword.value, ast.Constant):
                    return str(keyword.value.value)
    raise AssertionError("no --liveness default in cotrain_operator/__main__.py")


def test_one_standalone_operator_with_probes_on_kopfs_endpoint_and_named_metrics(
    kustomize: Render, overlay: str
) -> None:
    documents = kustomize(overlay)
    deployment = operator_deployment(documents)
    # kopf runs standalone: never two operators, not even during a rollout.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = operator_container(documents)
    assert container["command"] == ["python", "-m", "cotrain_operator"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    liveness = re.fullmatch(r"http://0\.0\.0\.0:(\d+)(/\S+)", liveness_default())
    assert liveness, liveness_default()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http = container[probe]["httpGet"]
        assert ports[http["port"]] == int(liveness.group(1)), probe
        assert http["path"] == liveness.group(2), probe
    assert ports["metrics"] == int(env_of(container)["COTRAIN_METRICS_PORT"]) == 8080


def test_the_metrics_service_selects_the_operator_and_not_trainer_pods(
    kustomize: Render, overlay: str
) -> None:
    documents = kustomize(overlay)
    service = find(documents, "Service", "cotrain-operator-metrics")
    selector = service["spec"]["selector"].items()
    pod_labels = operator_deployment(documents)["spec"]["template"]["metadata"]["labels"]
    assert selector <= pod_labels.items()
    assert not selector <= job_labels("some-job").items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == port["targetPort"] == "metrics"
    # ServiceMonitor-friendly: the Service carries the labels a monitor selects by.
    assert selector <= service["metadata"]["labels"].items()


def production_with(component: str, kubectl: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """The production overlay with one of deploy/components added, as a user's overlay has it,
    rendered by the real kubectl."""
    # kustomize takes no absolute paths: an overlay of our own beside a copy of the tree.
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    shutil.copytree(ROOT / "crds", tmp_path / "crds")
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay/kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../deploy/overlays/production]\n"
        f"components: [../deploy/components/{component}]\n"
    )
    result = subprocess.run(
        [str(kubectl), "kustomize", str(tmp_path / "overlay")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return load_documents(result.stdout)


def test_the_service_monitor_component_scrapes_the_metrics_service(
    kubectl: Path, tmp_path: Path
) -> None:
    documents = production_with("servicemonitor", kubectl, tmp_path)
    monitor = find(documents, "ServiceMonitor", "cotrain-operator")
    service = find(documents, "Service", "cotrain-operator-metrics")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_the_kueue_component_turns_queueing_on_with_least_privilege(
    kubectl: Path, tmp_path: Path
) -> None:
    documents = production_with("kueue", kubectl, tmp_path)
    env = env_of(operator_container(documents))
    assert env["COTRAIN_KUEUE"] == "true"
    assert env["COTRAIN_WORKERS"] == "8"  # the overlay's own settings survive the component
    role = find(documents, "ClusterRole", "cotrain-operator-kueue")
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"]
             for r in rule["resources"]}  # fmt: skip
    assert verbs == {
        ("kueue.x-k8s.io", "workloads"): {"get", "list", "watch", "create", "delete"},
        ("kueue.x-k8s.io", "workloads/status"): {"patch"},
        ("kueue.x-k8s.io", "resourceflavors"): {"get", "list", "watch"},
        ("kueue.x-k8s.io", "workloadpriorityclasses"): {"get", "list", "watch"},
    }
    binding = find(documents, "ClusterRoleBinding", "cotrain-operator-kueue")
    account = operator_deployment(documents)["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": "cotrain-system"}
    ]


# --------------------------------------------------------------------------------------------
# images


def images_of(documents: list[dict[str, Any]]) -> tuple[str, str, str]:
    container = operator_container(documents)
    return (
        container["image"],
        env_of(container)["COTRAIN_TRAINER_IMAGE"],
        container["imagePullPolicy"],
    )


def test_base_and_production_run_the_released_images(kustomize: Render) -> None:
    for kustomization in ("deploy/base", "deploy/overlays/production"):
        operator, trainer, pull = images_of(kustomize(kustomization))
        assert operator.startswith(f"ghcr.io/cotrain/operator:{PROJECT_VERSION}")
        assert trainer.startswith(f"ghcr.io/cotrain/trainer:{PROJECT_VERSION}")
        assert pull == "IfNotPresent"


# A digest, if any, is a real one; no tag that moves, no placeholder.
PINNED = re.compile(r"^ghcr\.io/cotrain/[a-z]+:\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?$")


def test_production_images_are_pinned_without_placeholders(kustomize: Render) -> None:
    documents = kustomize("deploy/overlays/production")
    for image in images_of(documents)[:2]:
        assert PINNED.match(image), image
    # Wherever a digest appears, it is a whole one.
    text = "\n".join(map(str, documents))
    for digest in re.findall(r"sha256:\S*", text):
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest.rstrip("',\"}]")), digest


def test_production_has_more_room_than_the_base(kustomize: Render) -> None:
    from cotrain_operator.api.quantity import parse_quantity

    base = operator_container(kustomize("deploy/base"))["resources"]
    production = operator_container(kustomize("deploy/overlays/production"))["resources"]
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert parse_quantity(production[bound][resource]) > parse_quantity(
                base[bound][resource]
            ), (bound, resource)


def test_dev_runs_locally_built_images_with_debug_logging(kustomize: Render) -> None:
    documents = kustomize("deploy/overlays/dev")
    operator, trainer, pull = images_of(documents)
    assert (operator, trainer, pull) == (
        "ghcr.io/cotrain/operator:dev",
        "ghcr.io/cotrain/trainer:dev",
        "Never",
    )
    assert operator_container(documents)["args"] == ["--verbose"]
