"""Running a CoTrainJob under the real operator on the real node: the one way the node tests
start the operator as a host process, apply a job with kubectl and watch it to its end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane.cluster import ControlPlane
from tests.controlplane.images import LocalImage
from tests.fixtures.kube import install_cotrain
from tests.fixtures.operator_process import OperatorProcess
from tests.node.conftest import RealNode
from tests.node.waiting import get_json, until


def with_local_images(
    kustomization: dict[str, Any], operator: LocalImage, trainer: LocalImage
) -> dict[str, Any]:
    """A kustomization that installs the operator with the images built here instead of the
    released ones (the node has no registry): the one change a test makes to a user's overlay."""
    name, tag = operator.ref.rsplit(":", 1)
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "cotrain-operator", "namespace": "cotrain-system"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "operator",
                            "env": [{"name": "COTRAIN_TRAINER_IMAGE", "value": trainer.ref}],
                        }
                    ]
                }
            }
        },
    }
    return {
        **kustomization,
        "images": [{"name": "ghcr.io/cotrain/operator", "newName": name, "newTag": tag}],
        "patches": [*kustomization.get("patches", []), {"patch": yaml.safe_dump(patch)}],
    }


def events(cp: ControlPlane, ns: str) -> str:
    """The namespace's events, for an assertion's message."""
    return cp.kubectl("get", "events", "-n", ns, "-o", "wide", check=False).stdout


def job_path(ns: str, name: str) -> str:
    return f"/apis/cotrain.dev/v1alpha1/namespaces/{ns}/cotrainjobs/{name}"


@contextmanager
def host_operator(
    real_node: RealNode,
    trainer_image: LocalImage | None,
    ns: str,
    work: Path,
    kubeconfig: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[OperatorProcess]:
    """The real operator as a host process for ``ns``, as deploy/'s ServiceAccount (through
    ``kubeconfig`` when given, e.g. a fault proxy's), its pods in ``trainer_image`` (None: an
    image the node lacks, for a test whose pods need not run), ``env`` added to its own."""
    cp = real_node.control_plane
    install_cotrain(cp)
    if kubeconfig is None:
        kubeconfig = cp.service_account_kubeconfig(
            "cotrain-system", "cotrain-operator", create=False, duration="1h"
        )
    image = {"trainer_image": trainer_image.ref} if trainer_image else {}
    with OperatorProcess(kubeconfig, work, namespace=ns, env=env, **image) as operator:
        yield operator


@dataclass
class Ran:
    status: dict[str, Any]  # the job's, at its end
    pods: dict[str, dict[str, Any]]  # every pod of the job seen while it ran, as last seen
    # The last lines of each pod seen Failed, taken before the operator removes it: what a
    # failed attempt printed, for an assertion's message.
    failed_logs: dict[str, str]


def watch_to_end(cp: ControlPlane, ns: str, name: str, timeout: float = 240) -> Ran:
    """Poll job ``name`` and its namespace's pods until the job Succeeded or Failed."""
    seen: dict[str, dict[str, Any]] = {}
    logs: dict[str, str] = {}

    def ended() -> dict[str, Any] | None:
        for pod in get_json(cp, f"/api/v1/namespaces/{ns}/pods")["items"]:
            pod_name = pod["metadata"]["name"]
            seen[pod_name] = pod
            if pod["status"].get("phase") == "Failed" and pod_name not in logs:
                got = cp.kubectl("logs", "-n", ns, pod_name, "--tail=40", check=False)
                logs[pod_name] = got.stdout[-4000:] or got.stderr[-400:]
        status: dict[str, Any] = get_json(cp, job_path(ns, name)).get("status", {})
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    return Ran(until(f"job {name} to end", ended, timeout=timeout), seen, logs)


def run_operator_job(
    real_node: RealNode,
    trainer_image: LocalImage,
    ns: str,
    job: dict[str, Any],
    work: Path,
    timeout: float = 240,
) -> Ran:
    """``kubectl apply`` ``job`` under the real operator and watch it to its end."""
    cp = real_node.control_plane
    with host_operator(real_node, trainer_image, ns, work):
        cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(job))
        return watch_to_end(cp, ns, job["metadata"]["name"], timeout)


def assert_trained(status: dict[str, Any], members: list[str]) -> None:
    """Each of ``members`` Succeeded with every step counted and its loss gone down."""
    for name in members:
        member = status["members"][name]
        assert member["phase"] == "Succeeded", (name, member)
        assert member["step"] == member["totalSteps"] > 0, (name, member)
        assert member["loss"] < member["firstLoss"], (name, member)
        assert member["samplesPerSecond"] > 0, (name, member)
        assert member["lastReportTime"], (name, member)
