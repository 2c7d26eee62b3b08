"""Overlays of a few fixed frames per checkpoint as TensorBoard images (written by probe workers).

The probe suite draws attribution (NMF, positive and negative), attention and saliency overlays of
the first attributed frames of its seeded recording; the same frame indices every checkpoint, so
TensorBoard's step slider shows how one view changes over training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: (tag, file inside the probe output) of the images logged per checkpoint
IMAGES = (
    ("attribution/positive-0", "nmf/overlay/positive-00000.png"),
    ("attribution/negative-0", "nmf/overlay/negative-00000.png"),
    ("attribution/positive-1", "nmf/overlay/positive-00001.png"),
    ("attribution/negative-1", "nmf/overlay/negative-00001.png"),
    ("attention/overlay-0", "attention/overlay-00.png"),
    ("attention/overlay-1", "attention/overlay-01.png"),
    ("saliency/smoothgrad-0", "saliency/smoothgrad-00.png"),
    ("saliency/perturbation-0", "saliency/perturbation-00.png"),
)


def log_probe_images(writer, probe_dir: str | Path, step: int) -> list[str]:
    """Add the overlays found in ``probe_dir`` to ``writer`` at ``step`` -> the tags written."""
    from PIL import Image

    written = []
    for tag, name in IMAGES:
        path = Path(probe_dir) / name
        if not path.is_file():
            continue
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        writer.add_image(f"probe/{tag}", image, step, dataformats="HWC")
        written.append(tag)
    writer.flush()
    return written
