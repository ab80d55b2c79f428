"""Does a window of slices predict what the whole-volume pass predicts?

    .venv/bin/python benchmarks/segmenter_context_window.py > benchmarks/results/segmenter_context_window.json

Fine-tuning once took "the model's prediction" on an annotated slice from a window of ±3
slices around it; the bundled segmenter's bidirectional GRU carries the whole volume, so
the window disagreed with what ``segment`` shows. For three slices of a 96 × 256 × 256
phantom (a seed no training used as a volume) and windows of ±3 … ±48 slices: the number
of voxels (model grid) whose label differs from the whole-volume pass. About 1 min.
"""

from __future__ import annotations

import json

import torch

from napari_medseg.core.inference import ModelGridSlices
from napari_medseg.core.models.registry import BUNDLED_DIR, load_model
from napari_medseg.core.phantom import generate_phantom

SLICES = (20, 48, 70)
CONTEXTS = (3, 6, 12, 24, 48)


def main() -> None:
    model, card = load_model(BUNDLED_DIR / "segmenter.json")
    phantom = generate_phantom((96, 256, 256), (2.5, 0.8, 0.8), seed=5)
    n = phantom.volume.shape[0]
    x = ModelGridSlices(phantom.volume, card)[0:n]
    rows = []
    with torch.inference_mode():
        full = model.forward_chunked(x).argmax(1)
        for z in SLICES:
            for k in CONTEXTS:
                a, b = max(0, z - k), min(n, z + k + 1)
                window = model(x[a:b]).argmax(1)[z - a]
                rows.append({"slice": z, "context": k,
                             "voxels_differing": int((window != full[z]).sum())})
    print(json.dumps({"benchmark": "segmenter_context_window", "volume_zyx": [96, 256, 256],
                      "grid_yx": list(full.shape[1:]), "rows": rows}))


if __name__ == "__main__":
    main()
