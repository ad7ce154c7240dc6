"""What the real API server does with our CRD: validation, printer columns, explain, status
subresource, and the RBAC of a job's reporting identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.controlplane.cluster import ControlPlane
from tests.fixtures.invalid_jobs import INVALID_CASES, InvalidCase
from tests.fixtures.jobs import a_job
from tests.fixtures.kube import Kube

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
    result = cluster.kubectl(
        "apply",
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


def test_a_jobs_service_account_can_patch_only_its_own_status(
    cluster: ControlPlane, namespace: str
) -> None:
    # The operator makes these objects; here they come straight from the builder it uses.
    from cotrain_operator.reconcile.children import build_reporting_identity

    for name in ("mine", "other"):
        body = a_job(name).run_policy(suspend=True).build()
        body["metadata"]["namespace"] = namespace
        cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
        uid = cluster.kubectl(
            "get", "ctj", name, "-n", namespace, "-o", "jsonpath={.metadata.uid}"
        ).stdout
        body["metadata"]["uid"] = uid
        for child in build_reporting_identity(body):
            cluster.kubectl("apply", "-f", "-", input=json.dumps(child))
    trainer = f"system:serviceaccount:{namespace}:mine-trainer"

    def can(*args: str) -> bool:
        result = cluster.kubectl(
            "auth", "can-i", *args, "-n", namespace, as_user=trainer, check=False
        )
        return result.stdout.strip() == "yes"

    assert can("patch", "cotrainjobs/mine", "--subresource=status")
    assert can("get", "cotrainjobs/mine", "--subresource=status")
    assert not can("patch", "cotrainjobs/other", "--subresource=status")
    assert not can("patch", "cotrainjobs/mine")  # the spec stays the user's
    assert not can("get", "secrets")
    assert not can("list", "pods")

    # And for real, with the service account's own token.
    kubeconfig = cluster.service_account_kubeconfig(namespace, "mine-trainer", create=False)
    patch = json.dumps({"status": {"members": {"torch": {"step": 3}}}})
    ok = cluster.kubectl(
        "patch",
        "ctj",
        "mine",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        patch,
        kubeconfig=kubeconfig,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    denied = cluster.kubectl(
        "patch",
        "ctj",
        "other",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        patch,
        kubeconfig=kubeconfig,
        check=False,
    )
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()
    secrets = cluster.kubectl("get", "secrets", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert "forbidden" in secrets.stderr.lower()


def test_the_committed_crd_is_what_the_server_serves(cluster: ControlPlane) -> None:
    served = yaml.safe_load(
        cluster.kubectl("get", "crd", "cotrainjobs.cotrain.dev", "-o", "yaml").stdout
    )
    committed = yaml.safe_load((ROOT / "crds" / "cotrain.dev_cotrainjobs.yaml").read_text())
    assert served["spec"]["versions"][0]["schema"] == committed["spec"]["versions"][0]["schema"]
    assert served["status"]["acceptedNames"]["shortNames"] == ["ctj"]
