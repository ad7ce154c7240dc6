"""The Helm chart (deploy/helm/cotrain) against the kustomize tree, with the real helm.

The kustomize tree is the source of truth and the chart is held to it: for each kustomization a
platform engineer applies (production, dev, production with each component) the chart renders,
with the values file of ci/ that says the same, the very same objects, field for field; what
Helm adds of its own (its labels) and what means the same in another order (env, rules) aside.
The one object of kustomize's that the chart leaves out is the Namespace: Helm keeps its release
in the namespace, so the namespace exists before the install (`--create-namespace`, labelled as
the NOTES say). A test edits one side alone and sees the comparison fail, so the comparison is
known to catch drift. Everything the chart renders validates against the Kubernetes schemas.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cotrain_operator.reconcile.access import render_trainer_access_chart
from tests.controlplane.tools import ToolNotBuiltError, built_tool
from tests.deploy.conftest import DEPLOY, ROOT, find, load_documents
from tests.deploy.test_manifests import (
    Render,
    env_of,
    operator_container,
    production_with,
    validate,
)

CHART = DEPLOY / "helm" / "cotrain"
NAMESPACE = "cotrain-system"
# Labels Helm's conventions add to the chart's objects, and nothing else differs.
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance")
VALUES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
Objects = dict[tuple[str, str, str], dict[str, Any]]


@pytest.fixture(scope="module")
def helm() -> Path:
    try:
        return built_tool("helm")
    except ToolNotBuiltError as error:
        pytest.fail(str(error))


def run_helm(helm: Path, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args, str(chart)], capture_output=True, text=True, timeout=60
    )


def render(helm: Path, *values: str, chart: Path = CHART) -> list[dict[str, Any]]:
    """`helm template` of the chart into cotrain-system, CRDs included."""
    flags = [arg for name in values for arg in ("-f", str(chart / "ci" / name))]
    ran = run_helm(helm, "template", "cotrain", "-n", NAMESPACE, "--include-crds", *flags,
                   chart=chart)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    return load_documents(ran.stdout)


def _normalized(document: dict[str, Any]) -> dict[str, Any]:
    document = json.loads(json.dumps(document))
    for owner in (document.get("metadata", {}), document.get("spec", {}).get("template", {})):
        labels = owner.get("metadata", owner).get("labels")
        if isinstance(labels, dict):
            for label in HELM_LABELS:
                labels.pop(label, None)
    if document["kind"] == "ClusterRole":
        document["rules"] = sorted(document.get("rules", []), key=json.dumps)
    pod = document.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []):
        container["env"] = sorted(container.get("env", []), key=lambda e: e["name"])
    return document


def objects(documents: list[dict[str, Any]]) -> Objects:
    keyed: Objects = {}
    for document in documents:
        metadata = document["metadata"]
        key = (document["kind"], metadata.get("namespace", ""), metadata["name"])
        assert key not in keyed, f"{key} rendered twice"
        keyed[key] = _normalized(document)
    return keyed


def drift(kustomize: list[dict[str, Any]], chart: list[dict[str, Any]]) -> list[str]:
    """What differs between the two renderings, one line per object; [] when none does."""
    ours = {k: v for k, v in objects(kustomize).items() if k[0] != "Namespace"}
    theirs = objects(chart)
    lines = [f"only in kustomize: {key}" for key in sorted(ours.keys() - theirs.keys())]
    lines += [f"only in the chart: {key}" for key in sorted(theirs.keys() - ours.keys())]
    for key in sorted(ours.keys() & theirs.keys()):
        if ours[key] != theirs[key]:
            a = yaml.safe_dump(ours[key], sort_keys=True).splitlines()
            b = yaml.safe_dump(theirs[key], sort_keys=True).splitlines()
            changed = [f"-{x}" for x in a if x not in b] + [f"+{x}" for x in b if x not in a]
            lines.append(f"{key} differs: {' '.join(changed)[:400]}")
    return lines


def _copy_of_the_tree(tmp_path: Path) -> Path:
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    shutil.copytree(ROOT / "crds", tmp_path / "crds")
    return tmp_path


# --------------------------------------------------------------------------------------------
# the chart is the kustomize tree


@pytest.mark.parametrize(
    ("kustomization", "values"),
    [
        ("deploy/overlays/production", []),
        ("deploy/overlays/dev", ["dev-values.yaml"]),
        ("kueue", ["kueue-values.yaml"]),
        ("servicemonitor", ["servicemonitor-values.yaml"]),
    ],
)
def test_the_chart_renders_what_kustomize_does(
    helm: Path,
    kustomize: Render,
    kubectl: Path,
    tmp_path: Path,
    kustomization: str,
    values: list[str],
) -> None:
    if kustomization.startswith("deploy/"):
        expected = kustomize(kustomization)
    else:  # production with one of deploy/components
        expected = production_with(kustomization, kubectl, tmp_path)
    differences = drift(expected, render(helm, *values))
    assert not differences, "the chart and kustomize have drifted apart:\n" + "\n".join(differences)


def test_a_kustomize_object_changed_alone_is_drift(
    helm: Path, kubectl: Path, tmp_path: Path
) -> None:
    tree = _copy_of_the_tree(tmp_path)
    deployment = tree / "deploy" / "base" / "deployment.yaml"
    deployment.write_text(deployment.read_text().replace("periodSeconds: 10", "periodSeconds: 20"))
    rbac = tree / "deploy" / "base" / "rbac.yaml"
    rbac.write_text(rbac.read_text().replace('verbs: ["create"]', 'verbs: ["create", "delete"]'))
    ran = subprocess.run(
        [str(kubectl), "kustomize", str(tree / "deploy" / "overlays" / "production")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    differences = drift(load_documents(ran.stdout), render(helm))
    assert [line.split(" differs")[0] for line in differences] == [
        "('ClusterRole', '', 'cotrain-operator')",
        "('Deployment', 'cotrain-system', 'cotrain-operator')",
    ]
    assert "periodSeconds: 20" in differences[1]


def test_a_chart_object_changed_alone_is_drift(
    helm: Path, kustomize: Render, tmp_path: Path
) -> None:
    chart = _copy_of_the_tree(tmp_path) / "deploy" / "helm" / "cotrain"
    service = chart / "templates" / "service.yaml"
    service.write_text(service.read_text().replace("type: ClusterIP", "type: NodePort"))
    differences = drift(kustomize("deploy/overlays/production"), render(helm, chart=chart))
    assert len(differences) == 1
    assert differences[0].startswith("('Service', 'cotrain-system', 'cotrain-operator-metrics')")


def test_the_chart_carries_the_crd_as_generated() -> None:
    assert (CHART / "crds" / "cotrain.dev_cotrainjobs.yaml").read_text() == (
        ROOT / "crds" / "cotrain.dev_cotrainjobs.yaml"
    ).read_text(), (
        "the chart's CRD is stale: cp crds/cotrain.dev_cotrainjobs.yaml deploy/helm/cotrain/crds/"
    )


def test_the_chart_trainer_policy_is_generated_from_the_code() -> None:
    assert (CHART / "templates" / "trainer.yaml").read_text() == render_trainer_access_chart(), (
        "deploy/helm/cotrain/templates/trainer.yaml is stale: python -m "
        "cotrain_operator.reconcile.access --chart > deploy/helm/cotrain/templates/trainer.yaml"
    )


# --------------------------------------------------------------------------------------------
# helm lint, the schemas, and the values kustomize has no counterpart for


@pytest.mark.parametrize("values", [None, *VALUES])
def test_helm_lint_strict_passes(helm: Path, values: str | None) -> None:
    flags = ["-f", str(CHART / "ci" / values)] if values else []
    ran = run_helm(helm, "lint", "--strict", *flags)
    assert ran.returncode == 0, ran.stdout + ran.stderr


@pytest.mark.parametrize("values", [None, *VALUES])
def test_everything_the_chart_renders_validates(helm: Path, values: str | None) -> None:
    documents = render(helm, *([values] if values else []))
    assert documents
    for document in documents:
        validate(document)


def test_watched_namespaces_get_the_namespaced_verbs_and_nothing_is_lost(helm: Path) -> None:
    everywhere = render(helm)
    watching = render(helm, "watch-namespaces-values.yaml")
    args = operator_container(watching)["args"]
    assert args == ["--namespace=team-a", "--namespace=team-b"]
    cluster_wide = find(everywhere, "ClusterRole", "cotrain-operator")["rules"]
    cluster = find(watching, "ClusterRole", "cotrain-operator")["rules"]
    namespaced = find(watching, "ClusterRole", "cotrain-operator-namespaced")["rules"]
    assert sorted(cluster + namespaced, key=json.dumps) == sorted(cluster_wide, key=json.dumps)
    assert not any("pods" in rule["resources"] for rule in cluster)
    bindings = [d for d in watching if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["name"] == "cotrain-operator-namespaced"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "cotrain-operator", "namespace": NAMESPACE}
        ]


def test_images_take_a_tag_and_a_digest(helm: Path, tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    values = tmp_path / "images.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "image": {
                    "operator": {"tag": "0.2.0", "digest": digest},
                    "trainer": {"repository": "registry.example/trainer", "tag": "7"},
                }
            }
        )
    )
    ran = run_helm(helm, "template", "x", "-f", str(values))
    assert ran.returncode == 0, ran.stderr
    container = operator_container(load_documents(ran.stdout))
    assert container["image"] == f"ghcr.io/cotrain/operator:0.2.0@{digest}"
    assert env_of(container)["COTRAIN_TRAINER_IMAGE"] == "registry.example/trainer:7"
    # Without a tag, the chart's appVersion: the release's own images.
    default = operator_container(render(helm))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert default["image"] == f"ghcr.io/cotrain/operator:{chart['appVersion']}"


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        ("operator.wrokers=3", "additional properties 'wrokers' not allowed"),
        ("trainerPolicy.validationActions={Deny,Warn}", "validationActions"),
        ("image.operator.digest=latest", "digest"),
        ("metrics.port=8081", "port"),
        ("operator.watchNamespaces={Team_A}", "watchNamespaces"),
    ],
)
def test_values_the_schema_refuses(helm: Path, setting: str, refusal: str) -> None:
    ran = run_helm(helm, "template", "x", "--set", setting)
    assert ran.returncode != 0
    assert refusal in ran.stderr, ran.stderr


def test_the_chart_version_is_the_projects(helm: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{chart["version"]}"' in project
    assert chart["appVersion"] == chart["version"]
