"""Placement: each sharing mode x placement strategy on GFD-labelled nodes, budgets, misfits."""

from __future__ import annotations

from typing import Any

import pytest

from cotrain_operator.api import parse_job
from cotrain_operator.api.models import SharingMode
from cotrain_operator.reconcile.placement import Placement, Unschedulable, place
from cotrain_operator.sharing import GpuNode, parse_node
from tests.fixtures.jobs import a_job
from tests.fixtures.nodes import cpu_node, gpu_node

GIB = 2**30


def nodes(*bodies: dict[str, Any]) -> list[GpuNode]:
    parsed = [parse_node(b) for b in bodies]
    return [n for n in parsed if n is not None]


def placed(document: dict[str, Any], *bodies: dict[str, Any]) -> Placement:
    result = place(parse_job(document), nodes(*bodies))
    assert isinstance(result, Placement), result
    return result


def refused(document: dict[str, Any], *bodies: dict[str, Any]) -> Unschedulable:
    result = place(parse_job(document), nodes(*bodies))
    assert isinstance(result, Unschedulable), result
    return result


def test_cpu_only_nodes_are_not_gpu_nodes() -> None:
    assert parse_node(cpu_node("cpu-1")) is None
    message = refused(a_job().build(), cpu_node("cpu-1")).message
    assert "no ready node" in message


@pytest.mark.parametrize(
    ("mode", "node", "resource", "share_gib"),
    [
        ("Exclusive", gpu_node("a", memory_mib=24576), "nvidia.com/gpu", 24),
        (
            "TimeSlicing",
            gpu_node("a", sharing="time-slicing", replicas=4, memory_mib=24576),
            "nvidia.com/gpu",
            6,
        ),
        (
            "TimeSlicing",
            gpu_node("a", sharing="time-slicing", replicas=2, memory_mib=24576, renamed=True),
            "nvidia.com/gpu.shared",
            12,
        ),
        (
            "MPS",
            gpu_node("a", sharing="mps", replicas=2, memory_mib=40960, renamed=True),
            "nvidia.com/gpu.shared",
            20,
        ),
        (
            "MIG",
            gpu_node("a", mig={"1g.10gb": (7, 9984), "3g.40gb": (2, 40192)}),
            "nvidia.com/mig-1g.10gb",
            9984 / 1024,
        ),
        (
            "MIG",
            gpu_node("a", mig_single="1g.10gb", memory_mib=9984),
            "nvidia.com/gpu",
            9984 / 1024,
        ),
        (  # single strategy with its slices time-shared: GFD appends -SHARED to the product
            "MIG",
            gpu_node(
                "a",
                mig_single="1g.10gb",
                memory_mib=9984,
                extra_labels={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb-SHARED"},
            ),
            "nvidia.com/gpu",
            9984 / 1024,
        ),
    ],
)
@pytest.mark.parametrize("strategy", ["SameGPU", "PodPerMember"])
def test_each_mode_and_strategy_requests_its_share(
    mode: str, node: dict[str, Any], resource: str, share_gib: float, strategy: str
) -> None:
    builder = a_job().sharing(mode=mode).placement(strategy=strategy)
    if mode == "MIG":
        builder.sharing(migProfile="1g.10gb")
    result = placed(builder.build(), node)
    assert result.mode == SharingMode(mode)
    expected_pods = 1 if strategy == "SameGPU" else 2
    assert len(result.groups) == expected_pods
    for group in result.groups:
        assert group.share.resource == resource
        assert group.share.memory_bytes == int(share_gib * GIB)
        assert group.nodes == ("a",)
        # Unset gpu.memory: members split their pod's share equally.
        per_member = int(share_gib * GIB) // len(group.group.members)
        assert all(b.memory_bytes == per_member for b in group.budgets.values())


def test_explicit_memory_first_then_equal_split() -> None:
    document = a_job().sharing(mode="TimeSlicing").gpu(0, memory="4Gi").build()
    result = placed(document, gpu_node("a", sharing="time-slicing", replicas=2, memory_mib=20480))
    budgets = result.groups[0].budgets
    assert budgets["torch"].memory_bytes == 4 * GIB
    assert budgets["tf"].memory_bytes == 6 * GIB  # 10Gi share - 4Gi


def test_a_job_that_cannot_fit_names_the_node_facts() -> None:
    document = a_job().sharing(mode="TimeSlicing").gpu(0, memory="8Gi").gpu(1, memory="8Gi").build()
    result = refused(
        document,
        gpu_node(
            "small", sharing="time-slicing", replicas=4, memory_mib=24576, product="NVIDIA-L4"
        ),
    )
    assert result.reason == "NoNodeFits"
    assert "small (NVIDIA-L4, 1x 24576MiB, time-slicing x4)" in result.message
    assert "6144MiB, less than the 16384MiB" in result.message


def test_mode_needs_a_node_set_up_for_it() -> None:
    result = refused(a_job().sharing(mode="MPS").build(), gpu_node("plain"))
    assert "not set up for mps" in result.message
    result = refused(
        a_job().sharing(mode="Exclusive").build(),
        gpu_node("ts", sharing="time-slicing", replicas=4),
    )
    assert "shares its GPUs (time-slicing x4), no whole GPU" in result.message


def test_mig_profile_must_be_offered() -> None:
    document = a_job().sharing(mode="MIG", migProfile="2g.20gb").build()
    result = refused(document, gpu_node("a", mig={"1g.10gb": (7, 9984)}))
    assert "offers no MIG slice 2g.20gb" in result.message


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (gpu_node("a", sharing="mps", replicas=4), SharingMode.MPS),
        (gpu_node("a", sharing="time-slicing", replicas=4), SharingMode.TIME_SLICING),
        (gpu_node("a", mig={"1g.10gb": (7, 9984)}), SharingMode.MIG),
        (gpu_node("a"), SharingMode.EXCLUSIVE),
    ],
)
def test_auto_resolves_from_gfd_labels(node: dict[str, Any], expected: SharingMode) -> None:
    assert placed(a_job().sharing(mode="Auto").build(), node).mode == expected


