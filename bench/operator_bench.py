"""Operator benchmark: admission throughput and latency, API cost per job, watches, memory.

Starts its own control plane (etcd + kube-apiserver + kube-controller-manager from
tests/controlplane, in a temp dir), applies crds/ and deploy/base's namespace and RBAC, creates
GPU nodes, and runs the real operator (`python -m cotrain_operator`, cluster-wide as deploy/ runs
it) as the cotrain-operator ServiceAccount through tests/fixtures/faultproxy.py, whose request log
is the operator's API traffic (the bench's own client creates jobs on the API server directly).
Prints:

- raw: the control plane creating N CoTrainJobs from a plain client with no operator running
  (`--concurrency` threads), measured before the operator starts and again after it stops;
- replay: with no operator either, the same client threads make, per job, the very writes that
  admit it (create the job, then its pod and its first status as `decide()` builds them, these
  two through the proxy as the operator's writes go): what the control plane can do for an
  admission on the operator's path, i.e. the ceiling for any operator here;
- admission: N CoTrainJobs created with the same client and concurrency while the operator runs;
  per job, the latency from the client-side create call to the moment the bench's own pod watch
  sees the job's pod ADDED (both on the bench's clock: creationTimestamp has whole-second
  resolution, too coarse for this); jobs/s from the first create to the last pod; and that rate
  as a share of the raw create rate and of the replay rate (target >= 90%). Operator and
  API-server CPU per job too;
- API cost: requests per job over a full lifecycle (create -> pod created -> bound and Running ->
  trainer reports -> members Succeeded, pod Succeeded -> job Succeeded), the kubelet and the
  trainer played by the bench; writes (POST/PUT/PATCH/DELETE, Events included: they are writes)
  and reads (GET/LIST, watches apart), by resource; target writes <= members + 6;
- watches: the watch requests the operator holds open, and how many it has opened in all;
- memory: the operator's VmRSS (and VmHWM, the peak) at 0 live jobs and after each admission
  round (target <= 150 MiB at 1,000).

    python bench/operator_bench.py            # N = 1, 100, 1000
    python bench/operator_bench.py --quick    # N = 1, 50, 200 (CI smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import urllib3

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the tests/ fixtures

from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from tests.controlplane.cluster import (  # noqa: E402
    ControlPlane,
    build_control_plane,
    start_control_plane,
)
from tests.fixtures.faultproxy import FaultProxy, Request, write_proxy_kubeconfig  # noqa: E402
from tests.fixtures.jobs import a_job  # noqa: E402
from tests.fixtures.kube import (  # noqa: E402
    GROUP,
    PLURAL,
    VERSION,
    Kube,
    install_cotrain,
    wait_for,
)
from tests.fixtures.nodes import gpu_node  # noqa: E402
from tests.fixtures.operator_process import OperatorProcess  # noqa: E402

sys.path.insert(0, str(ROOT / "operator"))
from cotrain_operator.reconcile.access import build_trainer_identity  # noqa: E402
from cotrain_operator.reconcile.job import decide  # noqa: E402
from cotrain_operator.sharing import GpuNode, parse_node  # noqa: E402

WRITES = ("POST", "PUT", "PATCH", "DELETE")
POOL_LABEL = "cotrain.bench/pool"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_TOKEN = "COTRAIN_BENCH_PROXY_TOKEN"  # the token `--serve-proxy` adds (ProxyProcess)


# -- measuring ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process in KiB, from /proc/<pid>/status."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (p99 of 100 values is the 99th smallest)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(-(-share * len(ordered) // 1)) - 1))
    return ordered[index]


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


class CpuMeter:
    """CPU seconds used by a set of processes, and by the whole machine, within a `with`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.machine = 0.0  # share of the machine's CPU busy (all processes, others' too)

    def __enter__(self) -> CpuMeter:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine = machine_busy()
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {name: cpu_seconds(pid) - self.before[name] for name, pid in self.pids.items()}
        busy, total = machine_busy()
        self.machine = (busy - self._machine[0]) / max(1e-9, total - self._machine[1])


