"""Start-up bench on the real node: from `kubectl apply` of examples/mixed-same-gpu.yaml to each
member's first step reported in the job's status, broken down, and the trainer image's size.

It starts what the node tests start (a control plane with kube-scheduler, a kubelet with
containerd and runc, the fake GPU plugin as one GPU time-sliced four ways; tests/node), imports
the trainer image built by setup, runs the operator as a host process, and applies the example
`--runs` times, one after the other. Each span is measured on the one clock of this machine:

- apply -> pod: the operator's admission (a watch on the namespace's pods, here);
- pod -> scheduled: kube-scheduler's binding (the pod's nodeName seen);
- scheduled -> container: sandbox, image and container start (the container seen running);
- container -> member: the supervisor's start (Python, `cotrain supervise`'s imports, the plan),
  up to the member's process;
- Python + CoTrain, framework + caps, first step: inside the member, from the line its pod's log
  gets at its first step (`kubectl logs --timestamps`: the runtime's stamp, which is when the
  supervisor read the step, within its 0.1 s poll);
- step -> status: the report's way into the job's status (the trainer's reporter, the API).

    python bench/startup_bench.py [--runs 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the tests/ fixtures

import yaml  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402

from tests.controlplane.cluster import ControlPlane, build_control_plane, start_control_plane  # noqa: E402
from tests.controlplane.images import busybox_image  # noqa: E402
from tests.controlplane.node import Node, NodePKI, node_control_plane_args  # noqa: E402
from tests.controlplane.project_images import project_image  # noqa: E402
from tests.fixtures.kube import install_cotrain  # noqa: E402
from tests.fixtures.operator_process import OperatorProcess  # noqa: E402
from tests.node.conftest import GFD_TIME_SLICING_LABELS, TIME_SLICING_GPUS  # noqa: E402

EXAMPLE = ROOT / "examples" / "mixed-same-gpu.yaml"
FIRST_STEP = re.compile(
    r"^(?P<stamp>\S+) \[(?P<member>[\w-]+)\] first step (?P<total>[\d.]+) s after its process"
    r" was started \(Python and CoTrain (?P<python>[\d.]+) s, framework and caps"
    r" (?P<framework>[\d.]+) s, first step (?P<step>[\d.]+) s\)$"
)
SPANS = (
    "apply->pod",
    "pod->scheduled",
    "scheduled->container",
    "container->member",
    "Python+CoTrain",
    "framework+caps",
    "first step",
    "step->status",
)


def _stamp(text: str) -> float:
    """An RFC 3339 time with up to nanoseconds, as seconds since the epoch."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(whole + "+00:00").timestamp()
    return seconds + (float(f"0.{fraction}") if fraction else 0.0)


@dataclass
class Seen:
    """When the watches first saw each thing, on this machine's clock."""

    pod_created: float | None = None
    scheduled: float | None = None
    container: float | None = None
    first_reported: dict[str, float] = field(default_factory=dict)
    phase: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _watch_pods(
    api: client.CoreV1Api, ns: str, name: str, seen: Seen, stop: threading.Event
) -> None:
    stream = watch.Watch()
    selector = f"cotrain.dev/job={name}"  # not the previous run's pods, still going
    for event in stream.stream(
        api.list_namespaced_pod, ns, label_selector=selector, timeout_seconds=600
    ):
        now = time.time()
        pod = event["object"]
        if seen.pod_created is None:
            seen.pod_created = now
        if seen.scheduled is None and pod.spec.node_name:
            seen.scheduled = now
        statuses = pod.status.container_statuses or []
        if seen.container is None and any(s.state and s.state.running for s in statuses):
            seen.container = now
        if stop.is_set():
            stream.stop()


def _watch_job(api: client.CustomObjectsApi, ns: str, name: str, seen: Seen) -> None:
    stream = watch.Watch()
    for event in stream.stream(
        api.list_namespaced_custom_object,
        "cotrain.dev",
        "v1alpha1",
        ns,
        "cotrainjobs",
        field_selector=f"metadata.name={name}",
        timeout_seconds=600,
    ):
        now = time.time()
        status = event["object"].get("status") or {}
        for member, report in (status.get("members") or {}).items():
            if (report.get("step") or 0) >= 1:
                seen.first_reported.setdefault(member, now)
        seen.phase = status.get("phase")
        if seen.phase in ("Succeeded", "Failed"):
            seen.done.set()
            stream.stop()


