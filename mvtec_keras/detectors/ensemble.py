"""Seed ensemble: several copies of one detector, trained with different seeds, scored together.

GAN training is unstable: two runs that differ only in their seed can rank the
same test images quite differently (on MNIST digit 9, GANomaly's AUROC moves by
0.1 between seeds). Averaging the scores of a few independently trained members
removes much of that run-to-run noise, at the cost of training each member.

Members have their own score scale, so each member's score is standardised with
the mean and standard deviation it gives *normal* images (the validation images
when ``fit`` gets them, else the training images); the ensemble score is the mean
of the standardised scores. Anomaly maps, where the members have them, are
averaged as they are: members of one detector class share a map scale.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
from keras import ops

from .. import backends
from ..errors import InputError
from .base import Detector, _iterate_batches, detector_class, load_arrays, load_detector, register_detector, save_arrays

CALIBRATION_FILE = "calibration.npz"


def _member_dir(dirpath, i):
    return os.path.join(dirpath, f"member_{i}")


def _joined_history(members) -> dict:
    """The members' epochs one after the other, in training order (one curve per logged value)."""
    keys = getattr(members[0], "history_", {})
    return {k: [v for m in members for v in getattr(m, "history_", {}).get(k, [])] for k in keys}


@register_detector("ensemble")
class SeedEnsemble(Detector):
    """``members`` copies of detector ``detector`` (built from ``config``); member i gets seed ``seed + i``.

    ``calibration_images`` caps how many normal images standardise each member's scores.
    """

    def __init__(self, detector="ganomaly", config=None, members=3, calibration_images=2000):
        self.detector = detector
        self.config = config
        self.members = members
        self.calibration_images = calibration_images

    @property
    def has_maps(self):
        return detector_class(self.detector).has_maps

    @property
    def score_is_map_summary(self):
        return detector_class(self.detector).score_is_map_summary

    def _member_class(self):
        cls = detector_class(self.detector)
        if cls is SeedEnsemble:
            raise InputError("ensemble: members cannot themselves be ensembles")
        if "seed" not in inspect.signature(cls.__init__).parameters:
            raise InputError(f"ensemble: detector '{self.detector}' has no seed to vary")
        if not isinstance(self.members, int) or self.members < 1:
            raise InputError(f"ensemble: members must be a positive integer, got {self.members!r}")
        if not isinstance(self.calibration_images, int) or self.calibration_images < 2:
            raise InputError(f"ensemble: calibration_images must be an integer of at least 2, "
                             f"got {self.calibration_images!r}")
        return cls

    def member_configs(self) -> list[dict]:
        """The config of every member: the shared config with seeds ``seed``, ``seed + 1``, ..."""
        cls = self._member_class()
        config = dict(self.config or {})
        seed = config.get("seed", inspect.signature(cls.__init__).parameters["seed"].default)
        return [{**config, "seed": int(seed) + i} for i in range(self.members)]

    # -- fitting -------------------------------------------------------------
    def _fit(self, train, validation=None, verbose=1, **kwargs):
        cls = self._member_class()
        members = []
        for i, config in enumerate(self.member_configs()):
            if verbose:
                print(f"ensemble member {i + 1}/{self.members} ({self.detector}, seed {config['seed']})")
            members.append(cls(**config).fit(train, validation, verbose=verbose, **kwargs))
        self.center_, self.scale_ = self._normal_score_stats(members, train if validation is None else validation)
        self.members_ = members
        self.history_ = _joined_history(members)
        self.epochs_trained_ = len(next(iter(self.history_.values()), []))
        self._score_fn = None

    @classmethod
    def from_members(cls, members, normals, calibration_images=2000) -> "SeedEnsemble":
        """An ensemble of already fitted detectors of one class (e.g. seeds trained for a benchmark),
        calibrated on ``normals`` (normal images, never test images); the config records the first
        member's config and the member count."""
        if not members or len({m.name for m in members}) != 1:
            raise InputError("ensemble: from_members needs fitted detectors of one class")
        ens = cls(detector=members[0].name, config=members[0].get_config(), members=len(members),
                  calibration_images=calibration_images)
        ens._member_class()
        ens.center_, ens.scale_ = ens._normal_score_stats(members, normals)
        ens.members_ = list(members)
        ens.history_ = _joined_history(members)
        ens.epochs_trained_ = len(next(iter(ens.history_.values()), []))
        ens._score_fn = None
        return ens

    def _normal_score_stats(self, members, data):
        """Per-member mean and std of the scores of the same (up to ``calibration_images``) normal images,
        read in one pass over ``data``."""
        scores, n = [], 0
        for batch in _iterate_batches(data, 64, progress=False):
            x = np.asarray(batch["image"], np.float32)[: self.calibration_images - n]
            scores.append(np.stack([np.asarray(m.score_batch(x)[0], np.float32).reshape(-1) for m in members]))
            n += len(x)
            if n >= self.calibration_images:
                break
        if n < 2:
            raise InputError("ensemble: need at least 2 normal images to standardise the member scores")
        s = np.concatenate(scores, axis=1)  # [K, n]
        std = s.std(axis=1)
        return s.mean(axis=1).astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)

    # -- scoring -------------------------------------------------------------
    def score_batch(self, images):
        self._check_fitted()
        if getattr(self, "_score_fn", None) is None:
            if backends.is_tensorflow():
                import tensorflow as tf

                self._score_fn = tf.function(self._score_graph, reduce_retracing=True)
            else:  # each member compiles its own scoring; the combination is a few ops
                self._score_fn = self._score_graph
        return self._score_fn(backends.as_float32(images))

    def _score_graph(self, x):
        outputs = [m.score_batch(x) for m in self.members_]
        center = ops.convert_to_tensor(self.center_)
        scale = ops.convert_to_tensor(self.scale_)
        scores = ops.stack([ops.cast(s, "float32") for s, _ in outputs], axis=0)  # [K, B]
        score = ops.mean((scores - center[:, None]) / scale[:, None], axis=0)
        maps = [m for _, m in outputs]
        if any(m is None for m in maps):
            return score, None
        return score, ops.mean(ops.stack([ops.cast(m, "float32") for m in maps], axis=0), axis=0)

    # -- persistence ---------------------------------------------------------
    def _save_state(self, dirpath):
        for i, member in enumerate(self.members_):
            member.save(_member_dir(dirpath, i))
        save_arrays(os.path.join(dirpath, CALIBRATION_FILE), center=self.center_, scale=self.scale_)

    def _load_state(self, dirpath):
        self._member_class()
        path = os.path.join(dirpath, CALIBRATION_FILE)
        if not os.path.isfile(path):
            raise InputError(f"{path}: missing ensemble calibration")
        arrays = load_arrays(path)
        members = [load_detector(_member_dir(dirpath, i)) for i in range(self.members)]
        if len(arrays["center"]) != self.members or len(arrays["scale"]) != self.members:
            raise InputError(f"{path}: calibration is for {len(arrays['center'])} members, "
                             f"the config says {self.members}")
        self.members_ = members
        self.history_ = _joined_history(members)
        self.center_ = arrays["center"].astype(np.float32)
        self.scale_ = arrays["scale"].astype(np.float32)
        self._score_fn = None
