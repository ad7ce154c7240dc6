"""PyTorch: caps, the training-loop progress hook, and the built-in MLP and CNN.

Owns everything a PyTorch member does with torch: thread caps (`torch.set_num_threads`,
`set_num_interop_threads`), the GPU memory cap (`torch.cuda.set_per_process_memory_fraction`,
a fraction of the whole device torch sees, only when CUDA is really there: a CPU build raises
AssertionError and a CUDA build without a driver raises RuntimeError), the device-memory probe
(the caching allocator's reserved bytes), `TorchProgress` for any PyTorch loop, and the built-in
training run. The GPU calls sit behind `CudaMemory` (`CudaDevice` is torch's; tests fake it), and
the CPU is "no device": the same code, minus the device. Imported only by PyTorch member
processes (and user programs that want the hook).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cotrain_operator.api.contract import PlannedBudget
from cotrain_operator.api.models import BuiltinModel, Framework, Member
from cotrain_trainer import report
from cotrain_trainer.caps import MIB, memory_fraction
from cotrain_trainer.distributed import World
from cotrain_trainer.frameworks import AppliedCaps
from cotrain_trainer.frameworks.synthetic import (
    CLASSES,
    CNN_SIZE,
    MLP_FEATURES,
    MLP_HIDDEN,
    SEED,
    builtin_model,
    data_for,
    shard,
    total_steps,
)
from cotrain_trainer.gpu import CPU, Device, DeviceMemory, device_memory_probe
from cotrain_trainer.report import MemoryProbe, ProgressWriter

log = logging.getLogger(__name__)


def world() -> World:
    """This process's data-parallel world, from torch.distributed's environment variables."""
    return World.from_env(Framework.PYTORCH, os.environ)


def device_index() -> int:
    """The CUDA device of this process: its LOCAL_RANK (wrapped when there are fewer devices)."""
    return world().local_rank % max(1, torch.cuda.device_count())


class CudaMemory(DeviceMemory, Protocol):
    """The CUDA device of this process as the memory cap uses it."""

    def total_memory_bytes(self) -> int:
        """The memory of the whole device torch sees (the card, or its MIG slice): the number
        torch multiplies a per-process fraction by."""

    def set_memory_fraction(self, fraction: float) -> None:
        """Cap this process's caching allocator at `fraction` of `total_memory_bytes()`."""


class CudaDevice:
    """A CUDA device through torch.cuda."""

    def __init__(self, index: int) -> None:
        self.index = index

    def total_memory_bytes(self) -> int:
        # What the caching allocator's setMemoryFraction multiplies by (totalGlobalMem).
        return int(torch.cuda.get_device_properties(self.index).total_memory)

    def set_memory_fraction(self, fraction: float) -> None:
        torch.cuda.set_per_process_memory_fraction(fraction, self.index)

    def memory_in_use(self) -> tuple[int, int]:
        # Reserved, not allocated: the allocator's segments are what the fraction caps and what
        # the device has given this process (less the CUDA context).
        return (
            int(torch.cuda.memory_reserved(self.index)),
            int(torch.cuda.max_memory_reserved(self.index)),
        )


def cuda_device() -> CudaDevice | None:
    """This process's CUDA device (LOCAL_RANK, 0 alone) when torch can use one, else None."""
    return CudaDevice(device_index()) if torch.cuda.is_available() else None


def detect_device(cuda: CudaDevice | None) -> Device:
    """What this process trains on, for the caps it announces: its CUDA device, or the CPU."""
    if cuda is None:
        return CPU
    name = torch.cuda.get_device_name(cuda.index)
    return Device(kind="cuda", name=name, total_memory_bytes=cuda.total_memory_bytes())


def apply_memory_cap(budget: PlannedBudget, cuda: CudaMemory | None) -> str:
    """Cap this process's memory on its device at its budget, as a fraction of the whole device
    (`caps.memory_fraction`); say what was done."""
    if cuda is None:
        return "none: no GPU"
    total = cuda.total_memory_bytes()
    fraction = memory_fraction(budget.memory_bytes, total)
    if fraction is None or budget.memory_bytes is None:
        return "none: no memory budget"
    over = ""
    if budget.memory_bytes > total:
        over = f" (the budget, {budget.memory_bytes // MIB} MiB, is more than the device)"
        log.warning(
            "GPU memory budget of %d MiB is more than the device's %d MiB: capped at the device",
            budget.memory_bytes // MIB,
            total // MIB,
        )
    cuda.set_memory_fraction(fraction)
    return f"fraction {fraction:.4f} of {total // MIB} MiB{over}"


def apply_caps(
    budget: PlannedBudget, device_memory_bytes: int | None, devices: int = 1
) -> AppliedCaps:
    """Thread and memory caps, before any tensor is made. A PyTorch process uses one device
    (a data-parallel member runs one process per device), so `devices` changes nothing here; nor
    does `device_memory_bytes` (the share's memory, not the base of torch's fraction)."""
    torch.set_num_threads(budget.cpu_threads)
    cuda = cuda_device()
    if cuda is not None:
        torch.cuda.set_device(cuda.index)
    # Raises when already set or when the pool has started (a late call): what is in force is
    # reported below either way.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    memory_cap = apply_memory_cap(budget, cuda)
    return AppliedCaps(
        intra_op_threads=torch.get_num_threads(),
        inter_op_threads=torch.get_num_interop_threads(),
        device=detect_device(cuda).describe(),
        memory_cap=memory_cap,
    )


