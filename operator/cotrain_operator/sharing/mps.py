"""MPS: the pod gets an MPS share from the device plugin (memory and SMs split by replicas).

Inside the pod the trainer narrows each member further with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE
and CUDA_MPS_PINNED_DEVICE_MEM_LIMIT (see cotrain_trainer).
"""

from __future__ import annotations

from cotrain_operator.api.models import SharingMode
from cotrain_operator.sharing.inventory import GpuNode
from cotrain_operator.sharing.timeslicing import TimeSlicing


class MPS(TimeSlicing):
    mode = SharingMode.MPS
    strategy_label = "mps"

    def compute_share(self, node: GpuNode) -> int | None:
        return max(1, 100 // node.replicas)
