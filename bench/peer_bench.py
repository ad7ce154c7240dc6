"""Side by side with the peer: CoTrain's operator and Kubeflow's training operator v1 (v1.8.1,
built from its Go module by tests/controlplane/training-operator-module), one after the other
on the same control plane, through the same counting proxy, with the same client.

For each operator in turn: one-pod jobs (a one-member CoTrainJob; a PyTorchJob with one Master
replica), each pod requesting `nvidia.com/gpu: 1`, created N at a time by `--concurrency` client
threads: admission jobs/s (first create to last pod seen), create->pod p50/p99, CPU per admitted
job of the operator, kube-apiserver and etcd; over a short lifecycle (created, pod bound and
Running, pod Succeeded, job Succeeded, the kubelet played by the bench) its API writes and reads
per job; the watches it holds; its resident memory at 0 and with every job admitted live. Each
operator's jobs and pods are gone before the other starts (either one caches every pod it sees).

The peer runs with `--enable-scheme=pytorchjob` and as many controller threads as CoTrain has
workers (its shipped default is 1), as the admin (CoTrain as its ServiceAccount). Its validating
webhook is registered so that its certificate manager becomes ready, but matches no object: the
API server could not reach it from here (its certificate names a Service). What a webhook call
costs on each create is therefore not in the peer's numbers: the comparison favours it.

    python bench/peer_bench.py [--sizes 1,100,1000] [--concurrency 8] [--lifecycle-jobs 10]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from operator_bench import (  # noqa: E402
    POOL_LABEL,
    Bench,
    CpuMeter,
    PodWatch,
    ProxyProcess,
    _kind,
    _resource,
    bench_on,
    control_plane,
    memory_kib,
    percentile,
)

from tests.controlplane.cluster import ControlPlane, free_port  # noqa: E402
from tests.fixtures.faultproxy import write_proxy_kubeconfig  # noqa: E402
from tests.fixtures.jobs import a_job  # noqa: E402
from tests.fixtures.kube import wait_for  # noqa: E402

PEER_BUILD = ROOT / "tests" / "controlplane" / "training-operator-module" / "build.sh"
KUBEFLOW = ("kubeflow.org", "v1", "pytorchjobs")
PEER_LABEL = "training.kubeflow.org/job-name"
CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")  # fixed in its pkg/cert
WORKERS = 16  # CoTrain's default COTRAIN_WORKERS, given to the peer as --controller-threads


@dataclass
class Side:
    """One operator under the bench: how to create its job and name its pod."""

    name: str
    label: str  # the pod label whose value is the job's name
    create: Callable[[str, str], None]  # (namespace, name)
    pod: Callable[[str], str]  # job name -> its pod's name
    succeeded: Callable[[str, str], bool]  # (namespace, name)
    pid: Callable[[], int]
    # What the pod's own process reports before it exits (CoTrain's trainer: its member's end).
    finish: Callable[[str, str], None] = lambda namespace, name: None


@dataclass
class Round:
    n: int
    seconds: float
    latencies: list[float]
    cpu: dict[str, float]
    requests: int

    @property
    def rate(self) -> float:
        return self.n / self.seconds


@dataclass
class Result:
    side: str
    rounds: list[Round]
    writes: float  # per job, lifecycle
    reads: float
    written: Counter[str]
    watches: int
    rss_idle: int  # KiB
    rss_loaded: int
    live: int


def _peer_job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "Never",
                    "template": {
                        "spec": {
                            "nodeSelector": {POOL_LABEL: "bench"},
                            # The namespace enforces Pod Security restricted, as CoTrain's do.
                            "securityContext": {
                                "runAsNonRoot": True,
                                "runAsUser": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"},
                            },
                            "containers": [
                                {
                                    "name": "pytorch",
                                    "image": "ghcr.io/cotrain/trainer:0.1.0",
                                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                                    "securityContext": {
                                        "allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]},
                                    },
                                }
                            ],
                        }
                    },
                }
            }
        },
    }


def _cotrain_job(name: str) -> dict[str, Any]:
    return a_job(name).with_members(1).placement(nodeSelector={POOL_LABEL: "bench"}).build()


def _conditions_say(obj: dict[str, Any], kind: str) -> bool:
    return any(
        c.get("type") == kind and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def admit_round(bench: Bench, side: Side, n: int, tag: str) -> Round:
    namespace = bench.namespace(f"{side.name}-{tag}-{n}")
    names = [f"j{i}" for i in range(n)]
    bench.wait_quiet(quiet=1.0)
    first = bench.proxy.count()
    pids = {k: v for k, v in bench.cp.pids.items() if k in ("kube-apiserver", "etcd")}
    pids["operator"] = side.pid()
    starts: dict[str, float] = {}

    def create(name: str) -> None:
        starts[name] = time.time()
        side.create(namespace, name)

    with PodWatch(bench.cp, namespace, side.label) as watch, CpuMeter(pids) as meter:
        with ThreadPoolExecutor(bench.concurrency) as pool:
            list(pool.map(create, names))
        missing = watch.wait(n)
        bench.wait_quiet(quiet=1.5)
    if missing:
        raise RuntimeError(f"{side.name}: {missing} of {n} jobs got no pod")
    seconds = max(watch.seen.values()) - min(starts.values())
    return Round(
        n=n,
        seconds=seconds,
        latencies=[watch.seen[name] - starts[name] for name in names],
        cpu=meter.used,
        requests=len(bench.proxy.log(first)),
    )


def lifecycle(bench: Bench, side: Side, jobs: int) -> tuple[Counter[str], Counter[str]]:
    """Created, pod bound and Running, pod Succeeded, job Succeeded: the operator's writes and
    reads in that time (watches apart)."""
    kube, namespace = bench.kube, bench.namespace(f"{side.name}-life")
    names = [f"life{i}" for i in range(jobs)]
    bench.wait_quiet(quiet=1.0)
    first = bench.proxy.count()

    def each(action: Callable[[str], Any]) -> None:
        with ThreadPoolExecutor(min(8, jobs)) as pool:
            list(pool.map(action, names))
        bench.wait_quiet(quiet=1.0)

    each(lambda name: side.create(namespace, name))
    for name in names:
        wait_for(
            f"{name}'s pod",
            lambda n=name: (
                kube.core.list_namespaced_pod(namespace, label_selector=f"{side.label}={n}").items
            ),
            timeout=60,
        )
    bench.wait_quiet(quiet=1.0)
    nodes = bench.nodes
    each(lambda name: kube.bind_pod(namespace, side.pod(name), nodes[names.index(name) % 4]))
    each(lambda name: kube.set_pod_phase(namespace, side.pod(name), "Running"))
    each(lambda name: side.finish(namespace, name))
    each(lambda name: kube.set_pod_phase(namespace, side.pod(name), "Succeeded", 0))
    for name in names:
        wait_for(f"{name} Succeeded", lambda n=name: side.succeeded(namespace, n), timeout=60)
    bench.wait_quiet(quiet=2.0)
    log = bench.proxy.log(first)
    writes = Counter(f"{r.method} {_resource(r)}" for r in log if _kind(r) == "write")
    reads = Counter(f"{r.method} {_resource(r)}" for r in log if _kind(r) == "read")
    return writes, reads


def clear(bench: Bench, namespaces: list[str]) -> None:
    """Every namespace of a side gone, with its jobs and pods: the next operator caches pods."""
    for namespace in namespaces:
        bench.cp.kubectl("delete", "namespace", namespace, "--wait=false")
    wait_for(
        "the side's namespaces gone",
        lambda: (
            not [
                ns
                for ns in bench.kube.core.list_namespace().items
                if ns.metadata.name in namespaces
            ]
        ),
        timeout=600,
    )


def measure(bench: Bench, side: Side, sizes: list[int], lifecycle_jobs: int) -> Result:
    bench.wait_quiet(quiet=2.0)
    idle = memory_kib(side.pid())["VmRSS"]
    writes, reads = lifecycle(bench, side, lifecycle_jobs)
    rounds = [admit_round(bench, side, n, "adm") for n in sizes]
    live = sum(sizes) + lifecycle_jobs
    loaded = memory_kib(side.pid())["VmRSS"]
    watches = bench.proxy.open_watches()
    return Result(
        side=side.name,
        rounds=rounds,
        writes=sum(writes.values()) / lifecycle_jobs,
        reads=sum(reads.values()) / lifecycle_jobs,
        written=writes,
        watches=watches,
        rss_idle=idle,
        rss_loaded=loaded,
        live=live,
    )


@contextmanager
def peer_operator(bench: Bench, work: Path) -> Iterator[subprocess.Popen[bytes]]:
    built = subprocess.run(["bash", str(PEER_BUILD)], capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"building the training operator failed:\n{built.stderr[-2000:]}")
    binary = Path(built.stdout.strip().splitlines()[-1])
    cp = bench.cp
    cp.kubectl("apply", "--server-side", "-f", str(binary.parent / "kubeflow.org_pytorchjobs.yaml"))
    wait_for(  # kubectl wait fails outright while the CRD has no conditions yet
        "the PyTorchJob CRD established",
        lambda: cp.kubectl(
            "wait", "--for=condition=Established", "--timeout=5s",
            "crd/pytorchjobs.kubeflow.org", check=False,
        ).returncode == 0,
        timeout=60,
    )  # fmt: skip
    cp.kubectl("create", "namespace", "kubeflow")
    # As its manifests ship it: the empty Secret its certificate manager fills.
    cp.kubectl("create", "secret", "generic", "training-operator-webhook-cert", "-n", "kubeflow")
    port = free_port()
    webhook = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "validator.training-operator.kubeflow.org"},
        "webhooks": [
            {
                "name": "validator.pytorchjob.training-operator.kubeflow.org",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {
                    "url": f"https://training-operator.kubeflow.svc:{port}"
                    "/validate-kubeflow-org-v1-pytorchjob"
                },
                "rules": [
                    {
                        "apiGroups": ["kubeflow.org"],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["pytorchjobs"],
                    }
                ],
                # Registered for the certificate manager's CA injection; it matches nothing.
                "objectSelector": {"matchLabels": {"cotrain.bench/never": "true"}},
                "failurePolicy": "Ignore",
                "sideEffects": "None",
            }
        ],
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(webhook))
    kubeconfig = write_proxy_kubeconfig(work / "peer.kubeconfig", bench.proxy, cp.token)
    probe = free_port()
    log = (work / "training-operator.log").open("wb")
    process = subprocess.Popen(
        [
            str(binary),
            f"--kubeconfig={kubeconfig}",
            "--enable-scheme=pytorchjob",
            f"--controller-threads={WORKERS}",
            "--metrics-bind-address=0",
            f"--health-probe-bind-address=127.0.0.1:{probe}",
            f"--webhook-server-port={port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MY_POD_NAMESPACE": "kubeflow"},
    )

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{probe}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def mounted() -> bool:
        """What the kubelet does in a cluster: the Secret the certificate manager filled, as
        files in the directory its webhook server reads (a fixed path in the operator)."""
        secret = bench.kube.core.read_namespaced_secret(
            "training-operator-webhook-cert", "kubeflow"
        )
        data = secret.data or {}
        if not {"tls.crt", "tls.key", "ca.crt"} <= data.keys():
            return False
        CERT_DIR.mkdir(parents=True, exist_ok=True)
        for key in ("tls.crt", "tls.key", "ca.crt"):
            (CERT_DIR / key).write_bytes(base64.b64decode(data[key]))
        return True

    try:
        wait_for("the training operator's certificates", mounted, timeout=60)
        wait_for("the training operator ready", ready, timeout=120)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(CERT_DIR.parent, ignore_errors=True)


def print_results(results: list[Result], concurrency: int) -> None:
    print()
    print(f"side by side: one-pod jobs, {concurrency} client threads")
    print(f"{'':<26}" + "".join(f"{r.side:>22}" for r in results))
    sizes = [round_.n for round_ in results[0].rounds]
    for index, n in enumerate(sizes):
        rows: list[tuple[str, Callable[[Round], str]]] = [
            (f"N={n} admission jobs/s", lambda r: f"{r.rate:,.1f}"),
            (f"N={n} create->pod p50", lambda r: f"{percentile(r.latencies, 0.5):.3f} s"),
            (f"N={n} create->pod p99", lambda r: f"{percentile(r.latencies, 0.99):.3f} s"),
            (
                f"N={n} CPU ms/job op",
                lambda r: f"{1000 * r.cpu.get('operator', 0) / r.n:.1f}",
            ),
            (
                f"N={n} CPU ms/job apisrv",
                lambda r: f"{1000 * r.cpu.get('kube-apiserver', 0) / r.n:.1f}",
            ),
            (f"N={n} CPU ms/job etcd", lambda r: f"{1000 * r.cpu.get('etcd', 0) / r.n:.1f}"),
        ]
        for label, cell in rows:
            print(f"{label:<26}" + "".join(f"{cell(r.rounds[index]):>22}" for r in results))
    for label, value in (
        ("lifecycle writes/job", lambda r: f"{r.writes:.1f}"),
        ("lifecycle reads/job", lambda r: f"{r.reads:.1f}"),
        ("watches held", lambda r: f"{r.watches}"),
        ("RSS idle", lambda r: f"{r.rss_idle / 1024:.0f} MiB"),
        ("RSS loaded", lambda r: f"{r.rss_loaded / 1024:.0f} MiB ({r.live})"),
    ):
        print(f"{label:<26}" + "".join(f"{value(r):>22}" for r in results))
    for result in results:
        top = ", ".join(f"{k} {v / max(1, sum(result.written.values())):.0%}" for k, v in
                        result.written.most_common(4))  # fmt: skip
        print(f"  {result.side} lifecycle writes: {top}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,100,1000")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--lifecycle-jobs", type=int, default=10)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="cotrain-peerbench-"))
    print(f"peer bench: N = {args.sizes}; {args.concurrency} client threads; "
          f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M:%S')}")  # fmt: skip
    with control_plane(work) as cp:
        return run(cp, work, sizes, args)


def run(cp: ControlPlane, work: Path, sizes: list[int], args: argparse.Namespace) -> int:
    with bench_on(cp, work, args.concurrency) as bench:
        return side_by_side(bench, cp, work, sizes, args)


def side_by_side(
    bench: Bench, cp: ControlPlane, work: Path, sizes: list[int], args: argparse.Namespace
) -> int:
    kube = bench.kube
    results = []
    bench.create_nodes(4, replicas=max(8, sum(sizes)))
    # CoTrain first, as deploy/ runs it.
    bench.start_operator({"COTRAIN_WORKERS": str(WORKERS)})

    def create_cotrain(namespace: str, name: str) -> None:
        kube.create_job(namespace, _cotrain_job(name))

    def cotrain_done(namespace: str, name: str) -> bool:
        return bool(kube.job(namespace, name).get("status", {}).get("phase") == "Succeeded")

    def member_done(namespace: str, name: str) -> None:
        member = {"phase": "Succeeded", "step": 5, "totalSteps": 5, "loss": 0.1}
        kube.patch_job_status(namespace, name, {"members": {"m0": member}})

    cotrain = Side(
        name="cotrain",
        label="cotrain.dev/job",
        create=create_cotrain,
        pod=lambda name: f"{name}-gpu-0",
        succeeded=cotrain_done,
        pid=lambda: bench.operator_pid,
        finish=member_done,
    )
    results.append(measure(bench, cotrain, sizes, args.lifecycle_jobs))
    bench.stop_operator()
    clear(bench, ["cotrain-life", *(f"cotrain-adm-{n}" for n in sizes)])
    custom = kube.custom
    # The peer's own proxy, which adds the admin's token: client-go sends none over HTTP.
    bench.proxy.stop()
    bench.proxy = ProxyProcess(cp.server, cp.ca_file, token=cp.token)
    with peer_operator(bench, work) as process:

        def create_peer(namespace: str, name: str) -> None:
            custom.create_namespaced_custom_object(
                *KUBEFLOW[:2], namespace, KUBEFLOW[2], _peer_job(name)
            )

        def peer_done(namespace: str, name: str) -> bool:
            job = custom.get_namespaced_custom_object(*KUBEFLOW[:2], namespace, KUBEFLOW[2], name)
            return _conditions_say(job, "Succeeded")

        peer = Side(
            name="training-operator",
            label=PEER_LABEL,
            create=create_peer,
            pod=lambda name: f"{name}-master-0",
            succeeded=peer_done,
            pid=lambda: process.pid,
        )
        results.append(measure(bench, peer, sizes, args.lifecycle_jobs))
    print_results(results, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
