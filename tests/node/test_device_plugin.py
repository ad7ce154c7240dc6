"""GPU shares through the kubelet's real device-plugin API: fake-gpu-plugin registers fake GPUs,
kube-scheduler places the operator's own MPS trainer pod against the Node's allocatable, and the
kubelet merges the plugin's Allocate answer (NVIDIA_VISIBLE_DEVICES, the MPS pipe directory and
its /dev/shm) into the container, where nothing of the pod's own covers it."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from cotrain_operator.reconcile.access import TRAINER_SERVICE_ACCOUNT
from cotrain_operator.reconcile.job import decide
from cotrain_operator.sharing import parse_node
from tests.fixtures.jobs import a_job
from tests.node.conftest import RealNode
from tests.node.test_real_node import _wait_pod

pytestmark = pytest.mark.slow

PROBE = (
    'echo "visible=$NVIDIA_VISIBLE_DEVICES pipe=$CUDA_MPS_PIPE_DIRECTORY"; '
    'ls /dev/shm; ls "$CUDA_MPS_PIPE_DIRECTORY"; id -u'
)


def test_an_mps_trainer_pod_reaches_the_plugins_daemon_through_the_kubelets_merge(
    mps_node: RealNode,
) -> None:
    node, cp = mps_node.node, mps_node.control_plane
    gpu_node = parse_node(json.loads(cp.get(f"/api/v1/nodes/{node.name}")[1]))
    assert gpu_node is not None
    assert gpu_node.offers("nvidia.com/gpu") == 2  # from the plugin, through the kubelet

    ns = f"mps-{uuid.uuid4().hex[:8]}"
    cp.kubectl("create", "namespace", ns)
    cp.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    cp.kubectl("create", "serviceaccount", TRAINER_SERVICE_ACCOUNT, "-n", ns)
    job = a_job("mps").sharing(mode="MPS").build()
    job["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), generation=1)
    (pod,) = [
        c for c in decide(job, [], [gpu_node], datetime.now(UTC)).create if c["kind"] == "Pod"
    ]
    # The operator's pod as it is, but for its program (the test image has no trainer) and its
    # owner (no CoTrainJob object lives in this control plane).
    del pod["metadata"]["ownerReferences"]
    container = pod["spec"]["containers"][0]
    container.update(
        image=mps_node.test_image.ref, imagePullPolicy="Never", command=["/bin/sh", "-c", PROBE]
    )
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cp.kubectl("create", "-f", "-", input=json.dumps(pod))

    finished = _wait_pod(mps_node, ns, pod["metadata"]["name"], timeout=90)

    assert finished["status"]["phase"] == "Succeeded", finished["status"]
    assert finished["spec"]["nodeName"] == node.name
    logs = cp.kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout.splitlines()
    visible, pipe = logs[0].split()
    assert visible.startswith("visible=fake-gpu-")
    assert pipe == "pipe=/mps/nvidia.com/gpu/pipe"  # the plugin's, not one the pod set
    # /dev/shm and the pipe directory are the plugin's mounts: the daemon's files are there.
    assert logs[1:] == ["cuda.shm.daemon", "control", "1000"]
