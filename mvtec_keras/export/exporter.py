"""Export a trained run: build its graph, convert it, check it against Keras, write file + metadata."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from ..errors import InputError
from .graph import (NotExportable, build_archive, check_precision, fast_networks, filters_for, float32_networks,
                    needs_static_batch, scoring_function)
from .quantize import network_prefixes

FORMATS = ("litert", "saved_model", "onnx")
_EXT = {"litert": ".tflite", "saved_model": "", "onnx": ".onnx"}


def check_request(fmt: str, precision: str, calibration: int) -> None:
    from .converters import PRECISIONS

    if fmt not in FORMATS:
        raise InputError(f"--format: unknown '{fmt}'; choose {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise InputError(f"--precision: unknown '{precision}'; choose {', '.join(PRECISIONS)}")
    if fmt != "litert" and precision != "float32":
        raise NotExportable(f"--precision {precision}: only LiteRT files are quantised; {fmt} is float32")
    if int(calibration) < 1:
        raise InputError(f"--calibration must be at least 1, got {calibration}")


def _load_run(model_dir):
    from ..cli.finetune import load_for_scoring
    from ..operating_point import configure_detector, load_operating_point

    op = load_operating_point(model_dir)
    try:
        det, info = load_for_scoring(model_dir)
    except InputError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"{model_dir}: cannot load its detector ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    configure_detector(det, op)
    if "preprocessing" not in info:
        raise InputError(f"{model_dir}: info.json has no preprocessing record")
    return det, info, op


def _uint8_images(samples, prep, limit):
    from ..data.pipeline import load_image
    from ..runtime.images import to_uint8

    return np.stack([to_uint8(load_image(s.path, prep)) for s in samples[:limit]]) if samples else None


def default_out(model_dir, det, fmt, precision):
    name = f"{det.name}_{precision}{_EXT[fmt]}" if fmt != "saved_model" else "saved_model"
    return os.path.join(model_dir, "export", name)


def export_run(model_dir: str, fmt: str = "litert", precision: str = "float32", calibration: int = 100,
               out: str | None = None, parity_images: int = 8, verbose: bool = True) -> dict:
    """Export the run in ``model_dir``; returns the metadata written beside the file."""
    from ..cli.common import category_from_info, validation_samples
    from ..data.pipeline import Preprocessing
    from ..runtime.model import metadata_path
    from . import converters
    from .metadata import build_metadata, write_metadata

    check_request(fmt, precision, calibration)
    det, info, op = _load_run(model_dir)
    scoring_function(det)  # one line and exit 2 for a family that has no graph, before any work
    check_precision(det, precision)
    prep = Preprocessing.from_dict(info["preprocessing"])
    shape = prep.input_shape
    cat = category_from_info(info)
    val = validation_samples(cat, info)
    wanted = {s.path for s in val}
    train = [s for s in cat.train if s.path not in wanted]
    out = os.path.abspath(out or default_out(model_dir, det, fmt, precision))
    if os.path.exists(out):
        raise InputError(f"--out: {out} exists; remove it or choose another path")
    val_u8 = _uint8_images(val or train, prep, 10_000)
    calib = _uint8_images(train, prep, int(calibration)) if precision == "int8" else None
    mixed = float32_networks(det)  # a run trained in mixed precision is exported (and checked) in float32
    if mixed and op is not None:  # its float32 scores are not the 16-bit ones finetune.py chose on
        op = _rederive_operating_point(op, _keras_scorer(det), val_u8, cat, prep, det, "float32")
    refit = precision == "int8" and hasattr(det, "extractor")

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        from .quantize import refit_on_int8_features

        batch = 1 if fmt == "litert" or needs_static_batch(det) else None
        sm = os.path.join(work, "saved_model")

        guard = {"float_scopes": ()}  # int8: network layers kept float (see _int8_guard)

        def to_lite(float_scopes):
            rep = converters.representative_from(calib) if calib is not None else None
            return converters.to_litert(sm, precision, rep, network_prefixes(det), float_scopes)

        def convert():
            shutil.rmtree(sm, ignore_errors=True)
            with fast_networks(det, precision), filters_for(precision):
                converters.write_saved_model(build_archive(det, shape, op, batch_size=batch), sm)
            return to_lite(guard["float_scopes"]) if fmt == "litert" else None

        flat = convert()
        if precision == "int8" and not refit:
            flat, guard = _int8_guard(flat, to_lite, det, val_u8, shape, work, enforce=_reconstructs(det))
        if refit:  # head refitted on the int8 backbone's features, then the graph converted again
            refit_on_int8_features(det, _uint8_images(train, prep, 100_000), flat)
            if op is not None:  # the head's scores moved: choose the point again, by the same rule
                op = _rederive_operating_point(op, _keras_scorer(det), val_u8, cat, prep, det)
            flat = convert()
        elif precision == "int8" and op is not None:
            # int8 scores differ from float ones: choose the point again on the int8 file's own scores
            pre = os.path.join(work, "pre.tflite")
            with open(pre, "wb") as f:
                f.write(flat)
            op = _rederive_operating_point(
                op, lambda u8: _run_exported(pre, "litert", u8, det.has_maps, shape), val_u8, cat, prep, det)
            if op.get("decision") == "image_score":
                flat = convert()  # the decision's threshold is inside the graph (same calibration: same int8)
        ops = None
        if fmt == "litert":
            ops = converters.builtin_ops(flat)
            made = os.path.join(work, "model.tflite")
            with open(made, "wb") as f:
                f.write(flat)
        elif fmt == "onnx":
            made = os.path.join(work, "model.onnx")
            converters.to_onnx(sm, made)
        else:
            made = sm
        exported_scores, exported_maps = _run_exported(made, fmt, val_u8, det.has_maps, shape)
        parity = _parity(det, val_u8[:parity_images], exported_scores[:parity_images],
                         None if exported_maps is None else exported_maps[:parity_images])
        size = _size(made)
        meta = build_metadata(det, info, op, fmt, precision, shape, batch, det.has_maps, parity,
                              exported_scores, size, ops)
        meta["validation_images"] = int(len(val_u8)) if val else 0
        if mixed:
            meta["mixed_precision_training"] = (
                f"{', '.join(mixed)} trained in {det_precision(det)}; the graph (and the Keras reference of the "
                "parity figures) computes in float32 with the same weights"
                + ("; the operating point was chosen again on float32 scores" if op is not None else ""))
        if precision == "int8":
            meta["calibration_images"] = int(len(calib))
            meta["int8"] = {
                "quantised": f"the network ({', '.join(network_prefixes(det))}) in int8, calibrated on "
                             f"{len(calib)} training images",
                "kept_float": "everything outside the network: input scaling and colour, the "
                              + ("feature distance (Gaussian / nearest-neighbour) head, " if refit else
                                 "residual map or latent distance, ")
                              + "upsampling, blur and the score reduction"
                              + (f"; and the network's last {len(guard['float_scopes'])} layers "
                                 f"({', '.join(guard['float_scopes'])})" if guard["float_scopes"] else ""),
                "head_refitted_on_int8_features": bool(refit),
                "parity_reference": ("the Keras head refitted on the int8 backbone's features of the training "
                                     "images, scoring those int8 features" if refit else
                                     "the float Keras detector"),
            }
            if "score_drift" in guard:
                meta["int8"]["float_layers_guard"] = {
                    "float_layers": list(guard["float_scopes"]),
                    **{k: v for k, v in guard.items() if k != "float_scopes"}}
            if op is not None:
                meta["int8"]["operating_point_note"] = ("chosen again by the run's rule on the int8 scores of "
                                                        "the same validation / finetune images; "
                                                        "float_threshold is finetune.json's")
        write_metadata(os.path.join(work, "meta.json"), meta)
        os.replace(made, out)
        os.replace(os.path.join(work, "meta.json"), metadata_path(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if verbose:
        print(f"wrote {out} ({size / 1e6:.2f} MB) and {metadata_path(out)}")
        print(f"parity on {parity['n_images']} validation images vs Keras: score rel. diff "
              f"{parity['max_score_rel_diff']:.2e}" + (f", map abs. diff {parity['max_map_abs_diff']:.2e}"
                                                       if parity.get("max_map_abs_diff") is not None else ""))
    meta["path"] = out
    return meta


#: int8 of a network scored as it is (autoencoders, GANs): at most this drift of the validation scores,
#: median |int8 - float| / median |float|; beyond it the network's last layers stay float (_int8_guard)
INT8_MAX_SCORE_DRIFT = 0.01


def _reconstructs(det) -> bool:
    """Whether every network of ``det`` is scored by comparing its reconstruction with the input (the
    autoencoders, the dense AE), where the layers nearest the output carry the int8 error that counts."""
    from ..detectors.autoencoder import AutoencoderDetector
    from ..detectors.gan import DenseAEDetector

    return all(isinstance(m, (AutoencoderDetector, DenseAEDetector)) for m in getattr(det, "members_", None) or [det])


def _int8_guard(flat: bytes, to_lite, det, val_u8, shape, work, enforce: bool = True):
    """Keep float the fewest last layers of the network that bring the int8 file's validation scores within
    :data:`INT8_MAX_SCORE_DRIFT` of the float detector's: ``(flat, record)``. Errors of int8 activations add
    up along a decoder and an SSIM map magnifies them (mvtecCAE at 256 px on bottle: a 27 % median drift with
    the whole network int8, bench/export.py); the layers nearest the output are where they count most.
    Chosen on validation normals only, by bisection over the number of float layers. With ``enforce`` off
    (the GANs: their latent distance compares two encoders, and on a GANomaly ensemble one of them float, the
    other int8, drifted more than both int8), the drift is only measured and recorded."""
    from .quantize import network_scopes

    ref, _ = _keras_scorer(det)(val_u8)
    ref = np.asarray(ref, np.float64).reshape(-1)
    scale = max(float(np.median(np.abs(ref))), 1e-12)
    scopes = network_scopes(flat, network_prefixes(det))
    tried = {}

    def drift(n):
        if n not in tried:
            candidate = flat if n == 0 else to_lite(tuple(scopes[len(scopes) - n:]))
            pre = os.path.join(work, "guard.tflite")
            with open(pre, "wb") as f:
                f.write(candidate)
            s, _ = _run_exported(pre, "litert", val_u8, det.has_maps, shape)
            tried[n] = (float(np.median(np.abs(np.asarray(s, np.float64) - ref)) / scale), candidate)
        return tried[n][0]

    full = drift(0)
    lo, hi = 0, len(scopes) - 1  # the first layer stays int8: a network all float is not an int8 export
    if full > INT8_MAX_SCORE_DRIFT and enforce:
        if drift(hi) > INT8_MAX_SCORE_DRIFT:
            raise NotExportable(
                f"--precision int8: {det.name}'s validation scores drift by {tried[hi][0]:.2%} (median) from the "
                f"float model's even with only its first layer int8 (limit {INT8_MAX_SCORE_DRIFT:.2%}); "
                "export float32")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if drift(mid) <= INT8_MAX_SCORE_DRIFT else (mid, hi)
    n = 0 if full <= INT8_MAX_SCORE_DRIFT or not enforce else hi
    float_scopes = tuple(scopes[len(scopes) - n:]) if n else ()
    record = {"float_scopes": float_scopes, "score_drift": tried[n][0], "score_drift_all_int8": full,
              "limit": INT8_MAX_SCORE_DRIFT if enforce else None, "network_layers": len(scopes),
              "measured_on": f"{len(val_u8)} validation images, median |int8 - float| / median |float|"}
    return tried[n][1], record


def det_precision(det) -> str:
    members = getattr(det, "members_", None) or [det]
    return ", ".join(sorted({getattr(m, "precision", "float32") for m in members}))


def _keras_scorer(det):
    def score(images_u8):
        res = det.score(images_u8.astype(np.float32) / 255.0, batch_size=8)
        return res.scores, res.maps

    return score


def _rederive_operating_point(op: dict, score, val_u8, cat, prep, det, scores="int8") -> dict:
    """``op``'s rule applied again to the scores ``score(uint8 images) -> (scores, maps)`` gives, on the
    validation and finetune images it was chosen on (int8 scores are not the float ones, float32 scores not
    those of a network trained and tested in mixed precision). ``scores`` names them in the record."""
    from .. import thresholds

    rule = op.get("requested_rule") or op.get("rule") or ("fpr" if op.get("mode") == "fpr" else "auto")
    val_s, val_m = score(val_u8)
    ft_files = set(op.get("finetune_files") or [])
    ft = [s for s in cat.test if s.path in ft_files]
    ft_s = ft_m = labels = None
    if ft:
        ft_s, ft_m = score(_uint8_images(ft, prep, len(ft)))
        labels = np.array([s.label for s in ft])
    map_decisions = op.get("decision") == "segmentation"
    new, _ = thresholds.choose_operating_point(
        rule, val_scores=val_s, val_maps=val_m if map_decisions else None,
        ft_scores=ft_s, ft_maps=ft_m if map_decisions else None, ft_labels=labels, map_decisions=map_decisions,
        gaussian=det.gaussian_score_model() if rule == "chi2" else None,
        target_fpr=float(op.get("target_fpr") or 0.01), fpr_min_area=int(op.get("min_area") or 25),
        dtype=op.get("dtype", "float32"))
    # what only the float choice measured (auto's candidates and their figures) is not carried over
    stale = ("score", "tpr", "tnr", "relaxed", "candidates", "score_on_finetune_split", "threshold_interval",
             "conformal")
    kept = {k: v for k, v in op.items() if k not in new and k not in stale}
    previous = "float_threshold" if scores == "int8" else "finetune_threshold"
    return {**kept, **new, "chosen_on": f"{new.get('chosen_on', '')} ({scores} scores)".strip(),
            previous: op.get("threshold")}


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def _run_exported(path, fmt, images_u8, has_maps, shape):
    """Scores (and maps) of the exported artefact itself on ``images_u8``."""
    if fmt == "saved_model":
        import tensorflow as tf

        fn = tf.saved_model.load(path).signatures["serve"]
        outs = [fn(image=tf.constant(img[None])) for img in images_u8]
        scores = np.concatenate([o["score"].numpy().reshape(-1) for o in outs])
        maps = np.concatenate([o["map"].numpy() for o in outs]) if has_maps else None
        return scores, maps
    from ..runtime.model import ExportedModel

    meta = {"input": {"shape": [1, *shape]}, "has_maps": has_maps}
    return ExportedModel(path, metadata=meta).score(images_u8)


def _parity(det, images_u8, scores, maps) -> dict:
    x = images_u8.astype(np.float32) / 255.0
    ref_s, ref_m = [], []
    for i in range(0, len(x), 8):
        s, m = det.score_batch(x[i : i + 8])
        ref_s.append(np.asarray(s, np.float32).reshape(-1))
        if m is not None:
            ref_m.append(np.asarray(m, np.float32))
    ref_s = np.concatenate(ref_s)
    rel = np.abs(scores - ref_s) / np.maximum(np.abs(ref_s), 1e-12)
    out = {"n_images": int(len(x)), "reference": "the Keras detector on the same uint8 images",
           "max_score_rel_diff": float(rel.max()), "max_score_abs_diff": float(np.abs(scores - ref_s).max()),
           "max_map_abs_diff": None}
    if maps is not None and ref_m:
        out["max_map_abs_diff"] = float(np.abs(maps - np.concatenate(ref_m)).max())
    return out
