"""Builders of the objects a CoTrainJob owns: its trainer pods and its peers' Services.

Owns the exact shape of every child: deterministic names, our labels, an ownerReference to the
job, and trainer pods that run as the namespace's trainer ServiceAccount (access.py), request
their GPU share, carry the PodPlan and meet the Pod Security "restricted" profile. Pure functions
of the job and the placement.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from cotrain_operator.api.contract import (
    ENV_POD_PLAN,
    ENV_REPORT_MODE,
    LABEL_ATTEMPT,
    LABEL_GROUP,
    LABEL_JOB,
    LABEL_MEMBER,
    LABEL_REPLICA,
    TRAINER_CONTAINER,
    MemberTopology,
    PodPlan,
)
from cotrain_operator.api.models import (
    API_VERSION,
    GROUP,
    KIND,
    CoTrainJob,
    Framework,
    Member,
    SharingMode,
)
from cotrain_operator.api.quantity import parse_quantity
from cotrain_operator.reconcile.access import TRAINER_SERVICE_ACCOUNT
from cotrain_operator.reconcile.placement import GroupPlacement, Placement
from cotrain_operator.settings import DecisionSettings

# torch.distributed's rendezvous on replica 0, and each TensorFlow worker's own port (distinct
# per replica, so replicas that share a host never collide).
TORCH_MASTER_PORT = 29500
TF_WORKER_BASE_PORT = 2222
ANNOTATION_RESTARTS = f"{GROUP}/restarts"
MANAGED_BY = "cotrain-operator"
TRAINER_UID = 1000
# Shared memory for the frameworks' data loaders; under MPS the device plugin mounts its own.
SHM_PATH = "/dev/shm"


def job_labels(job_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "cotrain",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB: job_name,
    }


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    metadata = body["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(body: Mapping[str, Any], name: str, **extra: Any) -> dict[str, Any]:
    job_name = body["metadata"]["name"]
    return {
        "name": name,
        "namespace": body["metadata"]["namespace"],
        "labels": job_labels(job_name) | extra.pop("labels", {}),
        "ownerReferences": [owner_reference(body)],
        **extra,
    }


def pod_name(job_name: str, group: str, attempt: int) -> str:
    return f"{job_name}-{group}-{attempt}"


def _sum_quantities(values: list[str | int]) -> str:
    total = sum((parse_quantity(v) for v in values), Decimal(0))
    return format(total.normalize(), "f")


def _container_resources(group: GroupPlacement) -> dict[str, dict[str, str]]:
    """The trainer container's requests and limits: the sum over its members.

    Each member counts as a container of its own would: a limit without a request requests the
    limit. A resource gets a limit only when every member limits it, since one unlimited member
    makes the container's use of it unlimited; so requests never exceed limits."""
    members = group.group.members
    requests: dict[str, list[str | int]] = {}
    limits: dict[str, list[str | int]] = {}
    for member in members:
        asked = {**member.resources.limits, **member.resources.requests}
        for key, value in asked.items():
            requests.setdefault(key, []).append(value)
        for key, value in member.resources.limits.items():
            limits.setdefault(key, []).append(value)
    resources = {
        "requests": {k: _sum_quantities(v) for k, v in requests.items()},
        "limits": {k: _sum_quantities(v) for k, v in limits.items() if len(v) == len(members)},
    }
    # Extended resources are requested by limit; Kubernetes copies it to requests.
    resources["limits"][group.share.resource] = str(group.group.devices)
    return resources


def _affinity(job: CoTrainJob, group: GroupPlacement) -> dict[str, Any]:
    affinity: dict[str, Any] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {
                                "key": "kubernetes.io/hostname",
                                "operator": "In",
                                "values": sorted(group.nodes),
                            }
                        ]
                    }
                ]
            }
        }
    }
    if job.spec.placement.same_node:
        affinity["podAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": {LABEL_JOB: job.metadata.name or ""}},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    return affinity


def peer_service_name(job_name: str, member: str) -> str:
    return f"{job_name}-{member}"


def _replica_host(job_name: str, namespace: str, member: str, index: int) -> str:
    """The stable DNS name of one replica's pod (hostname + subdomain of the headless Service)."""
    return f"{member}-{index}.{peer_service_name(job_name, member)}.{namespace}.svc"


