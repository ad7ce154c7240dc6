"""A pod runs on the real node: bound by kube-scheduler, run by the kubelet through containerd
and runc under the Pod Security "restricted" profile, and its log read back through the API
server (which fetches it from the kubelet)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from tests.node.conftest import RealNode

pytestmark = pytest.mark.slow

LINE = "hello from the cotrain test node"


def _restricted_pod(name: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",  # imported, no registry
                    "command": ["/bin/sh", "-c", f'echo "{LINE}"; id -u'],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def _wait_pod(real_node: RealNode, ns: str, name: str, timeout: float) -> dict[str, Any]:
    cp = real_node.control_plane
    deadline = time.monotonic() + timeout
    while True:
        status, body = cp.get(f"/api/v1/namespaces/{ns}/pods/{name}")
        assert status == 200, body
        pod: dict[str, Any] = json.loads(body)
        if pod["status"].get("phase") in ("Succeeded", "Failed"):
            return pod
        if time.monotonic() > deadline:
            events = cp.kubectl("get", "events", "-n", ns, "-o", "wide", check=False).stdout
            pytest.fail(
                f"pod {ns}/{name} not finished after {timeout}s: {pod['status']}\n"
                f"events:\n{events}\nkubelet log:\n{real_node.node.log_tail('kubelet')}"
            )
        time.sleep(0.5)


def test_restricted_pod_runs_to_completion_on_the_real_node(real_node: RealNode) -> None:
    cp = real_node.control_plane
    ns = f"node-{uuid.uuid4().hex[:8]}"
    cp.kubectl("create", "namespace", ns)
    cp.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    cp.wait_for_service_account(ns)
    cp.kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=json.dumps(_restricted_pod("hello", real_node.test_image.ref)),
    )

    pod = _wait_pod(real_node, ns, "hello", timeout=90)

    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    # Bound by the real scheduler: kube-scheduler is the only one that could set it, and it
    # reports the PodScheduled condition.
    assert pod["spec"]["nodeName"] == real_node.node.name
    conditions = {c["type"]: c for c in pod["status"]["conditions"]}
    assert conditions["PodScheduled"]["status"] == "True"
    events = json.loads(
        cp.kubectl(
            "get",
            "events",
            "-n",
            ns,
            "-o",
            "json",
            "--field-selector=involvedObject.name=hello,reason=Scheduled",
        ).stdout
    )["items"]
    assert [e["source"].get("component") or e.get("reportingComponent") for e in events] == [
        "default-scheduler"
    ]
    (state,) = pod["status"]["containerStatuses"]
    assert state["state"]["terminated"]["exitCode"] == 0
    assert state["state"]["terminated"]["reason"] == "Completed"
    # The API server fetched the log from the kubelet (certificate-authenticated both ways).
    logs = cp.kubectl("logs", "-n", ns, "hello").stdout.splitlines()
    assert logs == [LINE, "1000"]
