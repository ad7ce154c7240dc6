"""An object the CRD would refuse but that reached the operator anyway (validation off) ends
as Failed/InvalidSpec naming the field: the operator neither crashes nor hot-loops on it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from cotrain_operator.api.crd import render_crd
from tests.controlplane.cluster import ControlPlane
from tests.fixtures.jobs import a_job
from tests.fixtures.kube import Kube, wait_for
from tests.fixtures.nodes import gpu_node
from tests.fixtures.operator_process import OperatorProcess


def _lax_crd() -> dict[str, object]:
    """Our CRD with no validation of spec at all, as after a botched install."""
    crd = render_crd()
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema.pop("x-kubernetes-validations", None)
    return crd


def _patches(operator: OperatorProcess) -> float:
    total = 0.0
    for line in operator.metrics().splitlines():
        if line.startswith("cotrain_api_requests_total{") and 'verb="patch"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_invalid_object_fails_with_invalid_spec_and_no_hot_loop(
    control_plane_factory: Callable[..., ControlPlane], tmp_path: Path
) -> None:
    cluster = control_plane_factory()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(_lax_crd()))
    cluster.kubectl("wait", "--for=condition=Established", "crd/cotrainjobs.cotrain.dev")
    api = cluster.api_client()
    kube = Kube(api)
    try:
        kube.create_node(gpu_node("gpu-a", sharing="time-slicing", replicas=4))
        bad = a_job("bad").member(framework="Jax").sharing(migProfile="1g.10gb").build()
        kube.create_job("default", bad)
        # What used to crash validation with decimal.Overflow, retried forever as an error.
        kube.create_job("default", a_job("huge").gpu(memory="1e1000000").build())
        kube.create_job("default", a_job("good").build())
        operator = OperatorProcess(cluster.kubeconfig, tmp_path, namespace="default")
        operator.start()
        try:
            status = kube.wait_phase("default", "bad", "Failed")
            failed = kube.condition("default", "bad", "Failed")
            assert failed is not None
            assert failed["reason"] == "InvalidSpec"
            assert "spec.members[0].framework: must be one of" in failed["message"]
            assert status["observedGeneration"] == 1
            assert kube.pod_names("default", "bad") == []
            kube.wait_phase("default", "huge", "Failed")
            huge = kube.condition("default", "huge", "Failed")
            assert huge is not None
            assert huge["reason"] == "InvalidSpec"
            assert "spec.members[0].gpu.memory: '1e1000000' is not a quantity" in huge["message"]
            # The valid neighbour is not held up by the bad one.
            wait_for("good's pod", lambda: kube.pod_names("default", "good"))
            # Its status follows its pod: both jobs' status writes are done (and counted).
            kube.wait_phase("default", "good", "Pending")
            wait_for("three status writes counted", lambda: _patches(operator) >= 3)
            # No hot loop: the status is written once and then left alone.
            settled = _patches(operator)
            time.sleep(3)
            assert _patches(operator) == settled
            assert operator.process is not None
            assert operator.process.poll() is None
            assert not re.search(r"Traceback", operator.logs())
            assert 'kind="internal"' not in operator.metrics()
            # This cluster has the CRD alone: the operator says what keeps trainers apart.
            assert "validatingadmissionpolicies/cotrain-trainer-reports-own-job and " in (
                operator.logs()
            )
            assert "cotrain_trainer_policy_installed 0.0" in operator.metrics()
            events = cluster.kubectl("get", "events", "-n", "default", "-o", "json").stdout
            reasons = {
                e["reason"]
                for e in json.loads(events)["items"]
                if e["involvedObject"]["name"] == "bad"
            }
            assert "InvalidSpec" in reasons
        finally:
            operator.stop()
    finally:
        api.close()
