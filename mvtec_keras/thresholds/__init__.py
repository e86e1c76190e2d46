"""Every operating-point rule, and the decisions an operating point makes.

An operating point (a dict, see :mod:`mvtec_keras.operating_point`) turns
scores and maps into decisions through :func:`decide`. The rules that choose one:

- ``search`` (:func:`search_min_area_threshold`): min_area x map threshold,
  for detectors whose image score summarises their map (below);
- ``balanced`` / ``f1`` (:func:`balanced_optimal`, :func:`f1_optimal`): the
  image-score threshold with the best balanced accuracy / F1 on a labelled split
  (the finetune split plus the validation normals), in the middle of the widest
  interval of thresholds that reach it, never on a sample;
- ``fpr`` (:func:`normal_fpr`, :func:`normal_fpr_maps`): from normal images
  only, a target false-positive rate: the conformal quantile of validation
  scores (:func:`conformal_rank`), whose expected rate on new normal images is
  at most the target when n validation normals allow it (n + 1 >= 1 / target);
- ``chi2`` (:func:`chi2_bound`): for the Gaussian methods, a bound from the
  fitted distribution alone;
- :func:`choose_operating_point` picks and applies one, falling back to the
  normal-only rule when no anomalous image is there to choose on; ``auto``
  compares the image-score and map-region decisions on the labelled split
  and keeps the better (ties: the image score).

The labelled rules never return a point that flags all or none of a split
holding both classes: their candidates span that split's scores (not only the
validation normals' range), and the flag-everything threshold (the minimum
score) is never a candidate.

Segmentation rule: threshold the anomaly map (``map >= threshold``), drop the connected
regions that touch the image border, and call the image defective when a
remaining region has at least ``min_area`` pixels. Regions are 8-connected by
default (``connectivity=4`` is available), as in :mod:`mvtec_keras.metrics`.

:func:`search_min_area_threshold` tunes the pair: for every ``min_area`` it
takes the lowest candidate threshold that flags no defect-free validation
image, scores that pair by balanced accuracy on a labelled finetune set, and
keeps the best. Because border regions are dropped, "flagged" is not monotone
in the threshold (a region can grow into the border and vanish), so "flags no
validation image" is required at the chosen threshold *and every higher
candidate*; otherwise the lowest thresholds, where everything merges into one
border region, would always qualify.

Modules: :mod:`.regions` (the segmentation rule's regions), :mod:`.candidates` (threshold grids),
:mod:`.map_rules`, :mod:`.image_rules`, :mod:`.choose` (by rule name; :func:`decide`),
:mod:`.detector_settings` (map blur and score reduction, chosen before the threshold).
"""

from .candidates import candidate_thresholds, to_uint8
from .choose import RULES, choose_operating_point, decide, describe
from .detector_settings import choose_map_sigma, choose_score_reduction
from .image_rules import (balanced_optimal, chi2_bound, conformal_rank, conformal_warning, f1_optimal, normal_fpr,
                          normals_needed, threshold_from_fpr)
from .map_rules import MinAreaThresholdSearch, normal_fpr_maps, search_min_area_threshold, threshold_from_fpr_maps
from .regions import classify, largest_region_areas

__all__ = [
    "largest_region_areas",
    "candidate_thresholds",
    "to_uint8",
    "search_min_area_threshold",
    "MinAreaThresholdSearch",
    "threshold_from_fpr",
    "conformal_rank",
    "normals_needed",
    "conformal_warning",
    "threshold_from_fpr_maps",
    "classify",
    "decide",
    "describe",
    "normal_fpr",
    "normal_fpr_maps",
    "balanced_optimal",
    "f1_optimal",
    "chi2_bound",
    "choose_operating_point",
    "choose_map_sigma",
    "choose_score_reduction",
    "RULES",
]
