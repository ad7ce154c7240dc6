"""Trainer benchmark: one PyTorch and one TensorFlow member, concurrent vs sequential.

Prints a table of aggregate training throughput (samples/s, start-up excluded: only the time
between each member's first and last step counts) for:

- sequential, each member alone with every core (what "use them one after another" gives),
- sequential, each member alone with its capped share of the cores,
- concurrent without thread caps (each member believes it has every core),
- concurrent with thread caps (cores divided among the members, as the trainer plans it),

and the reporting overhead: the cost of the PyTorch hook / Keras callback per step as a share of
a step, and the supervisor's CPU time as a share of the members'. Targets: concurrent with caps
>= 1.0x sequential; reporting overhead <= 1%.

And co-training against its limit: the most two members can do side by side on this machine is
each one's throughput alone at its capped thread count, summed (no interference). Printed for the
pair above and for a lopsided pair (a PyTorch member with an eighth of the batch beside the
TensorFlow one), with each member's rate together over its rate alone. Target: >= 95%.

Then data-parallel overhead, per framework: the same global samples trained by one process
(global batch `--batch`, every core) and by two data-parallel processes (half the batch each,
half the cores each: DDP over gloo, MultiWorkerMirroredStrategy over loopback), as a ratio of
training throughput and of wall time (start-up and rendezvous included). On a machine without
spare cores little speed-up is possible: the row catches regressions in the gradient exchange.

    python bench/trainer_bench.py [--steps 1500] [--batch 256] [--dp-steps 600]
    python bench/trainer_bench.py --data-parallel-only
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cotrain_operator.api.contract import MemberTopology, PlannedBudget, PodPlan
from cotrain_operator.api.models import Framework, Member, SharingMode
from cotrain_trainer.distributed import local_topology
from cotrain_trainer.plan import available_cores
from cotrain_trainer.report import EVENT_STEP, ProgressEvent, read_events
from cotrain_trainer.supervisor import Supervisor


@dataclass(frozen=True)
class Trace:
    """(time, step) of one member's step events."""

    points: list[tuple[float, int]]
    batch: int

    @property
    def start(self) -> float:
        return self.points[0][0]

    @property
    def end(self) -> float:
        return self.points[-1][0]

    @property
    def samples(self) -> int:
        return (self.points[-1][1] - self.points[0][1]) * self.batch

    def rate(self) -> float:
        return self.samples / (self.end - self.start)

    def step_at(self, moment: float) -> float:
        """Steps done at `moment`, interpolated between events."""
        points = self.points
        if moment <= points[0][0]:
            return points[0][1]
        for (t0, s0), (t1, s1) in itertools.pairwise(points):
            if t0 <= moment <= t1:
                return s0 + (s1 - s0) * (moment - t0) / (t1 - t0) if t1 > t0 else s1
        return points[-1][1]


@dataclass(frozen=True)
class Run:
    traces: dict[str, Trace]
    supervisor_cpu: float
    members_cpu: float
    wall: float = 0.0


def members(steps: int, batch: int) -> list[Member]:
    common = {"model": "MLP", "steps": steps, "batchSize": batch, "learningRate": 0.001}
    return [
        Member.model_validate({"name": "torch", "framework": "PyTorch", **common}),
        Member.model_validate({"name": "tf", "framework": "TensorFlow", **common}),
    ]


SMALL = 8  # the small member's batch is the big one's / SMALL


