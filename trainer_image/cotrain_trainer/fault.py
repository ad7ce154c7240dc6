"""Who was at fault when a member of a shared pod ran out of memory.

Owns the attribution. The members of one pod share two pools: the container's memory (the pod's
limit is the members' ``resources.limits.memory`` summed) and, under TimeSlicing, the GPU share
(each member's ``gpu.memory`` budget, a cooperative cap). The member that runs out is not always
the one that took too much: the kernel's OOM killer picks the largest process in the cgroup, and
a co-tenant that ignores its cap leaves a well-behaved member's allocation to fail. So when a
member is OOM-killed or fails with a GPU out-of-memory error, the supervisor weighs what it saw
of every member (resident memory sampled from /proc, device memory from the frameworks' probes)
against each one's own limit: a member within its limit while a running co-tenant was over its
own is the co-tenant's victim (``CoTenantFault``: restarted at no cost), and the co-tenant is
charged. Anything less certain charges the member that ran out, as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cotrain_operator.api.models import Member
from cotrain_operator.api.quantity import quantity_bytes

MIB = 1 << 20


@dataclass(frozen=True)
class Usage:
    """What the supervisor last saw of one member's use of a pool, against its own limit."""

    member: str
    used_bytes: int | None  # None: never seen
    limit_bytes: int | None  # None: the member has no limit of its own in this pool
    running: bool = True

    @property
    def over(self) -> bool:
        return (
            self.used_bytes is not None
            and self.limit_bytes is not None
            and self.used_bytes > self.limit_bytes
        )

    @property
    def within(self) -> bool:
        return (
            self.used_bytes is not None
            and self.limit_bytes is not None
            and self.used_bytes <= self.limit_bytes
        )

    def describe(self) -> str:
        """E.g. "300MiB of its 200MiB limit"."""
        used = "?" if self.used_bytes is None else f"{self.used_bytes // MIB}MiB"
        if self.limit_bytes is None:
            return f"{used} (no limit of its own)"
        return f"{used} of its {self.limit_bytes // MIB}MiB limit"


def culprits(victim: Usage, others: Sequence[Usage]) -> tuple[Usage, ...]:
    """The running co-tenants over their own limits when ``victim`` was within its own, most
    over first; none when the victim was over its limit, had none, or was never seen, or when no
    running co-tenant is known to be over its own."""
    if not victim.within:
        return ()
    over = [u for u in others if u.running and u.over and u.member != victim.member]
    return tuple(
        sorted(over, key=lambda u: (u.used_bytes or 0) - (u.limit_bytes or 0), reverse=True)
    )


def memory_limit_bytes(member: Member) -> int | None:
    """The member's own container memory limit (``resources.limits.memory``), in bytes."""
    value = member.resources.limits.get("memory")
    return None if value is None else quantity_bytes(value)


def resident_bytes_by_group(groups: Iterable[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """Resident memory of the processes in each of the process ``groups``, summed per group,
    from ``/proc/<pid>/stat`` (its pgrp and rss fields, rss in pages)."""
    wanted = set(groups)
    page = os.sysconf("SC_PAGE_SIZE")
    found = dict.fromkeys(wanted, 0)
    if not wanted:
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone, or not ours to read
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) < 22:
            continue
        group, rss = int(fields[2]), int(fields[21])
        if group in wanted:
            found[group] += rss * page
    return found
