"""Model architectures and the weights registry (docs/models.md). Imports neither napari nor Qt.

- :class:`SliceClassifier`: per-slice classes (no_body / normal / lesion), Grad-CAM ready.
- :class:`RecurrentSegmenter`: organ labels per voxel; 2D encoder, bidirectional ConvGRU
  over z, 2D decoder; streams a volume in chunks of slices
  (:meth:`~RecurrentSegmenter.iter_chunks`).
- :class:`LesionDetector`: 2.5D CenterNet-style centre heatmap + size map, with
  :func:`gaussian_heatmap_targets` and :func:`extract_peaks`.
- :class:`SliceGenerator`: the segmenter's network regressing missing slices (residual
  over linear interpolation), for :mod:`..generation`.
- :mod:`.registry`: ``<name>.safetensors`` + ``<name>.json`` model cards, sha256-verified.
"""

from .classifier import (
    ACTIVATIONS,
    KERNEL_SIZES,
    ConvBNAct,
    SliceClassifier,
    fold_batchnorm,
    make_activation,
)
from .detector import (
    DetectorOutput,
    LesionDetector,
    Peak,
    extract_peaks,
    gaussian_heatmap_targets,
    stack_neighbours,
)
from .generator import GENERATOR_INPUTS, SliceGenerator
from .registry import (
    ARCHITECTURES,
    BUNDLED_DIR,
    apply_normalisation,
    build_model,
    list_models,
    load_model,
    read_card,
    save_model,
    user_models_dir,
)
from .segmenter import ConvGRUCell, RecurrentSegmenter, SliceChunk

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "BUNDLED_DIR",
    "KERNEL_SIZES",
    "ConvBNAct",
    "ConvGRUCell",
    "DetectorOutput",
    "LesionDetector",
    "Peak",
    "RecurrentSegmenter",
    "SliceChunk",
    "SliceClassifier",
    "SliceGenerator",
    "GENERATOR_INPUTS",
    "apply_normalisation",
    "build_model",
    "extract_peaks",
    "fold_batchnorm",
    "gaussian_heatmap_targets",
    "list_models",
    "load_model",
    "make_activation",
    "read_card",
    "save_model",
    "stack_neighbours",
    "user_models_dir",
]
