"""Training glue shared by every trainable detector: callbacks, LR range test, NaN guard.

Kept apart from the models (pure computation) so that autoencoders and GANs
train the same way: Keras ``fit`` with early stopping, reduce-on-plateau, a
best-weights checkpoint, resumable backups, TensorBoard and a CSV history.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import keras
import numpy as np

from .errors import InputError


class NaNGuard(keras.callbacks.Callback):
    """Stop at the first non-finite loss and remember where, so the caller can raise one clear line."""

    def __init__(self):
        super().__init__()
        self.failed_at: Optional[tuple] = None

    def on_train_batch_end(self, batch, logs=None):
        # Every logged loss counts: GANs log several (d_loss, g_loss, ...), autoencoders one.
        for key, value in (logs or {}).items():
            if "loss" in key and not math.isfinite(float(value)):
                self.failed_at = (self._epoch, batch)
                self.model.stop_training = True
                return

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def check(self):
        if self.failed_at is not None:
            epoch, batch = self.failed_at
            raise InputError(
                f"training diverged: loss became NaN/inf at epoch {epoch + 1}, batch {batch + 1}; "
                "lower --lr or check the input images"
            )


def standard_callbacks(
    workdir: Optional[str],
    monitor: Optional[str] = "val_loss",
    patience: int = 12,
    lr_patience: int = 5,
    min_lr: float = 1e-6,
    tensorboard: bool = True,
) -> tuple[list, NaNGuard]:
    """NaN guard; with a ``monitor``, early stopping and reduce-on-plateau; with a workdir,
    checkpoint / resumable backup / CSV history / TensorBoard.

    ``monitor=None`` (GANs, whose adversarial losses do not settle) keeps a checkpoint of the
    latest epoch instead of the best one and never stops early.
    """
    guard = NaNGuard()
    cbs: list = [guard]
    if monitor:
        cbs += [
            keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True, verbose=1),
            keras.callbacks.ReduceLROnPlateau(
                monitor=monitor, factor=0.5, patience=lr_patience, min_lr=min_lr, verbose=1
            ),
        ]
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        cbs += [
            keras.callbacks.ModelCheckpoint(
                os.path.join(workdir, "checkpoint.best.weights.h5" if monitor else "checkpoint.last.weights.h5"),
                monitor=monitor or "loss",
                save_best_only=bool(monitor),
                save_weights_only=True,
            ),
            # Resume after an interruption: restores weights, optimizer and epoch.
            keras.callbacks.BackupAndRestore(os.path.join(workdir, "backup"), delete_checkpoint=True),
            keras.callbacks.CSVLogger(os.path.join(workdir, "history.csv"), append=True),
        ]
        if tensorboard and _tensorflow_available():  # TensorBoard writes through tf.summary
            cbs.append(keras.callbacks.TensorBoard(os.path.join(workdir, "logs"), write_graph=False))
    return cbs, guard


def fit(model, x, validation_data=None, epochs=1, steps_per_epoch=None, callbacks=(), verbose=1):
    """``model.fit`` for every trainable detector (no shuffling there: the pipelines shuffle, seeded);
    under ``MultiWorkerMirroredStrategy``, which Keras' fit cannot run, the same training through
    :func:`mvtec_keras.multiworker.fit`."""
    from . import backends

    if backends.is_tensorflow():
        from . import multiworker

        if multiworker.is_multiworker(model.distribute_strategy):
            return multiworker.fit(model, x, validation_data=validation_data, epochs=epochs,
                                   steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=verbose)
    return model.fit(x, validation_data=validation_data, epochs=epochs, steps_per_epoch=steps_per_epoch,
                     callbacks=list(callbacks), verbose=verbose, shuffle=False)


def _tensorflow_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


class ArrayPairs(keras.utils.PyDataset):
    """``(x, x)`` batches of an image array in order, for autoencoder training without tf.data
    (Keras backends other than TensorFlow); :meth:`repeat` cycles them, as ``tf.data``'s does."""

    def __init__(self, images, batch_size: int, repeats: int = 1):
        super().__init__()
        self.images = np.asarray(images, np.float32)
        self.batch_size = int(batch_size)
        self.n_batches = -(-len(self.images) // self.batch_size)
        self.repeats = repeats

    def __len__(self):
        return self.n_batches * self.repeats

    def __getitem__(self, i):
        lo = (i % self.n_batches) * self.batch_size
        x = self.images[lo : lo + self.batch_size]
        return x, x

    def repeat(self):
        # Long enough for any sweep; fit stops at its steps_per_epoch.
        return ArrayPairs(self.images, self.batch_size, repeats=1 << 20)


class _LRSweep(keras.callbacks.Callback):
    def __init__(self, lrs):
        super().__init__()
        self.lrs = lrs
        self.losses: list = []

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate.assign(self.lrs[min(batch, len(self.lrs) - 1)])

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", np.nan))
        self.losses.append(loss)
        # Stop once the loss has clearly blown up: nothing more to learn from the sweep.
        finite = [v for v in self.losses if math.isfinite(v)]
        if not math.isfinite(loss) or (len(finite) > 10 and loss > 4 * min(finite)):
            self.model.stop_training = True


def fresh_workdir(workdir: Optional[str], resume: bool) -> None:
    """A new run must not pick up a stale backup or history from an earlier one."""
    if workdir and not resume:
        import shutil

        shutil.rmtree(os.path.join(workdir, "backup"), ignore_errors=True)
        hist = os.path.join(workdir, "history.csv")
        if os.path.exists(hist):
            os.remove(hist)


def lr_range_test(
    model: keras.Model,
    dataset,
    min_lr: float = 1e-6,
    max_lr: float = 1e-1,
    steps: int = 100,
) -> dict:
    """Exponential learning-rate sweep (Smith 2017); the model's weights are restored afterwards.

    Suggests the learning rate at the steepest descent of the smoothed loss,
    divided by 2 for a margin. ``dataset`` must yield ``(x, y)`` and may repeat.
    """
    saved = [w.numpy().copy() for w in model.weights]
    opt_vars = [v.numpy().copy() for v in model.optimizer.variables] if model.optimizer.built else None
    lrs = np.geomspace(min_lr, max_lr, steps)
    sweep = _LRSweep(lrs)
    fit(model, dataset.repeat(), epochs=1, steps_per_epoch=steps, callbacks=[sweep], verbose=0)
    for w, v in zip(model.weights, saved):
        w.assign(v)
    if opt_vars is not None:
        for w, v in zip(model.optimizer.variables, opt_vars):
            w.assign(v)
    losses = np.asarray(sweep.losses, dtype=np.float64)
    n = len(losses)
    lrs = lrs[:n]
    # Exponential smoothing with bias correction, as usual for LR finders.
    smooth, avg = np.empty(n), 0.0
    for i, v in enumerate(np.nan_to_num(losses, nan=np.nanmax(losses[np.isfinite(losses)]) if np.isfinite(losses).any() else 1.0)):
        avg = 0.9 * avg + 0.1 * v
        smooth[i] = avg / (1 - 0.9 ** (i + 1))
    if n < 5:
        suggested = float(lrs[0])
    else:
        grads = np.gradient(smooth, np.log10(lrs))
        lo = max(1, n // 10)  # skip the noisy start
        i = lo + int(np.argmin(grads[lo:]))
        suggested = float(lrs[i] / 2)
    model.optimizer.learning_rate.assign(suggested)
    return {"lrs": lrs.tolist(), "losses": smooth.tolist(), "suggested_lr": suggested}
