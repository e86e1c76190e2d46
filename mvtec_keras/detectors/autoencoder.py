"""Reconstruction detector: a convolutional autoencoder plus a residual map.

Training glue lives here; the architectures are pure models in
:mod:`mvtec_keras.models.autoencoders`, the maps and losses in
:mod:`mvtec_keras.residuals`.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import keras
import numpy as np

from .. import backends, residuals, training
from ..devices import PRECISIONS
from ..distribute import short_last_batch
from ..errors import InputError
from ..training import ArrayPairs, fresh_workdir, lr_range_test, standard_callbacks
from .base import Detector, read_json_state, reading_state, register_detector

MODEL_FILE = "model.keras"
#: image-score reductions of the (blurred) residual map that finetune.py chooses from
SCORE_REDUCTIONS = ("max", "mean", "topk")


def fast_precision() -> str:
    """The ``--precision auto`` choice for the devices present (see :func:`mvtec_keras.devices.auto_precision`)."""
    from ..devices import auto_precision

    return auto_precision()


def _pairs(data, batch_size):
    """(x, x) batches for autoencoder training from a dict dataset or an array."""
    if backends.is_tf_dataset(data):  # batched by the caller (train.py drops a too-short last batch)
        return data.map(lambda b: (b["image"], b["image"]))
    arr = np.asarray(data, np.float32)
    if not backends.is_tensorflow():
        return ArrayPairs(arr, batch_size)
    import tensorflow as tf

    if short_last_batch(len(arr), batch_size):
        # Under several replicas a last batch with fewer images than replicas would leave one without
        # images (its convolutions fail): drop it, keeping the dataset's length known.
        arr = arr[: len(arr) // batch_size * batch_size]

    return tf.data.Dataset.from_tensor_slices((arr, arr)).batch(batch_size)


@register_detector("autoencoder")
class AutoencoderDetector(Detector):
    """Train an autoencoder on normal images; anomaly map = residual between input and reconstruction.

    Parameters
    ----------
    architecture: one of ``mvtec_keras.models.AUTOENCODERS`` (default ``mvtecCAE``).
    input_shape: ``(H, W, C)`` of the preprocessed images.
    loss: training loss ``ssim`` | ``mssim`` | ``l2``.
    residual: map used for scoring ``ssim`` | ``l2`` (finetune.py can switch it).
    score_reduction / score_sigma: image score = ``score_reduction`` of the residual map after
        a Gaussian blur of ``score_sigma`` (0 = none).
    map_sigma: Gaussian blur of the returned anomaly map (0 = the raw residual map).
        finetune.py chooses it on its labelled finetune split (see there).
    learning_rate: a float, or ``"auto"`` for a learning-rate range test first.
    """

    has_maps = True

    def __init__(
        self,
        architecture: str = "mvtecCAE",
        input_shape=(256, 256, 1),
        loss: str = "ssim",
        residual: str = "ssim",
        score_reduction: str = "max",
        score_sigma: float = 4.0,
        map_sigma: float = 0.0,
        epochs: int = 100,
        batch_size: int = 8,
        learning_rate: Union[str, float] = 2e-4,
        patience: int = 12,
        seed: int = 0,
        jit_compile: bool = False,
        precision: str = "float32",
    ):
        self.architecture = architecture
        self.input_shape = tuple(input_shape)
        self.loss = loss
        self.residual = residual
        self.score_reduction = score_reduction
        self.score_sigma = score_sigma
        self.map_sigma = map_sigma
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.seed = seed
        self.jit_compile = jit_compile
        self.precision = precision

    # -- model ---------------------------------------------------------------
    def _compile(self, model: keras.Model, lr: float) -> None:
        loss_fn = residuals.get_loss(self.loss)
        optimizer = keras.optimizers.Adam(learning_rate=lr)
        if self.precision == "mixed_float16":  # float16 gradients underflow without loss scaling
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(
            optimizer=optimizer,
            loss=loss_fn,
            metrics=[residuals.ssim_metric, residuals.l2_loss],
            jit_compile=backends.fit_jit_compile(self.jit_compile),
        )

    def build_model(self) -> keras.Model:
        from ..models.autoencoders import build_autoencoder

        if self.precision not in PRECISIONS:
            raise InputError(f"--precision: unknown '{self.precision}'; choose {' or '.join(PRECISIONS)}")
        keras.utils.set_random_seed(self.seed)
        # bfloat16 compute with float32 weights: about 3x faster training on CPUs with AVX512-BF16;
        # losses and residual maps are computed in float32 either way.
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.precision)
        try:
            model = build_autoencoder(self.architecture, input_shape=self.input_shape)
        finally:
            keras.config.set_dtype_policy(previous)
        if self.precision != "float32":
            # Reconstructions leave the model in float32 (losses, residual maps and the
            # float16 loss scaling that Keras adds in compile then see float32).
            out = keras.layers.Activation("linear", dtype="float32", name="output_float32")(model.outputs[0])
            model = keras.Model(model.inputs, out, name=model.name)
        return model

    # -- fit -----------------------------------------------------------------
    def _fit(self, train, validation=None, workdir: Optional[str] = None, resume: bool = False, verbose=1,
             callbacks=()):
        if self.residual not in ("ssim", "l2"):
            raise InputError(f"--method: unknown residual map '{self.residual}'; choose ssim or l2")
        model = self.build_model()
        lr = self.learning_rate
        train_pairs = _pairs(train, self.batch_size)
        val_pairs = _pairs(validation, self.batch_size) if validation is not None else None
        self.lr_test_ = None
        if lr == "auto":
            self._compile(model, 1e-6)
            self.lr_test_ = lr_range_test(model, train_pairs)
            lr = self.lr_test_["suggested_lr"]
            if verbose:
                print(f"learning-rate range test suggests {lr:.2e}")
        else:
            try:
                lr = float(lr)
            except (TypeError, ValueError):
                raise InputError(f"--lr must be 'auto' or a number, got '{lr}'") from None
        self._compile(model, lr)
        monitor = "val_loss" if val_pairs is not None else "loss"
        standard, guard = standard_callbacks(workdir, monitor=monitor, patience=self.patience)
        callbacks = standard + list(callbacks)
        fresh_workdir(workdir, resume)
        history = training.fit(model, train_pairs, validation_data=val_pairs, epochs=self.epochs,
                               callbacks=callbacks, verbose=verbose)
        guard.check()
        self.model_ = model
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        self.learning_rate_ = float(lr)
        # After --resume, Keras reports only the epochs of this call; count from the first.
        self.epochs_trained_ = (max(history.epoch) + 1) if history.epoch else 0
        return self

    # -- scoring -------------------------------------------------------------
    def reconstruct(self, images):
        self._check_fitted()
        return self._predict(images)

    def _predict(self, images):
        if not hasattr(self, "_predict_fn"):
            model = self.model_
            if not backends.is_tensorflow():
                self._predict_fn = backends.jit(lambda x: model(x, training=False), model.variables)
            else:
                import tensorflow as tf

                # One traced function per detector: Python-side model calls retrace otherwise.
                @tf.function(reduce_retracing=True, autograph=False)
                def predict(x):
                    return model(x, training=False)

                self._predict_fn = predict
        return self._predict_fn(backends.as_float32(images))

    def residual_maps(self, images, reconstructions):
        return residuals.residual_map(images, reconstructions, method=self.residual)

    def scoring_graph(self, x):
        """Images -> (scores, maps) in keras ops: reconstruction, residual map, blur, reduction."""
        recon = self.model_(x, training=False)
        maps = self.residual_maps(x, recon)
        smoothed = residuals.gaussian_blur(maps, self.score_sigma) if self.score_sigma else maps
        if self.map_sigma == self.score_sigma:
            maps = smoothed  # one blur serves both
        elif self.map_sigma:
            maps = residuals.gaussian_blur(maps, self.map_sigma)
        return residuals.image_scores(smoothed, reduction=self.score_reduction), maps

    def scores_from_maps(self, raw_maps, reduction=None):
        """Image scores from raw (unblurred) residual maps, as ``scoring_graph`` makes them,
        with another ``reduction`` if given: lets finetune.py compare reductions without rescoring."""
        smoothed = residuals.gaussian_blur(raw_maps, self.score_sigma) if self.score_sigma else raw_maps
        return np.asarray(residuals.image_scores(smoothed, reduction=reduction or self.score_reduction))

    def score_batch(self, images):
        # One traced graph for the whole scoring path (eager residual maps cost about 2x);
        # retraced only when the residual settings change (finetune.py -m).
        key = (self.residual, self.score_sigma, self.score_reduction, self.map_sigma)
        if getattr(self, "_score_key", None) != key:
            if backends.is_tensorflow():
                import tensorflow as tf

                # One signature for every batch size: the same graph (and bit-identical scores)
                # whatever batches came before, e.g. after save / load.
                spec = tf.TensorSpec([None, *self.model_.input_shape[1:]], tf.float32)
                self._score_fn = tf.function(self.scoring_graph, input_signature=[spec], autograph=False)
            else:
                self._score_fn = backends.jit(self.scoring_graph, self.model_.variables)
            self._score_key = key
        return self._score_fn(backends.as_float32(images))

    # -- persistence ---------------------------------------------------------
    def _save_state(self, dirpath: str) -> None:
        self.model_.save(os.path.join(dirpath, MODEL_FILE))
        import json

        with open(os.path.join(dirpath, "training.json"), "w") as f:
            json.dump(
                {
                    "history": self.history_,
                    "learning_rate": self.learning_rate_,
                    "epochs_trained": self.epochs_trained_,
                    "lr_test": self.lr_test_,
                },
                f,
            )

    def _load_state(self, dirpath: str) -> None:

        path = os.path.join(dirpath, MODEL_FILE)
        if not os.path.isfile(path):
            raise InputError(f"model file not found: {path}")
        with reading_state(path):
            self.model_ = keras.saving.load_model(path, compile=False)
        meta = read_json_state(os.path.join(dirpath, "training.json"), default={})
        self.history_ = meta.get("history", {})
        self.learning_rate_ = meta.get("learning_rate")
        self.epochs_trained_ = meta.get("epochs_trained")
        self.lr_test_ = meta.get("lr_test")
