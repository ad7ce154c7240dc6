"""Data-parallel members: which processes a member runs and the environment of each.

Owns the mapping from a member's `MemberTopology` (replicas x processes per replica, the replicas
this supervisor runs, the rendezvous addresses) to its processes ("ranks") and to the variables
the frameworks read: PyTorch's MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK and
LOCAL_WORLD_SIZE (as torchrun sets them), TensorFlow's TF_CONFIG; and the way back, `World`, read
by a member process from its environment. A PyTorch member runs `procs_per_replica` processes per
replica, a TensorFlow member one worker per replica (that mirrors its model over its devices).
LOCAL_RANK counts the member's processes on this machine (a pod runs one replica; `cotrain run`
runs them all), so it is the device a process uses. Pure and framework-free.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cotrain_operator.api.contract import MemberTopology
from cotrain_operator.api.models import Framework, Member

ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_RANK = "RANK"
ENV_LOCAL_RANK = "LOCAL_RANK"
ENV_LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
ENV_TF_CONFIG = "TF_CONFIG"
# What the trainer sets per rank; a member's spec.env may not override them.
RANK_ENV_NAMES = (
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_WORLD_SIZE,
    ENV_RANK,
    ENV_LOCAL_RANK,
    ENV_LOCAL_WORLD_SIZE,
    ENV_TF_CONFIG,
)


@dataclass(frozen=True)
class Rank:
    """One process of a member: its place in the member's world and on this machine."""

    replica: int
    rank: int  # global: replica x processes per replica + process within the replica
    local_rank: int  # among the member's processes on this machine
    local_world_size: int
    world_size: int

    @property
    def label(self) -> str:
        """How logs and messages name it: "rank 1 (replica 1)"."""
        return f"rank {self.rank} (replica {self.replica})"


def procs_per_replica(member: Member, topology: MemberTopology) -> int:
    """PyTorch: the topology's processes per replica (one per device); TensorFlow: one worker."""
    return topology.procs_per_replica if member.framework == Framework.PYTORCH else 1


def world_size(member: Member, topology: MemberTopology) -> int:
    return topology.replicas * procs_per_replica(member, topology)


def member_ranks(member: Member, topology: MemberTopology | None) -> list[Rank]:
    """The processes this supervisor runs for `member`, rank order; one rank 0 without topology."""
    if topology is None:
        return [Rank(replica=0, rank=0, local_rank=0, local_world_size=1, world_size=1)]
    procs = procs_per_replica(member, topology)
    size = world_size(member, topology)
    local = len(topology.replica_indices) * procs
    ranks = []
    for position, replica in enumerate(topology.replica_indices):
        for process in range(procs):
            ranks.append(
                Rank(
                    replica=replica,
                    rank=replica * procs + process,
                    local_rank=position * procs + process,
                    local_world_size=local,
                    world_size=size,
                )
            )
    return ranks


def tf_config(topology: MemberTopology, replica: int) -> str:
    """TF_CONFIG of the worker of `replica`: every worker's host:port, and which one it is."""
    return json.dumps(
        {
            "cluster": {"worker": list(topology.worker_hosts)},
            "task": {"type": "worker", "index": replica},
        },
        separators=(",", ":"),
    )


def rank_env(member: Member, topology: MemberTopology | None, rank: Rank) -> dict[str, str]:
    """The variables of one rank: torch.distributed's (PyTorch, world above 1) or TF_CONFIG
    (TensorFlow, more than one replica; one replica mirrors over its own devices, no TF_CONFIG)."""
    if topology is None:
        return {}
    if member.framework == Framework.TENSORFLOW:
        if topology.replicas <= 1:
            return {}
        if len(topology.worker_hosts) != topology.replicas:
            raise ValueError(
                f"member {member.name}: {topology.replicas} replicas but "
                f"{len(topology.worker_hosts)} worker host(s) in its topology"
            )
        return {ENV_TF_CONFIG: tf_config(topology, rank.replica)}
    if rank.world_size <= 1:
        return {}
    return {
        ENV_MASTER_ADDR: topology.master_addr,
        ENV_MASTER_PORT: str(topology.master_port),
        ENV_WORLD_SIZE: str(rank.world_size),
        ENV_RANK: str(rank.rank),
        ENV_LOCAL_RANK: str(rank.local_rank),
        ENV_LOCAL_WORLD_SIZE: str(rank.local_world_size),
    }


