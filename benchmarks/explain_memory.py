"""Peak memory of MC-dropout uncertainty against segmentation, as the slice count grows.

    .venv/bin/python benchmarks/explain_memory.py [--slices 48 96] [--out FILE]

Each run is a fresh subprocess (the bundled segmenter, 256² slices of noise at 2 mm,
2 samples, chunk 8, one thread); it reports the growth of its peak RSS over what it had
before the job. Both stream: segmentation chunk by chunk, and uncertainty too since it
samples each chunk's decoder (before, it kept the mean probabilities of every slice on
the model grid and grew by about that array's size). Neither growth should follow the
slice count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import emit

CHILD = r"""
import json, resource, sys
import numpy as np, torch
torch.set_num_threads(1)
from napari_medseg.core.explain import segmentation_uncertainty
from napari_medseg.core.inference import segment_volume
from napari_medseg.core.models import load_model
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.volume import Volume
task, nz = sys.argv[1], int(sys.argv[2])
model, card = load_model("segmenter")
volume = Volume(np.random.default_rng(0).normal(0, 100, (nz, 256, 256)).astype(np.float32),
                (2.0, 0.78, 0.78))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if task == "segment":
    run_to_completion(segment_volume(volume, model, card, chunk=8))
else:
    run_to_completion(segmentation_uncertainty(volume, model, card, samples=2, chunk=8))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (after - before) / 1024, "input_mb": volume.array.nbytes / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[48, 96])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for task in ("segment", "uncertainty"):
        for nz in args.slices:
            done = subprocess.run([sys.executable, "-c", CHILD, task, str(nz)], check=True,
                                  capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append({"task": task, "slices": nz, **json.loads(done.stdout.splitlines()[-1])})
    emit({"benchmark": "explain_memory", "shape_yx": [256, 256], "samples": 2, "chunk": 8,
          "runs": rows}, args.out)


if __name__ == "__main__":
    main()
