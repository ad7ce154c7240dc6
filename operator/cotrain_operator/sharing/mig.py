"""MIG: the pod gets a hardware-isolated MIG slice of `spec.sharing.migProfile`.

Mixed strategy nodes expose each profile as its own resource (`nvidia.com/mig-1g.10gb`, and
`nvidia.com/mig-1g.10gb.me` for profile 1g.10gb+me); single
strategy nodes expose identical slices as `nvidia.com/gpu` and name the profile in the product.
"""

from __future__ import annotations

from cotrain_operator.api.models import Sharing, SharingMode
from cotrain_operator.sharing.base import Refusal, Share
from cotrain_operator.sharing.inventory import (
    GPU_RESOURCE,
    GpuNode,
    MigSlice,
    mig_name,
    mig_profile_memory_bytes,
)

SHARED_PRODUCT_SUFFIX = "-SHARED"


def mig_resource(profile: str) -> str:
    """The extended resource of a profile's slices, e.g. nvidia.com/mig-1g.10gb.me."""
    return f"nvidia.com/mig-{mig_name(profile)}"


class MIG:
    mode = SharingMode.MIG

    def offer(self, node: GpuNode, sharing: Sharing, demand_bytes: int) -> Share | Refusal:
        profile = sharing.mig_profile
        if node.mig_strategy == "mixed":
            return self._mixed(node, profile, demand_bytes)
        if node.mig_strategy == "single":
            return self._single(node, profile)
        return Refusal(node.name, f"{node.facts()} has MIG disabled (nvidia.com/mig.strategy)")

    def _mixed(self, node: GpuNode, profile: str | None, demand_bytes: int) -> Share | Refusal:
        slices: list[MigSlice] = [s for s in node.mig_slices if s.count > 0]
        if profile is not None:
            slices = [s for s in slices if s.profile == profile]
        else:  # Auto: the smallest slice that holds the demand
            slices = [s for s in slices if s.memory_bytes >= demand_bytes]
        if not slices:
            wanted = profile or "any profile that fits"
            return Refusal(node.name, f"{node.facts()} offers no MIG slice {wanted}")
        chosen = slices[0]
        return Share(
            self.mode,
            node.name,
            mig_resource(chosen.profile),
            chosen.memory_bytes,
            mig_profile=chosen.profile,
        )

    def _single(self, node: GpuNode, profile: str | None) -> Share | Refusal:
        # e.g. NVIDIA-A100-SXM4-80GB-MIG-1g.10gb, "-SHARED" added when the slices are time-shared
        product = (node.product or "").removesuffix(SHARED_PRODUCT_SUFFIX)
        node_profile = product.rsplit("-MIG-", 1)[1] if "-MIG-" in product else None
        if node_profile is None or (profile is not None and node_profile != profile):
            return Refusal(
                node.name,
                f"{node.facts()} slices its GPUs as {node_profile or 'unknown'}, not {profile}",
            )
        if not node.offers(GPU_RESOURCE):
            return Refusal(node.name, f"{node.facts()} has no allocatable {GPU_RESOURCE}")
        memory = node.memory_bytes or mig_profile_memory_bytes(node_profile)
        return Share(self.mode, node.name, GPU_RESOURCE, memory, mig_profile=node_profile)