class PodWatch:
    """The bench's own watch on one namespace's pods: when each pod was first seen (ADDED).

    Plain HTTP streaming with the admin token, one json.loads per event: cheap enough that
    the timestamps are not held up by the bench's own creates.
    """

    def __init__(self, cp: ControlPlane, namespace: str, label: str = "cotrain.dev/job") -> None:
        self.cp = cp
        self.namespace = namespace
        self.label = label  # the pods' label whose value names their job
        self.seen: dict[str, float] = {}  # job name -> first pod ADDED (time.time())
        self.pods = 0
        self._lock = threading.Lock()
        self._conn: http.client.HTTPSConnection | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pod-watch")

    def __enter__(self) -> PodWatch:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the bench's pod watch did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(2)  # type: ignore[union-attr]
            self._conn.close()
        self._thread.join(5)

    def _run(self) -> None:
        parsed = urllib.parse.urlparse(self.cp.server)
        context = ssl.create_default_context(cafile=str(self.cp.ca_file))
        self._conn = http.client.HTTPSConnection(
            parsed.hostname or "127.0.0.1", parsed.port, context=context
        )
        query = urllib.parse.urlencode(
            {"watch": "1", "labelSelector": self.label, "timeoutSeconds": "3600"}
        )
        self._conn.request(
            "GET",
            f"/api/v1/namespaces/{self.namespace}/pods?{query}",
            headers={"Authorization": f"Bearer {self.cp.token}"},
        )
        response = self._conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"pod watch: HTTP {response.status}")
        self._ready.set()
        with contextlib.suppress(Exception):  # the stream ends when __exit__ shuts the socket
            for line in response:
                now = time.time()
                event = json.loads(line)
                if event.get("type") != "ADDED":
                    continue
                labels = event["object"]["metadata"].get("labels") or {}
                job = labels.get(self.label)
                with self._lock:
                    self.pods += 1
                    if job and job not in self.seen:
                        self.seen[job] = now

    def wait(self, jobs: int, stall: float = 60.0) -> int:
        """Until every job has a pod, or none came for `stall` seconds; the jobs without one."""
        seen, since = len(self.seen), time.monotonic()
        while seen < jobs and time.monotonic() - since < stall:
            time.sleep(0.05)
            if len(self.seen) != seen:
                seen, since = len(self.seen), time.monotonic()
        return jobs - len(self.seen)


# -- the proxy, in a process of its own ---------------------------------------------------------


