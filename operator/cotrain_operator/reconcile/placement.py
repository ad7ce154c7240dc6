"""Placement: which pods a job needs, which nodes can hold them, and each member's GPU budget.

Owns grouping members into pods (SameGPU: one pod; PodPerMember: one per member), resolving
`mode: Auto`, asking each sharing mode what every node can give one pod, and splitting that share
into per-member budgets (explicit `gpu.memory` first, the rest in equal parts). A job that fits
nowhere gets an `Unschedulable` that names the node facts, before any pod exists. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cotrain_operator.api.budget import cpu_threads, memory_budgets
from cotrain_operator.api.contract import PlannedBudget
from cotrain_operator.api.models import CoTrainJob, Member, PlacementStrategy, SharingMode
from cotrain_operator.api.quantity import quantity_bytes
from cotrain_operator.settings import DecisionSettings
from cotrain_operator.sharing import GpuNode, Refusal, Share, auto_mode, strategy
from cotrain_operator.sharing.inventory import NVIDIA_RESOURCE_PREFIX

MIB = 2**20
SAME_GPU_GROUP = "gpu"
# Cores a trainer pod may assume it shares among its members when neither cpuThreads nor a cpu
# limit says otherwise (the node's real count is unknown until the pod runs): a setting.
NODE_CORES = DecisionSettings.default_cpu_threads


@dataclass(frozen=True)
class PodGroup:
    """Members that run in one pod and share its one GPU share."""

    name: str  # "gpu" for SameGPU; the member's name, "-<index>" added for its replicas
    members: tuple[Member, ...]
    replica: int | None = None  # the replica index of a member with replicas > 1

    @property
    def devices(self) -> int:
        """Units of the share the pod requests (gpu.count; members of SameGPU share one)."""
        return max(m.gpu.count for m in self.members)

    @property
    def demand_bytes(self) -> int:
        """GPU memory the members ask for explicitly."""
        return sum(quantity_bytes(m.gpu.memory) for m in self.members if m.gpu.memory is not None)


@dataclass(frozen=True)
class GroupPlacement:
    """Where one pod group may run and what each of its members gets."""

    group: PodGroup
    share: Share  # the share on the first fitting node (the budget holds on all of them)
    nodes: tuple[str, ...]  # hostnames of every node that fits
    budgets: dict[str, PlannedBudget]


@dataclass(frozen=True)
class Placement:
    mode: SharingMode
    groups: tuple[GroupPlacement, ...]
    gpu_product: str | None


@dataclass(frozen=True)
class Unschedulable:
    reason: str
    message: str
    refusals: tuple[Refusal, ...] = field(default=())


def held_share(pod: Mapping[str, Any]) -> tuple[str, dict[str, int]] | None:
    """(node, GPU shares by resource) that a live pod bound to a node holds, or None: a pod
    not yet bound, finished or being deleted holds none."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    node = spec.get("nodeName")
    phase = (pod.get("status") or {}).get("phase")
    if not node or metadata.get("deletionTimestamp") or phase in ("Succeeded", "Failed"):
        return None
    held: dict[str, int] = {}
    for container in spec.get("containers") or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        for resource, amount in limits.items():
            if str(resource).startswith(NVIDIA_RESOURCE_PREFIX):
                try:
                    held[resource] = held.get(resource, 0) + int(str(amount))
                except ValueError:
                    continue
    return (str(node), held) if held else None


def pod_groups(job: CoTrainJob) -> tuple[PodGroup, ...]:
    members = tuple(job.spec.members)
    if job.spec.placement.strategy == PlacementStrategy.SAME_GPU:
        return (PodGroup(SAME_GPU_GROUP, members),)
    groups: list[PodGroup] = []
    for member in members:
        if member.replicas == 1:
            groups.append(PodGroup(member.name, (member,)))
        else:
            groups.extend(
                PodGroup(f"{member.name}-{index}", (member,), index)
                for index in range(member.replicas)
            )
    return tuple(groups)


def member_budgets(
    group: PodGroup, share_bytes: int | None, node_cores: int = NODE_CORES
) -> dict[str, PlannedBudget]:
    memory = memory_budgets(group.members, share_bytes)
    return {
        member.name: PlannedBudget(
            memory_bytes=memory[member.name],
            compute_percent=member.gpu.compute_percent,
            cpu_threads=cpu_threads(member, len(group.members), node_cores),
        )
        for member in group.members
    }


def _offer(job: CoTrainJob, mode: SharingMode, node: GpuNode, group: PodGroup) -> Share | Refusal:
    demand = group.demand_bytes
    offer = strategy(mode).offer(node, job.spec.sharing, demand)
    if isinstance(offer, Share) and node.offers(offer.resource) < group.devices:
        return Refusal(
            node.name,
            f"{node.facts()}: {node.offers(offer.resource)} {offer.resource}, fewer than the "
            f"{group.devices} one pod asks for (gpu.count)",
        )
    if isinstance(offer, Share) and offer.memory_bytes is not None and demand > offer.memory_bytes:
        return Refusal(
            node.name,
            f"{node.facts()}: a {mode.value} share holds {offer.memory_bytes // MIB}MiB, "
            f"less than the {demand // MIB}MiB the members ask for",
        )
    unset = [m.name for m in group.members if m.gpu.memory is None]
    if isinstance(offer, Share) and offer.memory_bytes is not None and unset:
        # The members without gpu.memory split what is left; nothing left would leave them
        # uncapped beside members that asked for the whole share.
        left = offer.memory_bytes - demand
        if left < MIB * len(unset):
            return Refusal(
                node.name,
                f"{node.facts()}: a {mode.value} share holds {offer.memory_bytes // MIB}MiB and "
                f"the members' gpu.memory take {demand // MIB}MiB of it, leaving none for "
                f"{', '.join(unset)} (no gpu.memory)",
            )
    if isinstance(offer, Share) and offer.compute_percent is not None:
        # An MPS client's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE can only lower the daemon's limit,
        # which the device plugin sets to 100/replicas: asking for more would silently get less.
        greedy = [m for m in group.members if (m.gpu.compute_percent or 0) > offer.compute_percent]
        if greedy:
            asked = ", ".join(f"{m.name} {m.gpu.compute_percent}%" for m in greedy)
            return Refusal(
                node.name,
                f"{node.facts()}: its MPS daemon grants each client at most "
                f"{offer.compute_percent}% of the GPU (100/{node.replicas} replicas), less than "
                f"gpu.computePercent {asked}",
            )
    return offer