def memory_probe() -> MemoryProbe:
    """This process's device-memory probe: its CUDA device's, or (0, 0) on the CPU."""
    return device_memory_probe(cuda_device())


class TorchProgress:
    """Progress of a PyTorch training loop: call `after_step(loss)` after each optimizer step.

    The loss reported is the mean over the steps since the previous report, accumulated on the
    device, so a step costs one tensor add and no host sync.
    """

    def __init__(
        self,
        total_steps: int | None = None,
        batch_size: int | None = None,
        samples_per_epoch: int | None = None,
        progress: ProgressWriter | None = None,
    ) -> None:
        self.progress = progress or report.writer()
        self.progress.memory_probe = memory_probe()
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.step = 0
        self.samples = 0
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0

    def _take_loss(self) -> float:
        mean = float(self._loss_sum) / max(1, self._loss_count)
        self._loss_sum, self._loss_count = 0.0, 0
        return mean

    def after_step(self, loss: torch.Tensor | float, samples: int | None = None) -> None:
        self.step += 1
        count = samples if samples is not None else self.batch_size
        self.samples += count or 0
        value = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
        self._loss_sum = self._loss_sum + value
        self._loss_count += 1
        epoch = self.samples // self.samples_per_epoch if self.samples_per_epoch else None
        self.progress.step(
            self.step,
            loss=self._take_loss,
            samples=count,
            total_steps=self.total_steps,
            epoch=epoch,
        )

    def epoch_end(self, epoch: int) -> None:
        """Report that `epoch` passes over the data are complete (for loops that have epochs)."""
        self.progress.epoch(epoch)


def build_model(kind: BuiltinModel) -> nn.Module:
    if kind == BuiltinModel.CNN:
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (CNN_SIZE // 4) ** 2, CLASSES),
        )
    return nn.Sequential(
        nn.Linear(MLP_FEATURES, MLP_HIDDEN),
        nn.ReLU(),
        nn.Linear(MLP_HIDDEN, MLP_HIDDEN),
        nn.ReLU(),
        nn.Linear(MLP_HIDDEN, CLASSES),
    )


def init_distributed(place: World, on_cuda: bool) -> str:
    """Join the member's process group (MASTER_ADDR/PORT, RANK, WORLD_SIZE from the
    environment): NCCL when every local rank has a CUDA device of its own, else gloo."""
    enough_devices = on_cuda and torch.cuda.device_count() >= place.local_size
    backend = "nccl" if enough_devices else "gloo"
    dist.init_process_group(backend, rank=place.rank, world_size=place.size)
    return backend


def train(member: Member, progress: ProgressWriter) -> None:
    """Train the member's built-in model on its synthetic data set; data-parallel (DDP, each
    rank on its own shard, `batchSize` per rank) when the process is one of several."""
    place = world()
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda", device_index()) if on_cuda else torch.device("cpu")
    if place.distributed:
        backend = init_distributed(place, on_cuda)
        print(f"torch.distributed: rank {dist.get_rank()} of {dist.get_world_size()} ({backend})")
    try:
        _train(member, progress, place, device)
    finally:
        if place.distributed:
            dist.destroy_process_group()


def _train(member: Member, progress: ProgressWriter, place: World, device: torch.device) -> None:
    kind = builtin_model(member)
    data = data_for(member, place.size)
    steps = total_steps(member, data.samples, place.size)
    torch.manual_seed(SEED)  # the same initial weights on every rank (DDP broadcasts rank 0's)
    own = shard(data.samples, place.rank, place.size)
    x = torch.from_numpy(data.x[own])
    if kind == BuiltinModel.CNN:
        x = x.permute(0, 3, 1, 2).contiguous()  # channels-last data, channels-first convs
    x, y = x.to(device), torch.from_numpy(data.y[own]).to(device)
    samples = int(x.shape[0])
    model: nn.Module = build_model(kind).to(device)
    if place.distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=member.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    batch = member.batch_size
    # Rank 0 reports for the member: a step is a global batch of every rank's samples.
    hook = TorchProgress(steps, batch * place.size, data.samples, progress)
    per_epoch = max(1, samples // batch)
    shuffle = torch.Generator().manual_seed(SEED + place.rank)
    order = torch.randperm(samples, generator=shuffle)
    model.train()
    for index in range(steps):
        position = index % per_epoch
        if position == 0 and index:
            order = torch.randperm(samples, generator=shuffle)
        batch_index = order[position * batch : (position + 1) * batch].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[batch_index]), y[batch_index])
        loss.backward()  # DDP all-reduces the gradients here
        optimizer.step()
        hook.after_step(loss)