def serve_proxy(upstream: str, ca_file: str) -> int:
    """`--serve-proxy`: run tests/fixtures/faultproxy.py's proxy and answer on stdin/stdout.

    In its own process so that the bench's client threads do not hold it up (and the operator's
    requests are not slowed by the bench's GIL). Commands: `count`, `log FROM`, `watches`.
    """
    proxy = FaultProxy(upstream, Path(ca_file), token=os.environ.get(PROXY_TOKEN))
    proxy.start()
    print(proxy.port, flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "count":
            answer: Any = len(proxy.log)
        elif command == "log":
            answer = [
                [r.method, r.path, r.status, r.watch] for r in proxy.log[int(argument or 0) :]
            ]
        elif command == "watches":
            answer = proxy.open_watches()
        else:
            break
        print(json.dumps(answer), flush=True)
    proxy.stop()
    return 0


class ProxyProcess:
    """The client side of `serve_proxy`."""

    def __init__(self, upstream: str, ca_file: Path, token: str | None = None) -> None:
        """`token`: the one sent for clients that send none (see FaultProxy.token)."""
        env = {**os.environ, **({PROXY_TOKEN: token} if token else {})}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-proxy", upstream, str(ca_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ask(self, command: str) -> Any:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        with self._lock:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
            return json.loads(self.process.stdout.readline())

    def count(self) -> int:
        return int(self._ask("count"))

    def log(self, start: int = 0) -> list[Request]:
        return [
            Request(m, p, "", status, watch) for m, p, status, watch in self._ask(f"log {start}")
        ]

    def open_watches(self) -> int:
        return int(self._ask("watches"))

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


# -- the cluster -------------------------------------------------------------------------------


@dataclass
class Bench:
    cp: ControlPlane
    kube: Kube
    proxy: ProxyProcess
    concurrency: int
    work: Path
    operator: OperatorProcess | None = None
    nodes: list[str] = field(default_factory=list)
    inventory: list[GpuNode] = field(default_factory=list)
    writes: urllib3.PoolManager = field(
        default_factory=lambda: urllib3.PoolManager(maxsize=16, retries=False)
    )

    @property
    def operator_pid(self) -> int:
        assert self.operator is not None
        assert self.operator.process is not None
        return self.operator.process.pid

    def pids(self) -> dict[str, int]:
        """The processes whose CPU the bench accounts for."""
        pids = {**self.cp.pids, "proxy": self.proxy.process.pid, "bench": os.getpid()}
        process = self.operator.process if self.operator is not None else None
        if process is not None and process.poll() is None:
            pids["operator"] = process.pid
        return pids

    def namespace(self, name: str) -> str:
        self.cp.kubectl("create", "namespace", name)
        self.cp.kubectl(
            "label",
            "namespace",
            name,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        )
        return name

    def create_nodes(self, count: int, replicas: int) -> None:
        for index in range(count):
            name = f"bench-gpu-{index}"
            node = gpu_node(
                name, sharing="time-slicing", replicas=replicas, extra_labels={POOL_LABEL: "bench"}
            )
            self.kube.create_node(node)
            self.nodes.append(name)
            parsed = parse_node(node)
            assert parsed is not None
            self.inventory.append(parsed)

    def start_operator(self, env: dict[str, str] | None = None) -> None:
        token = self.cp.service_account_token(
            "cotrain-system", "cotrain-operator", create=False, duration="4h"
        )
        # The fixture only reads the proxy's url, which ProxyProcess has too.
        kubeconfig = write_proxy_kubeconfig(self.work / "operator.kubeconfig", self.proxy, token)
        saved = {key: os.environ.get(key) for key in env or {}}
        os.environ.update(env or {})
        try:
            # Cluster-wide, as deploy/ runs it.
            self.operator = OperatorProcess(kubeconfig, self.work / "operator-logs")
            self.operator.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.stop()

    def wait_quiet(self, quiet: float = 1.5, timeout: float = 300.0) -> float:
        """Until the operator has made no API request for `quiet` seconds; returns when the
        last one was made (time.monotonic())."""
        deadline = time.monotonic() + timeout
        count, since = self.proxy.count(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now_count = self.proxy.count()
            if now_count != count:
                count, since = now_count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return since
        raise AssertionError(f"the operator was still busy after {timeout}s")

    def create_jobs(
        self, namespace: str, names: list[str], admit: bool = False
    ) -> list[tuple[float, float]]:
        """Create the jobs with `concurrency` threads; (start, end) of each call (time.time()).
        With `admit`, each thread then writes what admits its job, as the operator would: the
        pod and the first status that decide() makes of the created job; `end` is when the pod
        was created."""
        custom = self.kube.custom
        selector = {"nodeSelector": {POOL_LABEL: "bench"}}

        def create(name: str) -> tuple[float, float]:
            body = a_job(name).placement(**selector).build()
            started = time.time()
            response = custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, _preload_content=False
            )
            created = json.loads(response.read())
            response.release_conn()
            if not admit:
                return started, time.time()
            decision = decide(created, [], self.inventory, datetime.now(UTC))
            (pod,) = (c for c in decision.create if c["kind"] == "Pod")
            self.send("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
            pod_created = time.time()
            self.send(
                "PATCH",
                f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
                {"status": decision.status_patch},
                "application/merge-patch+json",
            )
            return started, pod_created

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(create, names))

    def send(
        self, method: str, path: str, body: Any, content_type: str = "application/json"
    ) -> None:
        """One write in plain JSON, as the operator sends it, and through the counting proxy,
        as the operator's writes go: the replay's ceiling pays for the path the operator's
        requests take in this bench (~1 ms of the proxy's CPU per request, bench/README.md)."""
        response = self.writes.request(
            method,
            self.proxy.url + path,
            body=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.cp.token}",
                "Accept": "application/json",
                "Content-Type": content_type,
            },
        )
        if not 200 <= response.status <= 299:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}")

    def delete_jobs(self, namespace: str) -> None:
        self.kube.custom.delete_collection_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL
        )
        wait_for(
            f"jobs in {namespace} gone",
            lambda: (
                not self.kube.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, limit=1
                )["items"]
            ),
            timeout=120,
        )


# -- the measurements --------------------------------------------------------------------------


