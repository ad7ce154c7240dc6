"""The real Kueue of the tests admits by quota: two Workloads asking one GPU each on a
ClusterQueue with one GPU of quota; one is admitted, the other waits for it, in Kueue's words,
and is admitted once the first is gone. Its webhooks answer for its own kinds."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.controlplane.cluster import ControlPlane, KubectlError
from tests.controlplane.kueue import Kueue
from tests.fixtures.kube import wait_for

pytestmark = pytest.mark.slow
API = "kueue.x-k8s.io/v1beta2"


def _workload(name: str, queue: str, gpus: int) -> dict[str, Any]:
    container = {
        "name": "c",
        "image": "busybox",
        "resources": {"requests": {"nvidia.com/gpu": str(gpus), "cpu": "100m"}},
    }
    return {
        "apiVersion": API,
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {
            "queueName": queue,
            "podSets": [
                {"name": "main", "count": 1, "template": {"spec": {"containers": [container],
                                                                   "restartPolicy": "Never"}}}
            ],
        },
    }  # fmt: skip


def _condition(cp: ControlPlane, ns: str, name: str, kind: str) -> dict[str, Any] | None:
    got = json.loads(cp.kubectl("get", "workload", name, "-n", ns, "-o", "json").stdout)
    conditions = got.get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == kind), None)


def test_kueue_admits_workloads_by_quota(control_plane: ControlPlane, kueue: Kueue) -> None:
    cp = control_plane
    suffix = uuid.uuid4().hex[:6]
    ns, flavor, cq = f"kq-{suffix}", f"gpus-{suffix}", f"cq-{suffix}"
    cp.kubectl("create", "namespace", ns)
    objects = [
        {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": flavor}},
        {
            "apiVersion": API,
            "kind": "ClusterQueue",
            "metadata": {"name": cq},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": flavor,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "4"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": "1"},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": API,
            "kind": "LocalQueue",
            "metadata": {"name": "team-a", "namespace": ns},
            "spec": {"clusterQueue": cq},
        },
    ]
    cp.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    for name in ("first", "second"):
        cp.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(_workload(name, "team-a", 1)))
        if name == "first":
            admitted = wait_for(
                "the first admitted",
                lambda: (c := _condition(cp, ns, "first", "Admitted")) and c["status"] == "True",
                timeout=60,
            )
            assert admitted
    waiting = wait_for(
        "the second refused quota",
        lambda: (
            (c := _condition(cp, ns, "second", "QuotaReserved")) and c["status"] == "False" and c
        ),
        timeout=60,
    )
    assert "nvidia.com/gpu" in waiting["message"], waiting
    assert (_condition(cp, ns, "second", "Admitted") or {}).get("status") != "True"
    cp.kubectl("delete", "workload", "first", "-n", ns)
    wait_for(
        "the second admitted once the first is gone",
        lambda: (c := _condition(cp, ns, "second", "Admitted")) and c["status"] == "True",
        timeout=60,
    )
    # Kueue's validating webhook answers for its own kinds: an admitted Workload's pod sets are
    # immutable, which only the webhook checks (the CRD's schema would let the change through).
    patch = [
        {
            "op": "replace",
            "path": "/spec/podSets/0/template/spec/containers/0/resources/requests/cpu",
            "value": "200m",
        }
    ]
    with pytest.raises(KubectlError) as refused:
        cp.kubectl("patch", "workload", "second", "-n", ns, "--type=json", "-p", json.dumps(patch))
    assert "admission webhook" in refused.value.stderr, refused.value.stderr
    cp.kubectl("delete", "namespace", ns, "--wait=false")
