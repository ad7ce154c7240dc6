"""docs/kueue.md, run: every command of the walk from a stock Kueue to a queued CoTrainJob, in
order, against the real Kueue on the real node, with the files it tells a user to write.

Only the blocks marked ``<!-- not run by the tests: ... -->`` are left out (installing Kueue from
the internet; the test's Kueue is started from its Go module instead), and the Kueue
configuration the page shows is compared with the one the test's Kueue runs with. The one change
made to what the page says: the overlay it has the user write gets the images built here (the
node has no registry), as every deployment test does.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.controlplane.images import LocalImage
from tests.controlplane.kueue import INTEGRATION_CONFIG, Kueue
from tests.fixtures.kube import install_cotrain
from tests.node.conftest import RealNode
from tests.node.running import events, job_path, with_local_images
from tests.node.waiting import get_json

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "kueue.md"
BLOCK = re.compile(r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    marker: str | None


def blocks(text: str) -> list[Block]:
    return [Block(m["lang"], m["body"], m["marker"]) for m in BLOCK.finditer(text)]


def test_the_page_has_the_steps_the_test_runs() -> None:
    found = blocks(DOC.read_text())
    run = [b for b in found if b.lang == "bash" and not (b.marker or "").startswith("not run")]
    commands = [line for b in run for line in b.body.splitlines() if line.strip()]
    assert any("apply --server-side -k cotrain-kueue" in c for c in commands)
    assert any("examples/kueue/queues.yaml" in c for c in commands)
    assert any("condition=Succeeded ctj/auto-queued" in c for c in commands)
    assert all(c.startswith("kubectl ") for c in commands), commands
    assert [b.marker for b in found if b.marker and b.marker.startswith("file: ")] == [
        "file: cotrain-kueue/kustomization.yaml"
    ]


@pytest.fixture
def walk_dir(tmp_path: Path) -> Path:
    """Beside a checkout of the repository, as the page has it (kustomize takes no absolute
    paths, and no symlinks out of its tree)."""
    for tree in ("deploy", "crds", "examples"):
        shutil.copytree(ROOT / tree, tmp_path / tree)
    return tmp_path


def test_the_kueue_page_runs_from_a_stock_kueue_to_a_queued_job(
    time_slicing_node: RealNode,
    node_kueue: Kueue,
    operator_image: LocalImage,
    trainer_image: LocalImage,
    walk_dir: Path,
) -> None:
    cp = time_slicing_node.control_plane
    install_cotrain(cp)  # the CRD, as an earlier install would have it: the page's apply updates it
    ran: list[str] = []
    try:
        for block in blocks(DOC.read_text()):
            marker = block.marker or ""
            if marker.startswith("not run"):
                continue
            if marker == "kueue-config":
                shown = yaml.safe_load(block.body)["integrations"]
                shipped = yaml.safe_load(INTEGRATION_CONFIG.read_text())["integrations"]
                running = yaml.safe_load(node_kueue.config_path.read_text())["integrations"]
                assert shown == shipped == running, (shown, shipped, running)
            elif marker.startswith("file: "):
                path = walk_dir / marker.removeprefix("file: ")
                path.parent.mkdir(parents=True, exist_ok=True)
                written = with_local_images(
                    yaml.safe_load(block.body), operator_image, trainer_image
                )
                path.write_text(yaml.safe_dump(written))
            elif block.lang == "bash":
                for line in filter(str.strip, block.body.splitlines()):
                    argv = shlex.split(line)
                    assert argv[0] == "kubectl", line
                    ran.append(line)
                    cp.kubectl(*argv[1:], cwd=walk_dir, timeout=720)
        status = get_json(cp, job_path("default", "auto-queued"))["status"]
        assert status["phase"] == "Succeeded", status
        for name in ("torch", "tf"):
            member = status["members"][name]
            assert member["step"] == member["totalSteps"] == 200, member
            assert member["loss"] < member["firstLoss"], member
        assert ran[-1].startswith("kubectl wait"), ran
    except BaseException:
        print("ran:", *ran, sep="\n  ")
        print(cp.kubectl("logs", "-n", "cotrain-system", "deploy/cotrain-operator", "--tail=80",
                         check=False).stdout)  # fmt: skip
        print(node_kueue.logs()[-4000:])
        print(events(cp, "default"))
        raise
    finally:
        cp.kubectl("delete", "ctj", "auto-queued", "-n", "default", "--ignore-not-found",
                   "--wait=true", check=False, timeout=120)  # fmt: skip
        cp.kubectl("delete", "-f", str(walk_dir / "examples/kueue/queues.yaml"),
                   "--ignore-not-found", check=False)  # fmt: skip
        # Only the Deployment goes: the CRD and RBAC stay for the other tests of the session.
        cp.kubectl("delete", "deploy", "cotrain-operator", "-n", "cotrain-system",
                   "--wait=true", check=False, timeout=120)  # fmt: skip
