"""TensorFlow/Keras: caps, the Keras progress callback, and the built-in MLP and CNN.

Owns everything a TensorFlow member does with TensorFlow: thread caps
(`tf.config.threading`, which must be set before the runtime starts), the GPU memory cap (a
logical device with `memory_limit` in MiB, or memory growth without a budget: by default
TensorFlow maps the whole card), the device-memory probe (`get_memory_info`: the BFC allocator's
current and peak bytes), `KerasProgress` for any `model.fit`, and the built-in training run. The
GPU calls sit behind `TfGpu` (`PhysicalGpu` is TensorFlow's; tests fake it). On a CPU device
TensorFlow refuses GPU memory configuration (ValueError), so the cap is only applied when a GPU
is listed, and the CPU is "no device": the same code, minus the device. Imported only by
TensorFlow member processes (and user programs that want the callback).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import keras
import numpy as np
import tensorflow as tf

from cotrain_operator.api.contract import PlannedBudget
from cotrain_operator.api.models import BuiltinModel, Framework, Member
from cotrain_trainer import report
from cotrain_trainer.caps import memory_limit_mib
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


def detect_device(gpus: list[Any], device_memory_bytes: int | None = None) -> Device:
    if not gpus:
        return CPU
    details = tf.config.experimental.get_device_details(gpus[0])
    name = str(details.get("device_name", gpus[0].name))
    return Device(kind="cuda", name=name, total_memory_bytes=device_memory_bytes)


class TfGpu(DeviceMemory, Protocol):
    """One GPU of this process as the memory cap uses it."""

    def limit_memory(self, mib: int) -> None:
        """Give TensorFlow one logical device of `mib` MiB on this GPU."""

    def grow_memory(self) -> None:
        """Let TensorFlow map this GPU's memory as it needs it, not all at once."""


class PhysicalGpu:
    """A GPU through tf.config; `logical` is its name once visible (GPU:0 for the first)."""

    def __init__(self, device: Any, logical: str) -> None:
        self.device, self.logical = device, logical

    def limit_memory(self, mib: int) -> None:
        config = tf.config.LogicalDeviceConfiguration(memory_limit=mib)
        tf.config.set_logical_device_configuration(self.device, [config])

    def grow_memory(self) -> None:
        tf.config.experimental.set_memory_growth(self.device, True)

    def memory_in_use(self) -> tuple[int, int]:
        info = tf.config.experimental.get_memory_info(self.logical)
        return int(info["current"]), int(info["peak"])


def visible_gpus(gpus: Sequence[Any], devices: int = 1) -> list[PhysicalGpu]:
    """The member's first `devices` of the physical `gpus`, made the only ones TensorFlow uses
    (so that none of the others gets mapped whole); none on the CPU."""
    if not gpus:
        return []
    mine = list(gpus[: max(1, devices)])
    tf.config.set_visible_devices(mine, "GPU")
    return [PhysicalGpu(gpu, f"GPU:{index}") for index, gpu in enumerate(mine)]


def apply_memory_cap(budget: PlannedBudget, gpus: Sequence[TfGpu]) -> str:
    """Cap the memory TensorFlow may take on each of the member's GPUs (the budget is per
    device, `memory_limit` is in MiB: `caps.memory_limit_mib`); say what was done."""
    if not gpus:
        return "none: no GPU"
    limit = memory_limit_mib(budget.memory_bytes)
    if limit is None:
        for gpu in gpus:
            gpu.grow_memory()
        return "growth: no memory budget"
    for gpu in gpus:
        gpu.limit_memory(limit)
    each = " each" if len(gpus) > 1 else ""
    return f"memory_limit {limit} MiB{each}"


