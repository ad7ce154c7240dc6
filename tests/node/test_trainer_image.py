"""The trainer image built from trainer_image/Dockerfile, run by the real kubelet under Pod
Security restricted: uid 1000 on a read-only root filesystem with /tmp its only writable place,
the in-cluster API reached through the "kubernetes" Service, and the mixed example trained to
Succeeded by real PyTorch and TensorFlow with the operator's own pods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controlplane.images import LocalImage
from tests.controlplane.node import resolve
from tests.fixtures.jobs import a_job
from tests.node.conftest import RealNode
from tests.node.running import assert_trained, events, host_operator, job_path, run_operator_job
from tests.node.test_real_node import _restricted_pod
from tests.node.waiting import get_json as _get
from tests.node.waiting import until as _until

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# What a framework, matplotlib and a user's program write, run in the image as the pod runs it.
PROBE = """
import json, os, pathlib, urllib.request
out = {"uid": os.getuid(), "gid": os.getgid(), "home": os.environ["HOME"]}
try:
    open("/opt/venv/written-by-the-pod", "w")
    out["root_writable"] = True
except OSError:
    out["root_writable"] = False
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.plot([1, 2], [3, 4])
plt.savefig("/tmp/plot.png")
import torch
import tensorflow as tf
x = torch.ones(2, requires_grad=True)
(x * x).sum().backward()
out["torch"] = torch.__version__
out["grad"] = x.grad.tolist()
out["tf"] = tf.__version__
out["tf_sum"] = float(tf.reduce_sum(tf.ones([3])))
pathlib.Path(os.path.expanduser("~/.cache/a-users-dataset")).mkdir(parents=True)
from kubernetes import client, config
config.load_incluster_config()
out["api"] = client.VersionApi().get_code().git_version
out["tmp"] = sorted(os.listdir("/tmp"))
print("PROBE " + json.dumps(out), flush=True)
"""


def test_the_trainer_image_runs_as_uid_1000_on_a_read_only_root_and_reaches_the_api(
    real_node: RealNode, trainer_image: LocalImage, restricted_namespace: str
) -> None:
    cp, ns = real_node.control_plane, restricted_namespace
    pod = _restricted_pod("probe", trainer_image.ref)
    container = pod["spec"]["containers"][0]
    container["command"] = ["python", "-c", PROBE]
    container["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    pod["spec"]["volumes"] = [{"name": "tmp", "emptyDir": {}}]
    cp.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(pod))
    path = f"/api/v1/namespaces/{ns}/pods/probe"
    done = _until(
        "the probe pod to finish",
        lambda: (p := _get(cp, path))["status"].get("phase") in ("Succeeded", "Failed") and p,
        timeout=240,
    )
    logs = cp.kubectl("logs", "-n", ns, "probe", check=False).stdout
    assert done["status"]["phase"] == "Succeeded", (logs, events(cp, ns))
    line = next(x for x in logs.splitlines() if x.startswith("PROBE "))
    seen = json.loads(line.removeprefix("PROBE "))
    assert (seen["uid"], seen["gid"]) == (1000, 1000)
    assert seen["root_writable"] is False
    assert seen["home"] == "/tmp"
    assert seen["torch"].startswith("2.13.0")
    assert seen["tf"] == "2.21.0"
    assert seen["grad"] == [2.0, 2.0]
    assert seen["tf_sum"] == 3.0
    server = json.loads(cp.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert seen["api"] == server["gitVersion"]
    # Every cache went to /tmp: matplotlib's, the user's ~/.cache and the plot itself.
    assert {"matplotlib", ".cache", "plot.png"} <= set(seen["tmp"])


@pytest.mark.parametrize("placement", ["SameGPU", "PodPerMember"])
def test_the_mixed_example_trains_to_success_in_the_trainer_image(
    time_slicing_node: RealNode,
    trainer_image: LocalImage,
    restricted_namespace: str,
    tmp_path: Path,
    placement: str,
) -> None:
    """The example as written (SameGPU: both members in one pod), and with each member in a
    pod of its own on the same time-sliced GPU."""
    cp, ns = time_slicing_node.control_plane, restricted_namespace
    example = EXAMPLES / "mixed-same-gpu.yaml"
    document = yaml.safe_load(example.read_text())
    document["spec"]["placement"]["strategy"] = placement
    name = document["metadata"]["name"]
    members = [m["name"] for m in document["spec"]["members"]]
    pods_wanted = 1 if placement == "SameGPU" else len(members)

    def finished_pods() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = _get(cp, f"/api/v1/namespaces/{ns}/pods")["items"]
        done = [p for p in items if p["status"].get("phase") == "Succeeded"]
        return items if len(done) == len(items) == pods_wanted else None

    with host_operator(time_slicing_node, trainer_image, ns, tmp_path):
        if placement == "SameGPU":
            cp.kubectl("apply", "-n", ns, "-f", str(example))
        else:
            cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(document))
        waited = cp.kubectl(
            "wait", "-n", ns, "--for=condition=Succeeded", "--timeout=300s", f"ctj/{name}",
            check=False,
        )  # fmt: skip
        job = _get(cp, job_path(ns, name))
        assert waited.returncode == 0, (job.get("status"), events(cp, ns))
        # The trainer reports the last step, then exits: the kubelet's word on the pod follows.
        pods = _until("the trainer pods to exit", finished_pods, timeout=60)
    status = job["status"]
    assert status["phase"] == "Succeeded"
    assert status["progress"] == "100%"
    assert_trained(status, members)
    for member in members:
        assert status["members"][member]["totalSteps"] == 300
    # Placed by kube-scheduler on the node, run by the kubelet to Succeeded.
    assert len(pods) == pods_wanted, [p["metadata"]["name"] for p in pods]
    assert status["sharing"]["node"] == time_slicing_node.node.name
    logs = ""
    for pod in pods:
        assert pod["spec"]["nodeName"] == time_slicing_node.node.name
        assert pod["status"]["phase"] == "Succeeded"
        assert pod["spec"]["containers"][0]["image"] == trainer_image.ref
        scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
        assert scheduled["status"] == "True"
        logs += cp.kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout
    # kubectl logs, through the kubelet, shows each member's own lines.
    for member in members:
        assert f"[{member}]" in logs, logs[-3000:]
    # kubectl get cotrainjobs: every printer column filled.
    table = cp.kubectl("get", "cotrainjobs", "-n", ns, name).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert len(row) == len(header), table
    assert "<none>" not in row, table
    assert row[0] == name, table
    assert "Succeeded" in row, table


def test_a_member_over_its_container_memory_limit_is_oom_killed_by_the_kernel(
    time_slicing_node: RealNode,
    trainer_image: LocalImage,
    restricted_namespace: str,
    tmp_path: Path,
) -> None:
    """A real kernel OOM kill in the pod's memory cgroup (cgroup v1 on this host, where the
    supervisor reads memory.oom_control's count): the member's status says OOMKilled and how
    to fix it, and the job fails with nothing retried."""
    hog = "import time\nheld = b'x' * (2 << 30)\ntime.sleep(60)\n"
    job = (
        a_job("hog")
        .member(0, command=["python", "-c", hog], resources={"limits": {"memory": "512Mi"}})
        .gpu(0, memory="1Gi")
        .run_policy(backoffLimit=0)
        .build()
    )
    del job["spec"]["members"][1:]  # the pod's limit is its one member's
    ran = run_operator_job(time_slicing_node, trainer_image, restricted_namespace, job, tmp_path)
    status = ran.status
    assert status["phase"] == "Failed", status
    member = status["members"]["torch"]
    assert member["phase"] == "Failed", member
    # No retry left (backoffLimit 0): the job says so, and why the one run ended.
    assert member["reason"] == "BackoffLimitExceeded", member
    assert member["message"].startswith("OOMKilled: killed by the kernel's out-of-memory"), member
    assert member["exitCode"] == 137, member
    # The kernel killed the member alone: the supervisor, in the same cgroup, lived to say so.
    [pod] = ran.pods.values()
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["memory"] == str(512 << 20)  # the members' limits summed, in bytes


# Two members of one pod, each with its own memory limit (the pod's is their sum, 900Mi). The
# culprit holds 300Mi, over its own 200Mi; the victim then grows within its own 700Mi until the
# pod's limit is reached and the kernel kills the largest process in the cgroup: the victim.
# Their second runs (the pod's /tmp remembers the first) train ten steps and succeed.
CULPRIT = """
import os, time
from cotrain_trainer import report
if not os.path.exists("/tmp/culprit-ran"):
    open("/tmp/culprit-ran", "w").close()
    held = b"x" * (300 << 20)
    open("/tmp/culprit-holds", "w").close()
    time.sleep(120)
