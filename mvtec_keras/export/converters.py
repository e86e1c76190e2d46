"""SavedModel -> LiteRT (float32 / float16 / dynamic-range / int8) and -> ONNX (tf2onnx).

LiteRT goes through ``TFLiteConverter.from_saved_model`` of a batch-1
SavedModel: ``from_concrete_functions`` on Keras 3 models silently drops the
weights, and a fixed batch keeps nearest-neighbour upsampling off the Flex
(select-TF) path. Only builtin ops are allowed: neither ``ai-edge-litert`` nor
``tf.lite.Interpreter`` carries Flex, so such a file would fail at load time;
a conversion that needs one fails here with the op named.

int8 (see :mod:`.quantize`): the network in int8, calibrated on the run's own
training images, every op outside it in float. Input stays uint8 (the image),
outputs float32.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from .graph import ENDPOINT, NotExportable

PRECISIONS = ("float32", "float16", "dynamic", "int8")


def write_saved_model(archive, path: str) -> None:
    archive.write_out(path, verbose=False)


def to_litert(saved_model_dir: str, precision: str = "float32", representative=None, network_prefixes=(),
              float_scopes=()) -> bytes:
    """Convert the ``serve`` signature of a SavedModel to a LiteRT flatbuffer.

    int8 only: ``representative``, a callable yielding ``[uint8 image batch]`` lists;
    ``network_prefixes``, the op-name prefixes quantised to int8 (the rest stays float);
    ``float_scopes``, network layers kept float all the same (``quantize.network_scopes``).
    """
    if precision not in PRECISIONS:
        raise NotExportable(f"--precision: unknown '{precision}'; choose {', '.join(PRECISIONS)}")

    def converter():
        c = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=[ENDPOINT])
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if precision != "float32":
            c.optimizations = [tf.lite.Optimize.DEFAULT]
        if precision == "float16":
            c.target_spec.supported_types = [tf.float16]
        return c

    try:
        if precision == "int8":
            from .quantize import int8_litert

            if representative is None:
                raise ValueError("int8 needs a representative dataset")
            flat = int8_litert(saved_model_dir, representative, network_prefixes, float_scopes)
        else:
            flat = converter().convert()
    except NotExportable:
        raise
    except Exception as e:  # noqa: BLE001 - the converter raises many types; one line names the cause
        raise NotExportable(f"LiteRT {precision} conversion failed: {_first_line(e)}") from None
    flex = flex_ops(flat)
    if flex:
        raise NotExportable(f"LiteRT {precision}: the graph needs Flex (select-TF) ops {', '.join(flex)}, "
                            "which ai-edge-litert cannot run")
    return flat


def flex_ops(flat: bytes) -> list:
    """Names of the Flex (select-TF) custom ops in a LiteRT flatbuffer."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flat), 0)
    found = set()
    for code in model.operatorCodes or []:
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
        if custom and custom.startswith("Flex"):
            found.add(custom)
    return sorted(found)


def builtin_ops(flat: bytes) -> list:
    """The operator names a LiteRT file uses (builtins by name, custom ops by code)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flat), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    out = set()
    for code in model.operatorCodes or []:
        if code.customCode:
            out.add(code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode)
        else:
            out.add(names.get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode)))
    return sorted(out)


def to_onnx(saved_model_dir: str, path: str, opset: int = 17) -> None:
    """tf2onnx's converter on the SavedModel's ``serve`` signature (run as its CLI, in a subprocess)."""
    try:
        import tf2onnx  # noqa: F401
    except ImportError:
        raise NotExportable("--format onnx needs tf2onnx and onnxruntime: pip install '.[onnx]' "
                            "(or -r requirements-onnx.txt)") from None
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", saved_model_dir, "--signature_def", ENDPOINT,
           "--opset", str(opset), "--output", path]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not os.path.isfile(path):
        tail = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln][-1:] or proc.stderr.splitlines()[-1:]
        raise NotExportable(f"ONNX conversion failed (tf2onnx): {' '.join(tail)[:300]}")


def _first_line(e) -> str:
    text = str(e).strip().splitlines()
    msg = next((ln for ln in text if "error" in ln.lower()), text[0] if text else type(e).__name__)
    return " ".join(msg.split())[:300]


def representative_from(images_uint8):
    """A converter representative dataset from uint8 images ``[N, H, W, C]`` (one image per step)."""
    arr = np.asarray(images_uint8, np.uint8)

    def gen():
        for img in arr:
            yield [img[None]]

    return gen
