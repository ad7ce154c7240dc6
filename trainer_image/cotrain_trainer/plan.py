"""The pod plan of `cotrain run`: every member of the job on this one machine.

Owns mapping a cluster spec onto a workstation: the sharing mode (Auto resolved from this
machine's GPU), each member's budget (`gpu.memory` as asked, the rest of the device split equally
among the others; CPU threads from `cpuThreads`, else the cpu limit, else this machine's cores
divided among the members so that co-tenants do not thrash), each data-parallel member's
topology (every replica on this machine, on free loopback ports), and notes that tell the user
what differs from a cluster (no GPU, no MIG slice, ...). Pure but for picking free ports: the
device facts and core count are arguments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cotrain_operator.api.budget import cpu_threads, memory_budgets
from cotrain_operator.api.contract import PlannedBudget, PodPlan
from cotrain_operator.api.models import CoTrainJob, SharingMode
from cotrain_trainer.distributed import local_topology, member_ranks
from cotrain_trainer.gpu import GpuDevice


@dataclass(frozen=True)
class LocalPlan:
    plan: PodPlan
    on_gpu: bool
    notes: list[str] = field(default_factory=list)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_mode(job: CoTrainJob, devices: Sequence[GpuDevice]) -> SharingMode:
    """The spec's mode; Auto becomes MPS when members ask for compute shares, MIG on a MIG
    GPU, else TimeSlicing (processes on one GPU are time-sliced by the driver)."""
    mode = job.spec.sharing.mode
    if mode != SharingMode.AUTO:
        return mode
    if any(m.gpu.compute_percent is not None for m in job.spec.members):
        return SharingMode.MPS
    if devices and devices[0].mig_enabled:
        return SharingMode.MIG
    return SharingMode.TIME_SLICING


def local_plan(
    job: CoTrainJob, devices: Sequence[GpuDevice], cores: int, no_gpu_reason: str = ""
) -> LocalPlan:
    members = job.spec.members
    mode = resolve_mode(job, devices)
    device = devices[0] if devices else None
    device_bytes = device.total_memory_bytes if device else None
    memory = memory_budgets(members, device_bytes)
    budgets = {
        m.name: PlannedBudget(
            memory_bytes=memory[m.name] if device else None,
            compute_percent=m.gpu.compute_percent if mode == SharingMode.MPS else None,
            cpu_threads=cpu_threads(m, len(members), cores),
        )
        for m in members
    }
    threads = ", ".join(f"{m.name} {budgets[m.name].cpu_threads}" for m in members)
    notes = []
    if device is None:
        why = f" ({no_gpu_reason})" if no_gpu_reason else ""
        notes.append(f"no GPU found{why}: members run on the CPU")
        notes.append(f"{cores} CPU core(s); threads per member: {threads}")
    else:
        notes.append(f"{device.describe()}: members share it in mode {mode.value}")
        notes.append(f"{cores} CPU core(s); threads per member: {threads}")
        if mode == SharingMode.MIG and not device.mig_enabled:
            notes.append("this GPU is not in MIG mode: members share the whole GPU")
        if mode == SharingMode.MPS:
            notes.append("MPS limits are set per member; they take effect if an MPS daemon runs")
    topology = {m.name: t for m in members if (t := local_topology(m)) is not None}
    for m in members:
        if m.name in topology:
            ranks = len(member_ranks(m, topology[m.name]))
            notes.append(
                f"{m.name}: {m.replicas} replica(s) x {m.gpu.count} device(s): {ranks} "
                "data-parallel process(es) on this machine, started and restarted together"
            )
    if job.spec.run_policy.suspend:
        notes.append("spec.runPolicy.suspend is ignored by cotrain run")
    plan = PodPlan(
        job=job.metadata.name or "cotrain-job",
        namespace=job.metadata.namespace or "default",
        mode=mode,
        members=list(members),
        budgets=budgets,
        device_memory_bytes=device_bytes,
        backoff_limit=job.spec.run_policy.backoff_limit,
        success_policy=job.spec.success_policy,
        topology=topology,
    )
    return LocalPlan(plan=plan, on_gpu=device is not None, notes=notes)