def topology(job_name: str, namespace: str, member: Member, replica: int | None) -> MemberTopology:
    """Where this pod's processes of `member` sit in the member's data-parallel world."""
    procs = member.gpu.count if member.framework == Framework.PYTORCH else 1
    if member.replicas == 1:
        return MemberTopology(replicas=1, procs_per_replica=procs, replica_indices=[0])
    hosts = [_replica_host(job_name, namespace, member.name, i) for i in range(member.replicas)]
    return MemberTopology(
        replicas=member.replicas,
        procs_per_replica=procs,
        replica_indices=[replica or 0],
        master_addr=hosts[0],
        master_port=TORCH_MASTER_PORT,
        worker_hosts=[f"{host}:{TF_WORKER_BASE_PORT + i}" for i, host in enumerate(hosts)],
    )


def build_peer_services(body: Mapping[str, Any], job: CoTrainJob) -> list[dict[str, Any]]:
    """A headless Service per member with replicas, so they find each other by stable names."""
    job_name = body["metadata"]["name"]
    services = []
    for member in job.spec.members:
        if member.replicas == 1:
            continue
        ports = [{"name": "torch", "port": TORCH_MASTER_PORT, "targetPort": TORCH_MASTER_PORT}]
        ports += [
            {
                "name": f"tf-{i}",
                "port": TF_WORKER_BASE_PORT + i,
                "targetPort": TF_WORKER_BASE_PORT + i,
            }
            for i in range(member.replicas)
        ]
        services.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _metadata(body, peer_service_name(job_name, member.name)),
                "spec": {
                    "clusterIP": "None",
                    # Replicas must resolve each other while they start, before they are ready.
                    "publishNotReadyAddresses": True,
                    "selector": {LABEL_JOB: job_name, LABEL_MEMBER: member.name},
                    "ports": ports,
                },
            }
        )
    return services


def build_pod(
    body: Mapping[str, Any],
    job: CoTrainJob,
    placement: Placement,
    group: GroupPlacement,
    attempt: int,
    restarts: Mapping[str, int],
    trainer_image: str = DecisionSettings.trainer_image,
) -> dict[str, Any]:
    """The trainer pod of one group, attempt `attempt`, continuing from `restarts`; in
    `trainer_image` unless its members name their own."""
    job_name = body["metadata"]["name"]
    images = {m.image for m in group.group.members if m.image}
    image = images.pop() if images else trainer_image
    plan = PodPlan(
        job=job_name,
        namespace=body["metadata"]["namespace"],
        mode=placement.mode,
        members=list(group.group.members),
        budgets=group.budgets,
        device_memory_bytes=group.share.memory_bytes,
        backoff_limit=job.spec.run_policy.backoff_limit,
        success_policy=job.spec.success_policy,
        restarts={m.name: restarts.get(m.name, 0) for m in group.group.members},
        topology={
            m.name: topology(job_name, body["metadata"]["namespace"], m, group.group.replica)
            for m in group.group.members
            if m.replicas > 1 or m.gpu.count > 1
        },
    )
    env = [
        {"name": ENV_POD_PLAN, "value": plan.model_dump_json(by_alias=True, exclude_none=True)},
        {"name": ENV_REPORT_MODE, "value": "kubernetes"},
    ]
    # Under MPS the device plugin's Allocate gives the container CUDA_MPS_PIPE_DIRECTORY, mounts
    # its daemon's pipe directory and its /dev/shm: the pod sets and mounts nothing over them, so
    # the members (which inherit the supervisor's environment) reach the daemon. The trainer sets
    # each member's own limits (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, ..._PINNED_DEVICE_MEM_LIMIT).
    mps = placement.mode == SharingMode.MPS
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "resources": _container_resources(group),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
        + ([] if mps else [{"name": "dshm", "mountPath": SHM_PATH}]),
    }
    # The supervisor runs every member (built-in or its own command) as a process of its own.
    container["command"] = ["cotrain", "supervise"]
    labels = {LABEL_GROUP: group.group.name, LABEL_ATTEMPT: str(attempt)}
    peers: dict[str, Any] = {}
    if len(group.group.members) == 1:
        member = group.group.members[0]
        labels[LABEL_MEMBER] = member.name
        if group.group.replica is not None:
            labels[LABEL_REPLICA] = str(group.group.replica)
            peers = {
                "hostname": f"{member.name}-{group.group.replica}",
                "subdomain": peer_service_name(job_name, member.name),
            }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(
            body,
            pod_name(job_name, group.group.name, attempt),
            labels=labels,
            annotations={ANNOTATION_RESTARTS: json.dumps(plan.restarts, sort_keys=True)},
        ),
        "spec": {
            **peers,
            "restartPolicy": "Never",
            "serviceAccountName": TRAINER_SERVICE_ACCOUNT,
            "automountServiceAccountToken": True,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 30,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": TRAINER_UID,
                "runAsGroup": TRAINER_UID,
                "fsGroup": TRAINER_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "affinity": _affinity(job, group),
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {}}]
            + ([] if mps else [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]),
        },
    }
