"""What a sharing mode is: the `Share` a node can give one pod, behind one small Protocol.

Owns the types every mode module returns. Each mode (exclusive, timeslicing, mps, mig) answers
one question — what share of its GPUs can this node give one pod of this job, or why not — and
placement (`reconcile/placement.py`, `place()`) picks nodes and budgets from the answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cotrain_operator.api.models import Sharing, SharingMode
from cotrain_operator.sharing.inventory import GPU_RESOURCE, SHARED_GPU_RESOURCE, GpuNode


@dataclass(frozen=True)
class Share:
    """One pod's GPU share on one node."""

    mode: SharingMode
    node: str
    resource: str  # the extended resource the pod requests one unit of
    memory_bytes: int | None  # device memory the share holds, when the node says
    compute_percent: int | None = None  # SM share the device plugin enforces (MPS)
    mig_profile: str | None = None


@dataclass(frozen=True)
class Refusal:
    """Why a node cannot give the share, in words that name the node's facts."""

    node: str
    reason: str


class SharingStrategy(Protocol):
    """One sharing mode."""

    mode: SharingMode

    def offer(self, node: GpuNode, sharing: Sharing, demand_bytes: int) -> Share | Refusal:
        """The share `node` can give one pod needing `demand_bytes` of GPU memory."""
        ...


def replica_resource(node: GpuNode) -> str | None:
    """The resource a shared replica is requested as: renamed `.shared` when the plugin did."""
    if node.offers(SHARED_GPU_RESOURCE):
        return SHARED_GPU_RESOURCE
    if node.offers(GPU_RESOURCE):
        return GPU_RESOURCE
    return None
