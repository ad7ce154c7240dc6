"""Exclusive: the pod gets a whole GPU (`nvidia.com/gpu: 1`) on a node that does not share."""

from __future__ import annotations

from cotrain_operator.api.models import Sharing, SharingMode
from cotrain_operator.sharing.base import Refusal, Share
from cotrain_operator.sharing.inventory import GPU_RESOURCE, GpuNode


class Exclusive:
    mode = SharingMode.EXCLUSIVE

    def offer(self, node: GpuNode, sharing: Sharing, demand_bytes: int) -> Share | Refusal:
        if node.sharing_strategy != "none" or node.mig_strategy not in ("none", ""):
            how = (
                f"{node.sharing_strategy} x{node.replicas}"
                if node.sharing_strategy != "none"
                else f"MIG {node.mig_strategy}"
            )
            return Refusal(node.name, f"{node.facts()} shares its GPUs ({how}), no whole GPU")
        if not node.offers(GPU_RESOURCE):
            return Refusal(node.name, f"{node.facts()} has no allocatable {GPU_RESOURCE}")
        return Share(self.mode, node.name, GPU_RESOURCE, node.memory_bytes)
