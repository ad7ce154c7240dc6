"""Synthetic, seeded, learnable data for the built-in models, identical for both frameworks.

Owns the data sets (a random linear teacher for the MLP, noisy class templates for the CNN) and
how many steps a built-in member trains. Arrays are numpy, channels-last; each framework module
converts them. Framework-free and pure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cotrain_operator.api.models import BuiltinModel, Member

SEED = 0
DEFAULT_STEPS = 200
MLP_FEATURES = 128
MLP_HIDDEN = 512
MLP_SAMPLES = 8192
CNN_SIZE = 16
CNN_SAMPLES = 4096
CLASSES = 10


@dataclass(frozen=True)
class SyntheticData:
    """Inputs (float32, channels-last) and integer class labels."""

    x: NDArray[np.float32]
    y: NDArray[np.int64]

    @property
    def samples(self) -> int:
        return int(self.x.shape[0])


def mlp_data(samples: int = MLP_SAMPLES, seed: int = SEED) -> SyntheticData:
    """Gaussian inputs labelled by a random linear teacher: separable, so loss falls fast."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((MLP_FEATURES, CLASSES)).astype(np.float32)
    x = rng.standard_normal((samples, MLP_FEATURES)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int64)
    return SyntheticData(x, y)


def cnn_data(samples: int = CNN_SAMPLES, seed: int = SEED) -> SyntheticData:
    """16x16 one-channel images: a per-class random template plus as much noise."""
    rng = np.random.default_rng(seed)
    templates = rng.standard_normal((CLASSES, CNN_SIZE, CNN_SIZE, 1)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=samples).astype(np.int64)
    noise = rng.standard_normal((samples, CNN_SIZE, CNN_SIZE, 1)).astype(np.float32)
    return SyntheticData((templates[y] + noise).astype(np.float32), y)


def builtin_model(member: Member) -> BuiltinModel:
    return member.model or BuiltinModel.MLP


def dataset_samples(member: Member, world: int = 1) -> int:
    """Samples in the member's data set: at least one global batch (`batchSize` per process of
    a data-parallel world of `world`)."""
    base = CNN_SAMPLES if builtin_model(member) == BuiltinModel.CNN else MLP_SAMPLES
    return max(base, member.batch_size * world)


def data_for(member: Member, world: int = 1) -> SyntheticData:
    """The member's data set (the whole of it; each rank trains on its `shard`)."""
    if builtin_model(member) == BuiltinModel.CNN:
        return cnn_data(dataset_samples(member, world))
    return mlp_data(dataset_samples(member, world))


def shard(samples: int, rank: int, world: int) -> slice:
    """The samples of `rank` in a world of `world`: every world-th one, from the rank's own."""
    return slice(rank, samples, world)


def total_steps(member: Member, samples: int, world: int = 1) -> int:
    """Optimizer steps of a built-in run: `steps`, else `epochs` full global batches per pass,
    else DEFAULT_STEPS."""
    if member.steps is not None:
        return member.steps
    if member.epochs is not None:
        return member.epochs * max(1, samples // (member.batch_size * world))
    return DEFAULT_STEPS