@dataclass
class RawResult:
    n: int
    seconds: float
    latencies: list[float]
    cpu: dict[str, float]
    machine: float

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def raw_creates(bench: Bench, n: int, tag: str, admit: bool = False) -> RawResult:
    """N CoTrainJobs from the plain client, no operator running; then deleted again. With
    `admit`, the replay: the client also writes each job's pod and first status."""
    namespace = bench.namespace(f"{'replay' if admit else 'raw'}-{tag}-{n}")
    if admit:
        account, binding = build_trainer_identity(namespace)
        bench.send("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", account)
        bench.send(
            "POST",
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
            binding,
        )
    with CpuMeter(bench.pids()) as meter:
        calls = bench.create_jobs(namespace, [f"j{i}" for i in range(n)], admit=admit)
    seconds = max(end for _, end in calls) - min(start for start, _ in calls)
    bench.delete_jobs(namespace)
    if admit:
        # Gone before the operator starts (or the next round): a cluster-wide operator would
        # otherwise find these pods, labelled as ours, in its first list and keep them.
        bench.kube.core.delete_collection_namespaced_pod(namespace)
        wait_for(
            f"pods in {namespace} gone",
            lambda: not bench.kube.core.list_namespaced_pod(namespace, limit=1).items,
            timeout=120,
        )
    bench.cp.kubectl("delete", "namespace", namespace, "--wait=false")
    return RawResult(n, seconds, [end - start for start, end in calls], meter.used, meter.machine)


@dataclass
class AdmissionResult:
    n: int
    seconds: float
    latencies: list[float]
    create_seconds: float
    cpu: dict[str, float]
    machine: float
    settle_requests: Counter[str]
    memory: dict[str, int]
    missing: int  # jobs that got no pod (the operator lost or failed them)

    @property
    def rate(self) -> float:
        return (self.n - self.missing) / self.seconds


def admission(bench: Bench, n: int) -> AdmissionResult:
    namespace = bench.namespace(f"adm-{n}")
    names = [f"j{i}" for i in range(n)]
    pids = bench.pids()
    bench.wait_quiet(quiet=1.0)
    first_request = bench.proxy.count()
    with PodWatch(bench.cp, namespace) as watch, CpuMeter(pids) as meter:
        calls = bench.create_jobs(namespace, names)
        missing = watch.wait(n)
        # The status patches and Events follow the pods; count them in the round's cost.
        bench.wait_quiet(quiet=1.5)
    started = min(start for start, _ in calls)
    last_pod = max(watch.seen.values())
    latencies = [
        watch.seen[name] - start
        for name, (start, _) in zip(names, calls, strict=True)
        if name in watch.seen
    ]
    requests = Counter(
        f"{r.method} {_resource(r)}" + (f" (HTTP {r.status})" if r.status >= 300 else "")
        for r in bench.proxy.log(first_request)
    )
    return AdmissionResult(
        n=n,
        seconds=last_pod - started,
        latencies=latencies,
        create_seconds=max(end for _, end in calls) - started,
        cpu=meter.used,
        machine=meter.machine,
        settle_requests=requests,
        memory=memory_kib(bench.operator_pid),
        missing=missing,
    )


def _resource(request: Request) -> str:
    """pods, serviceaccounts, cotrainjobs/status, events, ... from an API path."""
    parts = [p for p in request.path.split("/") if p]
    if parts[:1] == ["api"]:
        parts = parts[2:]
    elif parts[:1] == ["apis"]:
        parts = parts[3:]
    if parts[:1] == ["namespaces"] and len(parts) > 2:
        parts = parts[2:]
    if not parts:
        return request.path
    kind = parts[0]
    if len(parts) >= 3:
        kind += "/" + parts[2]
    return kind


def _kind(request: Request) -> str:
    if request.watch:
        return "watch"
    return "write" if request.method in WRITES else "read"


@dataclass
class LifecycleResult:
    jobs: int
    members: int
    writes: Counter[str]
    reads: Counter[str]
    watches: int
    errors: list[str]


@dataclass
class TrainingResult:
    jobs: int
    seconds: float
    report_interval: float
    reports: int  # the trainers' status patches
    writes: Counter[str]  # the operator's


MEMBERS = ("torch", "tf")  # a_job()'s two members, in one SameGPU pod
STEPS = 1000


