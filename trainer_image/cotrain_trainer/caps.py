"""Caps: what each member may use of the shared device and of the CPU, as numbers and env vars.

Owns the pure decisions behind every cap the trainer applies: the environment a member process
starts with (thread caps for both frameworks, MPS compute and pinned-memory limits, the contract's
COTRAIN_* variables) and the framework-level numbers (PyTorch's per-process memory fraction,
TensorFlow's logical-device memory limit). The supervisor turns these into a process environment;
`frameworks/` apply the in-process half right after importing their framework. Pure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from cotrain_operator.api.contract import (
    ENV_DEVICE_MEMORY_BYTES,
    ENV_MEMBER,
    ENV_MEMBER_BUDGET,
    ENV_PROGRESS_FILE,
    PlannedBudget,
)
from cotrain_operator.api.models import Framework, Member, SharingMode

MIB = 2**20

# Environment variables that cap the CPU threads of both frameworks (and of the BLAS libraries
# they link). OMP_NUM_THREADS alone does not cap TensorFlow, hence the TF_* pair.
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
)
INTEROP_ENV = "TF_NUM_INTEROP_THREADS"
MPS_THREAD_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
MPS_PINNED_MEMORY = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
# Names the trainer sets and a member's spec.env may not override (the API refuses them too).
RESERVED_PREFIXES = ("COTRAIN_", "CUDA_MPS_")
RESERVED_NAMES = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")


def memory_fraction(budget_bytes: int | None, card_bytes: int | None) -> float | None:
    """PyTorch's per-process memory fraction for a budget, in (0, 1]; None when not capped (no
    budget, a zero budget, or no device).

    `torch.cuda.set_per_process_memory_fraction` multiplies the fraction by the total memory of
    the whole device torch sees (`get_device_properties(i).total_memory`: the card, or the MIG
    slice), so `card_bytes` must be that number, never the share the pod plan calls
    device_memory_bytes: under TimeSlicing with 4 replicas of an 80 GiB card, 6 GiB of a
    20 GiB share as a fraction of the share would let the process take 24 GiB. A budget above
    the card is the whole card (1.0; the caller warns)."""
    if budget_bytes is None or budget_bytes <= 0 or not card_bytes or card_bytes <= 0:
        return None
    return min(1.0, budget_bytes / card_bytes)


def memory_limit_mib(memory_bytes: int | None) -> int | None:
    """TensorFlow's logical-device memory_limit (`LogicalDeviceConfiguration(memory_limit=)`,
    which TensorFlow calls MB and multiplies by 2**20: MiB), rounded down so the cap never
    exceeds the budget, at least 1; None when not capped. Also the MiB of the MPS pinned limit."""
    if memory_bytes is None or memory_bytes <= 0:
        return None
    return max(1, memory_bytes // MIB)


def mps_pinned_limit(memory_bytes: int | None) -> str | None:
    """CUDA_MPS_PINNED_DEVICE_MEM_LIMIT for the member's one visible device: "0=<MiB>M"."""
    mib = memory_limit_mib(memory_bytes)
    return None if mib is None else f"0={mib}M"


def thread_env(cpu_threads: int) -> dict[str, str]:
    """Thread caps seen by both frameworks before they start: `cpu_threads` intra-op, one
    inter-op (co-tenants on few cores thrash with more)."""
    env = dict.fromkeys(THREAD_ENV, str(cpu_threads))
    env[INTEROP_ENV] = "1"
    return env


def mps_env(budget: PlannedBudget) -> dict[str, str]:
    """The MPS client limits of one member (read by the MPS server when the process connects)."""
    env: dict[str, str] = {}
    if budget.compute_percent is not None:
        env[MPS_THREAD_PERCENTAGE] = str(budget.compute_percent)
    pinned = mps_pinned_limit(budget.memory_bytes)
    if pinned is not None:
        env[MPS_PINNED_MEMORY] = pinned
    return env


def is_reserved(name: str) -> bool:
    return name.startswith(RESERVED_PREFIXES) or name in RESERVED_NAMES


@dataclass(frozen=True)
class MemberLaunch:
    """How to start one member: its argv and the environment variables it adds."""

    argv: list[str]
    env: dict[str, str]


def member_launch(
    member: Member,
    budget: PlannedBudget,
    mode: SharingMode,
    progress_file: str,
    device_memory_bytes: int | None,
    python: str = sys.executable,
    *,
    processes: int = 1,
    rank_env: Mapping[str, str] | None = None,
) -> MemberLaunch:
    """The argv and added environment of one process of `member` (the supervisor adds them to
    its own env).

    A member of several processes on this machine (`processes`, its data-parallel ranks here)
    splits its CPU threads among them; each gets the member's GPU memory budget for its own
    device. `rank_env` is the process's place in its world (`distributed.rank_env`). Order
    matters: the member's spec.env may override the thread caps (its author knows the program)
    but never the contract's variables, the rank's variables nor the MPS limits.
    """
    if processes > 1:
        budget = budget.model_copy(update={"cpu_threads": max(1, budget.cpu_threads // processes)})
    if member.command:
        argv = [*member.command, *(member.args or [])]
    else:
        argv = [python, "-m", "cotrain_trainer.member"]
    env = thread_env(budget.cpu_threads)
    if member.framework == Framework.TENSORFLOW and member.command:
        # A user's TensorFlow program that never calls report.apply_caps() would otherwise map
        # the whole card; growth-on-demand at least leaves the co-tenants what it does not use.
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({var.name: var.value for var in member.env if not is_reserved(var.name)})
    if mode == SharingMode.MPS:
        env.update(mps_env(budget))
    env.update(rank_env or {})
    env[ENV_MEMBER] = member.model_dump_json(by_alias=True, exclude_none=True)
    env[ENV_MEMBER_BUDGET] = budget.model_dump_json(by_alias=True, exclude_none=True)
    env[ENV_PROGRESS_FILE] = progress_file
    if device_memory_bytes is not None:
        env[ENV_DEVICE_MEMORY_BYTES] = str(device_memory_bytes)
    return MemberLaunch(argv=argv, env=env)


def with_python_first(environ: Mapping[str, str], python: str = sys.executable) -> dict[str, str]:
    """`environ` with the trainer's Python first on PATH, so a member's `python` is the one that
    has cotrain_trainer and the frameworks (as an activated virtual environment would)."""
    env = dict(environ)
    bindir = os.path.dirname(python)
    path = env.get("PATH", "")
    if bindir and path.split(os.pathsep)[:1] != [bindir]:
        env["PATH"] = os.pathsep.join([bindir, path]) if path else bindir
    return env
