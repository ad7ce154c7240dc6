"""A data-parallel rank waits until its world's names resolve (a headless Service's pod records
appear only once each pod has an address) and says why it waits; a name that never does ends it
with the names in the error."""

from __future__ import annotations

import json

import pytest

from cotrain_operator.api.models import Framework
from cotrain_trainer.distributed import World, wait_until_resolvable

WORKERS = ["a.svc:2222", "b.svc:2222"]


class Dns:
    """Names that resolve after a number of failed lookups each."""

    def __init__(self, misses: dict[str, int]) -> None:
        self.misses = dict(misses)
        self.asked: list[str] = []

    def __call__(self, host: str) -> str:
        self.asked.append(host)
        if self.misses.get(host, 0) > 0:
            self.misses[host] -= 1
            raise OSError(f"{host}: Name or service not known")
        return "10.213.0.11"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_waits_for_each_name_once_and_says_so_once() -> None:
    dns, clock, said = Dns({"w-1.svc": 3, "w-0.svc": 1}), Clock(), []
    wait_until_resolvable(
        ["w-0.svc", "w-1.svc", "w-0.svc"],
        resolve=dns,
        clock=clock,
        sleep=clock.sleep,
        say=said.append,
        interval=0.5,
    )
    # A name that resolved is not asked again; the duplicate is asked once per round.
    assert dns.asked.count("w-0.svc") == 2
    assert dns.asked.count("w-1.svc") == 4
    assert clock.now == 1.5
    assert said == ["waiting for w-0.svc, w-1.svc to resolve (peers' pods not addressable yet)"]


def test_names_that_never_resolve_end_the_wait_with_their_names() -> None:
    clock = Clock()
    with pytest.raises(TimeoutError, match=r"^w-1\.svc did not resolve within 10 s"):
        wait_until_resolvable(
            ["w-0.svc", "w-1.svc"],
            timeout=10,
            resolve=Dns({"w-1.svc": 10**6}),
            clock=clock,
            sleep=clock.sleep,
            say=lambda _: None,
        )
    assert 10 <= clock.now < 11


@pytest.mark.parametrize(
    ("framework", "environ", "hosts"),
    [
        (
            Framework.TENSORFLOW,
            {"TF_CONFIG": json.dumps({"cluster": {"worker": WORKERS}, "task": {"index": 1}})},
            ("a.svc", "b.svc"),
        ),
        (
            Framework.PYTORCH,
            {"WORLD_SIZE": "4", "RANK": "2", "MASTER_ADDR": "m.svc", "MASTER_PORT": "29500"},
            ("m.svc",),
        ),
        (Framework.PYTORCH, {}, ()),
    ],
)
def test_a_worlds_peer_hosts_are_the_names_it_must_reach(
    framework: Framework, environ: dict[str, str], hosts: tuple[str, ...]
) -> None:
    assert World.from_env(framework, environ).peer_hosts == hosts
