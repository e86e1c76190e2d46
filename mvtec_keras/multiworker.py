"""``model.fit`` under ``tf.distribute.MultiWorkerMirroredStrategy``, which Keras 3's own fit cannot run.

Keras 3.15's fit fails there in two places (keras-team/keras#20585): it reduces a *distributed input
batch* eagerly to build the model ("Attempt to convert a value (PerReplica ...)"), and it averages the
replicas' scalar logs with ``axis=0`` ("Invalid reduction dimension 0 for input with 0 dimensions").
:func:`fit` is the same training with a loop of our own: each step runs the model's own ``train_step``
through ``strategy.run`` (so losses, loss scaling, gradients, optimiser updates and synchronised
BatchNorm are exactly those of Keras' fit and of MirroredStrategy), the replicas' logs are averaged as
fit averages them, and the callbacks see the same events (epoch and batch begin/end, ``stop_training``,
``BackupAndRestore``'s initial epoch), so early stopping, reduce-on-plateau, checkpoints, the CSV
history and ``--resume`` behave as on one device.

The input must be a ``tf.data.Dataset`` batched with the *global* batch. It is sharded by data: every
worker reads the same pipeline (same seed, same order) and keeps its own slice of each global batch,
so one step sees exactly the global batch a one-device step would see.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import keras

from .errors import InputError


def is_multiworker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy=None) -> bool:
    """Whether this process is the one that writes: the ``chief`` task, else worker 0 (TF's convention)."""
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not is_multiworker(strategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0 and
                                            "chief" not in resolver.cluster_spec().as_dict())


@contextlib.contextmanager
def worker_workdir(chief_workdir: str, resume: bool):
    """The training folder of a worker that is not the chief: its own temporary folder (checkpoints of
    every worker would collide in the chief's), removed at the end. With ``resume`` it starts from a
    copy of the chief's backup, so that every worker restores the same epoch (the chief's folder must
    then be visible to every worker, e.g. on a shared filesystem)."""
    workdir = tempfile.mkdtemp(prefix="mvtec-keras-worker-")
    try:
        backup = os.path.join(chief_workdir, "backup")
        if resume and os.path.isdir(backup):
            shutil.copytree(backup, os.path.join(workdir, "backup"))
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def distribute_dataset(strategy, dataset, flag="the data"):
    import tensorflow as tf

    if not isinstance(dataset, tf.data.Dataset):
        raise InputError(f"--strategy multiworker: {flag} must be a tf.data.Dataset, got {type(dataset).__name__}")
    options = tf.data.Options()
    # Every worker reads the whole (seeded) pipeline and keeps its slice of each global batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    return dataset, strategy.experimental_distribute_dataset(dataset)


def _reduced(strategy, logs):
    # Each replica's logs are the running means of its own metrics; fit averages them over replicas.
    return {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}


def fit(model, x, validation_data=None, epochs=1, steps_per_epoch=None, callbacks=(), verbose=1):
    """Train ``model`` (built and compiled inside its strategy's scope) like ``model.fit`` would, in that
    scope as fit is; returns its History."""
    with model.distribute_strategy.scope():
        return _fit(model, x, validation_data, epochs, steps_per_epoch, callbacks, verbose)


def _fit(model, x, validation_data, epochs, steps_per_epoch, callbacks, verbose):
    import tensorflow as tf

    strategy = model.distribute_strategy
    local, train = distribute_dataset(strategy, x, "the training data")
    val = None if validation_data is None else distribute_dataset(strategy, validation_data, "the validation data")[1]
    # What fit does before its first step, on a local (not distributed) batch: build the model, its
    # metrics and optimiser variables outside replica context.
    model._symbolic_build(data_batch=next(iter(local)))  # noqa: SLF001 (Keras' own pre-fit build)

    @tf.function
    def train_fn(batch):
        return _reduced(strategy, strategy.run(model.train_step, args=(batch,)))

    @tf.function
    def test_fn(batch):
        return _reduced(strategy, strategy.run(model.test_step, args=(batch,)))

    steps = steps_per_epoch
    if steps is None:
        n = int(local.cardinality())
        steps = n if n >= 0 else None
    chief_verbose = verbose if is_chief(strategy) else 0
    callbacks = keras.callbacks.CallbackList(list(callbacks), add_history=True, add_progbar=chief_verbose != 0,
                                             verbose=chief_verbose, epochs=epochs, steps=steps, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    # BackupAndRestore sets this when it restores a backup (what fit reads too).
    initial_epoch = getattr(model, "_initial_epoch", None) or 0
    iterator = iter(train) if steps_per_epoch is not None else None  # a repeated dataset: one iterator
    logs, training_logs = {}, None
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        batches = iter(train) if iterator is None else iterator
        step = 0
        while steps_per_epoch is None or step < steps_per_epoch:
            try:
                batch = next(batches)  # in step on every worker: the iterator agrees on the end
            except StopIteration:
                break
            callbacks.on_train_batch_begin(step)
            logs = train_fn(batch)
            callbacks.on_train_batch_end(step, logs)
            step += 1
            if model.stop_training:
                break
        epoch_logs = {k: float(v) for k, v in logs.items()}
        if val is not None:
            model.reset_metrics()
            val_logs = {}
            for batch in val:
                val_logs = test_fn(batch)
            epoch_logs.update({f"val_{k}": float(v) for k, v in val_logs.items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        training_logs = epoch_logs
        if model.stop_training:
            break
    if isinstance(model.optimizer, keras.optimizers.Optimizer) and epochs > 0:
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs=training_logs)
    return model.history