def _selected(job: CoTrainJob, node: GpuNode) -> bool:
    selector = job.spec.placement.node_selector
    return node.schedulable and all(node.labels.get(k) == v for k, v in selector.items())


def _gangs_fit(
    groups: tuple[PodGroup, ...],
    fits: dict[str, list[tuple[GpuNode, Share]]],
    refusals: list[Refusal],
) -> bool:
    """A member's replicas start together (a gang): the nodes that fit them must offer enough
    units of the share for all of them at once."""
    gangs: dict[str, list[PodGroup]] = {}
    for group in groups:
        if group.replica is not None:
            gangs.setdefault(group.members[0].name, []).append(group)
    for member, gang in gangs.items():
        nodes = {n.name: (n, s) for g in gang for n, s in fits[g.name]}
        units = sum(n.offers(s.resource) for n, s in nodes.values())
        wanted = sum(g.devices for g in gang)
        if units < wanted:
            refusals.append(
                Refusal(
                    "*",
                    f"member {member} needs {wanted} GPU share(s) at once for its {len(gang)} "
                    f"replicas; the nodes that fit offer {units}",
                )
            )
            return False
    return True


def place(
    job: CoTrainJob, nodes: list[GpuNode], node_cores: int = NODE_CORES
) -> Placement | Unschedulable:
    """Fit every pod group of `job` on the GPU nodes, or say why it cannot fit anywhere;
    `node_cores`: the CPU threads a pod's members share unless they say otherwise."""
    groups = pod_groups(job)
    candidates = sorted((n for n in nodes if _selected(job, n)), key=lambda n: n.name)
    if not candidates:
        selector = job.spec.placement.node_selector
        where = f" matching nodeSelector {selector}" if selector else ""
        return Unschedulable("NoGPUNodes", f"no ready node{where} offers an NVIDIA GPU")
    requested = job.spec.sharing.mode
    if requested == SharingMode.AUTO:
        modes = []
        for node in candidates:
            mode = auto_mode(node)
            if mode not in modes:
                modes.append(mode)
        if any(m.gpu.compute_percent is not None for m in job.spec.members):
            # gpu.computePercent is an MPS share: no other mode can honour it.
            modes = [SharingMode.MPS]
    else:
        modes = [requested]
    refusals: list[Refusal] = []
    for mode in modes:
        placed = _place_mode(job, groups, mode, candidates, refusals, node_cores)
        if placed is not None:
            return placed
    facts = "; ".join(r.reason for r in refusals)
    tried = "/".join(m.value for m in modes)
    return Unschedulable(
        "NoNodeFits",
        f"no node can hold the job's {len(groups)} pod(s) in mode {tried}: {facts}",
        tuple(refusals),
    )


def _place_mode(
    job: CoTrainJob,
    groups: tuple[PodGroup, ...],
    mode: SharingMode,
    candidates: list[GpuNode],
    refusals: list[Refusal],
    node_cores: int,
) -> Placement | None:
    fits: dict[str, list[tuple[GpuNode, Share]]] = {}
    for group in groups:
        fits[group.name] = []
        for node in candidates:
            offer = _offer(job, mode, node, group)
            if isinstance(offer, Share):
                fits[group.name].append((node, offer))
            elif offer not in refusals:
                refusals.append(offer)
    if job.spec.placement.same_node:
        common = set.intersection(*({n.name for n, _ in f} for f in fits.values()))
        roomy = (
            {
                name
                for name in common
                if next(n for n in candidates if n.name == name).offers(
                    fits[groups[0].name][0][1].resource
                )
                >= len(groups)
            }
            if common
            else set()
        )
        if not roomy:
            refusals.append(Refusal("*", f"no single node holds all {len(groups)} member pods"))
            return None
        fits = {g: [(n, s) for n, s in f if n.name in roomy] for g, f in fits.items()}
    if not all(fits.values()):
        return None
    if not _gangs_fit(groups, fits, refusals):
        return None
    placements = []
    for group in groups:
        _, first_share = fits[group.name][0]
        # Keep the nodes that give the same kind of share, and budget for the smallest of them.
        same_kind = [(n, s) for n, s in fits[group.name] if s.resource == first_share.resource]
        sizes = [s.memory_bytes for _, s in same_kind if s.memory_bytes is not None]
        budget_bytes = min(sizes) if sizes else None
        placements.append(
            GroupPlacement(
                group=group,
                share=first_share,
                nodes=tuple(n.hostname for n, _ in same_kind),
                budgets=member_budgets(group, budget_bytes, node_cores),
            )
        )
    product = next(n.product for n, _ in fits[groups[0].name])
    return Placement(mode, tuple(placements), product)
