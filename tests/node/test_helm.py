"""The operator as a Helm user runs it: `helm install` of deploy/helm/cotrain on the real node
with the images built here, a job to Succeeded, `helm upgrade` to watch one namespace only (the
operator pod replaced, its namespaced verbs granted there alone, a job there to Succeeded, one
elsewhere untouched), then `helm uninstall`, which leaves the CRD and the jobs.

The session's cluster may already hold what `install_cotrain` applies (deploy/base's RBAC and the
trainer policy, by kubectl): the install takes those objects over (`--take-ownership`, the way
from a kustomize install to Helm), and the test puts them back after the uninstall.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.controlplane.cluster import ControlPlane
from tests.controlplane.images import LocalImage
from tests.controlplane.tools import ToolNotBuiltError, built_tool
from tests.fixtures.kube import install_cotrain
from tests.node.conftest import RealNode
from tests.node.running import job_path
from tests.node.waiting import get_json, until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "cotrain"
SYSTEM = "cotrain-system"
OPERATOR = "app.kubernetes.io/component=operator"
OPERATOR_ACCOUNT = f"system:serviceaccount:{SYSTEM}:cotrain-operator"


class Helm:
    """The real helm against the test cluster, its state in a directory of the test's own."""

    def __init__(self, binary: Path, cp: ControlPlane, home: Path) -> None:
        self.binary, self.cp = binary, cp
        self.env = {
            **os.environ,
            "KUBECONFIG": str(cp.kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        ran = subprocess.run(
            [str(self.binary), *args, "-n", SYSTEM],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=300,
        )
        assert not check or ran.returncode == 0, f"helm {' '.join(args)}:\n{ran.stderr}"
        return ran


def _local_images(path: Path, operator: LocalImage, trainer: LocalImage) -> Path:
    """Values that run the images built here (the node has no registry): the one change a
    test makes to a user's install."""
    (op_repo, op_tag), (tr_repo, tr_tag) = (i.ref.rsplit(":", 1) for i in (operator, trainer))
    values = {
        "image": {
            "operator": {"repository": op_repo, "tag": op_tag},
            "trainer": {"repository": tr_repo, "tag": tr_tag},
        }
    }
    path.write_text(yaml.safe_dump(values))
    return path


def _operator_pod(cp: ControlPlane) -> dict[str, Any]:
    pods = json.loads(cp.kubectl("get", "pods", "-n", SYSTEM, "-l", OPERATOR, "-o", "json").stdout)
    [pod] = [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]
    return pod  # type: ignore[no-any-return]


def _a_job(cp: ControlPlane, ns: str, name: str) -> None:
    job: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "mixed-same-gpu.yaml").read_text())
    job["metadata"] = {"name": name, "namespace": ns}
    for member in job["spec"]["members"]:
        member["steps"] = 200
    cp.kubectl("create", "-f", "-", input=json.dumps(job))


