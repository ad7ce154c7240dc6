"""deploy/device-plugin/: NVIDIA device plugin and MIG manager configs, and what CoTrain makes of
the nodes they produce.

Each configuration is checked for the shape the k8s-device-plugin reads (config file version v1);
then a node labelled as GPU Feature Discovery labels it under that configuration (the same
fixture the operator's tests use) is fed to CoTrain's inventory and sharing modes, which must
pick the mode and request the resource docs/gpu-nodes.md promises.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from cotrain_operator.api.models import Sharing, SharingMode
from cotrain_operator.sharing import auto_mode, inventory, parse_node, strategy
from tests.deploy.conftest import DEPLOY, ROOT, find, load_documents
from tests.fixtures.nodes import gpu_node

GIB = 2**30


def plugin_configs() -> dict[str, dict[str, Any]]:
    documents = load_documents((DEPLOY / "device-plugin/sharing-config.yaml").read_text())
    data = find(documents, "ConfigMap", "cotrain-device-plugin-config")["data"]
    return {key: yaml.safe_load(text) for key, text in data.items()}


def mig_configs() -> dict[str, Any]:
    documents = load_documents((DEPLOY / "device-plugin/mig-parted-config.yaml").read_text())
    data = find(documents, "ConfigMap", "cotrain-mig-parted-config")["data"]
    return yaml.safe_load(data["config.yaml"])["mig-configs"]  # type: ignore[no-any-return]


def test_one_plugin_configuration_per_way_of_sharing() -> None:
    configs = plugin_configs()
    assert set(configs) == {"exclusive", "time-slicing", "mps", "mig-mixed"}
    for config in configs.values():
        assert config["version"] == "v1"
        assert config["flags"]["migStrategy"] in ("none", "mixed")
    assert "sharing" not in configs["exclusive"]
    assert "sharing" not in configs["mig-mixed"]
    assert configs["mig-mixed"]["flags"]["migStrategy"] == "mixed"


@pytest.mark.parametrize("key", ["time-slicing", "mps"])
def test_shared_configurations_rename_replicas_of_whole_gpus(key: str) -> None:
    sharing = plugin_configs()[key]["sharing"]
    (kind,) = sharing
    assert kind == {"time-slicing": "timeSlicing", "mps": "mps"}[key]
    settings = sharing[kind]
    assert settings["renameByDefault"] is True
    (resource,) = settings["resources"]
    assert resource["name"] == inventory.GPU_RESOURCE
    assert isinstance(resource["replicas"], int)
    assert 2 <= resource["replicas"] <= 48  # the plugin's MPS maximum on Volta and newer
    if key == "time-slicing":
        assert settings["failRequestsGreaterThanOne"] is True


@pytest.mark.parametrize(
    ("key", "mode", "label", "resource"),
    [
        ("exclusive", SharingMode.EXCLUSIVE, "none", "nvidia.com/gpu"),
        ("time-slicing", SharingMode.TIME_SLICING, "time-slicing", "nvidia.com/gpu.shared"),
        ("mps", SharingMode.MPS, "mps", "nvidia.com/gpu.shared"),
    ],
)
def test_cotrain_resolves_a_node_with_the_configuration(
    key: str, mode: SharingMode, label: str, resource: str
) -> None:
    config = plugin_configs()[key]
    settings = next(iter(config.get("sharing", {}).values()), {})
    replicas = settings["resources"][0]["replicas"] if settings else 1
    node = parse_node(
        gpu_node(
            "gpu-a",
            sharing=label,
            replicas=replicas,
            renamed=settings.get("renameByDefault", False),
            memory_mib=24576,
        )
    )
    assert node is not None
    assert auto_mode(node) == mode
    share = strategy(mode).offer(node, Sharing(mode=mode), demand_bytes=0)
    assert share.resource == resource  # type: ignore[union-attr]
    assert share.memory_bytes == 24 * GIB // replicas  # type: ignore[union-attr]


def test_the_mig_geometry_fits_an_80gb_gpu_and_cotrain_requests_its_slices() -> None:
    configs = mig_configs()
    assert configs["all-disabled"] == [{"devices": "all", "mig-enabled": False}]
    (balanced,) = configs["cotrain-balanced"]
    assert balanced["mig-enabled"] is True
    slices: dict[str, int] = balanced["mig-devices"]
    # 7 compute slices per A100/H100; the memory follows the profile name.
    assert sum(int(profile.split("g.")[0]) * count for profile, count in slices.items()) <= 7
    assert sum(int(re.findall(r"(\d+)gb", p)[0]) * n for p, n in slices.items()) <= 80
    memory_mib = {profile: int(profile.split(".")[1][:-2]) * 1024 for profile in slices}
    node = parse_node(
        gpu_node("gpu-b", mig={p: (count, memory_mib[p]) for p, count in slices.items()})
    )
    assert node is not None
    assert auto_mode(node) == SharingMode.MIG
    for profile in slices:
        share = strategy(SharingMode.MIG).offer(
            node, Sharing(mode=SharingMode.MIG, migProfile=profile), demand_bytes=0
        )
        assert share.resource == f"nvidia.com/mig-{profile}"  # type: ignore[union-attr]


def test_the_gpu_nodes_guide_names_every_label_and_resource_cotrain_reads() -> None:
    guide = (ROOT / "docs/gpu-nodes.md").read_text()
    labels = [
        value
        for name, value in vars(inventory).items()
        if name.startswith("LABEL_") and isinstance(value, str)
    ]
    assert len(labels) >= 6
    for label in labels:
        assert f"`{label}" in guide, label
    for name in ("nvidia.com/mig-<profile>.count", "nvidia.com/mig-<profile>.memory"):
        assert name in guide, name
    for resource in ("nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-<profile>"):
        assert f"`{resource}`" in guide, resource
    for key in plugin_configs():
        assert f"`{key}`" in guide, key
