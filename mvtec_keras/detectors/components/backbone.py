"""The feature detectors' backbone: built from a name or injected as a ``keras.Model``, saved and
loaded inside the detector folder (self-contained, offline), run eagerly, traced or split over the
replicas of a ``tf.distribute`` strategy."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import keras
from keras import ops

from ... import backends
from ...errors import InputError
from ..base import _iterate_batches, reading_state


EXTRACTOR_WEIGHTS = "extractor.weights.h5"
EXTRACTOR_MODEL = "extractor.keras"


class BackboneMixin:
    """Backbone handling shared by the feature detectors.

    ``backbone`` is either a name for :func:`build_feature_extractor` or a
    ``keras.Model`` returning ``{"level<i>": [B, h, w, c]}`` (tests, custom
    nets). A Model is not part of the config; it is saved whole with the detector.
    """

    def _init_backbone(self, backbone, weights, input_size):
        if isinstance(backbone, keras.Model):
            self._extractor = backbone
            self.backbone = None
        else:
            self._extractor = None
            self.backbone = backbone
        self.weights = weights
        self.input_size = input_size

    def _needed_levels(self) -> tuple:
        """The extractor taps this detector reads (default: its ``levels``)."""
        return tuple(int(v) for v in self.levels)

    @property
    def extractor(self) -> keras.Model:
        if self._extractor is None:
            if self.backbone is None:
                raise InputError("no backbone: pass a backbone name or a keras.Model")
            from ...features.extractor import build_feature_extractor

            self._extractor = build_feature_extractor(
                self.backbone, weights=self.weights, levels=tuple(self._needed_levels()), input_size=self.input_size
            )
        return self._extractor

    def _save_extractor(self, dirpath: str) -> None:
        if self.backbone is None:  # injected model: keep architecture and weights
            self.extractor.save(os.path.join(dirpath, EXTRACTOR_MODEL))
        else:
            self.extractor.save_weights(os.path.join(dirpath, EXTRACTOR_WEIGHTS))

    def _load_extractor(self, dirpath: str) -> None:
        full = os.path.join(dirpath, EXTRACTOR_MODEL)
        if os.path.isfile(full):
            with reading_state(full):
                self._extractor = keras.saving.load_model(full, compile=False)
            return
        path = os.path.join(dirpath, EXTRACTOR_WEIGHTS)
        if not os.path.isfile(path):
            raise InputError(f"{dirpath}: saved detector lacks {EXTRACTOR_WEIGHTS}")
        from ...features.extractor import build_feature_extractor

        # Rebuild without downloading anything, then restore the saved weights.
        self._extractor = build_feature_extractor(
            self.backbone, weights=None, levels=tuple(self._needed_levels()), input_size=self.input_size
        )
        with reading_state(path):
            self._extractor.load_weights(path)

    def _features(self, images, levels) -> list:
        """Run the extractor; returns the requested levels as a list of tensors."""
        ext, x = self.extractor, to_rgb(images)
        if not backends.is_tensorflow():
            if getattr(self, "_extract_for", None) != id(ext):
                self._extract_fn = backends.jit(lambda t: ext(t, training=False), ext.variables)
                self._extract_for = id(ext)
            out = self._extract_fn(x)
        else:
            out = self._tf_features(ext, x, images)
        try:
            return [out[f"level{int(lv)}"] for lv in levels]
        except KeyError as e:
            raise InputError(f"backbone output lacks {e.args[0]}; it has {sorted(out)}") from None

    def _tf_features(self, ext, x, images):
        import tensorflow as tf

        source = getattr(self, "_feature_source", None)
        if source is not None and tf.executing_eagerly():
            # another implementation of the same backbone (export: the int8 model's features), used for
            # fitting and scoring eagerly; traced graphs always read the Keras backbone
            return source(images)
        if not tf.executing_eagerly():
            # Inside a trace (an export graph): call the model directly so static shapes,
            # the batch size included, survive into the graph.
            return ext(x, training=False)
        if getattr(self, "_extract_for", None) != (id(ext), tuple(x.shape[1:])):
            # A traced graph runs the backbone ~2x faster than eager dispatch; any batch size, one trace.
            self._extract_fn = batch_function(lambda t: ext(t, training=False), x)
            self._extract_for = (id(ext), tuple(x.shape[1:]))
        return self._extract_fn(x)

    def _per_replica(self, fn, images) -> list:
        """``fn(images)`` with the batch split over the replicas of the current ``tf.distribute``
        strategy: one result per replica, in replica order (replica r holds the r-th contiguous
        part of the batch, so concatenating the results gives the one-device stream). Without a
        multi-replica strategy: ``[fn(images)]``. The extractor must have been built in the
        strategy's scope (it is, when ``fit`` runs there).

        Under ``MultiWorkerMirroredStrategy`` every worker passes the same batch; each runs only its own
        replicas' parts, and the parts are gathered over the workers in replica order, so every worker
        gets ``[fn(images)]`` as one device would (and its statistics or bank end up the same)."""
        if not backends.is_tensorflow():
            return [fn(images)]  # tf.distribute is TensorFlow's; other backends fit on one device
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
        n = strategy.num_replicas_in_sync
        if n == 1:
            return [fn(images)]
        multi_worker = strategy.extended._in_multi_worker_mode()
        # Build (and load the weights of) the backbone here, in the strategy's scope: built lazily inside
        # the replicas' traced function, loading a weights file fails (its tensors would be out of scope).
        self.extractor  # noqa: B018
        x = tf.convert_to_tensor(images, tf.float32)
        if int(x.shape[0]) < n:
            # A replica would get no image, and backbone layers fail on an empty batch: a batch this
            # small (a last one) runs whole on this device (on every worker alike: no exchange needed).
            return [fn(x)]
        parts = np.array_split(np.arange(int(x.shape[0])), n)
        bounds = [(int(p[0]), int(p[-1]) + 1) if len(p) else (0, 0) for p in parts]
        dist_x = strategy.experimental_distribute_values_from_function(
            lambda ctx: x[slice(*bounds[ctx.replica_id_in_sync_group])])
        key = (fn, tuple(x.shape[1:]))
        if getattr(self, "_replica_key", None) != key:
            # One trace per function and image shape; replicas run the traced fn on their own devices.
            def run(t):
                out = strategy.run(fn, args=(t,))
                if multi_worker:  # the other workers' replicas are not local: gather them (in replica order)
                    out = tf.nest.map_structure(lambda v: strategy.gather(v, axis=0), out)
                return out

            self._replica_fn = tf.function(run, reduce_retracing=True)
            self._replica_key = key
        out = self._replica_fn(dist_x)
        if multi_worker:
            return [out]
        leaves = [strategy.experimental_local_results(v) for v in tf.nest.flatten(out)]
        return [tf.nest.pack_sequence_as(out, [leaf[r] for leaf in leaves]) for r in range(n)]


def batch_function(fn, example):
    """``tf.function`` of ``fn`` traced once for ``example``'s shape with any batch size (TF backend)."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *example.shape[1:]], tf.float32)
    return tf.function(fn, input_signature=[spec], autograph=False)


def to_rgb(images):
    """float32 [B, H, W, C] with C in {1, 3} -> [B, H, W, 3] (grey tiled)."""
    x = ops.convert_to_tensor(images, dtype="float32")
    if len(x.shape) != 4 or x.shape[-1] not in (1, 3):
        raise InputError(f"images must be [B, H, W, 1|3], got shape {tuple(x.shape)}")
    if x.shape[-1] == 1:
        x = ops.tile(x, (1, 1, 1, 3))
    return x


def iter_images(data, batch_size: int, progress: bool = False) -> Iterator[np.ndarray]:
    """Image batches (float32 numpy) of a dataset of dicts or an image array (``progress``: a bar)."""
    for batch in _iterate_batches(data, batch_size, progress=progress, desc="fitting"):
        if "image" not in batch:
            raise InputError("training data has no 'image' entry")
        yield np.asarray(batch["image"], dtype=np.float32)
