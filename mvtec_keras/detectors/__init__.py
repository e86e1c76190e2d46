"""Detectors: every method answers the interface of :class:`base.Detector`."""

from .base import Detector, ScoreResult, detector_class, load_detector, register_detector  # noqa: F401