def apply_caps(
    budget: PlannedBudget, device_memory_bytes: int | None, devices: int = 1
) -> AppliedCaps:
    """Thread and memory caps, before the TensorFlow runtime starts."""
    tf.config.threading.set_intra_op_parallelism_threads(budget.cpu_threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    physical = tf.config.list_physical_devices("GPU")
    memory_cap = apply_memory_cap(budget, visible_gpus(physical, devices))
    return AppliedCaps(
        intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        device=detect_device(physical, device_memory_bytes).describe(),
        memory_cap=memory_cap,
    )


def memory_probe() -> MemoryProbe:
    """This process's device-memory probe: its first GPU's (where a model on one device lives),
    or (0, 0) on the CPU. Listing physical devices starts no runtime."""
    gpus = tf.config.list_physical_devices("GPU")
    return device_memory_probe(PhysicalGpu(gpus[0], "GPU:0") if gpus else None)


class KerasProgress(keras.callbacks.Callback):  # type: ignore[misc]
    """Progress of `model.fit`: counts steps (and epochs), reports loss and samples/s.

    Keras logs the running mean of the loss since the epoch began; the callback reports the mean
    over the steps since its previous report, recovered from two running means, so the numbers
    match `TorchProgress`. With `samples_per_epoch` the epoch is counted from samples seen (for a
    `fit` over a repeated data set); without it, from Keras's epochs.
    """

    def __init__(
        self,
        total_steps: int | None = None,
        batch_size: int | None = None,
        samples_per_epoch: int | None = None,
        progress: ProgressWriter | None = None,
    ) -> None:
        super().__init__()
        self.progress = progress or report.writer()
        self.progress.memory_probe = memory_probe()
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.step = 0
        self.samples = 0
        self._batches = 0  # batches of the current Keras epoch
        self._mean = 0.0  # Keras's running mean after them
        self._reported_batches = 0
        self._reported_mean = 0.0

    def _take_loss(self) -> float:
        done = self._batches - self._reported_batches
        if done <= 0:
            return self._mean
        total = self._mean * self._batches - self._reported_mean * self._reported_batches
        self._reported_batches, self._reported_mean = self._batches, self._mean
        return total / done

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._batches = self._reported_batches = 0
        self._mean = self._reported_mean = 0.0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.step += 1
        self._batches = batch + 1
        loss = (logs or {}).get("loss")
        if loss is not None:
            self._mean = float(loss)
        self.samples += self.batch_size or 0
        epoch = self.samples // self.samples_per_epoch if self.samples_per_epoch else None
        self.progress.step(
            self.step,
            loss=self._take_loss if loss is not None else None,
            samples=self.batch_size,
            total_steps=self.total_steps,
            epoch=epoch,
        )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.samples_per_epoch is None:
            self.progress.epoch(epoch + 1)


def build_model(kind: BuiltinModel) -> Any:
    if kind == BuiltinModel.CNN:
        layers = [
            keras.Input((CNN_SIZE, CNN_SIZE, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES),
        ]
    else:
        layers = [
            keras.Input((MLP_FEATURES,)),
            keras.layers.Dense(MLP_HIDDEN, activation="relu"),
            keras.layers.Dense(MLP_HIDDEN, activation="relu"),
            keras.layers.Dense(CLASSES),
        ]
    return keras.Sequential(layers)


def _dataset_options() -> tf.data.Options:
    options = tf.data.Options()
    # tf.data has its own thread pool (one thread per core by default): keep it within the cap.
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return options


def strategy_for(member: Member, place: World) -> tf.distribute.Strategy | None:
    """MultiWorkerMirroredStrategy for a worker of several (TF_CONFIG), MirroredStrategy for
    one worker of several devices, None for a plain single-device run."""
    if place.distributed:
        loopback = all(h.split(":")[0] in ("127.0.0.1", "localhost") for h in place.tf_workers)
        # On one machine (`cotrain run`) workers may share a GPU, which NCCL refuses: use rings.
        implementation = (
            tf.distribute.experimental.CommunicationImplementation.RING
            if loopback
            else tf.distribute.experimental.CommunicationImplementation.AUTO
        )
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation
            )
        )
    if member.gpu.count > 1:
        return tf.distribute.MirroredStrategy()
    return None


def train(member: Member, progress: ProgressWriter) -> None:
    """Train the member's built-in model on its synthetic data set: with `model.fit` alone, or
    data-parallel under a tf.distribute strategy (see `strategy_for`)."""
    place = World.from_env(Framework.TENSORFLOW, os.environ)
    strategy = strategy_for(member, place)  # before any other op: it starts the runtime
    if strategy is not None:
        train_distributed(member, progress, strategy, place)
        return
    data = data_for(member)
    steps = total_steps(member, data.samples)
    keras.utils.set_random_seed(SEED)
    model = build_model(builtin_model(member))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=member.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((data.x, data.y))
        .shuffle(data.samples, seed=SEED, reshuffle_each_iteration=True)
        .batch(member.batch_size, drop_remainder=True)
        .repeat()
        .with_options(_dataset_options())
    )
    callback = KerasProgress(steps, member.batch_size, data.samples, progress)
    model.fit(
        dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[callback]
    )


def train_distributed(
    member: Member, progress: ProgressWriter, strategy: tf.distribute.Strategy, place: World
) -> None:
    """A custom loop under `strategy` (Keras 3's `fit` fails under MultiWorkerMirroredStrategy,
    keras-team/keras#20585): each worker trains on its shard, `batchSize` per replica, the
    gradients all-reduced by the optimizer; every worker reports, the supervisor reads worker
    0's."""
    replicas = strategy.num_replicas_in_sync
    kind = "MultiWorkerMirroredStrategy" if place.distributed else "MirroredStrategy"
    print(
        f"tf.distribute: {kind}, {replicas} replica(s) in sync "
        f"(worker {place.rank} of {place.size})"
    )
    global_batch = member.batch_size * replicas
    # Each worker batches the global batch (which the strategy rebatches): its shard must hold one.
    data = data_for(member, replicas * place.size)
    steps = total_steps(member, data.samples, replicas)
    keras.utils.set_random_seed(SEED)  # the same initial weights on every worker
    with strategy.scope():
        model = build_model(builtin_model(member))
        optimizer = keras.optimizers.Adam(learning_rate=member.learning_rate)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    own = shard(data.samples, place.rank, place.size)
    x, y = np.ascontiguousarray(data.x[own]), np.ascontiguousarray(data.y[own])
    options = _dataset_options()
    # Each worker reads its own shard: no automatic sharding on top.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=SEED + place.rank, reshuffle_each_iteration=True)
        # The strategy splits a batch among the replicas: batch the global batch.
        .batch(global_batch, drop_remainder=True)
        .repeat()
        .with_options(options)
    )
    batches = iter(strategy.experimental_distribute_dataset(dataset))

    def replica_step(inputs: Any, labels: Any) -> Any:
        with tf.GradientTape() as tape:
            per_sample = loss_fn(labels, model(inputs, training=True))
            loss = tf.reduce_sum(per_sample) / global_batch
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss

    @tf.function  # type: ignore[untyped-decorator]
    def train_step(iterator: Any) -> Any:
        inputs, labels = next(iterator)
        losses = strategy.run(replica_step, args=(inputs, labels))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    # A step is a global batch of every replica's samples (rank 0's report is the member's).
    samples = member.batch_size * replicas
    progress.memory_probe = memory_probe()
    seen = 0
    for step in range(1, steps + 1):
        loss = train_step(batches)
        seen += samples
        progress.step(
            step,
            loss=lambda loss=loss: float(loss),
            samples=samples,
            total_steps=steps,
            epoch=seen // data.samples,
        )