def test_auto_with_compute_shares_prefers_mps_nodes() -> None:
    document = a_job().sharing(mode="Auto").gpu(0, computePercent=50).build()
    result = placed(
        document,
        gpu_node("ts", sharing="time-slicing", replicas=2),
        gpu_node("mps", sharing="mps", replicas=2),
    )
    assert result.mode == SharingMode.MPS
    assert result.groups[0].nodes == ("mps",)
    assert result.groups[0].budgets["torch"].compute_percent == 50


def test_unready_and_unselected_nodes_are_skipped() -> None:
    document = a_job().sharing(mode="Exclusive").placement(nodeSelector={"pool": "train"}).build()
    result = placed(
        document,
        gpu_node("off", ready=False, extra_labels={"pool": "train"}),
        gpu_node("other", extra_labels={"pool": "infer"}),
        gpu_node("yes", extra_labels={"pool": "train"}),
    )
    assert result.groups[0].nodes == ("yes",)


def test_same_node_needs_room_for_every_member_pod() -> None:
    document = (
        a_job()
        .sharing(mode="TimeSlicing")
        .placement(strategy="PodPerMember", sameNode=True)
        .build()
    )
    one_replica = gpu_node("tight", sharing="time-slicing", replicas=1)
    assert "no single node holds all 2" in refused(document, one_replica).message
    roomy = gpu_node("roomy", sharing="time-slicing", replicas=4)
    assert placed(document, one_replica, roomy).groups[0].nodes == ("roomy",)


def test_budget_holds_on_every_fitting_node() -> None:
    document = a_job().sharing(mode="TimeSlicing").build()
    result = placed(
        document,
        gpu_node("big", sharing="time-slicing", replicas=2, memory_mib=81920),
        gpu_node("small", sharing="time-slicing", replicas=2, memory_mib=24576),
    )
    group = result.groups[0]
    assert set(group.nodes) == {"big", "small"}
    assert group.budgets["torch"].memory_bytes == 6 * GIB  # half of small's 12Gi replica


def test_cpu_threads_follow_the_spec() -> None:
    document = a_job().member(0, cpuThreads=3).member(1, resources={"limits": {"cpu": "2"}}).build()
    budgets = placed(document, gpu_node("a", sharing="time-slicing", replicas=2)).groups[0].budgets
    assert budgets["torch"].cpu_threads == 3
    assert budgets["tf"].cpu_threads == 2


@pytest.mark.parametrize(
    ("replicas", "percent", "fits"),
    [
        (2, 50, True),
        (2, 51, False),
        (4, 25, True),
        (4, 60, False),
        (1, 100, True),
        (3, 33, True),
        (3, 34, False),
    ],
)
def test_mps_compute_percent_is_placed_against_what_the_nodes_daemon_grants(
    replicas: int, percent: int, fits: bool
) -> None:
    # The device plugin's MPS daemon gives each client 100/replicas percent; a client's own
    # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE can only lower it.
    document = a_job().sharing(mode="MPS").gpu(0, computePercent=percent).build()
    node = gpu_node("mps", sharing="mps", replicas=replicas)
    result = place(parse_job(document), nodes(node))
    assert isinstance(result, Placement) is fits, result
    if not fits:
        assert isinstance(result, Unschedulable)
        assert f"at most {100 // replicas}% of the GPU (100/{replicas} replicas)" in result.message
        assert f"gpu.computePercent torch {percent}%" in result.message


def test_auto_with_compute_shares_never_falls_back_to_a_mode_that_drops_them() -> None:
    document = a_job().sharing(mode="Auto").gpu(0, computePercent=50).build()
    result = refused(document, gpu_node("ts", sharing="time-slicing", replicas=2))
    assert "in mode MPS" in result.message
    assert "not set up for mps" in result.message


def test_members_without_gpu_memory_are_never_left_a_zero_budget() -> None:
    # A 12Gi time-slicing replica: torch takes all of it, tf sets no gpu.memory.
    node = gpu_node("ts", sharing="time-slicing", replicas=2, memory_mib=24576)
    whole = a_job().sharing(mode="TimeSlicing").gpu(0, memory="12Gi").build()
    message = refused(whole, node).message
    assert "leaving none for tf (no gpu.memory)" in message
    most = a_job().sharing(mode="TimeSlicing").gpu(0, memory="11Gi").build()
    assert placed(most, node).groups[0].budgets["tf"].memory_bytes == GIB
