"""PyTorch: caps, the training-loop progress hook, and the built-in MLP and CNN.

Owns everything a PyTorch member does with torch: thread caps (`torch.set_num_threads`,
`set_num_interop_threads`), the GPU memory cap (`torch.cuda.set_per_process_memory_fraction`,
only when CUDA is really there: a CPU build raises AssertionError and a CUDA build without a
driver raises RuntimeError), `TorchProgress` for any PyTorch loop, and the built-in training run.
Imported only by PyTorch member processes (and user programs that want the hook).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from cotrain_operator.api.contract import PlannedBudget
from cotrain_operator.api.models import BuiltinModel, Member
from cotrain_trainer import report
from cotrain_trainer.caps import memory_fraction
from cotrain_trainer.frameworks import AppliedCaps
from cotrain_trainer.frameworks.synthetic import (
    CLASSES,
    CNN_SIZE,
    MLP_FEATURES,
    MLP_HIDDEN,
    SEED,
    builtin_model,
    data_for,
    total_steps,
)
from cotrain_trainer.gpu import CPU, Device
from cotrain_trainer.report import ProgressWriter


def detect_device(device_memory_bytes: int | None = None) -> Device:
    """CUDA device 0 when torch can use one, else the CPU."""
    if not torch.cuda.is_available():
        return CPU
    total = device_memory_bytes or torch.cuda.get_device_properties(0).total_memory
    return Device(kind="cuda", name=torch.cuda.get_device_name(0), total_memory_bytes=total)


def apply_memory_cap(budget: PlannedBudget, device: Device) -> str:
    """Cap this process's share of the device's memory; say what was done."""
    if not device.is_gpu:
        return "none: no GPU"
    fraction = memory_fraction(budget.memory_bytes, device.total_memory_bytes)
    if fraction is None:
        return "none: no memory budget"
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    total_mib = (device.total_memory_bytes or 0) // 2**20
    return f"fraction {fraction:.4f} of {total_mib} MiB"


def apply_caps(budget: PlannedBudget, device_memory_bytes: int | None) -> AppliedCaps:
    """Thread and memory caps, before any tensor is made."""
    torch.set_num_threads(budget.cpu_threads)
    # Raises when already set or when the pool has started (a late call): what is in force is
    # reported below either way.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    device = detect_device(device_memory_bytes)
    memory_cap = apply_memory_cap(budget, device)
    return AppliedCaps(
        intra_op_threads=torch.get_num_threads(),
        inter_op_threads=torch.get_num_interop_threads(),
        device=device.describe(),
        memory_cap=memory_cap,
    )


def _cuda_memory() -> tuple[int | None, int | None]:
    return torch.cuda.memory_reserved(0), torch.cuda.max_memory_reserved(0)


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
        if torch.cuda.is_available():
            self.progress.memory_probe = _cuda_memory
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


def train(member: Member, progress: ProgressWriter) -> None:
    """Train the member's built-in model on its synthetic data set."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = builtin_model(member)
    data = data_for(member)
    steps = total_steps(member, data.samples)
    torch.manual_seed(SEED)
    x = torch.from_numpy(data.x)
    if kind == BuiltinModel.CNN:
        x = x.permute(0, 3, 1, 2).contiguous()  # channels-last data, channels-first convs
    x, y = x.to(device), torch.from_numpy(data.y).to(device)
    model = build_model(kind).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=member.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    hook = TorchProgress(steps, member.batch_size, data.samples, progress)
    batch = member.batch_size
    per_epoch = max(1, data.samples // batch)
    shuffle = torch.Generator().manual_seed(SEED)
    order = torch.randperm(data.samples, generator=shuffle)
    model.train()
    for index in range(steps):
        position = index % per_epoch
        if position == 0 and index:
            order = torch.randperm(data.samples, generator=shuffle)
        batch_index = order[position * batch : (position + 1) * batch].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[batch_index]), y[batch_index])
        loss.backward()
        optimizer.step()
        hook.after_step(loss)