def _succeeded(cp: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    def phase() -> dict[str, Any] | None:
        status: dict[str, Any] = get_json(cp, job_path(ns, name)).get("status", {})
        assert status.get("phase") != "Failed", status
        return status if status.get("phase") == "Succeeded" else None

    status = until(f"job {ns}/{name} Succeeded", phase, timeout=300)
    for member, progress in status["members"].items():
        assert progress["step"] == progress["totalSteps"] == 200, (member, progress)
    return status


def _can_i(cp: ControlPlane, verb: str, resource: str, ns: str) -> bool:
    ran = cp.kubectl(
        "auth", "can-i", verb, resource, "-n", ns, f"--as={OPERATOR_ACCOUNT}", check=False
    )
    return ran.stdout.strip() == "yes"


def _member_series(pod: dict[str, Any], metric: str, job: str) -> dict[str, float]:
    """{member: value} of the job's series of `metric`, scraped from the operator pod."""
    with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        sample.labels["member"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric and sample.labels.get("job") == job
    }


@pytest.fixture
def helm(time_slicing_node: RealNode, tmp_path: Path) -> Iterator[Helm]:
    cp = time_slicing_node.control_plane
    try:
        binary = built_tool("helm")
    except ToolNotBuiltError as error:
        pytest.fail(str(error))
    # Another test's kustomize Deployment would run a second operator beside the chart's.
    cp.kubectl("delete", "deploy", "cotrain-operator", "-n", SYSTEM, "--wait=true", check=False)
    # The namespace as the chart's README creates it: before the install, Pod Security enforced.
    cp.kubectl("apply", "--server-side", "-f", str(ROOT / "deploy" / "base" / "namespace.yaml"))
    helm = Helm(binary, cp, tmp_path / "helm")
    try:
        yield helm
    finally:
        helm("uninstall", "cotrain", "--wait", check=False)
        install_cotrain(cp)  # what the other tests of the session expect of the cluster


@pytest.fixture
def other_namespace(time_slicing_node: RealNode) -> Iterator[str]:
    cp = time_slicing_node.control_plane
    ns = f"t-{uuid.uuid4().hex[:8]}"
    cp.kubectl("create", "namespace", ns)
    try:
        yield ns
    finally:
        cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_helm_installs_upgrades_and_uninstalls_the_operator(
    time_slicing_node: RealNode,
    helm: Helm,
    operator_image: LocalImage,
    trainer_image: LocalImage,
    restricted_namespace: str,
    other_namespace: str,
    tmp_path: Path,
) -> None:
    cp, ns = time_slicing_node.control_plane, restricted_namespace
    images = str(_local_images(tmp_path / "images.yaml", operator_image, trainer_image))

    helm("install", "cotrain", str(CHART), "-f", images, "--take-ownership", "--wait",
         "--timeout=180s")  # fmt: skip
    assert json.loads(helm("status", "cotrain", "-o", "json").stdout)["info"]["status"] == (
        "deployed"
    )
    first = _operator_pod(cp)
    assert first["spec"]["containers"][0]["image"] == operator_image.ref
    _a_job(cp, ns, "helm-installed")
    _succeeded(cp, ns, "helm-installed")
    # The per-member series of the job, on the operator's own metrics port, until it goes.
    steps = _member_series(first, "cotrain_member_step", "helm-installed")
    assert steps == {"torch-mlp": 200.0, "tf-mlp": 200.0}
    cp.kubectl("delete", "cotrainjob", "helm-installed", "-n", ns, "--wait=true")
    until(
        "the job's member series gone",
        lambda: _member_series(first, "cotrain_member_step", "helm-installed") == {} or None,
    )

    # Upgrade: watch one namespace. The Deployment rolls (Recreate) to a pod with the flag.
    helm("upgrade", "cotrain", str(CHART), "-f", images, "--set",
         f"operator.watchNamespaces={{{ns}}}", "--wait", "--timeout=180s")  # fmt: skip
    second = _operator_pod(cp)
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert second["spec"]["containers"][0]["args"] == [f"--namespace={ns}"]
    assert _can_i(cp, "create", "pods", ns)
    assert not _can_i(cp, "create", "pods", other_namespace)
    assert not _can_i(cp, "list", "cotrainjobs.cotrain.dev", other_namespace)
    _a_job(cp, other_namespace, "unwatched")
    _a_job(cp, ns, "watched")
    _succeeded(cp, ns, "watched")
    assert "status" not in get_json(cp, job_path(other_namespace, "unwatched"))

    helm("uninstall", "cotrain", "--wait", "--timeout=120s")
    gone = [
        ("deploy", "cotrain-operator", SYSTEM),
        ("serviceaccount", "cotrain-operator", SYSTEM),
        ("clusterrole", "cotrain-operator", ""),
        ("clusterrole", "cotrain-trainer", ""),
        ("validatingadmissionpolicy", "cotrain-trainer-reports-own-job", ""),
        ("rolebinding", "cotrain-operator", ns),
    ]
    for kind, name, where in gone:
        scope = ["-n", where] if where else []
        ran = cp.kubectl("get", kind, name, *scope, "--ignore-not-found", "-o", "name")
        assert ran.stdout.strip() == "", f"{kind}/{name} outlived helm uninstall"
    # Helm never deletes what crds/ installed, nor therefore anyone's jobs.
    cp.kubectl("get", "crd", "cotrainjobs.cotrain.dev")
    assert get_json(cp, job_path(ns, "watched"))["status"]["phase"] == "Succeeded"
