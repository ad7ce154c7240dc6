"""TimeSlicing: the pod gets one replica of a time-sliced GPU (memory / replicas as budget)."""

from __future__ import annotations

from cotrain_operator.api.models import Sharing, SharingMode
from cotrain_operator.sharing.base import Refusal, Share, replica_resource
from cotrain_operator.sharing.inventory import GpuNode


class TimeSlicing:
    mode = SharingMode.TIME_SLICING
    strategy_label = "time-slicing"

    def offer(self, node: GpuNode, sharing: Sharing, demand_bytes: int) -> Share | Refusal:
        if node.sharing_strategy != self.strategy_label:
            return Refusal(
                node.name,
                f"{node.facts()} is not set up for {self.strategy_label} "
                f"(nvidia.com/gpu.sharing-strategy={node.sharing_strategy})",
            )
        resource = replica_resource(node)
        if resource is None:
            return Refusal(node.name, f"{node.facts()} has no allocatable GPU replicas")
        memory = node.memory_bytes // node.replicas if node.memory_bytes else None
        return Share(self.mode, node.name, resource, memory, self.compute_share(node))

    def compute_share(self, node: GpuNode) -> int | None:
        return None  # time-slicing gives no compute guarantee
