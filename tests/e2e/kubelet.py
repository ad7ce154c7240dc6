"""A test-only "local kubelet": runs the pods bound to one fake GPU node as local processes.

It does, against the real API server, what a scheduler plus kubelet would: registers a Node that
carries GPU Feature Discovery labels and GPU capacity, binds each pending pod whose node affinity
allows that node, starts the pod's trainer container command as a local process with the pod's
environment, a projected service-account token for the pod's ServiceAccount and the API server's
address (as in-cluster config), and writes pod status as a kubelet would: Pending -> Running ->
Succeeded/Failed with exit codes, restart counts and container state reasons (Error, OOMKilled
for a SIGKILL, Completed). It honours restartPolicy and stops processes of deleted pods (SIGTERM,
then SIGKILL after the grace period), then removes the pod for good. No container runtime, no
images: the command runs from this checkout's environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.controlplane.cluster import ControlPlane
from tests.fixtures.nodes import gpu_node

VENV_BIN = Path(sys.executable).parent
POD_DNS_NAME = re.compile(r"\b[a-z0-9-]+\.[a-z0-9-]+\.[a-z0-9-]+\.svc(\.cluster\.local)?\b")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class RunningPod:
    namespace: str
    name: str
    uid: str
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    stopping: bool = False
    oom_killed: bool = False
    log_path: Path | None = None
    thread: threading.Thread | None = None


@dataclass
class LocalKubelet:
    cluster: ControlPlane
    node_name: str
    work_dir: Path
    node_kwargs: dict[str, Any] = field(default_factory=dict)
    namespaces: tuple[str, ...] = ()
    pods: dict[str, RunningPod] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.api = self.cluster.api_client()
        self.core = client.CoreV1Api(self.api)
        self._lock = threading.Lock()

    # -- node -------------------------------------------------------------------------------

    def register_node(self) -> None:
        body = gpu_node(self.node_name, **self.node_kwargs)
        status = body.pop("status")
        try:
            self.core.create_node(client.V1Node.model_validate(body))
        except ApiException as error:
            if error.status != 409:
                raise
        self.core.patch_node_status(
            self.node_name, {"status": status}, _content_type="application/merge-patch+json"
        )

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.register_node()
        self._thread = threading.Thread(target=self._watch_loop, daemon=True, name="kubelet")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            running = list(self.pods.values())
        for pod in running:
            pod.stopping = True
            self._terminate(pod, grace=5)
        with contextlib.suppress(ApiException):
            self.core.delete_node(self.node_name)
        self.api.close()

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.core.list_pod_for_all_namespaces,
                    timeout_seconds=5,
                    label_selector="cotrain.dev/job",
                ):
                    if self._stop.is_set():
                        break
                    body = self.api.sanitize_for_serialization(event["object"])
                    self._on_pod(event["type"], body)
            except Exception:  # a dropped watch: list again, as a kubelet would
                self._log(traceback.format_exc())
                time.sleep(0.2)
            finally:
                stream.stop()

    def _log(self, text: str) -> None:
        with (self.work_dir / "kubelet.log").open("a") as log:
            log.write(f"{_now()} {text}\n")

    def _mine(self, pod: dict[str, Any]) -> bool:
        metadata = pod["metadata"]
        if self.namespaces and metadata["namespace"] not in self.namespaces:
            return False
        node_name = pod["spec"].get("nodeName")
        if node_name:
            return bool(node_name == self.node_name)
        affinity = (pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}
        required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
        for term in required.get("nodeSelectorTerms") or []:
            for expression in term.get("matchExpressions") or []:
                if expression.get(
                    "key"
                ) == "kubernetes.io/hostname" and self.node_name in expression.get("values", []):
                    return True
        return False

    def _on_pod(self, event_type: str, pod: dict[str, Any]) -> None:
        if not self._mine(pod):
            return
        metadata = pod["metadata"]
        key = f"{metadata['namespace']}/{metadata['name']}"
        with self._lock:
            running = self.pods.get(key)
        if event_type == "DELETED":
            if running is not None:
                running.stopping = True
                self._terminate(running, grace=0)
            return
        if metadata.get("deletionTimestamp"):
            if running is not None and not running.stopping:
                running.stopping = True
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                threading.Thread(
                    target=self._delete_for_good, args=(running, grace), daemon=True
                ).start()
            elif running is None:
                self._force_delete(metadata["namespace"], metadata["name"])
            return
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if running is None and phase == "Pending":
            running = RunningPod(metadata["namespace"], metadata["name"], metadata["uid"])
            with self._lock:
                self.pods[key] = running
            if not pod["spec"].get("nodeName"):
                self._bind(running)
            running.thread = threading.Thread(
                target=self._run, args=(running, pod), daemon=True, name=f"pod-{key}"
            )
            running.thread.start()

    # -- what happens to one pod ------------------------------------------------------------

    def _bind(self, pod: RunningPod) -> None:
        binding = client.V1Binding.model_validate(
            {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": pod.name, "namespace": pod.namespace},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
            }
        )
        self.core.create_namespaced_binding(pod.namespace, binding, _preload_content=False)

    def _service_account_dir(self, pod: RunningPod, service_account: str) -> Path:
        """What the kubelet projects into /var/run/secrets/kubernetes.io/serviceaccount."""
        directory = self.work_dir / pod.namespace / pod.name / "serviceaccount"
        directory.mkdir(parents=True, exist_ok=True)
        request = client.AuthenticationV1TokenRequest.model_validate(
            {
                "spec": {
                    "audiences": [],
                    "expirationSeconds": 3600,
                    "boundObjectRef": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": pod.name,
                        "uid": pod.uid,
                    },
                }
            }
        )
        token = self.core.create_namespaced_service_account_token(
            service_account, pod.namespace, request
        )
        (directory / "token").write_text(token.status.token)
        shutil.copy(self.cluster.ca_file, directory / "ca.crt")
        (directory / "namespace").write_text(pod.namespace)
        return directory

    def _environment(self, pod: RunningPod, body: dict[str, Any]) -> dict[str, str]:
        container = body["spec"]["containers"][0]
        server = urlparse(self.cluster.server)
        env = {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "HOME": str(self.work_dir),
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": server.hostname or "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(server.port),
            "HOSTNAME": pod.name,
        }
        for item in container.get("env") or []:
            if "value" in item:
                # Every pod here has the pod IP 127.0.0.1: playing the cluster DNS, a pod's name
                # under a headless Service (<host>.<service>.<namespace>.svc) resolves to it.
                env[item["name"]] = POD_DNS_NAME.sub("127.0.0.1", item["value"])
        account = body["spec"].get("serviceAccountName") or "default"
        env["COTRAIN_SERVICEACCOUNT_DIR"] = str(self._service_account_dir(pod, account))
        return env

    def _command(self, container: dict[str, Any]) -> list[str]:
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        if argv and not os.path.isabs(argv[0]) and (VENV_BIN / argv[0]).exists():
            argv[0] = str(VENV_BIN / argv[0])
        return argv

    def _run(self, pod: RunningPod, body: dict[str, Any]) -> None:
        try:
            self._run_container(pod, body)
        except Exception:
            self._log(f"pod {pod.namespace}/{pod.name}: {traceback.format_exc()}")
            raise

    def _run_container(self, pod: RunningPod, body: dict[str, Any]) -> None:
        container = body["spec"]["containers"][0]
        policy = body["spec"].get("restartPolicy", "Always")
        try:
            env = self._environment(pod, body)
        except ApiException as error:
            self._set_status(
                pod,
                "Failed",
                terminated={
                    "exitCode": 128,
                    "reason": "CreateContainerConfigError",
                    "message": str(error.reason),
                },
            )
            return
        pod_dir = self.work_dir / pod.namespace / pod.name
        while not pod.stopping and not self._stop.is_set():
            pod.log_path = pod_dir / f"trainer-{pod.restarts}.log"
            with pod.log_path.open("wb") as log:
                pod.process = subprocess.Popen(
                    self._command(container),
                    env=env,
                    cwd=pod_dir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._set_status(pod, "Running", running=True)
            code = pod.process.wait()
            if pod.stopping:
                return
            terminated = self._termination(pod, code)
            pod.oom_killed = False
            failed = terminated["exitCode"] != 0
            if policy == "Always" or (policy == "OnFailure" and failed):
                pod.restarts += 1
                self._set_status(pod, "Running", last=terminated)
                time.sleep(min(10, 0.5 * 2**pod.restarts))
                continue
            self._set_status(pod, "Failed" if failed else "Succeeded", terminated=terminated)
            return

    def _termination(self, pod: RunningPod, code: int) -> dict[str, Any]:
        if code < 0:
            signum = -code
            reason = "OOMKilled" if pod.oom_killed else "Error"
            return {"exitCode": 128 + signum, "signal": signum, "reason": reason}
        return {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}

    def oom_kill(self, namespace: str, name: str) -> None:
        """Play the kernel's OOM killer on the pod's container (SIGKILL, reason OOMKilled)."""
        with self._lock:
            pod = self.pods[f"{namespace}/{name}"]
        assert pod.process is not None
        pod.oom_killed = True
        os.killpg(pod.process.pid, signal.SIGKILL)

    def _set_status(
        self,
        pod: RunningPod,
        phase: str,
        *,
        running: bool = False,
        terminated: dict[str, Any] | None = None,
        last: dict[str, Any] | None = None,
    ) -> None:
        now = _now()
        if terminated is not None:
            state: dict[str, Any] = {
                "terminated": terminated | {"startedAt": now, "finishedAt": now}
            }
        else:
            state = {"running": {"startedAt": now}}
        container: dict[str, Any] = {
            "name": "trainer",
            "image": "cotrain/trainer:local",
            "imageID": "",
            "ready": phase == "Running",
            "restartCount": pod.restarts,
            "state": state,
            "started": phase == "Running",
        }
        if last is not None:
            container["lastState"] = {"terminated": last | {"startedAt": now, "finishedAt": now}}
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": now,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if phase == "Running" else "False",
                    "lastTransitionTime": now,
                }
            ],
            "containerStatuses": [container],
        }
        try:
            self.core.patch_namespaced_pod_status(
                pod.name,
                pod.namespace,
                {"status": status},
                _content_type="application/merge-patch+json",
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def _terminate(self, pod: RunningPod, grace: float) -> None:
        process = pod.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=max(grace, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def _delete_for_good(self, pod: RunningPod, grace: float) -> None:
        self._terminate(pod, grace)
        self._force_delete(pod.namespace, pod.name)

    def _force_delete(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        except ApiException as error:
            if error.status != 404:
                raise
        with self._lock:
            self.pods.pop(f"{namespace}/{name}", None)

    def processes(self) -> list[int]:
        with self._lock:
            return [
                p.process.pid
                for p in self.pods.values()
                if p.process is not None and p.process.poll() is None
            ]

    def log(self, namespace: str, name: str) -> str:
        directory = self.work_dir / namespace / name
        return "\n".join(p.read_text(errors="replace") for p in sorted(directory.glob("*.log")))
