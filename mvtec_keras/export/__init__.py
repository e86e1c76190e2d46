"""Export trained detectors as one graph each: LiteRT (.tflite), SavedModel and ONNX.

- :mod:`.graph`: the per-family scoring graph (uint8 image -> score, map, decision);
- :mod:`.converters`: SavedModel -> LiteRT in four precisions, -> ONNX, Flex checks;
- :mod:`.metadata`: the side ``.json`` every exported file carries;
- :mod:`.exporter`: a run folder in, an exported file (checked against Keras) out.
"""