def spans_pods(topology: MemberTopology | None) -> bool:
    """Whether some of the member's replicas run elsewhere (in other pods)."""
    if topology is None:
        return False
    return set(topology.replica_indices) != set(range(topology.replicas))


@dataclass(frozen=True)
class World:
    """A member process's view of its data-parallel world, from its environment."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    tf_workers: tuple[str, ...] = ()
    master_addr: str = ""

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def peer_hosts(self) -> tuple[str, ...]:
        """The host names this process must reach to join its world (its own among them)."""
        hosts = [w.rsplit(":", 1)[0] for w in self.tf_workers]
        if self.master_addr:
            hosts.append(self.master_addr)
        return tuple(dict.fromkeys(hosts))

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, framework: Framework, environ: Mapping[str, str]) -> World:
        if framework == Framework.TENSORFLOW:
            raw = environ.get(ENV_TF_CONFIG)
            if not raw:
                return cls()
            config = json.loads(raw)
            workers = tuple(str(w) for w in config.get("cluster", {}).get("worker", []))
            index = int(config.get("task", {}).get("index", 0))
            return cls(rank=index, size=max(1, len(workers)), tf_workers=workers)
        size = int(environ.get(ENV_WORLD_SIZE, "1") or 1)
        if size <= 1:
            return cls()
        return cls(
            rank=int(environ.get(ENV_RANK, "0")),
            size=size,
            local_rank=int(environ.get(ENV_LOCAL_RANK, "0")),
            local_size=int(environ.get(ENV_LOCAL_WORLD_SIZE, "1")),
            master_addr=environ.get(ENV_MASTER_ADDR, ""),
        )


def wait_until_resolvable(
    hosts: Sequence[str],
    timeout: float = 600.0,
    interval: float = 0.5,
    resolve: Callable[[str], object] = socket.gethostbyname,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> None:
    """Return once every name in ``hosts`` resolves. A headless Service's pod names resolve only
    after the endpoint controller has seen each pod's IP, a moment after the pods start (longer
    on a busy cluster), and a name asked for too early stays unknown in DNS caches for their
    negative TTL. The frameworks fail at once on a name that does not resolve (TensorFlow's gRPC
    server cannot even bind its own), so a rank waits for its world's names first. Raises
    TimeoutError naming those still unresolved after ``timeout`` seconds."""
    pending = list(dict.fromkeys(hosts))
    deadline = clock() + timeout
    announced = False
    while True:
        left = []
        for host in pending:
            try:
                resolve(host)
            except OSError:
                left.append(host)
        if not left:
            return
        if clock() >= deadline:
            raise TimeoutError(
                f"{', '.join(left)} did not resolve within {timeout:.0f} s: "
                "the member's headless Service or its pods' addresses are missing"
            )
        if not announced:
            say(f"waiting for {', '.join(left)} to resolve (peers' pods not addressable yet)")
            announced = True
        pending = left
        sleep(interval)


def free_loopback_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on loopback now (held together while chosen, so distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def local_topology(member: Member, host: str = "127.0.0.1") -> MemberTopology | None:
    """`cotrain run`'s topology of a member: every replica on this machine, on free loopback
    ports; None for a member of one process."""
    procs = member.gpu.count if member.framework == Framework.PYTORCH else 1
    if member.replicas == 1 and member.gpu.count == 1:
        return None
    tf_workers = member.replicas if member.framework == Framework.TENSORFLOW else 0
    master, *workers = free_loopback_ports(1 + (tf_workers if tf_workers > 1 else 0), host)
    return MemberTopology(
        replicas=member.replicas,
        procs_per_replica=procs,
        replica_indices=list(range(member.replicas)),
        master_addr=host,
        master_port=master,
        worker_hosts=[f"{host}:{port}" for port in workers],
    )
