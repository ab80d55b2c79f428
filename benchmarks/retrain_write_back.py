"""What a Retrain round costs napari's thread when it writes its re-prediction back.

    .venv/bin/python benchmarks/retrain_write_back.py [--shape 300 512 512] [--out JSON]

``core.finetune.unannotated_updates`` finds the voxels of the unannotated slices that the
new version labels otherwise; the widget then writes them as one undo step. On a
300 × 512 × 512 label volume with 0.5 % of its voxels changed and 4 slices protected,
this times it against the whole-volume ``np.nonzero`` it replaced, in the same run (the
ratio is what to compare across machines), and checks both give the same voxels.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import emit, machine
from napari_medseg.core.finetune import unannotated_updates


def whole_volume_nonzero(current, predicted, protected):
    changed = predicted != current
    changed[protected] = False
    idx = np.nonzero(changed)
    return idx, predicted[idx]


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    current = rng.integers(0, 8, args.shape).astype(np.uint8)
    predicted = current.copy()
    flip = rng.random(args.shape) < 0.005
    predicted[flip] = (predicted[flip] + 1) % 8
    protected = np.zeros(args.shape[0], bool)
    protected[[3, 50, 51, min(200, args.shape[0] - 1)]] = True
    new = unannotated_updates(current, predicted, protected)
    old = whole_volume_nonzero(current, predicted, protected)
    assert all((a == b).all() for a, b in zip(new[0], old[0])) and (new[1] == old[1]).all()
    t_new = best_of(lambda: unannotated_updates(current, predicted, protected))
    t_old = best_of(lambda: whole_volume_nonzero(current, predicted, protected))
    emit({"benchmark": "retrain_write_back", "shape": list(args.shape),
          "voxels_changed": int(len(new[1])), "seconds": t_new,
          "seconds_whole_volume_nonzero_same_run": t_old, "speedup": t_old / t_new,
          "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