def one_run(cp: ControlPlane, ns: str, run: int) -> dict[str, dict[str, float]]:
    api = config.new_client_from_config(str(cp.kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    name = f"startup-{run}"
    job = yaml.safe_load(EXAMPLE.read_text())
    job["metadata"] = {"name": name, "namespace": ns}
    seen, stop = Seen(), threading.Event()
    threads = [
        threading.Thread(target=_watch_pods, args=(core, ns, name, seen, stop), daemon=True),
        threading.Thread(target=_watch_job, args=(custom, ns, name, seen), daemon=True),
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # both watches open before the apply
    applied = time.time()
    cp.kubectl("apply", "-f", "-", input=json.dumps(job))
    if not seen.done.wait(600) or seen.phase != "Succeeded":
        raise SystemExit(f"run {run}: job {name} ended {seen.phase}")
    stop.set()
    pods = core.list_namespaced_pod(ns, label_selector=f"cotrain.dev/job={name}").items
    logs = "".join(
        cp.kubectl("logs", "-n", ns, p.metadata.name, "--timestamps").stdout for p in pods
    )
    rows: dict[str, dict[str, float]] = {}
    if seen.pod_created is None or seen.scheduled is None or seen.container is None:
        raise SystemExit(f"run {run}: the pod watch missed a step: {seen}")
    for line in logs.splitlines():
        found = FIRST_STEP.match(line)
        if not found:
            continue
        member = found["member"]
        first_step = _stamp(found["stamp"])
        spawned = first_step - float(found["total"])
        rows[member] = {
            "apply->pod": seen.pod_created - applied,
            "pod->scheduled": seen.scheduled - seen.pod_created,
            "scheduled->container": seen.container - seen.scheduled,
            "container->member": spawned - seen.container,
            "Python+CoTrain": float(found["python"]),
            "framework+caps": float(found["framework"]),
            "first step": float(found["step"]),
            "step->status": seen.first_reported[member] - first_step,
            "total": seen.first_reported[member] - applied,
        }
    cp.kubectl("delete", "cotrainjob", name, "-n", ns, "--wait=true")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cotrain-startup-"))
    bin_dir = build_control_plane()
    pki = NodePKI.create(work / "node-pki")
    cp = start_control_plane(work / "cp", bin_dir, **node_control_plane_args(pki))
    results: list[dict[str, dict[str, float]]] = []
    try:
        node = Node.start(cp, bin_dir, work / "node", pki, images=[busybox_image()])
        try:
            trainer = project_image("trainer")
            imported = node.import_image(trainer)
            size = trainer.archive.stat().st_size / 2**30
            node.use_gpus(TIME_SLICING_GPUS, GFD_TIME_SLICING_LABELS)
            install_cotrain(cp)
            ns = f"startup-{uuid.uuid4().hex[:6]}"
            cp.kubectl("create", "namespace", ns)
            cp.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
            cp.wait_for_service_account(ns)
            kubeconfig = cp.service_account_kubeconfig(
                "cotrain-system", "cotrain-operator", create=False, duration="2h"
            )
            with OperatorProcess(
                kubeconfig, work / "operator", namespace=ns, trainer_image=trainer.ref
            ):
                for run in range(1, args.runs + 1):
                    results.append(one_run(cp, ns, run))
        finally:
            node.stop()
    finally:
        cp.stop()
    print(f"start-up on the real node: {EXAMPLE.relative_to(ROOT)}, {args.runs} runs")
    print(f"trainer image {trainer.ref}: archive {size:.2f} GiB, imported in {imported:.0f} s")
    print()
    members = sorted({m for rows in results for m in rows})
    header = f"{'span (s)':<22}" + "".join(
        f"{f'{m} #{i + 1}':>16}" for m in members for i in range(len(results))
    )
    print(header)
    for span in (*SPANS, "total"):
        cells = "".join(
            f"{rows[m][span]:>16.2f}" if m in rows else f"{'-':>16}"
            for m in members
            for rows in results
        )
        print(f"{span:<22}{cells}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nwork dir kept: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
