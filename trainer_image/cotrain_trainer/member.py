"""The built-in member runner: `python -m cotrain_trainer.member`, started by the supervisor.

Owns the order of things in a built-in member process: read the member from $COTRAIN_MEMBER,
import its one framework, apply the caps before the framework touches a device, announce the run
(with the caps as the framework reports them), train (data-parallel when its environment
places it in a world of several processes: see `distributed`), and exit — EXIT_GPU_OOM (75) after a
framework GPU out-of-memory error (through `report.session`), 1 after any other error.
"""

from __future__ import annotations

import os
import sys
import time

from cotrain_operator.api.contract import ENV_MEMBER
from cotrain_trainer import report
from cotrain_trainer.distributed import World, wait_until_resolvable
from cotrain_trainer.frameworks import load_member_context
from cotrain_trainer.frameworks.synthetic import dataset_samples, total_steps

# When this process began, as near as it can tell (its framework is imported later, in main):
# the start of the window in which it ran beside its co-tenants.
LAUNCHED = time.time()


def main() -> int:
    context = load_member_context()  # imports the member's framework, and only that one
    if context is None:
        sys.stderr.write(f"cotrain_trainer.member runs under the supervisor: no ${ENV_MEMBER}\n")
        return 2
    member = context.member
    caps = context.runner.apply_caps(
        context.budget, context.device_memory_bytes, devices=member.gpu.count
    )
    progress = report.writer()
    world = World.from_env(member.framework, os.environ)
    if world.distributed:
        wait_until_resolvable(world.peer_hosts)
    announced = caps.as_event()
    if world.distributed:
        announced.update(rank=world.rank, worldSize=world.size)
    steps = total_steps(member, dataset_samples(member, world.size), world.size)
    progress.started(steps, announced, launched=LAUNCHED)
    with report.session():
        context.runner.train(member, progress)
    progress.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