def small_member(steps: int, batch: int) -> Member:
    """A PyTorch member much smaller than its TensorFlow co-tenant (an eighth of its batch), as
    co-location is used in practice: a small experiment beside a large run. As many steps, so
    it trains for a good part of the large one's time."""
    return Member.model_validate(
        {
            "name": "torch-small",
            "framework": "PyTorch",
            "model": "MLP",
            "steps": steps * 2,
            "batchSize": max(1, batch // SMALL),
            "learningRate": 0.001,
        }
    )


def supervise(
    chosen: list[Member],
    threads: int,
    work: Path,
    topology: dict[str, MemberTopology] | None = None,
) -> Run:
    plan = PodPlan(
        job="bench",
        mode=SharingMode.TIME_SLICING,
        members=chosen,
        budgets={m.name: PlannedBudget(cpu_threads=threads) for m in chosen},
        backoff_limit=0,
        topology=topology or {},
    )
    supervisor = Supervisor(plan, work)
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    result = supervisor.run()
    wall = time.perf_counter() - began
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not result.succeeded:
        raise SystemExit(f"bench run failed: {result.members}")
    traces = {}
    for member in chosen:
        events: list[ProgressEvent] = read_events(supervisor.progress_path(member.name))
        points = [
            (e.time, e.step)
            for e in events
            if e.event == EVENT_STEP and e.time is not None and e.step is not None
        ]
        world = (topology or {}).get(member.name)
        size = (
            1
            if world is None
            else len(world.replica_indices)
            * (world.procs_per_replica if member.framework == Framework.PYTORCH else 1)
        )
        traces[member.name] = Trace(points, member.batch_size * size)  # rank 0: global batch

    def cpu(before: resource.struct_rusage, after: resource.struct_rusage) -> float:
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    return Run(traces, cpu(own_before, own_after), cpu(children_before, children_after), wall)


def sequential(chosen: list[Member], threads: int, work: Path) -> tuple[float, dict[str, float]]:
    """Aggregate rate when the members run one after another: all samples over the sum of
    their training times."""
    samples, seconds, rates = 0, 0.0, {}
    for member in chosen:
        trace = supervise([member], threads, work / f"{member.name}-{threads}").traces[member.name]
        samples += trace.samples
        seconds += trace.end - trace.start
        rates[member.name] = trace.rate()
    return samples / seconds, rates


def concurrent(
    chosen: list[Member], threads: int, work: Path, label: str = "both"
) -> tuple[float, float, Run]:
    """Aggregate rate while both train: the samples each did in the window where both were
    training, over that window (and the window's length)."""
    run = supervise(chosen, threads, work / f"{label}-{threads}")
    rates, window = window_rates(run)
    return sum(rates.values()), window, run


def window_rates(run: Run) -> tuple[dict[str, float], float]:
    """Each member's samples/s in the window where every member was training, and its length."""
    start = max(t.start for t in run.traces.values())
    end = min(t.end for t in run.traces.values())
    if end <= start:
        raise SystemExit("the members never trained at the same time: raise --steps")
    rates = {
        name: (t.step_at(end) - t.step_at(start)) * t.batch / (end - start)
        for name, t in run.traces.items()
    }
    return rates, end - start


@dataclass(frozen=True)
class Limit:
    """Concurrent members against the limit of co-training: each member's rate alone at its
    capped thread count, summed (what they would reach side by side with no interference)."""

    pair: str
    alone: dict[str, float]  # samples/s of each member alone, capped
    together: dict[str, float]  # samples/s of each while both trained, capped
    window: float

    @property
    def share(self) -> float:
        return sum(self.together.values()) / sum(self.alone.values())


def print_limits(limits: list[Limit], threads: int) -> None:
    print(f"co-training against its limit ({threads} thread(s) each; target >= 95%)")
    print(f"{'pair':<44} {'limit':>10} {'together':>10} {'share':>7}  per member (together/alone)")
    for limit in limits:
        members = ", ".join(
            f"{name} {limit.together[name]:,.0f}/{limit.alone[name]:,.0f}"
            f" {limit.together[name] / limit.alone[name]:.0%}"
            for name in limit.alone
        )
        print(
            f"{limit.pair:<44} {sum(limit.alone.values()):>10,.0f} "
            f"{sum(limit.together.values()):>10,.0f} {limit.share:>6.1%}  {members}"
        )


@dataclass(frozen=True)
class DataParallel:
    framework: str
    one: Run
    two: Run

    def rate(self, run: Run) -> float:
        (trace,) = run.traces.values()
        return trace.rate()


def data_parallel(
    framework: Framework, steps: int, batch: int, cores: int, work: Path
) -> DataParallel:
    """The same `steps` global batches of `batch` samples: one process with every core, then two
    data-parallel processes of batch/2 with half the cores each (the trainer splits them)."""
    common = {"framework": framework.value, "model": "MLP", "steps": steps, "learningRate": 0.001}
    one = Member.model_validate({"name": "one", "batchSize": batch, **common})
    spread = {"gpu": {"count": 2}} if framework == Framework.PYTORCH else {"replicas": 2}
    two = Member.model_validate({"name": "two", "batchSize": batch // 2, **spread, **common})
    topology = local_topology(two)
    assert topology is not None
    label = framework.value.lower()
    return DataParallel(
        framework.value,
        supervise([one], cores, work / f"dp-{label}-1"),
        supervise([two], cores, work / f"dp-{label}-2", {two.name: topology}),
    )


def print_data_parallel(rows: list[DataParallel], steps: int, batch: int, cores: int) -> None:
    print(
        f"data-parallel, same global samples ({steps} steps of {batch}): 2 processes of "
        f"{batch // 2} ({max(1, cores // 2)} thread(s) each) vs 1 process of {batch} ({cores})"
    )
    print(f"{'framework':<12} {'1 proc/s':>10} {'2 procs/s':>10} {'ratio':>7} "
          f"{'1 proc wall':>12} {'2 procs wall':>13} {'ratio':>7}")  # fmt: skip
    for row in rows:
        one, two = row.rate(row.one), row.rate(row.two)
        print(f"{row.framework:<12} {one:>10,.0f} {two:>10,.0f} {two / one:>6.2f}x "
              f"{row.one.wall:>11.1f}s {row.two.wall:>12.1f}s "
              f"{row.one.wall / row.two.wall:>6.2f}x")  # fmt: skip


def hook_costs(calls: int, work: Path) -> dict[str, float]:
    """Seconds per step of each framework's progress hook (writing events as in a member)."""
    import keras
    import torch

    from cotrain_trainer.frameworks.tensorflow import KerasProgress
    from cotrain_trainer.frameworks.torch import TorchProgress
    from cotrain_trainer.report import ProgressWriter

    costs = {}
    with ProgressWriter(work / "torch-hook.jsonl") as writer:
        hook = TorchProgress(total_steps=10**9, batch_size=256, progress=writer)
        loss = torch.tensor(0.5)
        started = time.perf_counter()
        for _ in range(calls):
            hook.after_step(loss)
        costs["torch"] = (time.perf_counter() - started) / calls
    with ProgressWriter(work / "keras-hook.jsonl") as writer:
        callback = KerasProgress(total_steps=10**9, batch_size=256, progress=writer)
        assert isinstance(callback, keras.callbacks.Callback)
        logs = {"loss": 0.5}
        started = time.perf_counter()
        for batch in range(calls):
            callback.on_train_batch_end(batch, logs)
        costs["tf"] = (time.perf_counter() - started) / calls
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dp-steps", type=int, default=600, help="steps of the data-parallel rows")
    parser.add_argument(
        "--data-parallel-only", action="store_true", help="only the data-parallel rows"
    )
    args = parser.parse_args(argv)
    cores = available_cores()
    if args.data_parallel_only:
        with tempfile.TemporaryDirectory(prefix="cotrain-bench-") as directory:
            only = [
                data_parallel(fw, args.dp_steps, args.batch, cores, Path(directory))
                for fw in (Framework.PYTORCH, Framework.TENSORFLOW)
            ]
        print_data_parallel(only, args.dp_steps, args.batch, cores)
        return 0
    capped = max(1, cores // 2)
    chosen = members(args.steps, args.batch)
    print(f"trainer bench: built-in MLP, {args.steps} steps of {args.batch}, {cores} cores")
    print("(start-up excluded: only time between each member's first and last step counts)")
    with tempfile.TemporaryDirectory(prefix="cotrain-bench-") as directory:
        work = Path(directory)
        seq_all, alone_all = sequential(chosen, cores, work)
        seq_capped, alone_capped = sequential(chosen, capped, work)
        conc_free, window_free, _ = concurrent(chosen, cores, work)
        conc_capped, window_capped, capped_run = concurrent(chosen, capped, work)
        small = small_member(args.steps, args.batch)
        _, alone_small = sequential([small], capped, work)
        _, _, lopsided_run = concurrent([small, chosen[1]], capped, work, label="lopsided")
        costs = hook_costs(20_000, work)
        dp_rows = [
            data_parallel(fw, args.dp_steps, args.batch, cores, work)
            for fw in (Framework.PYTORCH, Framework.TENSORFLOW)
        ]
    rows = [
        (f"sequential, {cores} threads each (baseline)", seq_all, ""),
        (f"sequential, {capped} thread(s) each", seq_capped, ""),
        (f"concurrent, no caps ({cores} threads each)", conc_free, f"{window_free:.1f}s overlap"),
        (
            f"concurrent, caps ({capped} thread(s) each)",
            conc_capped,
            f"{window_capped:.1f}s overlap",
        ),
    ]
    print()
    print(f"{'run':<44} {'samples/s':>10} {'vs baseline':>12}  note")
    for label, rate, note in rows:
        print(f"{label:<44} {rate:>10,.0f} {rate / seq_all:>11.2f}x  {note}")
    print()
    print(f"alone, {cores} threads: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in alone_all.items()))
    print(
        f"alone, {capped} thread(s): "
        + ", ".join(f"{k} {v:,.0f}/s" for k, v in alone_capped.items())
    )
    print()
    together, window = window_rates(capped_run)
    lopsided, lopsided_window = window_rates(lopsided_run)
    print_limits(
        [
            Limit(f"torch + tf, batch {args.batch} each", alone_capped, together, window),
            Limit(
                f"torch-small (batch {small.batch_size}) + tf ({args.batch})",
                {"torch-small": alone_small["torch-small"], "tf": alone_capped["tf"]},
                lopsided,
                lopsided_window,
            ),
        ],
        capped,
    )
    print()
    print(f"{'reporting overhead':<44} {'per step':>10} {'of a step':>12}")
    for name, cost in costs.items():
        step_seconds = args.batch / alone_capped[name]
        print(f"{name + ' hook (report.step, events to a file)':<44} "
              f"{cost * 1e6:>8.1f}us {100 * cost / step_seconds:>11.3f}%")  # fmt: skip
    share = 100 * capped_run.supervisor_cpu / max(capped_run.members_cpu, 1e-9)
    print(f"{'supervisor CPU (tail, poll, report) / members':<44} "
          f"{capped_run.supervisor_cpu:>9.2f}s {share:>11.3f}%")  # fmt: skip
    print()
    print_data_parallel(dp_rows, args.dp_steps, args.batch, cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
