"""The per-framework runners behind one small interface, loaded by name so that a member process
imports only its own framework.

Owns the `Runner` protocol that `torch.py` and `tensorflow.py` implement as modules
(`apply_caps`, `memory_probe`, `train`), `AppliedCaps` (what a runner applied, as the framework
reports it), and reading the member's context from the contract's environment variables.
Importing this package imports no framework; `load()` imports exactly one, `imported_runner()`
only one that the program already imported.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from cotrain_operator.api.contract import (
    ENV_DEVICE_MEMORY_BYTES,
    ENV_MEMBER,
    ENV_MEMBER_BUDGET,
    PlannedBudget,
)
from cotrain_operator.api.models import Framework, Member
from cotrain_trainer.report import MemoryProbe, ProgressWriter

_MODULES = {
    Framework.PYTORCH: "cotrain_trainer.frameworks.torch",
    Framework.TENSORFLOW: "cotrain_trainer.frameworks.tensorflow",
}
# The framework's own top-level package, as it appears in sys.modules once imported.
_PACKAGES = {Framework.PYTORCH: "torch", Framework.TENSORFLOW: "tensorflow"}


@dataclass(frozen=True)
class AppliedCaps:
    """The caps in force in a member process, as its framework reports them."""

    intra_op_threads: int
    inter_op_threads: int
    device: str
    memory_cap: str  # e.g. "fraction 0.0732 of 81559 MiB", "memory_limit 6144 MiB", "none: ..."

    def as_event(self) -> dict[str, Any]:
        return {
            "intraOpThreads": self.intra_op_threads,
            "interOpThreads": self.inter_op_threads,
            "device": self.device,
            "memoryCap": self.memory_cap,
        }


class Runner(Protocol):
    """A framework module: caps first, then training of a built-in model."""

    def apply_caps(
        self, budget: PlannedBudget, device_memory_bytes: int | None, devices: int = 1
    ) -> AppliedCaps:
        """Apply thread and GPU-memory caps (on each of the process's `devices`: a TensorFlow
        worker mirrors over them); call before the framework touches a device."""

    def memory_probe(self) -> MemoryProbe:
        """This process's device memory (now, peak) as the framework's allocator counts it;
        (0, 0) when the process trains on the CPU."""

    def train(self, member: Member, progress: ProgressWriter) -> None:
        """Train the member's built-in model, reporting through `progress`."""


def load(framework: Framework) -> Runner:
    """Import the runner of `framework` (and with it that framework, and only that one)."""
    return cast(Runner, importlib.import_module(_MODULES[framework]))


def imported_runner(environ: Mapping[str, str] = os.environ) -> Runner | None:
    """The runner of a framework this program has already imported, its member's own first
    (from $COTRAIN_MEMBER); None when it imported neither. Imports no framework."""
    order = list(Framework)
    try:
        own = Framework(json.loads(environ.get(ENV_MEMBER) or "{}").get("framework"))
    except (ValueError, AttributeError):  # no member, or a spec this process cannot read
        pass
    else:
        order.remove(own)
        order.insert(0, own)
    for framework in order:
        if _PACKAGES[framework] in sys.modules:
            return load(framework)
    return None


@dataclass(frozen=True)
class MemberContext:
    member: Member
    budget: PlannedBudget
    device_memory_bytes: int | None
    runner: Runner


def load_member_context() -> MemberContext | None:
    """The member this process runs as, from the supervisor's environment; None outside one."""
    spec = os.environ.get(ENV_MEMBER)
    if not spec:
        return None
    member = Member.model_validate_json(spec)
    budget_json = os.environ.get(ENV_MEMBER_BUDGET)
    budget = (
        PlannedBudget.model_validate_json(budget_json)
        if budget_json
        else PlannedBudget(cpu_threads=max(1, len(os.sched_getaffinity(0))))
    )
    memory = os.environ.get(ENV_DEVICE_MEMORY_BYTES)
    return MemberContext(
        member=member,
        budget=budget,
        device_memory_bytes=int(memory) if memory and memory.isdigit() else None,
        runner=load(member.framework),
    )
