"""Benchmark pages in docs/: generated from results, with one hand-written section that survives ``--doc``.

A page's figures come from its bench's result files, but some of what a reader needs is not in them
(what ran alongside, a figure measured by another command). That text lives under one heading, from
the heading to the end of the page; regenerating the page keeps it, once, after the generated part.
"""

from __future__ import annotations

import os

from mvtec_keras.fileio import atomic_path


def write_page(path: str, generated: str, kept_heading: str) -> None:
    """Write ``generated`` to ``path``, followed by the old page's section from ``kept_heading`` on.

    The page is replaced in one step (a crash never leaves it half written).
    """
    text = generated if generated.endswith("\n") else generated + "\n"
    if kept_heading in text:
        raise ValueError(f"the generated page already holds the hand-written heading {kept_heading!r}")
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
        if kept_heading in old:
            text += "\n" + kept_heading + old.split(kept_heading, 1)[1]
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
