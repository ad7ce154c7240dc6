"""Data-parallel members: each rank's environment, gang restarts, and both frameworks training
over two processes under `cotrain run`."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cotrain_operator.api.contract import (
    EXIT_GPU_OOM,
    EXIT_MEMBERS_FAILED,
    REASON_BACKOFF_EXCEEDED,
    REASON_COMPLETED,
    REASON_GPU_OOM,
    MemberTopology,
    PlannedBudget,
    PodPlan,
)
from cotrain_operator.api.models import Member, MemberPhase, SharingMode
from cotrain_trainer.caps import member_launch
from cotrain_trainer.cli import load_job
from cotrain_trainer.distributed import (
    Rank,
    World,
    local_topology,
    member_ranks,
    rank_env,
    spans_pods,
)
from cotrain_trainer.plan import local_plan
from cotrain_trainer.report import EVENT_STARTED, EVENT_STEP, read_events
from cotrain_trainer.supervisor import EXIT_POD_RETRY
from tests.trainer.builders import Recorder, a_member, a_plan, a_script, supervise

ROOT = Path(__file__).resolve().parents[2]
COTRAIN = str(Path(__import__("sys").executable).with_name("cotrain"))


def a_topology(**fields: Any) -> MemberTopology:
    return MemberTopology.model_validate(fields)


def with_topology(plan: PodPlan, **topologies: MemberTopology) -> PodPlan:
    return plan.model_copy(update={"topology": topologies})


# --------------------------------------------------------------------------------------------
# each rank's environment (pure)


def test_a_pytorch_pod_runs_its_replica_s_processes_with_torchrun_s_variables() -> None:
    member = a_member("ddp", "PyTorch", replicas=3, gpu={"count": 2})
    topology = a_topology(
        replicas=3,
        procsPerReplica=2,
        replicaIndices=[1],
        masterAddr="job-ddp-0.job",
        masterPort=29400,
    )
    ranks = member_ranks(member, topology)
    assert ranks == [
        Rank(replica=1, rank=2, local_rank=0, local_world_size=2, world_size=6),
        Rank(replica=1, rank=3, local_rank=1, local_world_size=2, world_size=6),
    ]
    assert rank_env(member, topology, ranks[1]) == {
        "MASTER_ADDR": "job-ddp-0.job",
        "MASTER_PORT": "29400",
        "WORLD_SIZE": "6",
        "RANK": "3",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
    }
    assert spans_pods(topology)


def test_cotrain_run_places_every_replica_here_and_local_rank_counts_them_all() -> None:
    member = a_member("ddp", "PyTorch", replicas=2, gpu={"count": 2})
    topology = local_topology(member)
    assert topology is not None
    assert (topology.replicas, topology.procs_per_replica) == (2, 2)
    assert topology.replica_indices == [0, 1]
    assert topology.master_addr == "127.0.0.1"
    assert topology.worker_hosts == []
    assert not spans_pods(topology)
    ranks = member_ranks(member, topology)
    assert [(r.replica, r.rank, r.local_rank) for r in ranks] == [
        (0, 0, 0),
        (0, 1, 1),
        (1, 2, 2),
        (1, 3, 3),
    ]  # LOCAL_RANK: the process's device on this machine
    assert {r.world_size for r in ranks} == {4}
    assert {r.local_world_size for r in ranks} == {4}


def test_a_tensorflow_worker_gets_tf_config_naming_every_worker_and_itself() -> None:
    member = a_member("mwms", "TensorFlow", replicas=2)
    hosts = ["job-mwms-0.job:2222", "job-mwms-1.job:2222"]
    # The operator's TensorFlow topology has one process per replica; a stray count is ignored.
    topology = a_topology(replicas=2, procsPerReplica=4, replicaIndices=[1], workerHosts=hosts)
    (rank,) = member_ranks(member, topology)
    assert (rank.replica, rank.rank, rank.world_size) == (1, 1, 2)
    env = rank_env(member, topology, rank)
    assert set(env) == {"TF_CONFIG"}
    assert json.loads(env["TF_CONFIG"]) == {
        "cluster": {"worker": hosts},
        "task": {"type": "worker", "index": 1},
    }
    place = World.from_env(member.framework, env)
    assert (place.rank, place.size, place.tf_workers) == (1, 2, tuple(hosts))


def test_tensorflow_over_several_devices_of_one_replica_mirrors_without_tf_config() -> None:
    member = a_member("mirror", "TensorFlow", gpu={"count": 2})
    topology = local_topology(member)
    assert topology is not None
    (rank,) = member_ranks(member, topology)  # one worker, MirroredStrategy over its devices
    assert rank_env(member, topology, rank) == {}
    assert World.from_env(member.framework, {}) == World()


def test_a_tensorflow_topology_without_a_host_per_worker_is_refused() -> None:
    member = a_member("mwms", "TensorFlow", replicas=2)
    topology = a_topology(replicas=2, workerHosts=["a:1"])
    with pytest.raises(ValueError, match="2 replicas but 1 worker host"):
        rank_env(member, topology, member_ranks(member, topology)[0])


def test_local_topologies_pick_distinct_free_ports() -> None:
    member = a_member("mwms", "TensorFlow", replicas=3)
    topology = local_topology(member)
    assert topology is not None
    ports = [topology.master_port] + [int(h.rsplit(":", 1)[1]) for h in topology.worker_hosts]
    assert len(topology.worker_hosts) == 3
    assert len(set(ports)) == 4
    assert local_topology(a_member("single", "PyTorch")) is None


def test_a_rank_s_launch_splits_the_member_s_threads_and_keeps_its_rank_variables() -> None:
    member = a_member(
        "ddp", "PyTorch", gpu={"count": 2}, env=[{"name": "MASTER_PORT", "value": "1"}]
    )
    topology = a_topology(replicas=1, procsPerReplica=2, masterPort=29500)
    rank = member_ranks(member, topology)[1]
    budget = PlannedBudget(cpu_threads=4, memory_bytes=2**30)
    launch = member_launch(
        member,
        budget,
        SharingMode.EXCLUSIVE,
        "p.jsonl",
        None,
        processes=rank.local_world_size,
        rank_env=rank_env(member, topology, rank),
    )
    assert launch.env["OMP_NUM_THREADS"] == "2"  # 4 threads for 2 processes
    assert json.loads(launch.env["COTRAIN_MEMBER_BUDGET"]) == {
        "memoryBytes": 2**30,  # per process: each has a device of its own
        "cpuThreads": 2,
    }
    assert launch.env["MASTER_PORT"] == "29500"  # spec.env cannot move the rendezvous
    assert (launch.env["RANK"], launch.env["LOCAL_RANK"], launch.env["WORLD_SIZE"]) == (
        "1",
        "1",
        "2",
    )
    place = World.from_env(member.framework, launch.env)
    assert (place.rank, place.size, place.local_rank, place.local_size) == (1, 2, 1, 2)


def test_cotrain_run_plans_the_distributed_example_on_this_machine() -> None:
    job = load_job(str(ROOT / "examples" / "distributed.yaml"))
    local = local_plan(job, [], cores=2)
    topology = local.plan.topology
    assert set(topology) == {"torch-ddp", "tf-workers"}
    for name in topology:
        member = job.member(name)
        assert len(member_ranks(member, topology[name])) == 2, name
    assert len(topology["tf-workers"].worker_hosts) == 2
    assert any("2 data-parallel process(es)" in note for note in local.notes)


# --------------------------------------------------------------------------------------------
# gangs: started, stopped and restarted together

# Each rank appends "<rank> <world> <local rank>" to a file; on its first run rank 1 fails
# (`FAIL` its exit code) while rank 0 waits to be stopped; later runs report and succeed.
GANG = """
import os, sys, time, pathlib
from cotrain_trainer import report
rank, fail = int(os.environ["RANK"]), int(sys.argv[2])
runs = pathlib.Path(sys.argv[1])
with runs.open("a") as out:
    out.write(f"{rank} {os.environ['WORLD_SIZE']} {os.environ['LOCAL_RANK']}\\n")
