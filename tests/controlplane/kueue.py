"""A real Kueue for the tests: sigs.k8s.io/kueue's manager (built in setup by
``kueue-module/build.sh``) started as a host process against a test control plane.

What it takes to run it outside a cluster, and why:

- Its CRDs come from the module (``crds/``, v1beta2 the storage version; no conversion webhook,
  so only v1beta2 is used).
- ``internalCertManagement`` is off: Kueue's rotator signs for its in-cluster Service name only.
  Its webhook server serves on 127.0.0.1 with the control plane's serving certificate (whose SANs
  include 127.0.0.1), and Kueue's own webhook manifests are registered with ``url:`` in place of
  their Service, for its own API group only (the other entries are for job frameworks that are
  not enabled; with ``failurePolicy: Fail`` they would refuse every Pod).
- With internal certificates off, ``cmd/kueue`` reads its metrics certificate from the fixed path
  /etc/kueue/metrics/certs, so the same certificate is put there (the tests run as root).
- Leader election is off, and so is the visibility API (it would need certificates of its own).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controlplane.cluster import ControlPlane, _Proc, _spawn, free_port

BUILD = Path(__file__).resolve().parent / "kueue-module" / "build.sh"
METRICS_CERTS = Path("/etc/kueue/metrics/certs")
KUEUE_GROUP = "kueue.x-k8s.io"


INTEGRATION_CONFIG = (
    Path(__file__).resolve().parents[2]
    / "deploy"
    / "components"
    / "kueue"
    / "kueue-configuration.yaml"
)


class KueueMissingError(RuntimeError):
    pass


def kueue_build() -> Path:
    """Where setup built Kueue for these inputs; never builds."""
    run = subprocess.run(["bash", str(BUILD), "--check"], capture_output=True, text=True)
    if run.returncode != 0:
        raise KueueMissingError(run.stderr.strip() or f"{BUILD} --check exited {run.returncode}")
    return Path(run.stdout.strip().splitlines()[-1])


def _own_webhooks(manifests: str, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, cut to its own API group, pointed at ``url``."""
    documents = []
    for document in yaml.safe_load_all(manifests):
        if not document:
            continue
        kind = document["kind"].removesuffix("WebhookConfiguration").lower()
        document["metadata"] = {"name": f"kueue-{kind}-webhook-configuration"}
        hooks = []
        for hook in document["webhooks"]:
            groups = {g for rule in hook["rules"] for g in rule["apiGroups"]}
            if groups != {KUEUE_GROUP}:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": ca_bundle}
            hooks.append(hook)
        document["webhooks"] = hooks
        documents.append(document)
    return documents


@dataclass
class Kueue:
    control_plane: ControlPlane
    process: _Proc
    health_url: str
    config_path: Path

    def logs(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.stop(15)
        self.control_plane.kubectl(
            "delete", "mutatingwebhookconfiguration,validatingwebhookconfiguration",
            "kueue-mutating-webhook-configuration", "kueue-validating-webhook-configuration",
            "--ignore-not-found", check=False,
        )  # fmt: skip


@contextmanager
def running_kueue(cp: ControlPlane, work: Path) -> Iterator[Kueue]:
    """The Kueue that setup built, running against ``cp`` for the block; a test fails (never
    skips) where it is not built."""
    try:
        built = kueue_build()
    except KueueMissingError as e:
        pytest.fail(str(e))
    running = start_kueue(cp, built, work)
    try:
        yield running
    finally:
        running.stop()


def start_kueue(cp: ControlPlane, built: Path, work: Path, timeout: float = 120) -> Kueue:
    """Kueue's CRDs installed and its manager running against ``cp``, ready and admitting."""
    work.mkdir(parents=True, exist_ok=True)
    cp.kubectl("apply", "--server-side", "-f", str(built / "crds"))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(built / "crds"))
    cp.kubectl("create", "namespace", "kueue-system", check=False)
    pki = cp.ca_file.parent
    certs = work / "certs"
    for target in (certs, METRICS_CERTS):
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(pki / "apiserver.crt", target / "tls.crt")
        shutil.copy(pki / "apiserver.key", target / "tls.key")
    webhook_port, health_port = free_port(), free_port()
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(certs)},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        # What docs/kueue.md has a user merge into Kueue's configuration, from deploy/.
        "integrations": yaml.safe_load(INTEGRATION_CONFIG.read_text())["integrations"],
        "featureGates": {"VisibilityOnDemand": False},
    }
    config_path = work / "kueue.yaml"
    config_path.write_text(yaml.safe_dump(config))
    argv = [
        str(built / "bin" / "kueue"),
        f"--config={config_path}",
        f"--kubeconfig={cp.kubeconfig}",
        "--zap-log-level=2",
    ]
    process = _spawn("kueue", argv, work / "kueue.log")
    kueue = Kueue(cp, process, f"http://127.0.0.1:{health_port}/readyz", config_path)
    try:
        _wait_ready(kueue, timeout)
        ca_bundle = base64.b64encode(cp.ca_file.read_bytes()).decode()
        url = f"https://127.0.0.1:{webhook_port}"
        hooks = _own_webhooks((built / "webhooks.yaml").read_text(), url, ca_bundle)
        cp.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(hooks))
    except BaseException:
        kueue.stop()
        raise
    return kueue


def _wait_ready(kueue: Kueue, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not kueue.process.alive():
            raise RuntimeError(
                f"kueue exited {kueue.process.popen.returncode}:\n{kueue.logs()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(kueue.health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"kueue not ready after {timeout}s:\n{kueue.logs()[-4000:]}")
