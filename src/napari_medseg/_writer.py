"""npe2 writer: a Labels layer to NIfTI with the spacing (scale), origin and axes of its image."""

from __future__ import annotations

from typing import Any

import numpy as np

from .core.io import write_nifti


def write_labels_nifti(path: str, data: Any, meta: dict) -> list[str]:
    labels = np.asarray(data)
    if labels.ndim == 2:
        labels = labels[np.newaxis]
    scale = tuple(meta.get("scale", (1.0,) * labels.ndim))[-3:]
    translate = tuple(meta.get("translate", (0.0,) * labels.ndim))[-3:]
    if labels.max(initial=0) <= np.iinfo(np.uint8).max and labels.min(initial=0) >= 0:
        labels = labels.astype(np.uint8)
    elif labels.min(initial=0) >= 0 and labels.max(initial=0) <= np.iinfo(np.uint16).max:
        labels = labels.astype(np.uint16)
    # otherwise as they are: write_nifti keeps or narrows integers to int32 and refuses
    # values int32 cannot hold (a cast here wrapped them into other labels)
    if len(scale) < 3:
        scale = (1.0,) * (3 - len(scale)) + tuple(scale)
        translate = (0.0,) * (3 - len(translate)) + tuple(translate)
    # a layer made from a scan by this plugin carries the scan's axes: a coronal or oblique
    # series' labels then land where the scan lies (a plain napari layer is taken as axial)
    source = ((meta.get("metadata") or {}).get("medseg") or {}).get("source") or {}
    written = write_nifti(path, labels, spacing=scale, origin=translate,
                          axes=source.get("axes_lps"))
    return [str(written)]
