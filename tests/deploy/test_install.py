"""`kubectl apply -k deploy/overlays/production` on a real API server, as docs/install.md says.

A control plane of its own runs the deployment and replicaset controllers besides the usual
ones, so the Deployment really becomes a Pod, which the namespace's Pod Security admission
(enforce: restricted) must accept. There is no kubelet: the pod stays Pending, which is all this
needs. RBAC is checked the way the API server evaluates it (`kubectl auth can-i`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.cluster import KCM_CONTROLLERS, ControlPlane
from tests.deploy.conftest import ROOT, find

OPERATOR = "system:serviceaccount:cotrain-system:cotrain-operator"
Render = Callable[[str | Path], list[dict[str, Any]]]


@pytest.fixture(scope="module")
def installed(control_plane_factory: Callable[..., ControlPlane]) -> Iterator[ControlPlane]:
    plane = control_plane_factory(
        kcm_controllers=(*KCM_CONTROLLERS, "deployment-controller", "replicaset-controller")
    )
    # The steps of docs/install.md.
    plane.kubectl("apply", "--server-side", "-k", str(ROOT / "deploy/overlays/production"))
    plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/cotrainjobs.cotrain.dev"
    )
    yield plane
    plane.stop()


def wait_for_operator_pod(plane: ControlPlane, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        pods = json.loads(
            plane.kubectl(
                "get",
                "pods",
                "-n",
                "cotrain-system",
                "-l",
                "app.kubernetes.io/component=operator",
                "-o",
                "json",
            ).stdout
        )["items"]
        if pods:
            return pods[0]  # type: ignore[no-any-return]
        # Why not yet: a ReplicaSet refused by admission says so in its conditions.
        last = plane.kubectl("get", "replicasets", "-n", "cotrain-system", "-o", "yaml").stdout
        time.sleep(0.5)
    raise AssertionError(f"no operator pod after {timeout}s; replicasets:\n{last}")


def test_the_operator_pod_is_admitted_under_pod_security_restricted(
    installed: ControlPlane,
) -> None:
    pod = wait_for_operator_pod(installed)
    assert pod["spec"]["serviceAccountName"] == "cotrain-operator"
    assert pod["spec"]["containers"][0]["image"].startswith("ghcr.io/cotrain/operator:")
    namespace = json.loads(installed.kubectl("get", "ns", "cotrain-system", "-o", "json").stdout)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_each_overlays_pod_template_passes_admission(
    installed: ControlPlane, kustomize: Render, overlay: str
) -> None:
    """The pod each overlay would run, created for real (server dry run) in the namespace."""
    deployment = find(kustomize(f"deploy/overlays/{overlay}"), "Deployment", "cotrain-operator")
    template = deployment["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"admission-{overlay}", **template["metadata"]},
        "spec": template["spec"],
    }
    result = installed.kubectl(
        "create", "--dry-run=server", "-n", "cotrain-system", "-f", "-", input=json.dumps(pod)
    )
    assert "created (server dry run)" in result.stdout
    assert "violate" not in result.stderr.lower(), result.stderr


def test_admission_would_refuse_a_pod_that_is_not_restricted(installed: ControlPlane) -> None:
    """Guards the test above: the namespace really enforces the profile."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    result = installed.kubectl(
        "create",
        "--dry-run=server",
        "-n",
        "cotrain-system",
        "-f",
        "-",
        input=json.dumps(pod),
        check=False,
    )
    assert result.returncode != 0
    assert "PodSecurity" in result.stderr


def can_i(plane: ControlPlane, *args: str) -> bool:
    result = plane.kubectl("auth", "can-i", *args, as_user=OPERATOR, check=False)
    return result.stdout.strip() == "yes"


@pytest.mark.parametrize(
    "request_args",
    [
        ("watch", "cotrainjobs.cotrain.dev", "--all-namespaces"),
        ("patch", "cotrainjobs.cotrain.dev", "--subresource=status", "-n", "team-a"),
        ("create", "pods", "-n", "team-a"),
        ("delete", "pods", "-n", "team-a"),
        ("list", "nodes"),
        ("create", "serviceaccounts", "-n", "team-a"),
        ("create", "services", "-n", "team-a"),
        ("create", "rolebindings.rbac.authorization.k8s.io", "-n", "team-a"),
        ("create", "events", "-n", "team-a"),
        (
            "get",
            "validatingadmissionpolicies.admissionregistration.k8s.io/"
            "cotrain-trainer-reports-own-job",
        ),
    ],
    ids=" ".join,
)
def test_the_operator_may_do_what_it_does(
    installed: ControlPlane, request_args: tuple[str, ...]
) -> None:
    assert can_i(installed, *request_args)


@pytest.mark.parametrize(
    "request_args",
    [
        ("get", "secrets", "-n", "team-a"),
        ("list", "secrets", "--all-namespaces"),
        ("get", "secrets", "-n", "cotrain-system"),
        ("create", "deployments.apps", "-n", "team-a"),
        ("delete", "services", "-n", "team-a"),
        ("update", "cotrainjobs.cotrain.dev", "-n", "team-a"),
        ("patch", "nodes"),
        ("delete", "namespaces"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("bind", "clusterroles.rbac.authorization.k8s.io"),
        ("escalate", "roles.rbac.authorization.k8s.io", "-n", "team-a"),
        ("create", "roles.rbac.authorization.k8s.io", "-n", "team-a"),
        ("impersonate", "serviceaccounts", "-n", "team-a"),
        ("create", "pods", "--subresource=exec", "-n", "team-a"),
        ("update", "customresourcedefinitions.apiextensions.k8s.io"),
        ("list", "validatingadmissionpolicies.admissionregistration.k8s.io"),
        ("get", "validatingadmissionpolicies.admissionregistration.k8s.io/other"),
    ],
    ids=" ".join,
)
def test_the_operator_may_not_do_anything_else(
    installed: ControlPlane, request_args: tuple[str, ...]
) -> None:
    assert not can_i(installed, *request_args)