mine = [l for l in runs.read_text().splitlines() if l.split()[0] == str(rank)]
failures = runs.with_name("failures")
if rank == 1 and (len(mine) == 1 or sys.argv[3] == "always"):
    with failures.open("a") as out:
        out.write("1\\n")
    raise SystemExit(fail)
# Rank 0 stands for a rank blocked on a peer that died: until rank 1 has failed it waits, and the
# gang must stop it. (Counting its own runs instead misreads a first run the gang stopped before
# it could record itself: the retry then waited the full minute.)
if rank == 0 and not failures.exists():
    time.sleep(60)
with report.session(total_steps=3):
    for step in range(1, 4):
        report.step(step=step, loss=10.0 * (rank + 1) / step, samples=8, total_steps=3)
"""


def gang_plan(runs: Path, fail: int, mode: str, backoff_limit: int, **topology: Any) -> PodPlan:
    member = a_script("gang", GANG, "PyTorch", str(runs), str(fail), mode)
    plan = a_plan(member, backoff_limit=backoff_limit)
    fields = {"replicas": 2, "replicaIndices": [0, 1], **topology}
    return with_topology(plan, gang=a_topology(**fields))


def ranks_run(runs: Path) -> list[str]:
    return [line.split()[0] for line in runs.read_text().splitlines()]


def test_a_failing_rank_restarts_the_whole_member_once_and_then_it_succeeds(tmp_path: Path) -> None:
    runs, recorder = tmp_path / "runs", Recorder()
    started = time.monotonic()
    result = supervise(gang_plan(runs, 5, "once", 2), tmp_path, listeners=[recorder])
    assert time.monotonic() - started < 30  # rank 0 was stopped, not waited for
    status = result.members["gang"]
    assert result.succeeded, status.message
    assert (status.phase, status.reason, status.restarts) == (
        MemberPhase.SUCCEEDED,
        REASON_COMPLETED,
        1,  # one restart for the gang, not one per rank
    )
    ranks = ranks_run(runs)
    # Both ranks ran again after the failure; the first time, rank 0 may have been stopped by
    # the gang before its program recorded that it started.
    assert ranks.count("1") == 2
    assert 1 <= ranks.count("0") <= 2
    assert {line.split()[1] for line in runs.read_text().splitlines()} == {"2"}
    restarting = [s for _, s, _ in recorder.changes if s.phase == MemberPhase.RESTARTING]
    assert restarting
    assert restarting[0].message is not None
    assert "rank 1 (replica 1): exited with code 5" in restarting[0].message
    # Only rank 0's progress is the member's: its losses are 10/step, rank 1's 20/step.
    assert (status.step, status.first_loss, status.loss) == (3, 10.0, 10.0 / 3)


def test_a_rank_that_keeps_failing_fails_the_member_at_the_backoff_limit(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    result = supervise(gang_plan(runs, 5, "always", 1), tmp_path)
    status = result.members["gang"]
    assert not result.succeeded
    assert result.exit_code == EXIT_MEMBERS_FAILED
    assert (status.phase, status.reason, status.restarts) == (
        MemberPhase.FAILED,
        REASON_BACKOFF_EXCEEDED,
        1,
    )
    assert status.message is not None
    assert "rank 1 (replica 1): exited with code 5" in status.message
    ranks = ranks_run(runs)
    # The failing rank ran once plus its one restart; rank 0 may be stopped by the gang before
    # its program records that it started (on a busy machine, in both runs), so it shows up at
    # most as often.
    assert ranks.count("1") == 2
    assert ranks.count("0") <= 2


def test_a_gpu_oom_in_any_rank_fails_the_member_without_restarts(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    status = supervise(gang_plan(runs, EXIT_GPU_OOM, "always", 2), tmp_path).members["gang"]
    assert (status.phase, status.reason, status.restarts) == (
        MemberPhase.FAILED,
        REASON_GPU_OOM,
        0,
    )
    ranks = ranks_run(runs)
    # Rank 1 ran once; rank 0 at most once (the gang may stop it before it records its start).
    assert ranks.count("1") == 1
    assert ranks.count("0") <= 1


def test_a_replica_whose_peers_run_in_other_pods_hands_the_restart_to_the_operator(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    plan = gang_plan(runs, 5, "always", 2, replicaIndices=[1])
    result = supervise(plan, tmp_path)
    status = result.members["gang"]
    assert ranks_run(runs) == ["1"]  # this pod runs replica 1 only, and does not restart it
    assert status.phase == MemberPhase.RESTARTING
    assert status.message is not None
    assert "the pod exits so that they restart together" in status.message
    assert result.exit_code == EXIT_POD_RETRY  # a pod failure: the operator recreates them all
    spent = plan.model_copy(update={"restarts": {"gang": 2}})  # ... within backoff only
    result = supervise(spent, tmp_path / "again")
    assert result.members["gang"].reason == REASON_BACKOFF_EXCEEDED
    assert result.exit_code == EXIT_MEMBERS_FAILED


# A real torch.distributed rendezvous: rank 1 dies after joining on its first run; rank 0 is
# stopped in (or failing out of) its all-reduce; both join again on the same port and succeed.
DDP_CRASH = """
import os, pathlib, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
marker = pathlib.Path(sys.argv[1])
if dist.get_rank() == 1 and not marker.exists():
    marker.write_text("crashed")
    os._exit(7)
