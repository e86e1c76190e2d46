"""An exported detector (``.tflite`` or ``.onnx``) with its side metadata, run without TensorFlow."""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import InputError

FORMATS = {".tflite": "litert", ".onnx": "onnx"}


def metadata_path(model_path: str) -> str:
    """The side ``.json`` of an exported file or SavedModel folder."""
    return os.path.splitext(os.path.normpath(model_path))[0] + ".json"


def read_metadata(model_path: str) -> dict:
    path = metadata_path(model_path)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{model_path}: its metadata file {path} is missing (export.py writes both)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or "input" not in meta or "preprocessing" not in meta:
        raise InputError(f"{path}: not the metadata of an exported detector")
    return meta


class ExportedModel:
    """``score(images uint8 [N, H, W, C]) -> (scores [N], maps [N, H, W] or None)``, one image per call."""

    def __init__(self, path: str, num_threads: int = 2, metadata: dict | None = None):
        ext = os.path.splitext(path)[1].lower()
        if ext not in FORMATS:
            raise InputError(f"{path}: expected a .tflite or .onnx file")
        if not os.path.isfile(path):
            raise InputError(f"model not found: {path}")
        self.path, self.format = path, FORMATS[ext]
        self.metadata = read_metadata(path) if metadata is None else metadata
        self.input_shape = tuple(self.metadata["input"]["shape"][1:])
        self.has_maps = bool(self.metadata.get("has_maps"))
        try:
            self._run = self._litert(path, num_threads) if self.format == "litert" else self._onnx(path, num_threads)
        except ImportError as e:
            raise InputError(f"{path}: the {self.format} runtime is not installed ({e.name}); "
                             f"pip install {'ai-edge-litert' if self.format == 'litert' else 'onnxruntime'}") from None
        except (RuntimeError, ValueError) as e:
            raise InputError(f"{path}: cannot load this {self.format} model ({' '.join(str(e).split())[:200]})") from None

    @staticmethod
    def _litert(path, num_threads):
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=path, num_threads=num_threads).get_signature_runner("serve")
        return lambda x: runner(image=x)

    @staticmethod
    def _onnx(path, num_threads):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = num_threads, 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        feed = sess.get_inputs()[0].name
        return lambda x: dict(zip(names, sess.run(None, {feed: x})))

    def score(self, images):
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        if x.dtype != np.uint8 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"{self.path}: expects uint8 images {self.input_shape}, got {x.dtype} {x.shape[1:]}")
        scores, maps = [], []
        for img in x:  # the LiteRT graph has a fixed batch of 1
            out = self._run(np.ascontiguousarray(img[None]))
            scores.append(np.asarray(out["score"], np.float32).reshape(-1))
            if self.has_maps:
                maps.append(np.asarray(out["map"], np.float32))
        return np.concatenate(scores), (np.concatenate(maps) if maps else None)
