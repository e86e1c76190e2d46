"""Inference without TensorFlow: numpy, Pillow and ai-edge-litert (or onnxruntime).

Nothing in this package imports TensorFlow or Keras at module level; the
exported ``.tflite`` / ``.onnx`` path of predict.py runs on an edge device
with only these installed (scipy too, for segmentation decisions). Only
:class:`mvtec_keras.runtime.scorers.KerasScorer` loads TensorFlow, when a run
folder is scored.
"""