total = torch.ones(1)
dist.all_reduce(total)
assert total.item() == dist.get_world_size() == 2, total
print("all-reduced", total.item(), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_torch_distributed_rank_that_dies_rejoins_with_its_peers(tmp_path: Path) -> None:
    member = a_script("ddp", DDP_CRASH, "PyTorch", str(tmp_path / "marker"))
    topology = local_topology(Member.model_validate({**member.model_dump(), "replicas": 2}))
    assert topology is not None
    plan = with_topology(a_plan(member, backoff_limit=2), ddp=topology)
    result = supervise(plan, tmp_path / "work", grace_period=5.0)
    status = result.members["ddp"]
    assert result.succeeded, status.message
    assert status.restarts == 1
    for rank in (0, 1):
        log = (tmp_path / "work" / "logs" / f"ddp{'.rank1' if rank else ''}.log").read_text()
        assert "all-reduced 2.0" in log, log[-2000:]


# --------------------------------------------------------------------------------------------
# the built-in runners over two processes each


def reduced_example(tmp_path: Path, steps: int) -> Path:
    document = yaml.safe_load((ROOT / "examples" / "distributed.yaml").read_text())
    for member in document["spec"]["members"]:
        member["steps"] = steps
    path = tmp_path / "distributed.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.slow
def test_run_trains_both_frameworks_data_parallel_over_two_processes(tmp_path: Path) -> None:
    job, out = reduced_example(tmp_path, steps=60), tmp_path / "out"
    result = subprocess.run(
        [COTRAIN, "run", str(job), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 data-parallel processes" in result.stdout
    status = yaml.safe_load((out / "status.yaml").read_text())
    assert (status["phase"], status["readyMembers"]) == ("Succeeded", "2/2")
    logs = out / "logs"
    for name, member in status["members"].items():
        output = "".join(f.read_text()[-3000:] for f in sorted(logs.glob(f"{name}*.log")))
        assert (member["phase"], member["restarts"]) == ("Succeeded", 0), output
        assert member["step"] == member["totalSteps"] == 60
        assert member["loss"] < member["firstLoss"], name
        assert member["samplesPerSecond"] > 0
        for rank in (0, 1):  # each process saw a world of two and its own rank
            progress = out / "progress" / f"{name}{'.rank1' if rank else ''}.jsonl"
            started = next(e for e in read_events(progress) if e.event == EVENT_STARTED)
            assert started.caps is not None
            assert (started.caps["rank"], started.caps["worldSize"]) == (rank, 2), name
    assert "torch.distributed: rank 1 of 2 (gloo)" in (logs / "torch-ddp.rank1.log").read_text()
    assert (
        "tf.distribute: MultiWorkerMirroredStrategy, 2 replica(s) in sync (worker 1 of 2)"
        in (logs / "tf-workers.rank1.log").read_text()
    )
    # The TensorFlow workers report the all-reduced loss of the global batch: the same numbers.
    losses = [
        [e.loss for e in read_events(logs.parent / "progress" / f) if e.event == EVENT_STEP]
        for f in ("tf-workers.jsonl", "tf-workers.rank1.jsonl")
    ]
    assert losses[0][0] == losses[1][0]
    # Rank 0 reports a step as the global batch: 2 x 64 samples.
    torch_steps = [
        e for e in read_events(out / "progress" / "torch-ddp.jsonl") if e.event == EVENT_STEP
    ]
    assert torch_steps[-1].epoch == 60 * 128 // 8192
