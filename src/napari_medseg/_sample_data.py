"""npe2 sample data: a synthetic abdominal CT with its ground truth, aligned."""

from __future__ import annotations

from .core.phantom import LABEL_NAMES, Phantom, generate_phantom
from ._layers import labels_layer_data, points_layer_data, volume_layer_data

SAMPLE_SHAPE = (48, 192, 192)
SAMPLE_SPACING = (2.5, 1.0, 1.0)


def phantom_layer_data(phantom: Phantom, prefix: str = "phantom") -> list[tuple]:
    volume = phantom.volume
    seed = volume.metadata.get("phantom_seed")
    name = f"{prefix} CT (seed {seed})"
    centers = [lesion.center_zyx for lesion in phantom.lesions]
    diameters = [2.0 * lesion.radius_mm for lesion in phantom.lesions]
    return [
        volume_layer_data(volume, name=name),
        labels_layer_data(phantom.labels, volume, f"{name} ground truth", LABEL_NAMES),
        points_layer_data(
            centers,
            diameters,
            volume,
            f"{name} ground-truth lesions",
            # cyan: detections are lime rings with yellow text, and on the same lesion
            # the two rings and texts could not be told apart
            colour="cyan",
            features={
                "organ": [lesion.organ for lesion in phantom.lesions],
                "contrast_hu": [lesion.contrast_hu for lesion in phantom.lesions],
            },
        ),
    ]


def synthetic_ct() -> list[tuple]:
    """Synthetic abdominal CT (with ground truth): image, organ labels and lesion points."""
    return phantom_layer_data(generate_phantom(SAMPLE_SHAPE, SAMPLE_SPACING, seed=0))
