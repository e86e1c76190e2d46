"""Overlay PNGs drawn with Pillow alone (no matplotlib on an edge device)."""

from __future__ import annotations

import numpy as np


def _jet(v: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 with the classic jet ramp."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def _outline(seg: np.ndarray) -> np.ndarray:
    """Pixels of ``seg`` with a 4-neighbour outside it: the region contours."""
    p = np.pad(seg, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return seg & ~inner


def overlay_png(path: str, image, amap=None, segmentation=None, vmax=None) -> None:
    """Write ``image | image + map (jet, alpha 0.5) with red contours of the segmentation``."""
    from PIL import Image

    from ..fileio import atomic_path

    img = np.clip(np.asarray(image, np.float32), 0, 1)
    rgb = (np.repeat(img, 3, -1) if img.shape[-1] == 1 else img[..., :3]) * 255
    panels = [rgb.astype(np.uint8)]
    if amap is not None:
        m = np.asarray(amap, np.float32)
        lo, hi = float(m.min()), float(vmax if vmax is not None else m.max())
        heat = _jet(np.clip((m - lo) / (hi - lo if hi > lo else 1.0), 0, 1))
        mixed = (0.5 * rgb + 0.5 * heat).astype(np.uint8)
        if segmentation is not None:
            mixed[_outline(np.asarray(segmentation, bool))] = (255, 0, 0)
        panels.append(mixed)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(np.concatenate(panels, axis=1)).save(tmp, format="PNG")
