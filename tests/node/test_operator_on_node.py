"""The real operator on the real node: a pod kube-scheduler cannot place shows in the job's
conditions, in the scheduler's own words, and mends once the GPUs are free.

Another tenant's pod holds both fake GPUs; the operator, which watches only its own pods, sees
room and creates the job's pod, and the real scheduler then says why it cannot bind it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.jobs import a_job
from tests.node.conftest import RealNode
from tests.node.running import host_operator, job_path
from tests.node.test_real_node import _restricted_pod
from tests.node.waiting import get_json as _get
from tests.node.waiting import until as _until

pytestmark = pytest.mark.slow


def _hog(name: str, image: str, gpus: int) -> dict[str, Any]:
    """Someone else's pod (no CoTrain label) that holds GPUs."""
    pod = _restricted_pod(name, image)
    pod["spec"]["terminationGracePeriodSeconds"] = 0
    container = pod["spec"]["containers"][0]
    container["command"] = ["/bin/sh", "-c", "sleep 600"]
    container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return pod


def test_a_pod_the_scheduler_cannot_place_shows_in_the_jobs_conditions(
    mps_node: RealNode, restricted_namespace: str, tmp_path: Path
) -> None:
    cp, ns = mps_node.control_plane, restricted_namespace
    hog = _hog("hog", mps_node.test_image.ref, gpus=2)
    cp.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(hog))
    _until(
        "the other tenant's pod on both GPUs",
        lambda: _get(cp, f"/api/v1/namespaces/{ns}/pods/hog")["status"].get("phase") == "Running",
    )
    with host_operator(mps_node, None, ns, tmp_path):
        job = a_job("waits").sharing(mode="MPS").build()
        cp.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(job))
        path = job_path(ns, "waits")

        def schedulable() -> dict[str, Any] | None:
            conditions = _get(cp, path).get("status", {}).get("conditions", [])
            return next((c for c in conditions if c["type"] == "Schedulable"), None)

        refused = _until(
            "the scheduler's verdict in the job",
            lambda: (c := schedulable()) and c["status"] == "False" and c,
        )
        assert refused["reason"] == "Unschedulable"
        assert "pod waits-gpu-0:" in refused["message"]
        assert "Insufficient nvidia.com/gpu" in refused["message"]
        status = _get(cp, path)["status"]
        assert status["phase"] == "Pending"
        events = json.loads(cp.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
        warned = [e for e in events if e["involvedObject"]["name"] == "waits"]
        assert [e["reason"] for e in warned].count("Unschedulable") == 1

        # The other tenant leaves: the scheduler binds the pod and the condition mends.
        cp.kubectl("delete", "pod", "hog", "-n", ns, "--wait=true")
        mended = _until(
            "the job schedulable again",
            lambda: (c := schedulable()) and c["status"] == "True" and c,
            timeout=90,
        )
        assert mended["reason"] == "Scheduled"
        assert f"waits-gpu-0 on {mps_node.node.name}" in mended["message"]
