"""Smoke tests for the local control plane (fixtures from tests.controlplane.plugin)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.slow


def _ns(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _create_namespace(kube_api, name: str) -> None:
    client.CoreV1Api(kube_api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    )


def test_kubectl_get_ns(control_plane):
    out = control_plane.kubectl("get", "ns", "-o", "name").stdout.split()
    assert "namespace/default" in out
    assert "namespace/kube-system" in out
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["major"] == "1"


def test_namespace_and_configmap_via_python_client(kube_api):
    core = client.CoreV1Api(kube_api)
    ns = _ns("smoke")
    _create_namespace(kube_api, ns)
    core.create_namespaced_config_map(
        ns,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm"), data={"k": "v"}),
    )
    assert core.read_namespaced_config_map("cm", ns).data == {"k": "v"}
    names = [n.metadata.name for n in core.list_namespace().items]
    assert ns in names


def test_rbac_is_enforced(control_plane, kube_api):
    ns = _ns("rbac")
    _create_namespace(kube_api, ns)
    sa_user = f"system:serviceaccount:{ns}:robot"

    # kubectl auth can-i (impersonation by the admin) says no ...
    can_i = control_plane.kubectl(
        "auth", "can-i", "list", "secrets", "-n", ns, as_user=sa_user, check=False
    )
    assert can_i.returncode == 1, can_i
    assert can_i.stdout.strip() == "no", can_i

    # ... a SubjectAccessReview agrees ...
    sar = client.AuthorizationV1Api(kube_api).create_subject_access_review(
        client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=sa_user,
                groups=["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
                resource_attributes=client.V1ResourceAttributes(
                    namespace=ns, verb="list", resource="secrets"
                ),
            )
        )
    )
    assert sar.status.allowed is False

    # ... and a real ServiceAccount token (TokenRequest API) is refused with 403.
    token = control_plane.service_account_token(ns, "robot")
    status, body = control_plane.get(f"/api/v1/namespaces/{ns}/secrets", token=token)
    assert status == 403, body
    with control_plane.api_client(token) as sa_api:
        with pytest.raises(ApiException) as exc:
            client.CoreV1Api(sa_api).list_namespaced_secret(ns)
        assert exc.value.status == 403

    # Granting a Role makes it allowed: RBAC is live, not AlwaysDeny.
    control_plane.kubectl(
        "create", "role", "secret-reader", "-n", ns, "--verb=list", "--resource=secrets"
    )
    control_plane.kubectl(
        "create",
        "rolebinding",
        "robot-secret-reader",
        "-n",
        ns,
        "--role=secret-reader",
        f"--serviceaccount={ns}:robot",
    )
    deadline = time.monotonic() + 10
    while control_plane.get(f"/api/v1/namespaces/{ns}/secrets", token=token)[0] != 200:
        assert time.monotonic() < deadline, "rolebinding never took effect"
        time.sleep(0.2)
    kubeconfig = control_plane.service_account_kubeconfig(ns, "robot")
    out = control_plane.kubectl("get", "secrets", "-n", ns, kubeconfig=kubeconfig)
    assert out.returncode == 0
    denied = control_plane.kubectl(
        "get", "configmaps", "-n", ns, kubeconfig=kubeconfig, check=False
    )
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()


def test_pod_admitted_in_fresh_namespace(control_plane, kube_api):
    """ServiceAccount admission must not reject pods in a brand-new namespace."""
    core = client.CoreV1Api(kube_api)
    ns = _ns("pods")
    _create_namespace(kube_api, ns)
    pod = core.create_namespaced_pod(
        ns,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="p"),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
        ),
    )
    # No kubelet/scheduler: the pod is stored and stays Pending.
    assert pod.status.phase == "Pending"
    if control_plane.controller_manager:
        assert pod.spec.service_account_name == "default"


def test_garbage_collector_deletes_dependents(control_plane, kube_api):
    if not control_plane.controller_manager:
        pytest.skip("kube-controller-manager not running")
    core = client.CoreV1Api(kube_api)
    ns = _ns("gc")
    _create_namespace(kube_api, ns)
    owner = core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    core.create_namespaced_config_map(
        ns,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name="child",
                owner_references=[
                    client.V1OwnerReference(
                        api_version="v1",
                        kind="ConfigMap",
                        name="owner",
                        uid=owner.metadata.uid,
                    )
                ],
            )
        ),
    )
    core.delete_namespaced_config_map("owner", ns)
    deadline = time.monotonic() + 30
    while any(cm.metadata.name == "child" for cm in core.list_namespaced_config_map(ns).items):
        assert time.monotonic() < deadline, "garbage collector did not delete the dependent"
        time.sleep(0.2)


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.smoke.cotrain.test"},
    "spec": {
        "group": "smoke.cotrain.test",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def test_garbage_collector_handles_new_crd(control_plane, kube_api):
    """Dependents of custom resources are collected once wait_for_garbage_collector returns."""
    if not control_plane.controller_manager:
        pytest.skip("kube-controller-manager not running")
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(WIDGET_CRD))
    try:
        control_plane.kubectl(
            "wait", "--for=condition=Established", "crd/widgets.smoke.cotrain.test"
        )
        waited = control_plane.wait_for_garbage_collector("smoke.cotrain.test/v1", "Widget")
        assert waited < 90
        ns = _ns("crdgc")
        _create_namespace(kube_api, ns)
        custom = client.CustomObjectsApi(kube_api)
        owner = custom.create_namespaced_custom_object(
            "smoke.cotrain.test",
            "v1",
            ns,
            "widgets",
            {"apiVersion": "smoke.cotrain.test/v1", "kind": "Widget", "metadata": {"name": "w"}},
        )
        core = client.CoreV1Api(kube_api)
        core.create_namespaced_config_map(
            ns,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(
                    name="child",
                    owner_references=[
                        client.V1OwnerReference(
                            api_version="smoke.cotrain.test/v1",
                            kind="Widget",
                            name="w",
                            uid=owner["metadata"]["uid"],
                        )
                    ],
                )
            ),
        )
        custom.delete_namespaced_custom_object("smoke.cotrain.test", "v1", ns, "widgets", "w")
        deadline = time.monotonic() + 10
        while any(cm.metadata.name == "child" for cm in core.list_namespaced_config_map(ns).items):
            assert time.monotonic() < deadline, "dependent of a custom resource not collected"
            time.sleep(0.2)
    finally:
        control_plane.kubectl("delete", "crd", "widgets.smoke.cotrain.test", "--wait=false")


def _pids_with_path_in_cmdline(path: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(path).encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def test_stop_leaves_no_processes(control_plane_factory):
    cp = control_plane_factory()
    pids = cp.pids
    assert set(pids) >= {"etcd", "kube-apiserver"}
    assert cp.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    for pid in pids.values():
        os.kill(pid, 0)  # alive
    cp.stop()
    for name, pid in pids.items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not Path(f"/proc/{pid}").exists(), name
    assert _pids_with_path_in_cmdline(cp.workdir) == []
    cp.stop()  # idempotent