for step in range(1, 11):
    report.step(step=step, loss=1.0 / step, samples=8, total_steps=10)
"""
VICTIM = """
import os, time
from cotrain_trainer import report
if not os.path.exists("/tmp/victim-ran"):
    open("/tmp/victim-ran", "w").close()
    while not os.path.exists("/tmp/culprit-holds"):
        time.sleep(0.05)
    held = []
    while True:
        held.append(b"x" * (25 << 20))
        time.sleep(0.1)
for step in range(1, 11):
    report.step(step=step, loss=1.0 / step, samples=8, total_steps=10)
"""


def test_a_member_the_kernel_kills_for_a_co_tenant_s_memory_is_not_charged(
    time_slicing_node: RealNode,
    trainer_image: LocalImage,
    restricted_namespace: str,
    tmp_path: Path,
) -> None:
    """A real kernel OOM kill of the member within its own limit, because its co-tenant was
    over its own: the victim is CoTenantFault (restarted free), the co-tenant charged."""
    job = (
        a_job("blame")
        .run_policy(backoffLimit=1)
        .member(0, name="victim", command=["python", "-c", VICTIM], steps=None)
        .member(
            1, name="culprit", framework="PyTorch", command=["python", "-c", CULPRIT], steps=None
        )
        .member(0, resources={"limits": {"memory": "700Mi"}})
        .member(1, resources={"limits": {"memory": "200Mi"}})
        .gpu(0, memory="1Gi")
        .gpu(1, memory="1Gi")
        .build()
    )
    ns, cp = restricted_namespace, time_slicing_node.control_plane
    ran = run_operator_job(time_slicing_node, trainer_image, ns, job, tmp_path)
    [pod] = ran.pods.values()
    logs = cp.kubectl("logs", "-n", ns, pod["metadata"]["name"], check=False).stdout
    status = ran.status
    assert status["phase"] == "Succeeded", (status, logs[-3000:])
    victim, culprit = status["members"]["victim"], status["members"]["culprit"]
    assert victim.get("restarts", 0) == 0, victim
    assert culprit["restarts"] == 1, culprit
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["memory"] == str(900 << 20)
    # What each said while it restarted, in the pod's log through the kubelet.
    blamed = [x for x in logs.splitlines() if x.startswith("[victim] Restarting (CoTenantFault:")]
    assert blamed, logs[-3000:]
    assert "OOMKilled" in blamed[0], blamed
    assert "culprit held" in blamed[0], blamed
    charged = [x for x in logs.splitlines() if x.startswith("[culprit] Restarting (OOMKilled:")]
    assert charged, logs[-3000:]
    assert "over its own limit" in charged[0], charged


def test_pods_resolve_cluster_names_through_coredns(real_node: RealNode) -> None:
    node, cp = real_node.node, real_node.control_plane
    service = _get(cp, "/api/v1/namespaces/default/services/kubernetes")
    found = resolve(node.ip, "kubernetes.default.svc.cluster.local")
    assert found == [service["spec"]["clusterIP"]]
    assert resolve(node.ip, "no-such-service.default.svc.cluster.local") == []


def test_the_distributed_example_trains_across_pods_that_find_each_other_by_dns(
    exclusive_node: RealNode,
    trainer_image: LocalImage,
    restricted_namespace: str,
    tmp_path: Path,
) -> None:
    """Replica pods rendezvous by their headless Services' names (torch.distributed's
    MASTER_ADDR, TensorFlow's TF_CONFIG), which only CoreDNS answers here."""
    job = yaml.safe_load((EXAMPLES / "distributed.yaml").read_text())
    ns = restricted_namespace
    ran = run_operator_job(exclusive_node, trainer_image, ns, job, tmp_path)
    status = ran.status
    cp = exclusive_node.control_plane
    why = {n: (m.get("reason"), m.get("message", "")[-400:]) for n, m in status["members"].items()}
    failed = next((c for c in status.get("conditions", []) if c["type"] == "Failed"), {})
    assert status["phase"] == "Succeeded", (failed.get("message"), why, ran.failed_logs,
                                            events(cp, ns))  # fmt: skip
    assert_trained(status, ["torch-ddp", "tf-workers"])
    assert sorted(ran.pods) == [
        "distributed-tf-workers-0-0",
        "distributed-tf-workers-1-0",
        "distributed-torch-ddp-0",
    ]
    worker = ran.pods["distributed-tf-workers-1-0"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    topology = json.loads(env["COTRAIN_POD_PLAN"])["topology"]["tf-workers"]
    assert topology["replicas"] == 2, topology
    assert topology["replicaIndices"] == [1], topology
    assert topology["masterAddr"] == f"tf-workers-0.distributed-tf-workers.{ns}.svc", topology
    service = _get(cp, f"/api/v1/namespaces/{ns}/services/distributed-tf-workers")
    assert service["spec"]["clusterIP"] == "None"  # headless: each replica's own name


def test_the_mig_example_trains_on_slices_the_device_plugin_hands_out(
    mig_node: RealNode,
    trainer_image: LocalImage,
    restricted_namespace: str,
    tmp_path: Path,
) -> None:
    ns, cp = restricted_namespace, mig_node.control_plane
    job = yaml.safe_load((EXAMPLES / "mig-slice.yaml").read_text())
    ran = run_operator_job(mig_node, trainer_image, ns, job, tmp_path)
    status = ran.status
    assert status["phase"] == "Succeeded", (status, events(cp, ns))
    assert_trained(status, ["torch", "tf"])
    assert ran.pods
    for pod in ran.pods.values():
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/mig-1g.10gb"] == "1", limits
