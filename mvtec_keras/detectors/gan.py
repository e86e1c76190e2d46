"""Detectors wrapping the GAN-family models and the dense autoencoder baseline.

Each detector trains its Keras model on normal images (a fixed budget of
``epochs`` x ``steps_per_epoch`` optimiser steps, or full passes when
``steps_per_epoch`` is None) and scores with the model's ``anomaly_score``.
Model selection never sees test labels: ``selection="last"`` keeps the final
weights, ``"best_val"`` the epoch with the lowest reconstruction loss on the
validation normals.
"""

from __future__ import annotations

import inspect
import json
import os

import keras
import numpy as np
import tensorflow as tf

from .. import training
from ..distribute import replicas, short_last_batch
from ..errors import InputError
from ..models import gans
from .base import Detector, read_json_state, reading_state, register_detector

WEIGHTS_FILE = "model.weights.h5"
HISTORY_FILE = "history.json"


class _KerasModelDetector(Detector):
    """Shared fit / score / save plumbing; subclasses name the model and its options."""

    model_class: type = None
    #: model-specific constructor parameters, passed on to ``model_class``
    options: tuple = ()
    #: validation metric that ``selection="best_val"`` minimises (None: unsupported)
    monitor: str | None = "val_rec"
    #: the map is the reconstruction residual, shown for localisation; the score is the model's own
    #: (latent distance, discriminator features, ...), so decisions are made on the score
    score_is_map_summary = False

    def __init__(self, image_size=64, channels=3, latent_dim=100, epochs=15, steps_per_epoch=None,
                 batch_size=32, learning_rate=2e-4, seed=0, selection="last", **model_options):
        self.image_size = image_size
        self.channels = channels
        self.latent_dim = latent_dim
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.seed = seed
        self.selection = selection
        for k, v in model_options.items():
            setattr(self, k, v)

    def get_config(self) -> dict:
        return {
            "image_size": self.image_size, "channels": self.channels, "latent_dim": self.latent_dim,
            "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch, "batch_size": self.batch_size,
            "learning_rate": self.learning_rate, "seed": self.seed, "selection": self.selection,
            **{k: getattr(self, k) for k in self.options},
        }

    # -- model ---------------------------------------------------------------
    def _model_kwargs(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels, "latent_dim": self.latent_dim,
                **{k: getattr(self, k) for k in self.options}}

    def check_options(self) -> "_KerasModelDetector":
        """Raise :class:`InputError` for a bad option now, before a run writes anything (``fit`` checks
        the same; this builds the model once and discards it)."""
        self._check_selection()
        self._build_model()
        return self

    def _check_selection(self):
        if self.selection not in ("last", "best_val"):
            raise InputError(f"selection={self.selection!r}: choose 'last' or 'best_val'")
        if self.selection == "best_val" and self.monitor is None:
            raise InputError(f"selection='best_val' needs a detector with a validation loss; {self.name} has none")

    def _build_model(self):
        if self.image_size not in gans.SUPPORTED_SIZES:
            raise InputError(f"image_size={self.image_size}: choose from {gans.SUPPORTED_SIZES}")
        if self.channels not in (1, 3):
            raise InputError(f"channels={self.channels}: must be 1 (grayscale) or 3 (RGB)")
        try:
            return self.model_class(**self._model_kwargs())
        except (TypeError, ValueError) as e:  # a bad model option
            raise InputError(f"{self.name}: {e}") from None

    def _compile(self, model):
        model.compile(learning_rate=self.learning_rate)

    # -- fitting -------------------------------------------------------------
    def _fit(self, train, validation=None, verbose=1, callbacks=()):
        self._check_selection()
        if self.selection == "best_val" and validation is None:
            raise InputError(f"selection='best_val' needs validation images ({self.name})")
        keras.utils.set_random_seed(int(self.seed))  # reproducible initial weights (global, as in Keras)
        model = self._build_model()
        self._compile(model)
        repeat = self.steps_per_epoch is not None
        train_ds = self._dataset(train, shuffle=True, repeat=repeat)
        val_ds = None if validation is None else self._dataset(validation, shuffle=False, repeat=False)
        cbs = list(callbacks)
        keep = _KeepBest(self.monitor) if self.selection == "best_val" else None
        if keep is not None:
            cbs.append(keep)
        history = training.fit(model, train_ds, validation_data=val_ds, epochs=int(self.epochs),
                               steps_per_epoch=self.steps_per_epoch, callbacks=cbs, verbose=verbose)
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        # After a resume Keras reports only this call's epochs; count from the first.
        self.epochs_trained_ = (max(history.epoch) + 1) if history.epoch else 0
        # the epoch whose weights are kept (1-based): the last, or the best on validation (after a resume: of
        # the epochs this call ran)
        self.selected_epoch_ = (keep.best_epoch + 1 if keep is not None and keep.best_epoch is not None
                                else self.epochs_trained_)
        self.model_ = model
        self._score_fn = None

    def _dataset(self, data, shuffle, repeat):
        """A batched ``tf.data.Dataset`` of float32 images from an array or a dataset of dicts."""
        shape = (self.image_size, self.image_size, self.channels)
        if isinstance(data, tf.data.Dataset):
            spec = data.element_spec
            if isinstance(spec, dict):
                if "image" not in spec:
                    raise InputError("training dataset elements have no 'image' key")
                ds, spec = data.map(lambda e: e["image"]), spec["image"]
            else:
                ds = data
            rank = spec.shape.rank
            if rank == 4:
                ds = ds.unbatch()  # re-batched below with this detector's batch size
            elif rank != 3:
                raise InputError(f"training images must be [H, W, C] or [B, H, W, C], got {spec.shape}")
            if tuple(spec.shape[-3:]) != shape:
                raise InputError(f"images are {tuple(spec.shape[-3:])}, the detector expects {shape} "
                                 "(set image_size / channels)")
            ds = ds.map(lambda x: tf.cast(x, tf.float32))
            n = None
        else:
            x = _as_images(data, shape)
            ds, n = tf.data.Dataset.from_tensor_slices(x), len(x)
        if shuffle:
            per_image = int(np.prod(shape)) * 4
            buffer = max(self.batch_size, min(10_000, (256 << 20) // per_image))
            ds = ds.shuffle(buffer if n is None else min(n, buffer), seed=int(self.seed))
        if repeat:
            ds = ds.repeat()
        # A last short batch would give BatchNorm noisy statistics; drop it when that leaves data to train on
        # (always under several replicas: a replica left without images would average an empty batch).
        drop = shuffle and (repeat or replicas() > 1 or (n is not None and n >= self.batch_size))
        ds = ds.batch(int(self.batch_size), drop_remainder=drop)
        k = replicas()
        if not drop and k > 1:  # validation: a last batch with fewer images than replicas is left out
            if n is not None:
                ds = ds.take(n // self.batch_size) if short_last_batch(n, self.batch_size) else ds
            else:
                ds = ds.filter(lambda x: tf.shape(x)[0] >= k)
        return ds.prefetch(tf.data.AUTOTUNE)

    # -- scoring -------------------------------------------------------------
    def score_batch(self, images):
        self._check_fitted()
        x = tf.convert_to_tensor(images, tf.float32)
        if x.shape.rank == 3 and self.channels == 1:
            x = x[..., None]
        shape = (self.image_size, self.image_size, self.channels)
        if x.shape.rank != 4 or tuple(x.shape[1:]) != shape:
            raise InputError(f"images are {tuple(x.shape)}, the detector expects [B, {', '.join(map(str, shape))}]")
        if getattr(self, "_score_fn", None) is None:
            self._score_fn = tf.function(self._score_graph, reduce_retracing=True)
        return self._score_fn(x)

    def _score_graph(self, x):
        scores, x_hat = self.model_.anomaly_score(x)
        return scores, tf.reduce_mean(tf.abs(x - x_hat), axis=-1)

    # -- persistence ---------------------------------------------------------
    def _save_state(self, dirpath):
        self.model_.save_weights(os.path.join(dirpath, WEIGHTS_FILE))
        with open(os.path.join(dirpath, HISTORY_FILE), "w") as f:
            json.dump(self.history_, f)

    def _load_state(self, dirpath):
        path = os.path.join(dirpath, WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise InputError(f"{path}: missing model weights")
        model = self._build_model()
        try:
            model.load_weights(path)
        except ValueError as e:
            raise InputError(f"{path}: weights do not match this detector's config ({e})") from None
        except Exception as e:  # a truncated or otherwise damaged .h5
            with reading_state(path):
                raise e
        self.history_ = read_json_state(os.path.join(dirpath, HISTORY_FILE), default={})
        self.model_ = model
        self._score_fn = None


@register_detector("ganomaly")
class GANomalyDetector(_KerasModelDetector):
    """GANomaly; score = mean squared latent distance (see :class:`gans.GANomaly`, which also
    documents the reference-fidelity options ``adversarial``, ``tanh_output``, ``reinit_d_below``)."""

    model_class = gans.GANomaly
    options = ("filters", "w_adv", "w_con", "w_enc", "adversarial", "tanh_output", "reinit_d_below")
    monitor = "val_con"

    def __init__(self, image_size=64, channels=3, latent_dim=100, filters=32, w_adv=1.0, w_con=50.0,
                 w_enc=1.0, adversarial="feature_matching", tanh_output=False, reinit_d_below=None, epochs=15,
                 steps_per_epoch=None, batch_size=32, learning_rate=2e-4, seed=0, selection="last"):
        super().__init__(image_size, channels, latent_dim, epochs, steps_per_epoch, batch_size,
                         learning_rate, seed, selection, filters=filters, w_adv=w_adv, w_con=w_con, w_enc=w_enc,
                         adversarial=adversarial, tanh_output=tanh_output, reinit_d_below=reinit_d_below)


@register_detector("efficientgan")
class EfficientGANDetector(_KerasModelDetector):
    """EfficientGAN (BiGAN); score = 0.9 * L1 reconstruction + 0.1 * D feature matching."""

    model_class = gans.EfficientGAN
    options = ("filters", "score_weight", "recon_weight")

    def __init__(self, image_size=64, channels=3, latent_dim=100, filters=32, score_weight=0.1,
                 recon_weight=0.0, epochs=15, steps_per_epoch=None, batch_size=32, learning_rate=2e-4,
                 seed=0, selection="last"):
        super().__init__(image_size, channels, latent_dim, epochs, steps_per_epoch, batch_size,
                         learning_rate, seed, selection, filters=filters, score_weight=score_weight,
                         recon_weight=recon_weight)

    def _model_kwargs(self):
        return {**super()._model_kwargs(), "seed": self.seed}


@register_detector("anogan")
class AnoGANDetector(_KerasModelDetector):
    """AnoGAN: DCGAN plus a batched latent search per image at scoring time."""

    model_class = gans.AnoGAN
    options = ("filters", "search_steps", "search_lr", "lam")
    monitor = None

    def __init__(self, image_size=64, channels=3, latent_dim=100, filters=32, search_steps=100,
                 search_lr=0.05, lam=0.1, epochs=15, steps_per_epoch=None, batch_size=32,
                 learning_rate=2e-4, seed=0, selection="last"):
        super().__init__(image_size, channels, latent_dim, epochs, steps_per_epoch, batch_size,
                         learning_rate, seed, selection, filters=filters, search_steps=search_steps,
                         search_lr=search_lr, lam=lam)

    def _model_kwargs(self):
        return {**super()._model_kwargs(), "seed": self.seed}


@register_detector("dense_ae")
class DenseAEDetector(_KerasModelDetector):
    """Dense autoencoder baseline (classic Keras MNIST example); score = mean squared error."""

    model_class = gans.DenseAutoencoder
    options = ("hidden", "loss")
    monitor = "val_loss"

    def __init__(self, image_size=64, channels=3, latent_dim=32, hidden=(128, 64), loss="bce", epochs=15,
                 steps_per_epoch=None, batch_size=64, learning_rate=1e-3, seed=0, selection="last"):
        super().__init__(image_size, channels, latent_dim, epochs, steps_per_epoch, batch_size,
                         learning_rate, seed, selection, hidden=list(hidden), loss=loss)

    def _compile(self, model):
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate))


def score_reference_leaky(detector, images, batch_size: int = 64) -> np.ndarray:
    """Image scores of a fitted GAN detector under the *reference GANomaly's* evaluation.

    BatchNorm runs in training mode, normalising each batch of ``batch_size``
    consecutive images (in the order given) by that batch's own statistics,
    as the reference does because it never calls ``eval()``. This leaks: on a
    test set ordered normals-then-abnormals the batch statistics carry the
    label. It exists only to reproduce the reference's published figures next
    to the honest ones (bench/cifar10.py); ``score`` / ``score_batch`` never use it.
    """
    detector._check_fitted()
    model = detector.model_
    if "batchnorm" not in inspect.signature(model.anomaly_score).parameters:
        raise InputError(f"{detector.name}: its model has no BatchNorm scoring mode")
    x = _as_images(images, (detector.image_size, detector.image_size, detector.channels))
    out = [np.asarray(model.anomaly_score(x[i:i + batch_size], batchnorm="reference_leaky")[0], np.float32)
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


class _KeepBest(keras.callbacks.Callback):
    """Restore the weights of the epoch with the lowest ``monitor`` (validation normals only)."""

    def __init__(self, monitor):
        super().__init__()
        self.monitor = monitor
        self.best, self.weights, self.best_epoch = np.inf, None, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value < self.best:
            self.best, self.weights, self.best_epoch = value, self.model.get_weights(), epoch

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


def _as_images(data, shape):
    """An image array as float32 [N, H, W, C] in [0, 1] (uint8 is rescaled)."""
    x = np.asarray(data)
    if x.ndim == 3 and shape[-1] == 1:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != shape:
        raise InputError(f"images are {x.shape}, the detector expects [N, {', '.join(map(str, shape))}]")
    if len(x) == 0:
        raise InputError("no training images")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.min() < 0.0 or x.max() > 1.0:
        raise InputError("images must be float values in [0, 1]")
    return x
