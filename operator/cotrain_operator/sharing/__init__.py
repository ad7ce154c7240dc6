"""GPU sharing modes: one module per mode behind the `SharingStrategy` Protocol.

`strategy(mode)` gives the module for an explicit mode; `auto_mode(node)` says which mode a
node's GPU Feature Discovery labels set it up for, which is what `mode: Auto` resolves to there.
"""

from __future__ import annotations

from cotrain_operator.api.models import SharingMode
from cotrain_operator.sharing.base import Refusal, Share, SharingStrategy
from cotrain_operator.sharing.exclusive import Exclusive
from cotrain_operator.sharing.inventory import GpuNode, parse_node
from cotrain_operator.sharing.mig import MIG
from cotrain_operator.sharing.mps import MPS
from cotrain_operator.sharing.timeslicing import TimeSlicing

_STRATEGIES: dict[SharingMode, SharingStrategy] = {
    SharingMode.EXCLUSIVE: Exclusive(),
    SharingMode.TIME_SLICING: TimeSlicing(),
    SharingMode.MPS: MPS(),
    SharingMode.MIG: MIG(),
}


def strategy(mode: SharingMode) -> SharingStrategy:
    """The module of an explicit (non-Auto) mode."""
    return _STRATEGIES[mode]


def auto_mode(node: GpuNode) -> SharingMode:
    """The mode a node is set up for, read from its GPU Feature Discovery labels."""
    if node.sharing_strategy == "mps":
        return SharingMode.MPS
    if node.sharing_strategy == "time-slicing":
        return SharingMode.TIME_SLICING
    if node.mig_strategy in ("single", "mixed"):
        return SharingMode.MIG
    return SharingMode.EXCLUSIVE


__all__ = [
    "GpuNode",
    "Refusal",
    "Share",
    "SharingStrategy",
    "auto_mode",
    "parse_node",
    "strategy",
]
