"""The methods a benchmark can run, and how each one is fitted.

A :class:`MethodSpec` says how to build one run folder for a category: the
pretrained-feature detectors go through ``extract.py``, the autoencoders through
``train.py``. Every run then goes through ``finetune.py`` (its operating point)
and ``test.py``, whatever its family. The feature settings are those of
``bench/feature_methods.py`` (EfficientNet-Lite0, 256 -> centre crop 224).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from ..errors import InputError

AUTOENCODERS = ("mvtecCAE", "baselineCAE", "inceptionCAE", "resnetCAE", "skipCAE")


@dataclass
class MethodSpec:
    """One benchmark method: a name (the ``method`` column) and how to fit it."""

    name: str
    family: str  # "features" (extract.py) or "autoencoder" (train.py)
    detector: str  # extract.py -m, or train.py -a
    backbone: Optional[str] = None
    weights: str = "imagenet"
    size: Optional[int] = None
    crop: Optional[int] = None
    params: dict = field(default_factory=dict)  # extract.py --param KEY=VALUE
    loss: str = "ssim"
    color: Optional[str] = None
    epochs: int = 30
    precision: str = "auto"
    extra: list = field(default_factory=list)  # further flags, passed as they are

    def config(self) -> dict:
        """What identifies a finished cell: a changed spec is run again."""
        return {k: v for k, v in vars(self).items()}

    def fit_argv(self, data: Optional[str], out: str) -> list:
        argv = [] if data is None else ["-d", data]
        if self.family == "features":
            argv += ["-m", self.detector, "-b", self.backbone or "efficientnet-lite0", "-w", self.weights]
            for k, v in self.params.items():
                argv += ["--param", f"{k}={json.dumps(v)}"]
        elif self.family == "autoencoder":
            argv += ["-a", self.detector, "-l", self.loss, "--epochs", str(self.epochs), "--precision", self.precision]
        else:
            raise InputError(f"method {self.name}: unknown family '{self.family}'")
        if self.size:
            argv += ["--size", str(self.size)]
        if self.crop:
            argv += ["--crop", str(self.crop)]
        if self.color:
            argv += ["-c", self.color]
        return argv + list(self.extra) + ["--out", out, "-q"]

    @property
    def backbone_name(self) -> str:
        return (self.backbone or "efficientnet-lite0") if self.family == "features" else "-"


_LITE = {"backbone": "efficientnet-lite0", "size": 256, "crop": 224}


def builtin_methods(epochs: int = 30) -> dict:
    """The methods ``--methods`` can name (lower-case keys)."""
    methods = {
        "padim": MethodSpec("padim", "features", "padim", params={"levels": [3, 4, 6], "n_features": 100}, **_LITE),
        "patchcore": MethodSpec("patchcore", "features", "patchcore", params={"levels": [4, 6], "coreset_ratio": 0.1},
                                **_LITE),
        "mahalanobis": MethodSpec("mahalanobis", "features", "mahalanobis", params={"levels": list(range(1, 10))},
                                  **_LITE),
        "spade": MethodSpec("spade", "features", "spade", params={"k": 50, "image_level": 9, "map_levels": [3, 4, 6]},
                            **_LITE),
    }
    for arch in AUTOENCODERS:  # SSIM, grayscale 128: the setting docs/bench_autoencoders.md ranks best on bottle
        methods[arch.lower()] = MethodSpec(arch, "autoencoder", arch, size=128, color="grayscale", epochs=epochs)
    return methods


DEFAULT_METHODS = "padim,patchcore,mahalanobis,spade,mvteccae"


def parse_methods(text: str, epochs: int = 30) -> list:
    known = builtin_methods(epochs)
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise InputError("--methods: name at least one method")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return [known[n] for n in dict.fromkeys(names)]