class Trainers:
    """The scheduler, the kubelet and the trainers of some two-member SameGPU jobs, played
    through the API; each step is left to settle (in a real cluster seconds to minutes pass
    between them) unless told otherwise."""

    def __init__(self, bench: Bench, namespace: str, names: list[str]) -> None:
        self.bench = bench
        self.kube = bench.kube
        self.namespace = namespace
        self.names = names

    def each(self, action: Callable[[str], Any], settle: bool = True) -> None:
        with ThreadPoolExecutor(min(8, len(self.names))) as pool:
            list(pool.map(action, self.names))
        if settle:
            self.bench.wait_quiet(quiet=1.0)

    def report(self, member: str, settle: bool = True, **fields: Any) -> None:
        """Each job's `member` merge-patches its own key of the status, as the trainer does."""
        patch = {"members": {member: fields}}
        self.each(lambda name: self.kube.patch_job_status(self.namespace, name, patch), settle)

    def pod(self, name: str) -> str:
        return f"{name}-gpu-0"

    def start(self) -> None:
        """Create the jobs and take them to Running, their members to step 0."""
        kube, namespace = self.kube, self.namespace
        nodes = self.bench.nodes
        self.bench.create_jobs(namespace, self.names)
        for name in self.names:
            wait_for(f"{name}'s pod", lambda n=name: kube.pod_names(namespace, n), timeout=60)
        self.bench.wait_quiet(quiet=1.0)
        # The scheduler spreads the pods over the nodes that fit; then the kubelet runs them.
        self.each(
            lambda name: kube.bind_pod(
                namespace, self.pod(name), nodes[self.names.index(name) % len(nodes)]
            )
        )
        self.each(lambda name: kube.set_pod_phase(namespace, self.pod(name), "Running"))
        for name in self.names:
            kube.wait_phase(namespace, name, "Running", timeout=60)
        for member in MEMBERS:
            self.report(member, phase="Running", step=0, totalSteps=STEPS)


