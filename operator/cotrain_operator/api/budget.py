"""Per-member budgets: how a pod's GPU share and CPU cores are divided among its members.

Owns the one rule both sides apply: `gpu.memory` as asked, the rest of the share in equal parts
for the members that set none; CPU threads from `cpuThreads`, else the cpu limit (at most the
cores there are, when known), else an equal part of the cores. The operator calls it with the
share it planned on a node; `cotrain run` with this machine's device and cores.
"""

from __future__ import annotations

from collections.abc import Sequence

from cotrain_operator.api.models import Member
from cotrain_operator.api.quantity import quantity_bytes


def cpu_threads(member: Member, members: int, cores: int) -> int:
    """Intra-op threads of a member sharing `cores` with `members` members in all."""
    if member.cpu_threads is not None:
        return member.cpu_threads
    limit = member.resources.limits.get("cpu")
    if limit is not None:
        return max(1, min(cores, quantity_bytes(limit)))  # quantity_bytes rounds up, as k8s
    return max(1, cores // max(1, members))


def memory_budgets(members: Sequence[Member], share_bytes: int | None) -> dict[str, int | None]:
    """gpu.memory as asked; the rest of the share in equal parts for the members without."""
    explicit = {m.name: quantity_bytes(m.gpu.memory) for m in members if m.gpu.memory is not None}
    unset = [m.name for m in members if m.gpu.memory is None]
    rest = None
    if share_bytes is not None and unset:
        rest = max(0, share_bytes - sum(explicit.values())) // len(unset)
    return {m.name: explicit.get(m.name, rest) for m in members}
