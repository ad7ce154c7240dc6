"""What the real API server does with our CRD: validation, printer columns, explain, status
subresource, and the RBAC and admission policy that keep a trainer to its own job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cotrain_operator.reconcile.access import TRAINER_SERVICE_ACCOUNT, build_trainer_identity
from tests.controlplane.cluster import ControlPlane
from tests.fixtures.cluster_state import ClusterState
from tests.fixtures.invalid_jobs import INVALID_CASES, InvalidCase
from tests.fixtures.jobs import JobBuilder, a_job
from tests.fixtures.kube import Kube, wait_for
from tests.fixtures.nodes import gpu_node

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_accepted_by_a_server_side_dry_run(
    cluster: ControlPlane, namespace: str, path: Path
) -> None:
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
    assert "(server dry run)" in result.stdout


@pytest.mark.parametrize("case", INVALID_CASES, ids=[c.id for c in INVALID_CASES])
def test_invalid_jobs_are_refused_by_the_server_naming_the_field(
    cluster: ControlPlane, namespace: str, case: InvalidCase
) -> None:
    # kubectl apply refuses a generateName before the server sees it; create sends it.
    verb = "create" if "generateName" in case.document["metadata"] else "apply"
    result = cluster.kubectl(
        verb,
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(case.document),
        check=False,
    )
    assert result.returncode != 0, f"{case.id} was accepted: {result.stdout}"
    # The server names the field the same way we do (list items by index, CEL by fieldPath).
    field = case.path.split("[")[0] if case.id.startswith("duplicate") else case.path
    assert field in result.stderr, result.stderr
    if case.fragment and any(
        rule_text in case.fragment
        for rule_text in (
            "only used with mode MIG",
            "needs the slice",
            "add up to more than 100",
            "is an MPS share",
            "either steps or epochs",
            "remove model or command",
            "set command too",
            "remove nvidia.com/*",
            "larger than its limit",
            "rename the variable",
            "only to strategy PodPerMember",
            "at most 40 characters",
            "same image",
            "at least 1Mi",
        )
    ):
        assert case.fragment in result.stderr, result.stderr


def test_python_and_server_agree_on_every_invalid_case() -> None:
    # The table is shared: the unit suite proves Python refuses each case, the test above
    # proves the server does; this guards against a case being dropped from one side.
    assert len(INVALID_CASES) >= 25


def test_get_shows_the_printer_columns(cluster: ControlPlane, kube: Kube, namespace: str) -> None:
    kube.create_job(namespace, a_job("cols").run_policy(suspend=True).build())
    kube.patch_job_status(
        namespace,
        "cols",
        {
            "phase": "Running",
            "readyMembers": "1/2",
            "progress": "40%",
            "sharing": {"mode": "MPS", "node": "gpu-7"},
        },
    )
    table = cluster.kubectl("get", "cotrainjobs", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "MODE", "READY", "PROGRESS", "AGE"]
    assert row.split()[:5] == ["cols", "Running", "MPS", "1/2", "40%"]
    wide = cluster.kubectl("get", "ctj", "-n", namespace, "-o", "wide").stdout
    assert wide.splitlines()[0].split()[:8] == [
        "NAME",
        "PHASE",
        "MODE",
        "PLACEMENT",
        "READY",
        "PROGRESS",
        "NODE",
        "AGE",
    ]
    assert "cols" in cluster.kubectl("get", "cotrain", "-n", namespace).stdout  # category


def test_explain_prints_our_field_descriptions(cluster: ControlPlane) -> None:
    text = cluster.kubectl("explain", "cotrainjob.spec.members").stdout
    assert "The training programs of the job, 1 to 8, with unique names." in text
    assert "framework" in text
    assert "-required-" in text
    gpu = cluster.kubectl("explain", "cotrainjob.spec.members.gpu.computePercent").stdout
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" in gpu


def test_status_subresource_separates_spec_from_status(kube: Kube, namespace: str) -> None:
    created = kube.create_job(namespace, a_job("gen").run_policy(suspend=True).build())
    assert created["metadata"]["generation"] == 1
    # A status write does not bump the generation, and spec sent to /status is ignored.
    patched = kube.custom.patch_namespaced_custom_object_status(
        "cotrain.dev",
        "v1alpha1",
        namespace,
        "cotrainjobs",
        "gen",
        {"status": {"phase": "Pending"}, "spec": {"successPolicy": "AnyMember"}},
        _content_type="application/merge-patch+json",
    )
    assert patched["metadata"]["generation"] == 1
    assert patched["spec"]["successPolicy"] == "AllMembers"
    assert patched["status"]["phase"] == "Pending"
    # A spec write bumps it, and status sent to the main resource is ignored.
    patched = kube.patch_job(
        namespace, "gen", {"spec": {"successPolicy": "AnyMember"}, "status": {"phase": "Failed"}}
    )
    assert patched["metadata"]["generation"] == 2
    assert patched["status"]["phase"] == "Pending"


def test_server_applies_the_schema_defaults(kube: Kube, namespace: str) -> None:
    created = kube.create_job(namespace, a_job("defaults").run_policy(suspend=True).build())
    spec = created["spec"]
    assert spec["runPolicy"]["backoffLimit"] == 3
    assert spec["successPolicy"] == "AllMembers"
    assert spec["members"][0]["batchSize"] == 32
    assert spec["members"][0]["learningRate"] == 0.001
    minimal = a_job("minimal").build()
    del minimal["spec"]["sharing"], minimal["spec"]["placement"]
    created = kube.create_job(namespace, minimal)
    assert created["spec"]["sharing"] == {"mode": "Auto"}
    assert created["spec"]["placement"]["strategy"] == "SameGPU"


def test_members_are_immutable_once_started_on_the_server(
    cluster: ControlPlane, kube: Kube, namespace: str
) -> None:
    kube.create_job(namespace, a_job("frozen").run_policy(suspend=True).build())
    kube.patch_job_status(namespace, "frozen", {"startTime": "2026-11-22T00:00:00Z"})
    document = a_job("frozen").run_policy(suspend=True).member(steps=99).build()
    result = cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(document),
        check=False,
    )
    assert result.returncode != 0
    assert "spec.members cannot change once the job has started" in result.stderr
    # Run policy stays editable (e.g. Kueue clearing suspend).
    kube.patch_job(namespace, "frozen", {"spec": {"runPolicy": {"suspend": False}}})


def _trainer_pod(cluster: ControlPlane, namespace: str, builder: JobBuilder) -> str:
    """Create a suspended job and, as the operator would build it, one of its trainer pods."""
    body = builder.run_policy(suspend=True).build()
    body["metadata"]["namespace"] = namespace
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
    name = body["metadata"]["name"]
    body["metadata"]["uid"] = cluster.kubectl(
        "get", "ctj", name, "-n", namespace, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    body["spec"]["runPolicy"]["suspend"] = False
    planned = ClusterState(body, gpu_node("n", sharing="time-slicing", replicas=8))
    planned.settle()
    pod = planned.pods[max(planned.pods)]  # for a replicated member: its last replica
    pod.pop("status")
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    return str(pod["metadata"]["name"])


# Outside the operator's "t*" namespaces: it would delete the pods of these suspended jobs, and a
# token bound to a deleted pod stops authenticating.
@pytest.mark.parametrize("namespace_prefix", ["api"])
def test_a_trainer_pod_can_patch_only_its_own_jobs_members(
    cluster: ControlPlane, namespace: str
) -> None:
    # The namespace's identity as the operator makes it; the pods as it builds them.
    for child in build_trainer_identity(namespace):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(child))
    mine = _trainer_pod(cluster, namespace, a_job("mine"))
    _trainer_pod(cluster, namespace, a_job("other"))
    split = _trainer_pod(
        cluster, namespace, a_job("split").placement(strategy="PodPerMember").member(0, replicas=2)
    )
    assert (mine, split) == ("mine-gpu-0", "split-torch-1-0")

    def as_trainer(job: str, patch: dict[str, Any], pod: str | None = mine) -> str:
        """Patch the job's status as the trainer: '' when allowed, else the refusal."""
        kubeconfig = cluster.service_account_kubeconfig(
            namespace, TRAINER_SERVICE_ACCOUNT, create=False, bound_pod=pod
        )
        result = cluster.kubectl(
            "patch",
            "ctj",
            job,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": patch}),
            kubeconfig=kubeconfig,
            check=False,
        )
        return "" if result.returncode == 0 else result.stderr

    report = {"members": {"torch": {"step": 3}}}
    # The API server loads admission policies asynchronously: wait until this one is in force.
    wait_for(
        "the trainer policy", lambda: "bound to a trainer pod" in as_trainer("mine", report, None)
    )
    assert as_trainer("mine", report) == ""
    assert as_trainer("split", report, pod=split) == ""
    refused = as_trainer("other", report)
    assert "pod mine-gpu-0 is not a trainer pod of CoTrainJob other" in refused
    refused = as_trainer("mine", {"phase": "Succeeded"})
    assert "status.phase is the operator's" in refused
    refused = as_trainer("mine", {"conditions": []})
    assert "status.conditions is the operator's" in refused
    status = json.loads(
        cluster.kubectl("get", "ctj", "mine", "-n", namespace, "-o", "json").stdout
    )["status"]
    assert status["members"]["torch"]["step"] == 3
    assert "phase" not in status
    assert "conditions" not in status

    # RBAC, as the API server evaluates it: the status of jobs, nothing else.
    trainer = f"system:serviceaccount:{namespace}:{TRAINER_SERVICE_ACCOUNT}"

    def can(*args: str) -> bool:
        result = cluster.kubectl(
            "auth", "can-i", *args, "-n", namespace, as_user=trainer, check=False
        )
        return result.stdout.strip() == "yes"

    assert can("patch", "cotrainjobs/mine", "--subresource=status")
    assert not can("patch", "cotrainjobs/mine")  # the spec stays the user's
    assert not can("get", "secrets")
    assert not can("list", "pods")
    assert not can("create", "pods")


def test_the_committed_crd_is_what_the_server_serves(cluster: ControlPlane) -> None:
    served = yaml.safe_load(
        cluster.kubectl("get", "crd", "cotrainjobs.cotrain.dev", "-o", "yaml").stdout
    )
    committed = yaml.safe_load((ROOT / "crds" / "cotrain.dev_cotrainjobs.yaml").read_text())
    assert served["spec"]["versions"][0]["schema"] == committed["spec"]["versions"][0]["schema"]
    assert served["status"]["acceptedNames"]["shortNames"] == ["ctj"]