def lifecycle(bench: Bench, jobs: int) -> LifecycleResult:
    """A short job's whole life: created, pod created, bound and Running, members started,
    halfway, Succeeded, pod Succeeded, job Succeeded; every operator request counted."""
    bench.wait_quiet(quiet=1.0)
    first = bench.proxy.count()
    trainers = Trainers(bench, bench.namespace("life"), [f"life{i}" for i in range(jobs)])
    trainers.start()
    for member in MEMBERS:
        trainers.report(member, step=STEPS // 2, loss=0.5, samplesPerSecond=900.0)
    for member in MEMBERS:
        trainers.report(member, phase="Succeeded", step=STEPS, loss=0.01)
    kube, namespace = bench.kube, trainers.namespace
    trainers.each(lambda name: kube.set_pod_phase(namespace, trainers.pod(name), "Succeeded", 0))
    errors = []
    for name in trainers.names:
        status = kube.wait_phase(namespace, name, "Succeeded", timeout=60)
        if status.get("progress") != "100%":
            errors.append(f"{name}: progress {status.get('progress')}")
    bench.wait_quiet(quiet=2.0)
    log = bench.proxy.log(first)
    return LifecycleResult(
        jobs=jobs,
        members=len(MEMBERS),
        writes=Counter(f"{r.method} {_resource(r)}" for r in log if _kind(r) == "write"),
        reads=Counter(f"{r.method} {_resource(r)}" for r in log if _kind(r) == "read"),
        watches=sum(1 for r in log if r.watch),
        errors=errors,
    )


def training(
    bench: Bench, jobs: int, seconds: float, report_interval: float = 5.0
) -> TrainingResult:
    """Running jobs whose members each report every `report_interval` seconds (the trainer's
    default is 5 s), each report 2% further (so every one moves the job's whole-percent
    progress: the most a trainer can cost); the operator's writes in that window."""
    trainers = Trainers(bench, bench.namespace("train"), [f"train{i}" for i in range(jobs)])
    trainers.start()
    first = bench.proxy.count()
    started = time.monotonic()
    tick = 0
    while time.monotonic() - started < seconds:
        tick += 1
        for index, member in enumerate(MEMBERS):  # members report independently of each other
            offset = (tick - 1 + index / len(MEMBERS)) * report_interval
            time.sleep(max(0.0, started + offset - time.monotonic()))
            trainers.report(member, settle=False, step=min(STEPS, tick * 20), loss=1.0 / tick)
    time.sleep(max(0.0, started + tick * report_interval - time.monotonic()))
    elapsed = time.monotonic() - started
    log = bench.proxy.log(first)
    # Let the last progress refreshes out (the operator holds them back up to 10 s) before
    # anything else is measured; they are not counted here, as after any other window's end.
    bench.wait_quiet(quiet=12.0)
    return TrainingResult(
        jobs=jobs,
        seconds=elapsed,
        report_interval=report_interval,
        reports=tick * len(MEMBERS) * jobs,
        writes=Counter(f"{r.method} {_resource(r)}" for r in log if _kind(r) == "write"),
    )


# -- the report --------------------------------------------------------------------------------


CPU_COLUMNS = (
    ("kube-apiserver", "apiserver"),
    ("etcd", "etcd"),
    ("kube-controller-manager", "kcm"),
    ("operator", "operator"),
    ("proxy", "proxy"),
    ("bench", "bench"),
)


def print_admission(
    raw: dict[int, list[RawResult]],
    replay: dict[int, list[RawResult]],
    results: list[AdmissionResult],
) -> None:
    print()
    print("admission: create N CoTrainJobs -> every job's pod created")
    print("  latency: client-side create call -> the bench's pod watch sees the pod (ADDED)")
    print(
        f"{'N':>6} {'raw jobs/s':>11} {'replay':>7} {'op jobs/s':>10} {'op/raw':>7} "
        f"{'op/replay':>10} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'create s':>9} {'admit s':>8} {'machine busy':>13}"
        f"{'no pod':>8}"
    )
    for result in results:
        raw_rate = statistics.mean(r.rate for r in raw[result.n])
        replay_rate = statistics.mean(r.rate for r in replay[result.n])
        print(
            f"{result.n:>6} {raw_rate:>11.1f} {replay_rate:>7.1f} {result.rate:>10.1f} "
            f"{100 * result.rate / raw_rate:>6.0f}% {100 * result.rate / replay_rate:>9.0f}% "
            f"{1000 * percentile(result.latencies, 0.5):>8.0f} "
            f"{1000 * percentile(result.latencies, 0.99):>8.0f} "
            f"{1000 * max(result.latencies):>8.0f} "
            f"{result.create_seconds:>9.2f} {result.seconds:>8.2f} {100 * result.machine:>12.0f}%"
            f"{result.missing:>8}"
        )
    print(
        "  raw jobs/s: the same client and threads, no operator; the mean of "
        + ", ".join(f"N={n}: " + "/".join(f"{r.rate:.0f}" for r in runs) for n, runs in raw.items())
        + " (before/after the operator ran)"
    )
    print(
        "  replay jobs/s: the same client writes each job, its pod and its first status itself "
        "(the ceiling for an operator here); "
        + ", ".join(
            f"N={n}: " + "/".join(f"{r.rate:.0f}" for r in runs) for n, runs in replay.items()
        )
    )
    print()
    print("CPU per job (ms) while creating (raw) or admitting (op); machine busy includes others'")
    header = "".join(f"{label:>10}" for _, label in CPU_COLUMNS)
    print(f"{'round':<13}{header}{'total':>10}{'machine busy':>14}")
    rows: list[tuple[str, int, dict[str, float], float]] = []
    for kind, rounds in (("raw", raw), ("replay", replay)):
        for n, runs in rounds.items():
            for index, run in enumerate(runs):
                label = f"{kind}{'ab'[index] if len(runs) > 1 else ''} {n}"
                rows.append((label, n, run.cpu, run.machine))
    rows += [(f"op {r.n}", r.n, r.cpu, r.machine) for r in results]
    for label, n, cpu, machine in rows:
        if n < 50:  # CPU time comes in 10ms clock ticks: too coarse for a few jobs
            continue
        cells = "".join(f"{1000 * cpu.get(name, 0.0) / n:>10.1f}" for name, _ in CPU_COLUMNS)
        total = 1000 * sum(cpu.values()) / n
        print(f"{label:<13}{cells}{total:>10.1f}{100 * machine:>13.0f}%")
    print()
    for result in results:
        counts = ", ".join(
            f"{k} {v / result.n:.2f}" for k, v in sorted(result.settle_requests.items())
        )
        print(f"  N={result.n}: operator requests per job: {counts}")


def print_lifecycle(result: LifecycleResult, train: TrainingResult) -> None:
    jobs = result.jobs
    total_writes = sum(result.writes.values()) / jobs
    total_reads = sum(result.reads.values()) / jobs
    target = result.members + 6
    print()
    print(
        f"API cost per job: {jobs} two-member SameGPU jobs, create -> pod bound and Running -> "
        "members start, halfway, Succeeded -> pod Succeeded -> job Succeeded"
    )
    print("  (the operator's requests; Events are writes and are counted as such)")
    print(f"{'request':<40} {'per job':>8}")
    for key, count in sorted(result.writes.items()):
        print(f"{'write ' + key:<40} {count / jobs:>8.2f}")
    for key, count in sorted(result.reads.items()):
        print(f"{'read ' + key:<40} {count / jobs:>8.2f}")
    verdict = "met" if total_writes <= target else "NOT met"
    print(f"{'writes':<40} {total_writes:>8.2f}   target <= {target} (members + 6): {verdict}")
    print(f"{'reads':<40} {total_reads:>8.2f}")
    if result.watches:
        print(f"{'watch (re)connections':<40} {result.watches / jobs:>8.2f}")
    for error in result.errors:
        print(f"  check failed: {error}")
    minutes = train.seconds / 60
    writes = sum(train.writes.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(train.writes.items())) or "none"
    reports = train.reports / train.jobs / minutes
    print(
        f"while training ({train.jobs} jobs, {train.seconds:.0f}s, every member reporting every "
        f"{train.report_interval:.0f}s): {reports:.1f} trainer patches and "
        f"{writes / train.jobs / minutes:.1f} operator writes per job per minute ({detail})"
    )


def print_watches(bench: Bench, elapsed: float) -> None:
    open_watches = bench.proxy.open_watches()
    opened = [r for r in bench.proxy.log() if r.watch]
    by_resource = Counter(_resource(r) for r in opened)
    print()
    opened_by = ", ".join(f"{k} {v}" for k, v in sorted(by_resource.items()))
    print(
        f"watches: {open_watches} open now; {len(opened)} opened in {elapsed:.0f}s of operator "
        f"time ({opened_by})"
    )


def print_memory(samples: list[tuple[int, dict[str, int]]]) -> None:
    print()
    print("operator memory")
    print(f"{'live jobs':>10} {'live pods':>10} {'VmRSS MiB':>10} {'VmHWM MiB':>10}")
    for jobs, memory in samples:
        print(
            f"{jobs:>10} {jobs:>10} {memory['VmRSS'] / 1024:>10.1f} {memory['VmHWM'] / 1024:>10.1f}"
        )
    jobs, last = samples[-1][0], samples[-1][1]["VmRSS"] / 1024
    if jobs < 1000:
        print(f"  target <= 150 MiB at 1,000 live jobs: not measured here ({jobs} at the most)")
    else:
        verdict = "met" if last <= 150 else "NOT met"
        print(f"  target <= 150 MiB at 1,000 live jobs: {verdict} ({last:.1f} MiB at {jobs})")


# -- main --------------------------------------------------------------------------------------


@contextlib.contextmanager
def control_plane(work: Path) -> Iterator[ControlPlane]:
    bin_dir = build_control_plane(log=sys.stderr)
    cp = start_control_plane(work / "controlplane", bin_dir)
    try:
        yield cp
    finally:
        cp.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 50, 200 (CI smoke)")
    parser.add_argument(
        "--sizes", help="comma-separated N to admit (default 1,100,1000; --quick 1,50,200)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="client threads creating jobs")
    parser.add_argument(
        "--lifecycle-jobs", type=int, default=10, help="jobs in the lifecycle and training runs"
    )
    parser.add_argument(
        "--training-seconds",
        type=float,
        help="the training run's length (default 60; --quick 20)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument(
        "--operator-path",
        help="run the operator package found in this directory (PYTHONPATH), e.g. an older "
        "version unpacked with `git archive`, for before/after numbers",
    )
    parser.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the operator (repeatable), e.g. COTRAIN_WORKERS=8",
    )
    parser.add_argument(
        "--serve-proxy", nargs=2, metavar=("UPSTREAM", "CA"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.serve_proxy:
        return serve_proxy(*args.serve_proxy)
    sizes = [
        int(s) for s in (args.sizes or ("1,50,200" if args.quick else "1,100,1000")).split(",")
    ]
    if args.training_seconds is None:
        args.training_seconds = 20.0 if args.quick else 60.0
    # SIGTERM (timeout, CI cancel) unwinds like Ctrl-C: the operator and the control plane stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cotrain-opbench-"))
    print(
        f"operator bench: N = {', '.join(map(str, sizes))}; {args.concurrency} client threads; "
        f"{os.cpu_count()} cores; work dir {work}"
        + (f"; operator from {args.operator_path}" if args.operator_path else "")
        + (f"; operator env {' '.join(args.operator_env)}" if args.operator_env else "")
    )
    try:
        with control_plane(work) as cp:
            return run(cp, work, sizes, args, started)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def bench_on(cp: ControlPlane, work: Path, concurrency: int) -> Iterator[Bench]:
    """CoTrain installed on `cp`, the bench's client and its counting proxy; whatever operator
    the bench started, the proxy and the client stopped at the end."""
    install_cotrain(cp)
    configuration = cp.api_client_configuration()
    configuration.connection_pool_maxsize = max(16, 2 * concurrency)
    api = client.ApiClient(configuration)
    bench = Bench(cp, Kube(api), ProxyProcess(cp.server, cp.ca_file), concurrency, work)
    try:
        yield bench
    finally:
        bench.stop_operator()
        bench.proxy.stop()  # the one in use: a bench may replace it (peer_bench.py)
        api.close()


def run(
    cp: ControlPlane, work: Path, sizes: list[int], args: argparse.Namespace, started: float
) -> int:
    with bench_on(cp, work, args.concurrency) as bench:
        return measure_all(bench, sizes, args, started)


def measure_all(bench: Bench, sizes: list[int], args: argparse.Namespace, started: float) -> int:
    try:
        total = sum(sizes) + 2 * args.lifecycle_jobs
        bench.create_nodes(4, replicas=max(8, total // 2))
        print(f"control plane up in {time.monotonic() - started:.0f}s; measuring raw creates")
        raw_creates(bench, 20, "warmup")  # the first creates of a new CRD are slow
        raw: dict[int, list[RawResult]] = {n: [] for n in sizes}
        replay: dict[int, list[RawResult]] = {n: [] for n in sizes}
        for n in sizes:
            raw[n].append(raw_creates(bench, n, "a"))
            replay[n].append(raw_creates(bench, n, "a", admit=True))
        env = dict(item.split("=", 1) for item in args.operator_env)
        if args.operator_path:
            path = os.environ.get("PYTHONPATH")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.operator_path, path]))
        bench.start_operator(env)
        operator_started = time.monotonic()
        bench.wait_quiet(quiet=2.0)
        memory = [(0, memory_kib(bench.operator_pid))]
        print("operator up; API cost over a lifecycle")
        life = lifecycle(bench, args.lifecycle_jobs)
        print("API cost while training")
        train = training(bench, args.lifecycle_jobs, args.training_seconds)
        live = 2 * args.lifecycle_jobs
        results = []
        for n in sizes:
            print(f"admitting {n} job(s)")
            result = admission(bench, n)
            results.append(result)
            live += n
            memory.append((live, result.memory))
        operator_seconds = time.monotonic() - operator_started
        print_watches(bench, operator_seconds)
        assert bench.operator is not None
        errors = [
            line
            for line in bench.operator.metrics().splitlines()
            if line.startswith("cotrain_reconcile_errors_total{")
        ]
        print("reconcile errors: " + (", ".join(errors) if errors else "none"))
        bench.stop_operator()
        for n in sizes:
            raw[n].append(raw_creates(bench, n, "b"))
            replay[n].append(raw_creates(bench, n, "b", admit=True))
        print_admission(raw, replay, results)
        print_lifecycle(life, train)
        print_memory(memory)
        print(f"\noperator bench: done in {time.monotonic() - started:.0f}s")
        return 0
    except (ApiException, AssertionError, RuntimeError) as error:
        print(f"operator bench failed: {error}", file=sys.stderr)
        if bench.operator is not None:
            tail = bench.operator.logs().splitlines()[-40:]
            print("last lines of the operator's log:", *tail, sep="\n", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
