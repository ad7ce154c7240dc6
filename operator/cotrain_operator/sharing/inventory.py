"""GPU facts of the cluster's nodes, read from NVIDIA GPU Feature Discovery labels.

Owns parsing a Node object into a `GpuNode`: how many GPUs, which product, how much memory per
GPU, how the device plugin shares them (none, time-slicing, MPS; replicas; renamed resources)
and which MIG slices it offers. Pure: the planner calls it on the nodes the operator watches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

MIB = 2**20
NVIDIA_RESOURCE_PREFIX = "nvidia.com/"  # every resource NVIDIA's device plugins advertise
GPU_RESOURCE = "nvidia.com/gpu"
SHARED_GPU_RESOURCE = "nvidia.com/gpu.shared"
LABEL_COUNT = "nvidia.com/gpu.count"
LABEL_PRODUCT = "nvidia.com/gpu.product"
LABEL_MEMORY = "nvidia.com/gpu.memory"  # MiB per GPU
LABEL_REPLICAS = "nvidia.com/gpu.replicas"
LABEL_SHARING = "nvidia.com/gpu.sharing-strategy"  # none | time-slicing | mps
LABEL_MIG_STRATEGY = "nvidia.com/mig.strategy"  # none | single | mixed
LABEL_HOSTNAME = "kubernetes.io/hostname"
# The device plugin and GFD name a profile's resource and labels with its "+" as "." (resource
# names and label keys allow no "+"): profile 1g.10gb+me is nvidia.com/mig-1g.10gb.me.
_MIG_COUNT = re.compile(r"^nvidia\.com/mig-(?P<name>[^.]+\.[^.]+(?:\.me)?)\.count$")
_MIG_PROFILE_GB = re.compile(r"^\d+g\.(?P<gb>\d+)gb")


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class MigSlice:
    """MIG slices of one profile that a node offers."""

    profile: str
    count: int
    memory_bytes: int


@dataclass(frozen=True)
class GpuNode:
    """What one node offers to GPU workloads."""

    name: str
    hostname: str
    product: str | None
    gpu_count: int
    memory_bytes: int | None  # per physical GPU
    sharing_strategy: str  # none | time-slicing | mps
    replicas: int
    mig_strategy: str  # none | single | mixed
    allocatable: Mapping[str, int] = field(default_factory=dict)
    mig_slices: tuple[MigSlice, ...] = ()
    schedulable: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)

    def offers(self, resource: str) -> int:
        """Allocatable units of an extended resource (0 when absent)."""
        return self.allocatable.get(resource, 0)

    def facts(self) -> str:
        """A short description for messages: 'gpu-a (NVIDIA-A100, 2x 40960MiB, time-slicing x4)'."""
        memory = f"{self.memory_bytes // MIB}MiB" if self.memory_bytes else "memory unknown"
        parts = [self.product or "GPU", f"{self.gpu_count}x {memory}"]
        if self.sharing_strategy != "none":
            parts.append(f"{self.sharing_strategy} x{self.replicas}")
        if self.mig_strategy != "none":
            slices = ",".join(f"{s.profile}x{s.count}" for s in self.mig_slices) or "no slices"
            parts.append(f"MIG {self.mig_strategy} {slices}")
        return f"{self.name} ({', '.join(parts)})"


def less_held(node: GpuNode, held: Mapping[str, int]) -> GpuNode:
    """`node` with the GPU shares that live pods already hold taken off its allocatable."""
    if not held:
        return node
    free = {k: max(0, v - held.get(k, 0)) for k, v in node.allocatable.items()}
    return replace(node, allocatable=free)


def mig_name(profile: str) -> str:
    """How the device plugin and GFD spell a MIG profile in resource names and label keys."""
    return profile.replace("+", ".")


def mig_profile_memory_bytes(profile: str) -> int | None:
    """Memory of a MIG profile from its name ('1g.10gb' -> 10 GiB), when no label says."""
    match = _MIG_PROFILE_GB.match(profile)
    return int(match.group("gb")) * 1024 * MIB if match else None


def parse_node(node: Mapping[str, Any]) -> GpuNode | None:
    """The node's GPU facts, or None when it offers no NVIDIA GPU at all."""
    metadata = node.get("metadata") or {}
    labels: Mapping[str, str] = metadata.get("labels") or {}
    status = node.get("status") or {}
    allocatable = {
        key: amount
        for key, value in (status.get("allocatable") or {}).items()
        if key.startswith(NVIDIA_RESOURCE_PREFIX) and (amount := _int(value)) is not None
    }
    slices = []
    for key, value in labels.items():
        match = _MIG_COUNT.match(key)
        count = _int(value)
        if match and count:
            name = match.group("name")
            profile = name.removesuffix(".me") + ("+me" if name.endswith(".me") else "")
            memory_mib = _int(labels.get(f"nvidia.com/mig-{name}.memory"))
            memory = memory_mib * MIB if memory_mib else mig_profile_memory_bytes(profile)
            slices.append(MigSlice(profile, count, memory or 0))
    gpu_count = _int(labels.get(LABEL_COUNT)) or 0
    if not allocatable and not gpu_count and not slices:
        return None
    memory_mib = _int(labels.get(LABEL_MEMORY))
    spec = node.get("spec") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    name = str(metadata.get("name", ""))
    return GpuNode(
        name=name,
        hostname=labels.get(LABEL_HOSTNAME, name),
        product=labels.get(LABEL_PRODUCT),
        gpu_count=gpu_count or allocatable.get(GPU_RESOURCE, 0),
        memory_bytes=memory_mib * MIB if memory_mib else None,
        sharing_strategy=labels.get(LABEL_SHARING, "none"),
        replicas=max(1, _int(labels.get(LABEL_REPLICAS)) or 1),
        mig_strategy=labels.get(LABEL_MIG_STRATEGY, "none"),
        allocatable=allocatable,
        mig_slices=tuple(sorted(slices, key=lambda s: (s.memory_bytes, s.profile))),
        schedulable=ready and not spec.get("unschedulable", False),
        labels=dict(labels),
    )
