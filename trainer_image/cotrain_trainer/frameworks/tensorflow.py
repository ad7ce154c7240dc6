"""TensorFlow/Keras: caps, the Keras progress callback, and the built-in MLP and CNN.

Owns everything a TensorFlow member does with TensorFlow: thread caps
(`tf.config.threading`, which must be set before the runtime starts), the GPU memory cap (a
logical device with `memory_limit`, or memory growth without a budget: by default TensorFlow maps
the whole card), `KerasProgress` for any `model.fit`, and the built-in training run. On a CPU
device TensorFlow refuses GPU memory configuration (ValueError), so the cap is only applied when
a GPU is listed. Imported only by TensorFlow member processes (and user programs that want the
callback).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from cotrain_operator.api.contract import PlannedBudget
from cotrain_operator.api.models import BuiltinModel, Member
from cotrain_trainer import report
from cotrain_trainer.caps import memory_limit_mib
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


def detect_device(gpus: list[Any], device_memory_bytes: int | None = None) -> Device:
    if not gpus:
        return CPU
    details = tf.config.experimental.get_device_details(gpus[0])
    name = str(details.get("device_name", gpus[0].name))
    return Device(kind="cuda", name=name, total_memory_bytes=device_memory_bytes)


def apply_memory_cap(budget: PlannedBudget, gpus: list[Any]) -> str:
    """Cap the memory TensorFlow may take on the first GPU; say what was done."""
    if not gpus:
        return "none: no GPU"
    # One member, one device: hide any others so that none of them gets mapped whole.
    tf.config.set_visible_devices(gpus[0], "GPU")
    limit = memory_limit_mib(budget.memory_bytes)
    if limit is None:
        tf.config.experimental.set_memory_growth(gpus[0], True)
        return "growth: no memory budget"
    tf.config.set_logical_device_configuration(
        gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=limit)]
    )
    return f"memory_limit {limit} MiB"


def apply_caps(budget: PlannedBudget, device_memory_bytes: int | None) -> AppliedCaps:
    """Thread and memory caps, before the TensorFlow runtime starts."""
    tf.config.threading.set_intra_op_parallelism_threads(budget.cpu_threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    gpus = tf.config.list_physical_devices("GPU")
    memory_cap = apply_memory_cap(budget, gpus)
    return AppliedCaps(
        intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        device=detect_device(gpus, device_memory_bytes).describe(),
        memory_cap=memory_cap,
    )


def _gpu_memory() -> tuple[int | None, int | None]:
    info = tf.config.experimental.get_memory_info("GPU:0")
    return int(info["current"]), int(info["peak"])


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
        if tf.config.list_physical_devices("GPU"):  # physical: listing them starts no runtime
            self.progress.memory_probe = _gpu_memory
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


def train(member: Member, progress: ProgressWriter) -> None:
    """Train the member's built-in model on its synthetic data set with `model.fit`."""
    data = data_for(member)
    steps = total_steps(member, data.samples)
    keras.utils.set_random_seed(SEED)
    model = build_model(builtin_model(member))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=member.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    options = tf.data.Options()
    # tf.data has its own thread pool (one thread per core by default): keep it within the cap.
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    dataset = (
        tf.data.Dataset.from_tensor_slices((data.x, data.y))
        .shuffle(data.samples, seed=SEED, reshuffle_each_iteration=True)
        .batch(member.batch_size, drop_remainder=True)
        .repeat()
        .with_options(options)
    )
    callback = KerasProgress(steps, member.batch_size, data.samples, progress)
    model.fit(
        dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[callback]
    )
