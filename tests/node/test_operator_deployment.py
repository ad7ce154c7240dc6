"""The operator as users run it: ``kubectl apply -k`` of the production overlay with the images
built here, a Deployment pod with in-cluster config, probes and metrics, and a job that
converges through the faults a node has: the operator pod deleted, the kubelet restarted,
containerd killed, the trainer pod deleted. No duplicate pods, no lost progress.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controlplane.cluster import ControlPlane
from tests.controlplane.images import LocalImage
from tests.fixtures.jobs import a_job
from tests.node.conftest import RealNode
from tests.node.running import with_local_images
from tests.node.waiting import get_json as _get
from tests.node.waiting import until as _until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "cotrain-system"
OPERATOR = "cotrain-operator"
STEPS = 8000  # long enough (a minute or so here) to fault the node three times mid-run


def _pods(cp: ControlPlane, ns: str, selector: str) -> list[dict[str, Any]]:
    got = json.loads(cp.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout)
    return got["items"]  # type: ignore[no-any-return]


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _test_overlay(d: Path, operator: LocalImage, trainer: LocalImage) -> Path:
    """deploy/overlays/production with this machine's images: what a user's overlay would do."""
    d.mkdir(parents=True, exist_ok=True)
    production = os.path.relpath(ROOT / "deploy" / "overlays" / "production", d)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [production],
    }
    (d / "kustomization.yaml").write_text(
        yaml.safe_dump(with_local_images(kustomization, operator, trainer))
    )
    return d


@pytest.fixture
def deployed_operator(
    time_slicing_node: RealNode,
    operator_image: LocalImage,
    trainer_image: LocalImage,
    tmp_path: Path,
) -> Iterator[Path]:
    cp = time_slicing_node.control_plane
    overlay = _test_overlay(tmp_path / "overlay", operator_image, trainer_image)
    cp.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(overlay))
    try:
        cp.kubectl(
            "rollout", "status", "-n", SYSTEM, f"deploy/{OPERATOR}", "--timeout=180s"
        )  # fmt: skip
        yield overlay
    finally:
        # Only the Deployment goes: the CRD and RBAC stay for the other tests of the session.
        cp.kubectl("delete", "deploy", OPERATOR, "-n", SYSTEM, "--wait=true", check=False)


def _long_mixed_job(name: str) -> dict[str, Any]:
    job: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "mixed-same-gpu.yaml").read_text())
    job["metadata"]["name"] = name
    for member in job["spec"]["members"]:
        member["steps"] = STEPS
    return job


class Progress:
    """The job's reported steps, which must never go back."""

    def __init__(self, cp: ControlPlane, ns: str, name: str) -> None:
        self.cp, self.path = cp, f"/apis/cotrain.dev/v1alpha1/namespaces/{ns}/cotrainjobs/{name}"
        self.seen: dict[str, int] = {}

    def status(self) -> dict[str, Any]:
        return _get(self.cp, self.path).get("status", {})  # type: ignore[no-any-return]

    def check(self) -> dict[str, tuple[int, int]]:
        """Each member's (step, totalSteps), checked against the last seen."""
        members = self.status().get("members", {})
        steps = {
            name: (m.get("step") or 0, m.get("totalSteps") or 0) for name, m in members.items()
        }
        for name, (step, _) in steps.items():
            assert step >= self.seen.get(name, 0), (name, step, self.seen)
            self.seen[name] = step
        return steps

    def mid_run(self) -> None:
        steps = self.check()
        assert steps, "no member has reported yet"
        assert all(s < t for s, t in steps.values()), f"the job ended before the fault: {steps}"

    def advanced(self, what: str) -> None:
        """Wait until every member has gone past where it was (or has finished)."""
        before = {name: step for name, (step, _) in self.check().items()}

        def moved() -> bool:
            now = self.check()
            return bool(now) and all(
                s > before.get(n, 0) or s == t > 0 for n, (s, t) in now.items()
            )

        try:
            _until(f"progress after {what}", lambda: moved() or None)
        except AssertionError as e:
            raise AssertionError(f"{e}; status: {self.status()}") from None


