"""Two speed-ups measured against the code they replaced, in the same run.

    .venv/bin/python benchmarks/phantom_and_label_map_speed.py [--out JSON]

1. Lesion placement: ``generate_phantom((8, 64, 64), (2.5, 2, 2), 0, n_lesions=30)`` (a
   crowded field of view: most candidate batches fail) with the batched placement, and
   with the one-batch-at-a-time placement it replaced (kept as the reference in
   tests/core/test_phantom.py); the two phantoms must be identical.
2. Recognising an unmarked 300 x 512 x 512 uint8 label map: the one count that now gives
   its values, against that count plus the ``np.unique`` of every labelled voxel the
   readers made before.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' reference placement

from _common import emit  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import napari_medseg.core.phantom as phantom
    from napari_medseg.core.io._common import label_map_values
    from tests.core.test_phantom import _try_place_one_batch_at_a_time

    crowded = ((8, 64, 64), (2.5, 2.0, 2.0), 0)
    batched_s, now = timed(lambda: phantom.generate_phantom(*crowded, n_lesions=30))
    batched = phantom._try_place
    phantom._try_place = _try_place_one_batch_at_a_time
    try:
        before_s, before = timed(lambda: phantom.generate_phantom(*crowded, n_lesions=30))
    finally:
        phantom._try_place = batched
    identical = bool(np.array_equal(now.labels, before.labels)
                     and np.array_equal(now.volume.array, before.volume.array))

    labels = np.zeros((300, 512, 512), np.uint8)
    labels[:, 100:400, 100:400] = 1
    labels[50:200, 150:300, 150:300] = 3
    labels[100:120, 200:220, 200:220] = 8
    count_s, values = timed(lambda: label_map_values(labels))
    unique_s, _ = timed(lambda: np.unique(labels[labels > 0]))
    result = {
        "benchmark": "phantom_and_label_map_speed",
        "lesion_placement": {"case": "8x64x64, 2.5x2x2 mm, seed 0, 30 lesions",
                             "batched_s": round(batched_s, 2),
                             "one_batch_at_a_time_s": round(before_s, 2),
                             "speed_up": round(before_s / batched_s, 2),
                             "identical_phantoms": identical},
        "label_map_300x512x512_uint8": {"count_s": round(count_s, 3),
                                        "count_plus_unique_before_s": round(count_s + unique_s, 3),
                                        "speed_up": round((count_s + unique_s) / count_s, 2),
                                        "values": values.tolist()},
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