def test_the_operator_deployment_runs_a_job_through_node_faults(
    time_slicing_node: RealNode, deployed_operator: Path, restricted_namespace: str
) -> None:
    node, cp, ns = time_slicing_node.node, time_slicing_node.control_plane, restricted_namespace
    operator_selector = "app.kubernetes.io/component=operator"
    [operator] = _pods(cp, SYSTEM, operator_selector)
    assert _ready(operator), operator["status"]  # the kubelet's probes against the pod
    assert operator["spec"]["nodeName"] == node.name
    # Its metrics port answers on the pod's IP, as the metrics Service's endpoints say.
    with urllib.request.urlopen(f"http://{operator['status']['podIP']}:8080/metrics") as r:
        assert "cotrain_" in r.read().decode()
    slices = _get(cp, f"/apis/discovery.k8s.io/v1/namespaces/{SYSTEM}/endpointslices")["items"]
    addresses = [a for s in slices for e in s.get("endpoints", []) for a in e["addresses"]]
    assert operator["status"]["podIP"] in addresses

    job = _long_mixed_job("faults")
    cp.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(job))
    progress = Progress(cp, ns, "faults")
    progress.advanced("the start")
    [trainer] = _pods(cp, ns, "cotrain.dev/job=faults")

    # The operator pod deleted: the Deployment makes another, which takes over.
    progress.mid_run()
    cp.kubectl("delete", "pod", "-n", SYSTEM, operator["metadata"]["name"], "--wait=true")
    _until(
        "a new operator pod Ready",
        lambda: [p for p in _pods(cp, SYSTEM, operator_selector) if _ready(p)] or None,
    )
    progress.advanced("the operator pod was deleted")
    # The kubelet restarted, then containerd killed outright: the trainer's container lives on
    # (containerd's shim holds it) and keeps reporting.
    progress.mid_run()
    node.restart("kubelet")
    progress.advanced("the kubelet restarted")
    # The device plugin registered again with the new kubelet: the GPUs are allocatable again.
    _until(
        "the GPUs allocatable again",
        lambda: (
            _get(cp, f"/api/v1/nodes/{node.name}")["status"]["allocatable"].get("nvidia.com/gpu")
            == "4"
        ),
    )
    progress.mid_run()
    node.restart("containerd", crash=True)
    progress.advanced("containerd was killed and started again")

    _until("the job Succeeded", lambda: progress.status().get("phase") == "Succeeded", timeout=300)
    status = progress.status()
    for name, member in status["members"].items():
        assert member["step"] == member["totalSteps"] == STEPS, (name, member)
        assert member["loss"] < member["firstLoss"], (name, member)
        assert member.get("restarts", 0) == 0, (name, member)
    # The same one pod all along, never restarted: nothing was duplicated or redone.
    [after] = _pods(cp, ns, "cotrain.dev/job=faults")
    assert after["metadata"]["uid"] == trainer["metadata"]["uid"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0


def test_a_deleted_trainer_pod_is_replaced_and_the_job_still_succeeds(
    time_slicing_node: RealNode, deployed_operator: Path, restricted_namespace: str
) -> None:
    cp, ns = time_slicing_node.control_plane, restricted_namespace
    job = _long_mixed_job("replaced")
    for member in job["spec"]["members"]:
        member["steps"] = 3000
    cp.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(job))
    progress = Progress(cp, ns, "replaced")
    progress.advanced("the start")
    [first] = _pods(cp, ns, "cotrain.dev/job=replaced")
    progress.mid_run()
    cp.kubectl("delete", "pod", "-n", ns, first["metadata"]["name"], "--wait=false")
    _until("the job Succeeded", lambda: progress.status().get("phase") == "Succeeded", timeout=300)
    pods = _pods(cp, ns, "cotrain.dev/job=replaced")
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    assert pods[0]["metadata"]["uid"] != first["metadata"]["uid"]
    for name, member in progress.status()["members"].items():
        assert member["step"] == member["totalSteps"] == 3000, (name, member)


def test_a_failing_member_is_retried_in_its_pod_and_the_job_still_succeeds(
    time_slicing_node: RealNode, deployed_operator: Path, restricted_namespace: str
) -> None:
    cp, ns = time_slicing_node.control_plane, restricted_namespace
    # The pod's /tmp (an emptyDir) outlives the member's first run, not the pod.
    script = (
        "import os, sys\n"
        "from cotrain_trainer import report\n"
        "if not os.path.exists('/tmp/crashed-once'):\n"
        "    open('/tmp/crashed-once', 'w').close()\n"
        "    sys.exit(3)\n"
        "for step in range(1, 11):\n"
        "    report.step(step=step, loss=1.0 / step, samples=8, total_steps=10)\n"
    )
    job = (
        a_job("retry")
        .run_policy(backoffLimit=2)
        .member(1, framework="PyTorch", command=["python", "-c", script], steps=None)
        .gpu(0, memory="1Gi")
        .gpu(1, memory="1Gi")
        .build()
    )
    cp.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(job))
    progress = Progress(cp, ns, "retry")
    _until("the job Succeeded", lambda: progress.status().get("phase") == "Succeeded", 240)
    members = progress.status()["members"]
    assert members["tf"]["restarts"] == 1, members["tf"]
    assert members["tf"]["phase"] == "Succeeded", members["tf"]
    assert members["torch"]["restarts"] == 0, members["torch"]
    [pod] = _pods(cp, ns, "cotrain.dev/job=retry")
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0  # a member, not the pod


def test_deleting_a_job_mid_run_stops_its_containers_and_removes_its_children(
    time_slicing_node: RealNode, deployed_operator: Path, restricted_namespace: str
) -> None:
    node, cp, ns = time_slicing_node.node, time_slicing_node.control_plane, restricted_namespace
    cp.wait_for_garbage_collector("cotrain.dev/v1alpha1", "CoTrainJob")
    cp.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(_long_mixed_job("doomed")))
    progress = Progress(cp, ns, "doomed")
    progress.advanced("the start")
    [pod] = _pods(cp, ns, "cotrain.dev/job=doomed")
    container = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    assert container in node.ctr("tasks", "ls", "-q").stdout.split()
    cp.kubectl("delete", "cotrainjob", "doomed", "-n", ns, "--wait=false")
    _until("the job's pods gone", lambda: not _pods(cp, ns, "cotrain.dev/job=doomed"), 90)
    _until(
        "the trainer's container stopped",
        lambda: container not in node.ctr("tasks", "ls", "-q").stdout.split(),
        60,
    )
    # The namespace's trainer identity is no child of the job: it stays for the other jobs.
    account = _get(cp, f"/api/v1/namespaces/{ns}/serviceaccounts/cotrain-trainer")
    assert not account["metadata"].get("ownerReferences")
